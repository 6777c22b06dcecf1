"""A small Hugging Face Hub-compatible server for tests and air-gapped sites.

Point the *unmodified* ``huggingface_hub`` client at it with ``HF_ENDPOINT``::

    python -m ltzoo.hub_server --root /srv/ltzoo-hub --port 8080
    export HF_ENDPOINT=http://127.0.0.1:8080
    ltzoo push runs/ncl my-org/ncl-resnet32-fmnistlt
    ltzoo download my-org/ncl-resnet32-fmnistlt

It implements the model-repo subset of the Hub API that ``zoo.push_to_hub`` /
``zoo.download`` / ``zoo.load`` (i.e. ``create_repo``, ``create_branch``,
``upload_folder``/``create_commit``, ``repo_info``, ``list_repo_tree``,
``list_repo_refs``, ``hf_hub_download``, ``snapshot_download``) use:

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``
* ``GET /api/models/{org}/{name}[/revision/{rev}]``: repo info (``sha``, ``siblings``)
* ``POST /api/models/{org}/{name}/preupload/{rev}``: always answers ``uploadMode: "regular"``,
  so file contents arrive base64-encoded in the commit (no LFS, no Xet)
* ``POST /api/models/{org}/{name}/commit/{rev}``: NDJSON ``header`` / ``file`` /
  ``deletedFile`` / ``deletedFolder`` (``lfsFile`` only for blobs already stored)
* ``POST /api/models/{org}/{name}/branch/{branch}``, ``DELETE`` the same to delete one
* ``GET /api/models/{org}/{name}/refs``, ``.../tree/{rev}[/{path}]``, ``.../commits/{rev}``,
  ``POST .../paths-info/{rev}``
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag``
* ``GET /api/whoami-v2``, ``POST /api/validate-yaml``

Errors are JSON ``{"error": "..."}`` with the ``X-Error-Code`` header the client maps to
its exceptions (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Storage under ``storage_dir``: content-addressed blobs (``blobs/ab/<sha256>``), one JSON
file per commit (``repos/<org>/<name>/commits/<sha1>.json``: tree path -> blob, parent,
message) and a refs file per repo. Commit ids are 40-hex sha1. Every write goes to a
temporary file in ``storage_dir`` and is moved in place with ``os.replace`` under a lock.

There is no authentication: bind it to 127.0.0.1 (the default) or put it behind a proxy
that authenticates. Every repo id, revision and file path from the network is validated
before use, and only names built from validated parts or hex digests touch the disk.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .zoo.hashing import git_blob_sha1

#: One part of a repo id: the charset of ``zoo.hub_io._REPO_ID`` (kept in sync by a test).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_NAME = re.compile(f"^{NAME_PATTERN}$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_PATH_LEN = 1024
_MAX_SEGMENT_LEN = 255
_MAX_OPERATIONS = 10_000
#: Deepest JSON nesting accepted in any request (the client sends depth 3 at most).
MAX_JSON_DEPTH = 32
#: NDJSON commit lines up to this size are parsed in memory; in longer ones, strings of
#: more than _SPILL_MIN bytes (file contents) are decoded from the spooled body in chunks.
_INLINE_LINE = 1 << 20
_SPILL_MIN = 1 << 16
_CHUNK = 1 << 22  # a multiple of 4: base64 decodes chunk by chunk
#: Windows device names: refused as a path segment (with or without an extension).
_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{kind}{n}" for kind in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)

DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_JSON_BYTES = 8 * 1024 * 1024

_INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
)


class HubError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (and ``X-Error-Code``)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


def _error_response(
    status: int, message: str, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    out = dict(headers or {})
    if code:
        out["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=out)


# --- validation ---------------------------------------------------------------------------
def _short(value: object, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def validate_repo_id(org: str, name: str) -> str:
    """``org/name`` if both parts are valid Hub names, else a 400."""
    for part in (org, name):
        if not isinstance(part, str) or not _NAME.match(part) or ".." in part or "--" in part:
            raise HubError(
                400, f"invalid repo id {_short(f'{org}/{name}')}: expected 'organisation/name'"
            )
    return f"{org}/{name}"


def validate_branch(branch: str) -> str:
    if (
        not isinstance(branch, str)
        or not _BRANCH.match(branch)
        or ".." in branch
        or branch.endswith(".lock")
        or _COMMIT_ID.match(branch)
    ):
        raise HubError(400, f"invalid branch name {_short(branch)}")
    return branch


def validate_revision(revision: str) -> str:
    """A branch name or a 40-hex commit id."""
    if isinstance(revision, str) and _COMMIT_ID.match(revision):
        return revision
    try:
        return validate_branch(revision)
    except HubError:
        raise HubError(
            400, f"invalid revision {_short(revision)}: expected a branch name or a commit id"
        ) from None


def validate_path(path: Any) -> str:
    """A relative POSIX path inside a repo: no ``..``, no absolute path, no odd characters."""
    if not isinstance(path, str) or not path:
        raise HubError(400, "invalid file path: expected a non-empty string")
    if len(path) > _MAX_PATH_LEN:
        raise HubError(400, f"invalid file path: longer than {_MAX_PATH_LEN} characters")
    if path.startswith("/") or "\\" in path or any(_is_control(c) for c in path):
        raise HubError(
            400, f"invalid file path {_short(path)}: no control or bidirectional characters"
        )
    for seg in path.split("/"):
        if seg in ("", ".", "..") or len(seg) > _MAX_SEGMENT_LEN or seg == ".git":
            raise HubError(400, f"invalid file path {_short(path)}")
        if seg != seg.strip() or seg.endswith("."):
            raise HubError(
                400,
                f"invalid file path {_short(path)}: no blank names, no leading or "
                "trailing spaces, no trailing dots",
            )
        if seg.split(".", 1)[0].rstrip().upper() in _DEVICE_NAMES:
            raise HubError(
                400, f"invalid file path {_short(path)}: {seg!r} is a Windows device name"
            )
    return path


def _is_control(char: str) -> bool:
    """Control, format (bidi overrides, zero-width) and line/paragraph separator characters."""
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")


_CARD_LISTS = ("tags", "datasets", "metrics")
_HUB_ID = re.compile(rf"^(?:{NAME_PATTERN}/)?{NAME_PATTERN}$")


def validate_card_metadata(content: str) -> dict[str, Any]:
    """Check a model card's YAML front matter as the Hub does: 400 when it is not valid.

    The metadata must be a YAML mapping; ``license``/``library_name`` are strings, list
    fields are lists of strings, ``datasets`` are Hub dataset ids and ``model-index``
    is a list of ``{name, results}``.
    """
    import yaml

    if not content.startswith("---"):
        return {"errors": [], "warnings": ["empty or missing YAML metadata in the model card"]}
    head, sep, _ = content[3:].partition("\n---")
    if not sep:
        raise HubError(400, "YAML metadata is not closed by a '---' line")
    try:
        meta = yaml.safe_load(head)
    except yaml.YAMLError as exc:
        raise HubError(400, f"invalid YAML metadata: {' '.join(str(exc).split())}") from None
    if meta is None:
        return {"errors": [], "warnings": ["empty YAML metadata in the model card"]}
    if not isinstance(meta, dict):
        raise HubError(400, "YAML metadata must be a mapping of keys to values")
    problems = [
        f"'{k}' must be a string"
        for k in ("license", "library_name", "pipeline_tag")
        if k in meta and not isinstance(meta[k], str)
    ]
    for key in _CARD_LISTS:
        value = meta.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            problems.append(f"'{key}' must be a list of strings")
    problems += [
        f"'datasets' entry {d!r} is not a Hub dataset id"
        for d in meta.get("datasets") or []
        if isinstance(d, str) and not _HUB_ID.match(d)
    ]
    index = meta.get("model-index")
    if index is not None and not (
        isinstance(index, list)
        and all(isinstance(m, dict) and isinstance(m.get("results"), list) for m in index)
    ):
        problems.append("'model-index' must be a list of {name, results: [...]}")
    if problems:
        raise HubError(400, "invalid model card metadata: " + "; ".join(problems))
    return {"errors": [], "warnings": []}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# --- storage ------------------------------------------------------------------------------
class Storage:
    """Blobs, commits and refs on disk. All writes are atomic and serialised by a lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        for sub in ("repos", "blobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # paths: only ever built from validated names or hex digests
    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise HubError(400, "path escapes the storage directory")
        return path

    def repo_dir(self, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        return self._inside(self.root / "repos" / org / name)

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise HubError(500, "corrupt storage: bad blob id")
        return self._inside(self.root / "blobs" / sha256[:2] / sha256)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=".write-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write_json(self, path: Path, obj: Any) -> None:
        self._write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HubError(500, f"corrupt storage: cannot read {path.name}") from exc

    # blobs
    def put_blob(self, data: bytes) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.is_file():
            self._write_atomic(path, data)
        return {"sha256": sha256, "size": len(data), "oid": _git_blob_id(data)}

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A folder for the blobs of one commit; whatever is left in it is deleted at exit,
        so a rejected commit leaves no blob behind."""
        with tempfile.TemporaryDirectory(dir=self.root / "tmp", prefix="stage-") as tmp:
            yield Path(tmp)

    @staticmethod
    def stage_blob(stage: Path, chunks: Iterable[bytes], size: int) -> dict[str, Any]:
        """Write ``size`` bytes from ``chunks`` into ``stage``, hashing them on the way."""
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
        fd, tmp = tempfile.mkstemp(dir=stage)
        written = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                sha256.update(chunk)
                sha1.update(chunk)
                written += len(chunk)
                f.write(chunk)
        if written != size:
            raise HubError(400, "file content size does not match its base64 length")
        return {"sha256": sha256.hexdigest(), "size": size, "oid": sha1.hexdigest(), "staged": tmp}

    def _publish_staged(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Move a staged blob into the store (call under the lock); the entry without it."""
        entry = dict(entry)
        staged = entry.pop("staged", None)
        if staged is not None:
            path = self.blob_path(entry["sha256"])
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, path)
        return entry

    def blob_entry(self, sha256: str, size: int | None) -> dict[str, Any]:
        path = self.blob_path(sha256)
        if not path.is_file():
            raise HubError(400, f"unknown LFS object {sha256}: upload it as a regular file")
        actual = path.stat().st_size
        if size is not None and size != actual:
            raise HubError(400, f"LFS object {sha256} has size {actual}, not {size}")
        return {"sha256": sha256, "size": actual, "oid": git_blob_sha1(path)}

    # repos
    def repo_exists(self, repo_id: str) -> bool:
        return (self.repo_dir(repo_id) / "repo.json").is_file()

    def require_repo(self, repo_id: str) -> Path:
        if not self.repo_exists(repo_id):
            raise HubError(404, f"Repository {repo_id} not found", code="RepoNotFound")
        return self.repo_dir(repo_id)

    def create_repo(self, repo_id: str, private: bool) -> bool:
        """Create ``repo_id`` with an initial commit; False if it already exists."""
        with self.lock:
            if self.repo_exists(repo_id):
                return False
            rdir = self.repo_dir(repo_id)
            entry = self.put_blob(_INITIAL_GITATTRIBUTES)
            commit = self._new_commit(rdir, {".gitattributes": entry}, None, "initial commit", "")
            self._write_json(rdir / "refs.json", {"main": commit})
            self._write_json(
                rdir / "repo.json", {"id": repo_id, "private": private, "createdAt": _now()}
            )
            return True

    def delete_repo(self, repo_id: str) -> None:
        with self.lock:
            rdir = self.require_repo(repo_id)
            # the marker goes first: a half-deleted repo is simply "not found"
            (rdir / "repo.json").unlink()
            trash = self.root / "tmp" / f"deleted-{uuid.uuid4().hex}"
            os.replace(rdir, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def repo_meta(self, repo_id: str) -> dict[str, Any]:
        return self._read_json(self.require_repo(repo_id) / "repo.json")

    def refs(self, repo_id: str) -> dict[str, str]:
        """Branch name -> commit id."""
        return self._read_json(self.require_repo(repo_id) / "refs.json")

    def tags(self, repo_id: str) -> dict[str, str]:
        """Tag name -> commit id (tags never move)."""
        path = self.require_repo(repo_id) / "tags.json"
        return self._read_json(path) if path.is_file() else {}

    def create_tag(self, repo_id: str, tag: str, revision: str) -> str:
        with self.lock:
            tags = self.tags(repo_id)
            if tag in tags or tag in self.refs(repo_id):
                raise HubError(409, f"Reference {tag} already exists (a tag or a branch)")
            commit_id, _ = self.resolve(repo_id, revision)
            tags[tag] = commit_id
            self._write_json(self.repo_dir(repo_id) / "tags.json", tags)
            return commit_id

    def delete_tag(self, repo_id: str, tag: str) -> None:
        with self.lock:
            tags = self.tags(repo_id)
            if tags.pop(tag, None) is None:
                raise HubError(404, f"Tag {tag} not found in {repo_id}", code="RevisionNotFound")
            self._write_json(self.repo_dir(repo_id) / "tags.json", tags)

    def commit(self, repo_id: str, commit_id: str) -> dict[str, Any]:
        path = self.require_repo(repo_id) / "commits" / f"{commit_id}.json"
        if not _COMMIT_ID.match(commit_id) or not path.is_file():
            raise HubError(
                404, f"Revision {commit_id} not found in {repo_id}", code="RevisionNotFound"
            )
        return self._read_json(path)

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, Any]]:
        """(commit id, commit) of a branch name, a tag or a commit id."""
        revision = validate_revision(revision)
        refs = self.refs(repo_id)
        tags = self.tags(repo_id)
        if revision in refs:
            commit_id = refs[revision]
        elif revision in tags:
            commit_id = tags[revision]
        elif _COMMIT_ID.match(revision):
            commit_id = revision
        else:
            raise HubError(
                404, f"Revision {revision} not found in {repo_id}", code="RevisionNotFound"
            )
        return commit_id, self.commit(repo_id, commit_id)

    def _new_commit(
        self, rdir: Path, tree: dict[str, Any], parent: str | None, title: str, description: str
    ) -> str:
        body = {
            "tree": tree,
            "parent": parent,
            "title": title,
            "message": description,
            "date": _now(),
        }
        seed = json.dumps({**body, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()
        commit_id = hashlib.sha1(seed).hexdigest()
        self._write_json(rdir / "commits" / f"{commit_id}.json", {"id": commit_id, **body})
        return commit_id

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None) -> str:
        with self.lock:
            refs = self.refs(repo_id)
            if branch in refs or branch in self.tags(repo_id):
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            commit_id, _ = self.resolve(repo_id, starting_point or "main")
            refs[branch] = commit_id
            self._write_json(self.repo_dir(repo_id) / "refs.json", refs)
            return commit_id

    def delete_branch(self, repo_id: str, branch: str) -> None:
        with self.lock:
            refs = self.refs(repo_id)
            if branch not in refs:
                raise HubError(
                    404, f"Revision {branch} not found in {repo_id}", code="RevisionNotFound"
                )
            if branch == "main":
                raise HubError(403, "cannot delete the main branch")
            del refs[branch]
            self._write_json(self.repo_dir(repo_id) / "refs.json", refs)

    def commit_operations(
        self,
        repo_id: str,
        branch: str,
        header: dict[str, Any],
        operations: list[tuple[str, str, dict[str, Any] | None]],
    ) -> str:
        """Apply (kind, path, blob entry) operations on ``branch`` as one commit; its id."""
        with self.lock:
            refs = self.refs(repo_id)
            if branch not in refs:
                raise HubError(
                    404, f"Revision {branch} not found in {repo_id}", code="RevisionNotFound"
                )
            head = refs[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(
                    412,
                    f"parentCommit {parent} is not the head of {branch} ({head}): pull and retry",
                )
            tree = dict(self.commit(repo_id, head)["tree"])
            for kind, path, entry in operations:
                if kind == "file":
                    for existing in tree:  # a file cannot also be a folder and vice versa
                        if existing.startswith(path + "/") or path.startswith(existing + "/"):
                            raise HubError(409, f"{path!r} conflicts with existing {existing!r}")
                    tree[path] = entry
                elif kind == "deletedFile":
                    if path not in tree:
                        raise HubError(
                            404,
                            f"A file with this name doesn't exist: {path}",
                            code="EntryNotFound",
                        )
                    del tree[path]
                else:  # deletedFolder
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in tree if p.startswith(prefix)]
                    if not gone:
                        raise HubError(
                            404,
                            f"A folder with this name doesn't exist: {path}",
                            code="EntryNotFound",
                        )
                    for p in gone:
                        del tree[p]
            rdir = self.repo_dir(repo_id)
            tree = {p: self._publish_staged(e) for p, e in tree.items()}
            commit_id = self._new_commit(
                rdir, tree, head, str(header["summary"]), str(header.get("description") or "")
            )
            refs[branch] = commit_id
            self._write_json(rdir / "refs.json", refs)
            return commit_id


# --- request helpers ------------------------------------------------------------------------
async def _body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body's chunks, answering 413 beyond ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HubError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HubError(413, f"request body larger than the limit of {limit} bytes")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HubError(413, f"request body larger than the limit of {limit} bytes")
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the request body into memory, answering 413 beyond ``limit`` bytes."""
    return b"".join([chunk async for chunk in _body_chunks(request, limit)])


async def _spool_body(request: Request, limit: int, sink: IO[bytes]) -> None:
    """Write the request body into ``sink``, answering 413 beyond ``limit`` bytes."""
    async for chunk in _body_chunks(request, limit):
        sink.write(chunk)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def _json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings ignored (no recursion)."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _json_loads(raw: bytes, what: str) -> Any:
    """Parse JSON from the network: malformed or nested deeper than MAX_JSON_DEPTH -> 400."""
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise HubError(400, f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise HubError(400, f"{what}: not valid JSON ({type(exc).__name__})") from None


def _parse_json_object(body: bytes) -> dict[str, Any]:
    data = _json_loads(body or b"{}", "malformed JSON body")
    if not isinstance(data, dict):
        raise HubError(400, "malformed JSON body: expected an object")
    return data


# --- streaming NDJSON commits ----------------------------------------------------------------
_STRING_SPECIAL = re.compile(rb'["\\]')


def _b64decode(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HubError(400, "file content is not valid base64") from None


def _line_spans(f: IO[bytes]) -> Iterator[tuple[int, int]]:
    """(start, end) offsets of the lines of ``f``, read in chunks (the caller may seek)."""
    start = pos = 0
    while True:
        f.seek(pos)
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        i = 0
        while (j := chunk.find(b"\n", i)) >= 0:
            yield start, pos + j
            start, i = pos + j + 1, j + 1
        pos += len(chunk)
    if start < pos:
        yield start, pos


def _long_strings(f: IO[bytes], start: int, end: int) -> list[tuple[int, int]]:
    """Offsets of the contents of the JSON strings in ``f[start:end]`` longer than _SPILL_MIN."""
    spans: list[tuple[int, int]] = []
    in_string = escaped = False
    opened = pos = start
    while pos < end:
        f.seek(pos)
        chunk = f.read(min(_CHUNK, end - pos))
        i = 0
        while i < len(chunk):
            if escaped:
                escaped, i = False, i + 1
            elif not in_string:
                j = chunk.find(b'"', i)
                if j < 0:
                    break
                in_string, opened, i = True, pos + j + 1, j + 1
            elif (m := _STRING_SPECIAL.search(chunk, i)) is None:
                break
            else:
                i = m.end()
                if m.group() == b"\\":
                    escaped = True
                    continue
                in_string = False
                if pos + m.start() - opened >= _SPILL_MIN:
                    spans.append((opened, pos + m.start()))
        pos += len(chunk)
    return spans


def _ndjson_items(f: IO[bytes]) -> Iterator[tuple[Any, dict[str, tuple[int, int]]]]:
    """Parse an NDJSON body without holding long strings in memory.

    Yields (item, spilled) per non-blank line: long strings (file contents) are replaced
    in ``item`` by placeholders, keys of ``spilled``, whose values are their offsets in ``f``.
    """
    for lineno, (start, end) in enumerate(_line_spans(f), 1):
        what = f"malformed NDJSON commit: line {lineno}"
        spans = _long_strings(f, start, end) if end - start > _INLINE_LINE else []
        if (end - start) - sum(e - s for s, e in spans) > _INLINE_LINE:
            raise HubError(400, f"{what} is too large")
        parts, spilled, pos = [], {}, start
        for k, (s, e) in enumerate(spans):
            f.seek(pos)
            parts += [f.read(s - pos), b"\\u0000%d" % k]
            spilled[f"\0{k}"], pos = (s, e), e
        f.seek(pos)
        parts.append(f.read(end - pos))
        raw = b"".join(parts)
        if raw.strip():
            yield _json_loads(raw, what), spilled


def _b64_file_chunks(f: IO[bytes], start: int, end: int) -> tuple[Iterator[bytes], int]:
    """The decoded bytes of the base64 text at ``f[start:end]``, chunk by chunk, and their size."""
    if (end - start) % 4:
        raise HubError(400, "file content is not valid base64")
    f.seek(end - 2)
    size = (end - start) // 4 * 3 - f.read(2).count(b"=")

    def chunks() -> Iterator[bytes]:
        pos = start
        while pos < end:
            f.seek(pos)
            chunk = f.read(min(_CHUNK, end - pos))
            pos += len(chunk)
            if pos < end and b"=" in chunk:
                raise HubError(400, "file content is not valid base64")
            yield _b64decode(chunk)

    return chunks(), size


def _tree_entries(
    tree: dict[str, Any], base: str, recursive: bool, commit_id: str
) -> list[dict[str, Any]]:
    """The Hub's tree listing of folder ``base`` ("" = root) of a commit's flat file tree."""
    prefix = f"{base}/" if base else ""
    files: list[dict[str, Any]] = []
    folders: dict[str, list[str]] = {}
    for path in sorted(tree):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        parts = rest.split("/")
        for i in range(1, len(parts)):
            if recursive or i == 1:
                folder = prefix + "/".join(parts[:i])
                folders.setdefault(folder, []).append(path)
        if recursive or len(parts) == 1:
            e = tree[path]
            files.append({"type": "file", "oid": e["oid"], "size": e["size"], "path": path})
    out = [
        {
            "type": "directory",
            "oid": hashlib.sha1(
                json.dumps([commit_id, *[tree[p]["oid"] for p in members]]).encode()
            ).hexdigest(),
            "size": 0,
            "path": folder,
        }
        for folder, members in sorted(folders.items())
    ]
    return out + files


def _file_entry(path: str, e: dict[str, Any]) -> dict[str, Any]:
    return {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}


# --- the app ---------------------------------------------------------------------------------
def create_app(
    storage_dir: str | Path,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> FastAPI:
    """The Hub-compatible FastAPI app serving the repos stored under ``storage_dir``."""
    store = Storage(storage_dir)
    json_limit = min(max_json_bytes, max_body_bytes)
    app = FastAPI(title="ltzoo local Hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.storage = store

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, exc: HubError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(400, "invalid request parameters")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(exc).__name__}")

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # -- accounts and helpers the client calls ------------------------------------------------
    @app.get("/api/whoami-v2")
    def whoami() -> dict[str, Any]:
        return {
            "type": "user",
            "id": "local",
            "name": "local",
            "fullname": "Local Hub user",
            "orgs": [],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "local", "role": "write"},
            },
        }

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request) -> dict[str, Any]:
        data = _parse_json_object(await _read_body(request, json_limit))
        content = data.get("content")
        if not isinstance(content, str):
            raise HubError(400, "expected 'content': the model card text")
        return validate_card_metadata(content)

    # -- repos ----------------------------------------------------------------------------------
    def _repo_from_payload(data: dict[str, Any]) -> str:
        repo_type = data.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"only model repos are supported, not {_short(repo_type)}")
        org, name = data.get("organization"), data.get("name")
        if not isinstance(org, str) or not isinstance(name, str):
            raise HubError(
                400, "expected 'organization' and 'name': repo ids are 'organisation/name'"
            )
        return validate_repo_id(org, name)

    @app.post("/api/repos/create")
    async def create_repo(request: Request) -> JSONResponse:
        data = _parse_json_object(await _read_body(request, json_limit))
        repo_id = _repo_from_payload(data)
        private = bool(data.get("private")) or data.get("visibility") == "private"
        url = f"{base_url(request)}/{repo_id}"
        created = await run_in_threadpool(store.create_repo, repo_id, private)
        if not created:
            return JSONResponse(
                {"error": "You already created this model repo", "url": url}, status_code=409
            )
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request) -> dict[str, Any]:
        repo_id = _repo_from_payload(_parse_json_object(await _read_body(request, json_limit)))
        await run_in_threadpool(store.delete_repo, repo_id)
        return {}

    def _model_info(org: str, name: str, revision: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        meta = store.repo_meta(repo_id)
        commit_id, commit = store.resolve(repo_id, revision)
        tree = commit["tree"]
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": org,
            "sha": commit_id,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "ltzoo",
            "siblings": [
                {"rfilename": p, "size": e["size"], "blobId": e["oid"]}
                for p, e in sorted(tree.items())
            ],
            "usedStorage": sum(e["size"] for e in tree.values()),
        }

    @app.get("/api/models/{org}/{name}")
    def model_info(org: str, name: str) -> dict[str, Any]:
        return _model_info(org, name, "main")

    @app.get("/api/models/{org}/{name}/revision/{revision:path}")
    def model_info_at(org: str, name: str, revision: str) -> dict[str, Any]:
        return _model_info(org, name, revision)

    # -- refs ------------------------------------------------------------------------------------
    @app.get("/api/models/{org}/{name}/refs")
    def list_refs(org: str, name: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
            for b, c in sorted(store.refs(repo_id).items())
        ]
        tags = [
            {"name": t, "ref": f"refs/tags/{t}", "targetCommit": c}
            for t, c in sorted(store.tags(repo_id).items())
        ]
        return {"branches": branches, "converts": [], "tags": tags, "pullRequests": []}

    @app.post("/api/models/{org}/{name}/tag/{revision:path}")
    async def create_tag(request: Request, org: str, name: str, revision: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        revision = validate_revision(revision)
        data = _parse_json_object(await _read_body(request, json_limit))
        tag = data.get("tag")
        if not isinstance(tag, str):
            raise HubError(400, "expected 'tag': the name of the tag to create")
        if not isinstance(data.get("message", ""), str):
            raise HubError(400, "tag message must be a string")
        await run_in_threadpool(store.create_tag, repo_id, validate_branch(tag), revision)
        return {}

    @app.delete("/api/models/{org}/{name}/tag/{tag:path}")
    def delete_tag(org: str, name: str, tag: str) -> dict[str, Any]:
        store.delete_tag(validate_repo_id(org, name), validate_branch(tag))
        return {}

    @app.post("/api/models/{org}/{name}/branch/{branch:path}")
    async def create_branch(request: Request, org: str, name: str, branch: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        branch = validate_branch(branch)
        data = _parse_json_object(await _read_body(request, json_limit))
        start = data.get("startingPoint")
        if start is not None and not isinstance(start, str):
            raise HubError(400, "startingPoint must be a string")
        await run_in_threadpool(store.create_branch, repo_id, branch, start)
        return {}

    @app.delete("/api/models/{org}/{name}/branch/{branch:path}")
    def delete_branch(org: str, name: str, branch: str) -> dict[str, Any]:
        store.delete_branch(validate_repo_id(org, name), validate_branch(branch))
        return {}

    @app.get("/api/models/{org}/{name}/commits/{revision:path}")
    def list_commits(org: str, name: str, revision: str) -> list[dict[str, Any]]:
        repo_id = validate_repo_id(org, name)
        commit_id, commit = store.resolve(repo_id, revision)
        out = []
        while True:
            out.append(
                {
                    "id": commit_id,
                    "title": commit["title"],
                    "message": commit["message"],
                    "authors": [{"user": "local"}],
                    "date": commit["date"],
                }
            )
            if not commit["parent"] or len(out) >= 10_000:
                return out
            commit_id = commit["parent"]
            commit = store.commit(repo_id, commit_id)

    # -- listing -----------------------------------------------------------------------------------
    @app.get("/api/models/{org}/{name}/tree/{rest:path}")
    def list_tree(
        org: str, name: str, rest: str, recursive: str | None = None, expand: str | None = None
    ) -> list[dict[str, Any]]:
        repo_id = validate_repo_id(org, name)
        revision, _, folder = rest.partition("/")
        folder = validate_path(folder.rstrip("/")) if folder.rstrip("/") else ""
        commit_id, commit = store.resolve(repo_id, revision)
        tree = commit["tree"]
        if folder and not any(p.startswith(folder + "/") for p in tree):
            raise HubError(
                404,
                f"Folder {folder} not found at {revision}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit_id},
            )
        return _tree_entries(tree, folder, _truthy(recursive), commit_id)

    @app.post("/api/models/{org}/{name}/paths-info/{revision:path}")
    async def paths_info(
        request: Request, org: str, name: str, revision: str
    ) -> list[dict[str, Any]]:
        repo_id = validate_repo_id(org, name)
        body = await _read_body(request, json_limit)
        try:
            form = parse_qs(body.decode(), strict_parsing=False, max_num_fields=10_000)
        except (UnicodeDecodeError, ValueError):
            raise HubError(400, "malformed form body") from None
        paths = [validate_path(p.rstrip("/")) for p in form.get("paths", [])]
        commit_id, commit = store.resolve(repo_id, revision)
        tree, out = commit["tree"], []
        for p in paths:
            if p in tree:
                out.append(_file_entry(p, tree[p]))
            elif any(q.startswith(p + "/") for q in tree):
                out.extend(
                    e
                    for e in _tree_entries(tree, p.rpartition("/")[0], False, commit_id)
                    if e["path"] == p
                )
        return out

    # -- uploads ----------------------------------------------------------------------------------
    @app.post("/api/models/{org}/{name}/preupload/{revision:path}")
    async def preupload(request: Request, org: str, name: str, revision: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        data = _parse_json_object(await _read_body(request, json_limit))
        files = data.get("files")
        if not isinstance(files, list) or len(files) > _MAX_OPERATIONS:
            raise HubError(400, "expected 'files': a list of {path, sample, size}")
        paths = []
        for f in files:
            if not isinstance(f, dict):
                raise HubError(400, "each file must be an object {path, sample, size}")
            paths.append(validate_path(f.get("path")))
        commit_id, commit = await run_in_threadpool(store.resolve, repo_id, revision)
        tree = commit["tree"]
        return {
            "files": [
                {
                    "path": p,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": tree[p]["oid"] if p in tree else None,
                }
                for p in paths
            ],
            "commitOid": commit_id,
        }

    def _parse_commit(
        spooled: Any, stage: Path
    ) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
        header: dict[str, Any] | None = None
        ops: list[tuple[str, str, Any]] = []
        seen: set[str] = set()
        for lineno, (item, spilled) in enumerate(_ndjson_items(spooled), 1):
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise HubError(
                    400, f"malformed NDJSON commit: line {lineno} needs 'key' and 'value'"
                )
            key, value = item.get("key"), item["value"]
            if key == "header":
                if header is not None or ops:
                    raise HubError(400, "malformed NDJSON commit: the header must come first, once")
                summary = value.get("summary")
                if not isinstance(summary, str) or not summary.strip():
                    raise HubError(400, "commit header needs a non-empty 'summary'")
                parent = value.get("parentCommit")
                if parent is not None and (
                    not isinstance(parent, str) or not _COMMIT_ID.match(parent)
                ):
                    raise HubError(400, "parentCommit must be a 40-hex commit id")
                if not isinstance(value.get("description", ""), str):
                    raise HubError(400, "commit description must be a string")
                header = value
                continue
            if header is None:
                raise HubError(400, "malformed NDJSON commit: the header must come first")
            if len(ops) >= _MAX_OPERATIONS:
                raise HubError(400, f"too many operations in one commit (max {_MAX_OPERATIONS})")
            raw_path = value.get("path")
            if key == "deletedFolder" and isinstance(raw_path, str):
                raw_path = raw_path.rstrip("/")
            path = validate_path(raw_path)
            if path in seen:
                raise HubError(400, f"{path!r} appears twice in one commit")
            seen.add(path)
            if key == "file":
                content = value.get("content")
                if value.get("encoding") != "base64" or not isinstance(content, str):
                    raise HubError(
                        400, f"{path!r}: expected base64 'content' with encoding 'base64'"
                    )
                if content in spilled:
                    chunks, size = _b64_file_chunks(spooled, *spilled[content])
                else:
                    data = _b64decode(content.encode("ascii", "replace"))
                    chunks, size = iter([data]), len(data)
                ops.append(("file", path, store.stage_blob(stage, chunks, size)))
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if (
                    value.get("algo", "sha256") != "sha256"
                    or not isinstance(oid, str)
                    or not _SHA256.match(oid)
                ):
                    raise HubError(400, f"{path!r}: lfsFile needs a sha256 'oid'")
                if size is not None and (not isinstance(size, int) or size < 0):
                    raise HubError(400, f"{path!r}: lfsFile 'size' must be a non-negative integer")
                ops.append(("file", path, store.blob_entry(oid, size)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path, None))
            else:
                raise HubError(400, f"unsupported commit operation {_short(key)}")
        if header is None:
            raise HubError(400, "malformed NDJSON commit: no header")
        return header, ops

    @app.post("/api/models/{org}/{name}/commit/{revision:path}")
    async def commit(request: Request, org: str, name: str, revision: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        branch = validate_revision(revision)
        if _truthy(request.query_params.get("create_pr")):
            raise HubError(400, "pull requests are not supported by this server")
        if _COMMIT_ID.match(branch):
            raise HubError(400, "commits go to a branch, not to a commit id")
        if branch in store.tags(repo_id):
            raise HubError(400, f"{branch} is a tag: tags are immutable, commit to a branch")
        if branch not in store.refs(repo_id):
            raise HubError(
                404, f"Revision {branch} not found in {repo_id}", code="RevisionNotFound"
            )
        with tempfile.SpooledTemporaryFile(
            max_size=8 * 1024 * 1024, dir=str(store.root / "tmp")
        ) as spooled:
            await _spool_body(request, max_body_bytes, spooled)
            with store.staging() as stage:
                header, ops = await run_in_threadpool(_parse_commit, spooled, stage)
                commit_id = await run_in_threadpool(
                    store.commit_operations, repo_id, branch, header, ops
                )
        return {
            "success": True,
            "commitOid": commit_id,
            "commitUrl": f"{base_url(request)}/{repo_id}/commit/{commit_id}",
            "pullRequestUrl": None,
        }

    # -- downloads ----------------------------------------------------------------------------------
    @app.api_route("/{org}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
    def resolve_file(org: str, name: str, rest: str) -> Response:
        repo_id = validate_repo_id(org, name)
        revision, _, path = rest.partition("/")
        path = validate_path(path)
        commit_id, commit = store.resolve(repo_id, revision)
        entry = commit["tree"].get(path)
        if entry is None:
            raise HubError(
                404,
                f"Entry {path} not found at {revision}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit_id},
            )
        blob = store.blob_path(entry["sha256"])
        if not blob.is_file():
            raise HubError(500, "corrupt storage: blob missing")
        return FileResponse(
            blob,
            media_type="application/octet-stream",
            headers={
                "X-Repo-Commit": commit_id,
                "ETag": f'"{entry["oid"]}"',
                "Cache-Control": "no-cache"
                if not _COMMIT_ID.match(revision)
                else "max-age=31536000",
            },
        )

    return app


# --- running it ----------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for callers that must know it before starting)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class HubServer:
    """Run :func:`create_app` with uvicorn in a background thread.

    >>> with HubServer(tmp_dir) as hub:          # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url  # set before importing huggingface_hub
    """

    def __init__(
        self,
        storage_dir: str | Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.storage_dir = Path(storage_dir)
        self.host, self.port = host, port or 0
        self.max_body_bytes = max_body_bytes
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubServer is not running")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> HubServer:
        import uvicorn

        if self._server is not None:
            return self
        app = create_app(self.storage_dir, max_body_bytes=self.max_body_bytes)
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="ltzoo-hub-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"local Hub server failed to start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = int(server.servers[0].sockets[0].getsockname()[1])
        self._server, self._thread = server, thread
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server, self._thread = None, None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ltzoo.hub_server --root DIR [--host H] [--port N]``: serve until Ctrl-C."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m ltzoo.hub_server",
        description="Serve a local Hugging Face Hub-compatible model store (point HF_ENDPOINT at it).",
    )
    parser.add_argument(
        "--root", required=True, type=Path, help="storage directory (created if missing)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--max-body-mib",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES // (1024 * 1024),
        help="largest accepted commit body, in MiB",
    )
    args = parser.parse_args(argv)
    app = create_app(args.root, max_body_bytes=args.max_body_mib * 1024 * 1024)
    print(f"ltzoo local Hub: serving {args.root.resolve()} at http://{args.host}:{args.port}")
    print(f"  export HF_ENDPOINT=http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
