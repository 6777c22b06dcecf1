"""Content-addressed storage of the local Hub: blobs, one JSON file per commit, refs and tags;
every write is atomic (temporary file + ``os.replace`` under a lock)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..zoo.hashing import git_blob_sha1
from .validation import COMMIT_ID, SHA256, HubError, validate_revision

_INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parent_folders(path: str) -> Iterator[str]:
    """The folders holding ``path``, outermost first: ``a/b/c`` -> ``a``, ``a/b``."""
    end = path.find("/")
    while end >= 0:
        yield path[:end]
        end = path.find("/", end + 1)


class _Tree:
    """A commit's file tree under edit: the files, and the entries of every folder.

    Each operation costs the depth of its path (a folder deletion, the files it removes),
    not the size of the tree: checking each new file against every file of the tree made
    a 10,000-file commit take 15 s, all of it holding the storage lock.
    """

    def __init__(self, files: dict[str, Any]) -> None:
        self.files = dict(files)
        #: folder ("" for the root) -> the paths of its files and folders; never empty
        self.children: dict[str, set[str]] = {}
        for path in self.files:
            self._link(path)

    def _link(self, path: str) -> None:
        """Enter ``path`` in its folder, and each folder this creates in its own parent."""
        while path:
            parent = path.rpartition("/")[0]
            entries = self.children.setdefault(parent, set())
            entries.add(path)
            if len(entries) > 1:  # the folder existed: it is entered already
                return
            path = parent

    def _unlink(self, path: str) -> None:
        """Remove ``path`` from its folder, and each folder this empties from its parent."""
        while path:
            parent = path.rpartition("/")[0]
            entries = self.children[parent]
            entries.discard(path)
            if entries or not parent:
                return
            del self.children[parent]
            path = parent

    def add(self, path: str, entry: dict[str, Any] | None) -> None:
        """Add or replace the file ``path`` (``entry``: its blob): a 409 when a file would
        also be a folder."""
        clash = next((f for f in parent_folders(path) if f in self.files), None)
        if clash is None and path in self.children:
            clash = path
            while clash in self.children:  # a file under the folder ``path``, for the message
                clash = min(self.children[clash])
        if clash is not None:
            raise HubError(409, f"{path!r} conflicts with existing {clash!r}")
        if path not in self.files:
            self._link(path)
        self.files[path] = entry

    def delete_file(self, path: str) -> None:
        """Delete the file ``path``: a 404 when there is none."""
        if path not in self.files:
            raise HubError(
                404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
            )
        del self.files[path]
        self._unlink(path)

    def delete_folder(self, folder: str) -> None:
        """Delete every file under ``folder``: a 404 when there is none."""
        if folder not in self.children:
            raise HubError(
                404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound"
            )
        pending = [folder]
        while pending:
            path = pending.pop()
            if path in self.children:
                pending.extend(self.children.pop(path))
            else:
                del self.files[path]
        self._unlink(folder)


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
        if not SHA256.fullmatch(sha256):
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
        if not COMMIT_ID.fullmatch(commit_id) or not path.is_file():
            raise HubError(
                404, f"Revision {commit_id} not found in {repo_id}", code="RevisionNotFound"
            )
        return self._read_json(path)

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, Any]]:
        """(commit id, commit) of a branch name, a tag or a commit id."""
        refs = self.refs(repo_id)  # first: an unknown repo is RepoNotFound, as on the Hub
        tags = self.tags(repo_id)
        revision = validate_revision(revision)
        if revision in refs:
            commit_id = refs[revision]
        elif revision in tags:
            commit_id = tags[revision]
        elif COMMIT_ID.fullmatch(revision):
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
            tree = _Tree(self.commit(repo_id, head)["tree"])
            for kind, path, entry in operations:
                if kind == "file":
                    tree.add(path, entry)
                elif kind == "deletedFile":
                    tree.delete_file(path)
                else:  # deletedFolder
                    tree.delete_folder(path.rstrip("/"))
            rdir = self.repo_dir(repo_id)
            files = {p: self._publish_staged(e) for p, e in tree.files.items()}
            commit_id = self._new_commit(
                rdir, files, head, str(header["summary"]), str(header.get("description") or "")
            )
            refs[branch] = commit_id
            self._write_json(rdir / "refs.json", refs)
            return commit_id


# --- request helpers ------------------------------------------------------------------------
