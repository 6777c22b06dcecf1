"""Saving, loading and publishing ensembles: local directories and the Hugging Face Hub.

Weights are safetensors only; nothing downloaded is ever unpickled. Loading is strict:
a missing ``config.json``, a missing tensor or an unexpected one is an error.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import EnsembleConfig
from .ensemble import CONFIG_NAME, WEIGHTS_NAME, Ensemble
from .registry import get_entry, is_registered

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelNotAvailableError(RuntimeError):
    """A model is neither in the local cache nor reachable on the Hub."""


def save_pretrained(model: Ensemble, directory: str | Path, card: bool = True) -> Path:
    """Write weights (safetensors), ``config.json`` and, optionally, the model card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "ltzoo"})
    model.config.save(directory / CONFIG_NAME)
    if card:
        from .cards import render_card

        (directory / "README.md").write_text(render_card(model.config))
    return directory


def load_local(directory: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load an ensemble from a directory written by :func:`save_pretrained` (strict)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not an ltzoo model directory")
    config = EnsembleConfig.load(config_path)
    model = Ensemble(config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} is not a valid safetensors file: {exc}") from exc
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


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
        f"`ltzoo push RUN_DIR {repo_id}`, or point HF_ENDPOINT at a Hub that hosts it."
    )


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a model repo snapshot into the Hugging Face cache (or find it there offline)."""
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'organisation/name'")
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


def _load_from_hub(repo_id: str, revision: str | None, device: str | torch.device) -> Ensemble:
    """Download (or find in the cache) and load a repo, recording where it came from."""
    model = load_local(download(repo_id, revision), device)
    model.config.extra.setdefault("source", {"repo_id": repo_id, "revision": revision or "main"})
    return model


def load(
    name: str,
    revision: str | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    experts: list[int] | None = None,
) -> Ensemble:
    """Load an ensemble by registry name, Hub repo id (``org/name[@rev]``) or local directory.

    ``pretrained=False`` builds the registered architecture with random weights.
    ``experts=[0, 1]`` keeps only those experts (cheaper inference).
    """
    if Path(name).is_dir():
        model = load_local(name, device)
    elif is_registered(name):
        entry = get_entry(name)
        if not pretrained:
            model = Ensemble(entry.build_config()).to(device).eval()
        else:
            model = _load_from_hub(entry.resolved_hub_id(), revision or entry.revision, device)
    else:
        repo, at_rev = split_revision(name)
        if not _REPO_ID.match(repo):
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
) -> str:
    """Publish ``model`` to ``repo_id`` in one commit (weights + config + card). Returns the commit id.

    ``revision`` is a branch, created from main if missing.
    """
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'organisation/name'")
    from huggingface_hub import HfApi

    api = HfApi(token=token or os.environ.get("HF_TOKEN"), endpoint=_hub_settings()["endpoint"])
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message
        )
    return str(info.oid)
