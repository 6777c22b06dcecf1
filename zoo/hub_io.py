"""Saving, loading and publishing ensembles: local directories and the Hugging Face Hub.

Weights are safetensors only; nothing downloaded is ever unpickled. Loading is strict:
a missing ``config.json``, a missing tensor or an unexpected one is an error.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypedDict

import torch

from .bundle import bundle_root, is_bundled, load_bundled, read_manifest
from .ensemble import CONFIG_NAME, WEIGHTS_NAME, Ensemble, record_source
from .errors import IntegrityError, ModelNotAvailableError
from .files import local_model_dir
from .hashing import file_sha256, git_blob_sha1
from .registry import get_entry, is_registered

REPO_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")


logger = logging.getLogger("zoo")

_HEX40 = re.compile(r"\A[0-9a-f]{40}\Z")
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


class _HubSettings(TypedDict):
    endpoint: str | None
    cache_dir: str | None


def _hub_settings() -> _HubSettings:
    """Endpoint and cache read from the environment at call time (huggingface_hub itself
    freezes them at import), so a process can switch Hubs, e.g. the demo's local one."""
    cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "cache_dir": cache}


def split_revision(name: str) -> tuple[str, str | None]:
    """``"org/repo@rev"`` -> ``("org/repo", "rev")``."""
    if "@" in name:
        repo, rev = name.split("@", 1)
        return repo, rev or None
    return name, None


def _not_available(repo_id: str, revision: str | None, why: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"cannot load {repo_id!r} at revision {revision or 'main'}: {why}.\n"
        "Train it with `ltzoo train RECIPE` and publish it with "
        f"`ltzoo push RUN_DIR {repo_id}` (or pass RUN_DIR itself instead of the name), "
        "or point HF_ENDPOINT at a Hub that hosts it."
    )


def _snapshot(repo_id: str, revision: str | None) -> Path:
    """``snapshot_download`` of the files an ensemble needs, errors mapped to ours."""
    # Imported here, not at module level: huggingface_hub reads HF_ENDPOINT / HF_HOME when
    # first imported, so `import zoo` must not freeze them (the demo points them at a local Hub).
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"],
            **_hub_settings(),
        )
    except LocalEntryNotFoundError as exc:
        raise _not_available(
            repo_id, revision, "not in the local cache and the Hub is unreachable or offline"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise _not_available(
            repo_id, revision, f"not found on the Hub ({type(exc).__name__})"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise _not_available(repo_id, revision, f"download failed ({exc})") from exc
    return Path(path)


def corrupt_cached_files(snapshot: Path) -> list[Path]:
    """Files of a cached snapshot whose content does not match the Hub's ETag.

    The cache names every blob by its ETag: the sha256 (LFS oid) of LFS files, the git
    blob sha1 of regular ones. Copies without that naming (no symlinks) are not checked.
    """
    bad = []
    for path in sorted(snapshot.iterdir()):
        if not path.is_file():
            continue
        blob = path.resolve()
        if _HEX64.fullmatch(blob.name):
            ok = file_sha256(blob) == blob.name
        elif _HEX40.fullmatch(blob.name):
            ok = git_blob_sha1(blob) == blob.name
        else:
            continue
        if not ok:
            bad.append(path)
    return bad


def _evict(files: Iterable[Path]) -> None:
    """Remove cached files and their blobs, so the next download fetches them again."""
    for path in files:
        path.resolve().unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a model repo snapshot into the Hugging Face cache (or find it there offline).

    Every file is checked against its Hub checksum; a corrupt cached copy is evicted and
    fetched once more, and if that copy is corrupt too it is evicted and
    :class:`IntegrityError` is raised, so a bad download never poisons the cache.
    """
    if not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'organisation/name'")
    path = _snapshot(repo_id, revision)
    bad = corrupt_cached_files(path)
    if not bad:
        return path
    logger.warning("%s: cached %s corrupt, downloading again", repo_id, [p.name for p in bad])
    _evict(bad)
    removed = IntegrityError(
        f"{repo_id}: the cached {', '.join(p.name for p in bad)} did not match the Hub's "
        "checksum and was removed; the Hub is not reachable to download it again"
    )
    try:
        path = _snapshot(repo_id, revision)
    except ModelNotAvailableError as exc:
        raise removed from exc
    if not all((path / p.name).is_file() for p in bad):  # offline: the snapshot stays partial
        raise removed
    bad = corrupt_cached_files(path)
    if bad:
        _evict(bad)
        raise IntegrityError(
            f"{repo_id}@{revision or 'main'}: {', '.join(p.name for p in bad)} as served by the "
            "Hub does not match its checksum (ETag), twice: the Hub's copy is damaged. "
            "Nothing was loaded and the bad copy was removed from the cache."
        )
    return path


def _load_from_hub(repo_id: str, revision: str | None, device: str | torch.device) -> Ensemble:
    """Download (or find in the cache) and load a repo, recording where it came from."""
    model = Ensemble.from_pretrained(download(repo_id, revision), device)
    # always this load's: a stored "source" (a config pushed before ltzoo stripped it) is stale
    record_source(model, {"repo_id": repo_id, "revision": revision or "main"})
    logger.info("loaded %s@%s from the Hub", repo_id, revision or "main")
    return model


def _load_registered(name: str, revision: str | None, device: str | torch.device) -> Ensemble:
    """A registered model from the Hub when it is reachable and has it, else the bundled copy.

    The bundled copy only stands in for the registry's own revision: an explicitly
    requested revision that the Hub cannot provide is an error.
    """
    entry = get_entry(name)
    try:
        return _load_from_hub(entry.resolved_hub_id(), revision or entry.revision, device)
    except ModelNotAvailableError as exc:
        if revision not in (None, entry.revision) or not is_bundled(name):
            raise
        logger.info("%s: Hub copy not available (%s); using the bundled copy", name, exc)
        return load_bundled(name, device)


def load(
    name: str,
    revision: str | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    experts: list[int] | None = None,
) -> Ensemble:
    """Load an ensemble by registry name, Hub repo id (``org/name[@rev]``) or local directory:
    a model directory, or a run directory of ``ltzoo train`` (its ``model/``).

    A registry name loads from the Hub (``LTZOO_HUB_ORG``, revision, cache and
    ``HF_HUB_OFFLINE`` honoured) and falls back to the copy bundled with the package;
    ``model.config.extra["source"]`` always says where the weights came from:
    ``{"repo_id", "revision"}``, ``{"bundled", "sha256"}``, ``{"local": directory}`` or,
    with ``pretrained=False``, ``{"random_init": name}``.
    ``pretrained=False`` builds the registered architecture with random weights.
    ``experts=[0, 1]`` keeps only those experts (cheaper inference).
    """
    if Path(name).is_dir():
        directory = local_model_dir(name)
        model = Ensemble.from_pretrained(directory, device)
        record_source(model, {"local": str(Path(directory).resolve())})
    elif is_registered(name):
        entry = get_entry(name)
        if not pretrained:
            model = Ensemble(entry.build_config()).to(device).eval()
            record_source(model, {"random_init": name})
        else:
            model = _load_registered(name, revision, device)
    else:
        repo, at_rev = split_revision(name)
        if not REPO_ID.fullmatch(repo):
            raise ValueError(
                f"{name!r} is not a registered model (see `ltzoo list`), an existing directory, "
                "or a Hub repo id of the form 'organisation/name[@revision]'"
            )
        if not pretrained:
            raise ValueError(
                "pretrained=False needs a registered model name (the architecture comes from the registry)"
            )
        model = _load_from_hub(repo, revision or at_rev, device)
    return model.select_experts(experts) if experts is not None else model


def push_to_hub(
    model: Ensemble,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload ltzoo ensemble",
    token: str | None = None,
    tag: str | None = None,
) -> str:
    """Publish ``model`` to ``repo_id`` in one commit (weights + config + card). Returns the commit id.

    The pushed config has no ``extra["source"]`` (``model`` keeps its own): whoever loads the
    repo gets the source of that load, ``{"repo_id", "revision"}``.

    ``revision`` is a branch, created from main if missing (it moves with later pushes);
    ``tag`` also tags the new commit (an immutable name, e.g. ``v1.0``).
    """
    if not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'organisation/name'")
    from huggingface_hub import HfApi

    api = HfApi(token=token or os.environ.get("HF_TOKEN"), endpoint=_hub_settings()["endpoint"])
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    kept = model.config
    record_source(model, None)  # where this copy came from is not where the Hub's will come from
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message
            )
    finally:
        model.config = kept
    if tag:
        api.create_tag(repo_id, tag=tag, revision=str(info.oid), tag_message=commit_message)
    return str(info.oid)


def push_zoo(
    org: str, revision: str | None = None, tag: str | None = None, private: bool = False
) -> Iterator[tuple[str, str, str]]:
    """Push every bundled model, with its card, to ``org/<name>``; yields (name, repo, commit)."""
    names = sorted(read_manifest())
    if not names:
        raise ValueError(f"nothing is bundled under {bundle_root()}: nothing to push")
    for name in names:
        model = load_bundled(name)
        record_source(model, None)
        if not model.config.metrics and is_registered(name):
            model.config = replace(model.config, metrics=get_entry(name).shipped_metrics)
        repo = f"{org}/{name}"
        oid = push_to_hub(
            model,
            repo,
            revision=revision,
            private=private,
            tag=tag,
            commit_message=f"Publish {name} (ltzoo push-zoo)",
        )
        yield name, repo, oid
