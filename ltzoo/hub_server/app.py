"""The local Hub's routes: a FastAPI app over :class:`~.storage.Storage`."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from .bodies import (
    b64_file_chunks,
    b64decode,
    ndjson_items,
    parse_json_object,
    read_body,
    spilled_content,
    spool_body,
)
from .storage import Storage, parent_folders
from .validation import (
    COMMIT_ID,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_BYTES,
    MAX_COMMIT_SUMMARY,
    MAX_OPERATIONS,
    MAX_PATHS_INFO,
    MAX_SMALL_BODY_BYTES,
    SHA256,
    HubError,
    error_response,
    short,
    validate_branch,
    validate_card_metadata,
    validate_path,
    validate_repo_id,
    validate_revision,
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


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
        _folder_entry(folder, members, tree, commit_id)
        for folder, members in sorted(folders.items())
    ]
    return out + files


def _file_entry(path: str, e: dict[str, Any]) -> dict[str, Any]:
    return {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}


def _folder_entry(
    folder: str, members: list[str], tree: dict[str, Any], commit_id: str
) -> dict[str, Any]:
    """The Hub's entry of a folder; ``members``: every file under it, in path order."""
    oid = hashlib.sha1(json.dumps([commit_id, *[tree[p]["oid"] for p in members]]).encode())
    return {"type": "directory", "oid": oid.hexdigest(), "size": 0, "path": folder}


def _folder_members(tree: dict[str, Any], folders: set[str]) -> dict[str, list[str]]:
    """Every file under each of ``folders`` that exists, in path order.

    One pass over the tree, whatever the number of folders: a scan of the tree per
    requested path took 14 s for 9,999 paths on a repo of 10,000 files.
    """
    members: dict[str, list[str]] = {}
    for path in sorted(tree) if folders else ():
        for folder in parent_folders(path):
            if folder in folders:
                members.setdefault(folder, []).append(path)
    return members


def paths_info_entries(
    tree: dict[str, Any], paths: list[str], commit_id: str
) -> list[dict[str, Any]]:
    """The paths-info answer: an entry per path of a file or folder, in request order;
    paths that exist in neither form are left out, as the Hub does."""
    members = _folder_members(tree, {p for p in paths if p not in tree})
    return [
        _file_entry(p, tree[p]) if p in tree else _folder_entry(p, members[p], tree, commit_id)
        for p in paths
        if p in tree or p in members
    ]


@dataclass(frozen=True)
class Limits:
    """Largest accepted request bodies, in bytes: a commit (``body``), a preupload
    (``json``) and the other JSON or form requests (``small``)."""

    body: int
    json: int
    small: int


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object body (at most ``limit`` bytes), parsed off the event loop."""
    return await run_in_threadpool(parse_json_object, await read_body(request, limit))


def _revision_and_path(request: Request, rest: str, prefix_segments: int) -> tuple[str, str]:
    """``(revision, path)`` of a ``.../{revision}/{path}`` URL after ``prefix_segments`` segments.

    Clients send the revision as one percent-encoded segment (``refs%2Fpr%2F1``), so it is
    split off the raw path: the decoded ``rest`` would cut it at its first ``/`` and look up
    ``refs`` instead. Falls back to that split when the raw path does not line up.
    """
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        parts = raw.decode("latin-1").split("/")[prefix_segments + 1 :]
        if parts and unquote("/".join(parts)) == rest:
            return unquote(parts[0]), unquote("/".join(parts[1:]))
    revision, _, path = rest.partition("/")
    return revision, path


def _commit_header(value: dict[str, Any]) -> dict[str, Any]:
    """The ``value`` of an NDJSON commit's header line, checked: a 400 unless valid."""
    summary = value.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise HubError(400, "commit header needs a non-empty 'summary'")
    if len(summary) > MAX_COMMIT_SUMMARY:
        raise HubError(
            400, f"commit summary too long: {len(summary)} characters, at most {MAX_COMMIT_SUMMARY}"
        )
    parent = value.get("parentCommit")
    if parent is not None and (not isinstance(parent, str) or not COMMIT_ID.fullmatch(parent)):
        raise HubError(400, "parentCommit must be a 40-hex commit id")
    if not isinstance(value.get("description", ""), str):
        raise HubError(400, "commit description must be a string")
    return value


def create_app(
    storage_dir: str | Path,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> FastAPI:
    """The Hub-compatible FastAPI app serving the repos stored under ``storage_dir``."""
    store = Storage(storage_dir)
    json_limit = min(max_json_bytes, max_body_bytes)
    limits = Limits(
        body=max_body_bytes, json=json_limit, small=min(MAX_SMALL_BODY_BYTES, json_limit)
    )
    app = FastAPI(title="ltzoo local Hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.storage = store

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, exc: HubError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid request parameters")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}")

    for add_routes in (
        _account_routes,
        _repo_routes,
        _ref_routes,
        _listing_routes,
        _upload_routes,
        _download_routes,
    ):
        add_routes(app, store, limits)
    _match_whole_paths(app)
    return app


def _match_whole_paths(app: FastAPI) -> None:
    """Make every route match the whole request path, a final newline included.

    Starlette anchors route patterns with ``$``, which also matches before a final newline,
    and its ``{x:path}`` (``.*``) stops at a newline: ``POST .../branch/dev%0A`` created the
    branch ``dev``, and ``.../resolve/main%0A/f`` matched no route (a 404 without the Hub's
    error code). With ``\\Z`` and DOTALL the parameters keep the newline for the name
    validators to refuse.
    """
    for route in app.router.routes:
        if isinstance(route, Route) and route.path_regex.pattern.endswith("$"):
            route.path_regex = re.compile(route.path_regex.pattern[:-1] + r"\Z", re.DOTALL)


def _account_routes(app: FastAPI, store: Storage, limits: Limits) -> None:
    """Routes: whoami and card validation, which the client calls before pushing."""

    @app.get("/api/whoami-v2")
    async def whoami() -> dict[str, Any]:
        # async: nothing blocks here, so it is answered even while the thread pool is busy
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
        data = await _read_json(request, limits.small)
        content = data.get("content")
        if not isinstance(content, str):
            raise HubError(400, "expected 'content': the model card text")
        return await run_in_threadpool(validate_card_metadata, content)


def _repo_routes(app: FastAPI, store: Storage, limits: Limits) -> None:
    """Routes: create / delete a repo and its info (``sha``, ``siblings``)."""

    def _repo_from_payload(data: dict[str, Any]) -> str:
        repo_type = data.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"only model repos are supported, not {short(repo_type)}")
        org, name = data.get("organization"), data.get("name")
        if not isinstance(org, str) or not isinstance(name, str):
            raise HubError(
                400, "expected 'organization' and 'name': repo ids are 'organisation/name'"
            )
        return validate_repo_id(org, name)

    @app.post("/api/repos/create")
    async def create_repo(request: Request) -> JSONResponse:
        data = await _read_json(request, limits.small)
        repo_id = _repo_from_payload(data)
        private = bool(data.get("private")) or data.get("visibility") == "private"
        url = f"{_base_url(request)}/{repo_id}"
        created = await run_in_threadpool(store.create_repo, repo_id, private)
        if not created:
            return JSONResponse(
                {"error": "You already created this model repo", "url": url}, status_code=409
            )
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request) -> dict[str, Any]:
        repo_id = _repo_from_payload(await _read_json(request, limits.small))
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


def _ref_routes(app: FastAPI, store: Storage, limits: Limits) -> None:
    """Routes: branches, tags and the commit log."""

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
        data = await _read_json(request, limits.small)
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
        data = await _read_json(request, limits.small)
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


def _listing_routes(app: FastAPI, store: Storage, limits: Limits) -> None:
    """Routes: the file tree and paths-info of a revision."""

    @app.get("/api/models/{org}/{name}/tree/{rest:path}")
    def list_tree(
        request: Request,
        org: str,
        name: str,
        rest: str,
        recursive: str | None = None,
        expand: str | None = None,
    ) -> list[dict[str, Any]]:
        repo_id = validate_repo_id(org, name)
        revision, folder = _revision_and_path(request, rest, 5)  # /api/models/org/name/tree
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

    def _paths_info(repo_id: str, revision: str, body: bytes) -> list[dict[str, Any]]:
        try:
            form = parse_qs(body.decode())
        except (UnicodeDecodeError, ValueError):
            raise HubError(400, "malformed form body") from None
        paths = form.get("paths", [])
        if len(paths) > MAX_PATHS_INFO:
            raise HubError(
                413,
                f"too many paths in one paths-info request: {len(paths)}, at most {MAX_PATHS_INFO}",
            )
        paths = [validate_path(p.rstrip("/")) for p in paths]
        commit_id, commit = store.resolve(repo_id, revision)
        return paths_info_entries(commit["tree"], paths, commit_id)

    @app.post("/api/models/{org}/{name}/paths-info/{revision:path}")
    async def paths_info(
        request: Request, org: str, name: str, revision: str
    ) -> list[dict[str, Any]]:
        repo_id = validate_repo_id(org, name)
        body = await read_body(request, limits.small)
        return await run_in_threadpool(_paths_info, repo_id, revision, body)


def _upload_routes(app: FastAPI, store: Storage, limits: Limits) -> None:
    """Routes: preupload and the NDJSON commit."""

    def _upload_modes(repo_id: str, revision: str, data: dict[str, Any]) -> dict[str, Any]:
        files = data.get("files")
        if not isinstance(files, list) or len(files) > MAX_OPERATIONS:
            raise HubError(400, "expected 'files': a list of {path, sample, size}")
        paths = []
        for f in files:
            if not isinstance(f, dict):
                raise HubError(400, "each file must be an object {path, sample, size}")
            paths.append(validate_path(f.get("path")))
        commit_id, commit = store.resolve(repo_id, revision)
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

    @app.post("/api/models/{org}/{name}/preupload/{revision:path}")
    async def preupload(request: Request, org: str, name: str, revision: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        data = await _read_json(request, limits.json)
        return await run_in_threadpool(_upload_modes, repo_id, revision, data)

    def _parse_commit(
        spooled: Any, stage: Path
    ) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
        header: dict[str, Any] | None = None
        ops: list[tuple[str, str, Any]] = []
        seen: set[str] = set()
        for lineno, (item, spilled) in enumerate(ndjson_items(spooled), 1):
            what = f"malformed NDJSON commit: line {lineno}"
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise HubError(400, f"{what} needs 'key' and 'value'")
            key, value = item.get("key"), item["value"]
            content_span = spilled_content(
                spilled, value.get("content") if key == "file" else None, what
            )
            if key == "header":
                if header is not None or ops:
                    raise HubError(400, "malformed NDJSON commit: the header must come first, once")
                header = _commit_header(value)
                continue
            if header is None:
                raise HubError(400, "malformed NDJSON commit: the header must come first")
            if len(ops) >= MAX_OPERATIONS:
                raise HubError(400, f"too many operations in one commit (max {MAX_OPERATIONS})")
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
                if content_span is not None:
                    chunks, size = b64_file_chunks(spooled, *content_span)
                else:
                    data = b64decode(content.encode("ascii", "replace"))
                    chunks, size = iter([data]), len(data)
                ops.append(("file", path, store.stage_blob(stage, chunks, size)))
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if (
                    value.get("algo", "sha256") != "sha256"
                    or not isinstance(oid, str)
                    or not SHA256.fullmatch(oid)
                ):
                    raise HubError(400, f"{path!r}: lfsFile needs a sha256 'oid'")
                if size is not None and (not isinstance(size, int) or size < 0):
                    raise HubError(400, f"{path!r}: lfsFile 'size' must be a non-negative integer")
                ops.append(("file", path, store.blob_entry(oid, size)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path, None))
            else:
                raise HubError(400, f"unsupported commit operation {short(key)}")
        if header is None:
            raise HubError(400, "malformed NDJSON commit: no header")
        return header, ops

    def _store_commit(repo_id: str, branch: str, spooled: Any) -> str:
        """Stage, check and store the spooled commit; its id. In one worker thread: removing
        the staging folder can mean thousands of files, not to be deleted on the event loop."""
        with store.staging() as stage:
            header, ops = _parse_commit(spooled, stage)
            return store.commit_operations(repo_id, branch, header, ops)

    def _require_branch(repo_id: str, branch: str) -> None:
        """A 4xx unless ``branch`` is a branch of ``repo_id`` (before its body is read)."""
        if branch in store.tags(repo_id):
            raise HubError(400, f"{branch} is a tag: tags are immutable, commit to a branch")
        if branch not in store.refs(repo_id):
            raise HubError(
                404, f"Revision {branch} not found in {repo_id}", code="RevisionNotFound"
            )

    @app.post("/api/models/{org}/{name}/commit/{revision:path}")
    async def commit(request: Request, org: str, name: str, revision: str) -> dict[str, Any]:
        repo_id = validate_repo_id(org, name)
        branch = validate_revision(revision)
        if _truthy(request.query_params.get("create_pr")):
            raise HubError(400, "pull requests are not supported by this server")
        if COMMIT_ID.fullmatch(branch):
            raise HubError(400, "commits go to a branch, not to a commit id")
        await run_in_threadpool(_require_branch, repo_id, branch)
        with tempfile.SpooledTemporaryFile(
            max_size=8 * 1024 * 1024, dir=str(store.root / "tmp")
        ) as spooled:
            await spool_body(request, limits.body, spooled)
            commit_id = await run_in_threadpool(_store_commit, repo_id, branch, spooled)
        return {
            "success": True,
            "commitOid": commit_id,
            "commitUrl": f"{_base_url(request)}/{repo_id}/commit/{commit_id}",
            "pullRequestUrl": None,
        }


def _download_routes(app: FastAPI, store: Storage, limits: Limits) -> None:
    """Routes: file downloads (``resolve``) with ``X-Repo-Commit`` and ``ETag``."""

    @app.api_route("/{org}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
    def resolve_file(request: Request, org: str, name: str, rest: str) -> Response:
        repo_id = validate_repo_id(org, name)
        revision, path = _revision_and_path(request, rest, 3)  # /org/name/resolve
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
                if not COMMIT_ID.fullmatch(revision)
                else "max-age=31536000",
            },
        )
