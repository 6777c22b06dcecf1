"""What the local Hub accepts from the network: repo ids, revisions, paths, card metadata,
and the limits; every name is checked here before it reaches storage."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from fastapi.responses import JSONResponse

#: One part of a repo id: the charset of ``zoo.hub_io.REPO_ID`` (kept in sync by a test).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
# Anchored with \A and \Z, never ^ and $ ("$" also matches before a final newline), and
# used with fullmatch: "org/name\n" or a tag "v1\n" must not pass.
_NAME = re.compile(rf"\A{NAME_PATTERN}\Z")
_BRANCH = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
COMMIT_ID = re.compile(r"\A[0-9a-f]{40}\Z")
SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
_MAX_PATH_LEN = 1024
_MAX_SEGMENT_LEN = 255
MAX_OPERATIONS = 10_000
#: Deepest JSON nesting accepted in any request (the client sends depth 3 at most).
MAX_JSON_DEPTH = 32
#: Windows device names: refused as a path segment (with or without an extension).
_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{kind}{n}" for kind in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)

DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
#: preupload: up to MAX_OPERATIONS files of {path, 512-byte sample, size} (the client sends 256)
DEFAULT_MAX_JSON_BYTES = 8 * 1024 * 1024
#: repos/create|delete, tag, branch, validate-yaml, paths-info: a few names, a model card or
#: MAX_PATHS_INFO paths; parsing more (8 MB of JSON, 3 MB of YAML) took seconds of CPU.
MAX_SMALL_BODY_BYTES = 1024 * 1024
#: Paths in one paths-info request: the Hub's own limit (it answers 413 beyond it; the
#: client sends batches of 500).
MAX_PATHS_INFO = 1_000
#: Longest commit summary (title), in characters.
MAX_COMMIT_SUMMARY = 10_000


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


def error_response(
    status: int, message: str, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    out = dict(headers or {})
    if code:
        out["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=out)


# --- validation ---------------------------------------------------------------------------
def short(value: object, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def validate_repo_id(org: str, name: str) -> str:
    """``org/name`` if both parts are valid Hub names, else a 400."""
    for part in (org, name):
        if not isinstance(part, str) or not _NAME.fullmatch(part) or ".." in part or "--" in part:
            raise HubError(
                400, f"invalid repo id {short(f'{org}/{name}')}: expected 'organisation/name'"
            )
    return f"{org}/{name}"


def validate_branch(branch: str) -> str:
    if (
        not isinstance(branch, str)
        or not _BRANCH.fullmatch(branch)
        or ".." in branch
        or branch.endswith(".lock")
        or COMMIT_ID.fullmatch(branch)
    ):
        raise HubError(400, f"invalid branch name {short(branch)}")
    return branch


def validate_revision(revision: str) -> str:
    """A branch or tag name or a 40-hex commit id to look up.

    Anything else cannot exist, so it is answered as the Hub answers an unknown revision:
    404 with ``X-Error-Code: RevisionNotFound`` (``huggingface_hub`` then raises
    ``RevisionNotFoundError``; a bare 400 makes it blame the user's connection).
    """
    if isinstance(revision, str) and COMMIT_ID.fullmatch(revision):
        return revision
    try:
        return validate_branch(revision)
    except HubError:
        raise HubError(
            404,
            f"Invalid rev id: {short(revision)}: expected a branch, a tag or a commit id",
            code="RevisionNotFound",
        ) from None


def validate_path(path: Any) -> str:
    """A relative POSIX path inside a repo: no ``..``, no absolute path, no odd characters."""
    if not isinstance(path, str) or not path:
        raise HubError(400, "invalid file path: expected a non-empty string")
    if len(path) > _MAX_PATH_LEN:
        raise HubError(400, f"invalid file path: longer than {_MAX_PATH_LEN} characters")
    if path.startswith("/") or "\\" in path or any(_is_control(c) for c in path):
        raise HubError(
            400, f"invalid file path {short(path)}: no control or bidirectional characters"
        )
    for seg in path.split("/"):
        if seg in ("", ".", "..") or len(seg) > _MAX_SEGMENT_LEN or seg == ".git":
            raise HubError(400, f"invalid file path {short(path)}")
        if seg != seg.strip() or seg.endswith("."):
            raise HubError(
                400,
                f"invalid file path {short(path)}: no blank names, no leading or "
                "trailing spaces, no trailing dots",
            )
        if seg.split(".", 1)[0].rstrip().upper() in _DEVICE_NAMES:
            raise HubError(
                400, f"invalid file path {short(path)}: {seg!r} is a Windows device name"
            )
    return path


def _is_control(char: str) -> bool:
    """Control, format (bidi overrides, zero-width) and line/paragraph separator characters."""
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")


_CARD_LISTS = ("tags", "datasets", "metrics")
_HUB_ID = re.compile(rf"\A(?:{NAME_PATTERN}/)?{NAME_PATTERN}\Z")


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
    except RecursionError:  # e.g. a flow sequence [[[...]]] nested thousands deep
        raise HubError(400, "invalid YAML metadata: nested too deeply") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # Value: `date: 2024-13-45`
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
    datasets = meta.get("datasets")
    problems += [
        f"'datasets' entry {d!r} is not a Hub dataset id"
        for d in (datasets if isinstance(datasets, list) else [])  # not `datasets: 5`
        if isinstance(d, str) and not _HUB_ID.fullmatch(d)
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
