"""Trained weights that ship inside the package: the offline fallback of ``zoo.load(name)``.

Layout (package data, so a wheel install finds it)::

    zoo/weights/manifest.json            name -> {files: {file: {sha256, size}}, top1, run}
    zoo/weights/<name>/model.safetensors
    zoo/weights/<name>/config.json

The manifest pins every file by size and sha256; a bundled model is verified before
anything is built from it. ``LTZOO_BUNDLE_DIR`` points at another bundle root (tests,
site-specific zoos). ``benchmarks/bundle_weights.py`` fills the bundle from run folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError, ModelNotAvailableError
from .files import CONFIG_NAME, WEIGHTS_NAME, write_json

if TYPE_CHECKING:
    import torch

    from .ensemble import Ensemble

BUNDLE_ENV = "LTZOO_BUNDLE_DIR"
MANIFEST_NAME = "manifest.json"
BUNDLED_FILES = (WEIGHTS_NAME, CONFIG_NAME)
DEFAULT_ROOT = Path(__file__).resolve().parent / "weights"

logger = logging.getLogger("zoo")


def bundle_root() -> Path:
    """Where bundled weights live: ``$LTZOO_BUNDLE_DIR`` or the package's ``zoo/weights``."""
    return Path(os.environ.get(BUNDLE_ENV) or DEFAULT_ROOT)


def read_manifest(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """name -> manifest entry of every bundled model (empty when nothing is bundled)."""
    path = (root or bundle_root()) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        models = json.loads(path.read_text()).get("models", {})
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a valid bundle manifest: {exc}") from None
    if not isinstance(models, dict):
        raise ValueError(f"{path} is not a valid bundle manifest: 'models' must be an object")
    return models


def is_bundled(name: str) -> bool:
    """True when ``name`` has bundled weights."""
    return name in read_manifest()


def _verify(name: str, directory: Path, files: dict[str, Any]) -> None:
    """Size, then sha256, of every bundled file against the manifest; IntegrityError if not."""
    from .hashing import file_sha256

    for filename in BUNDLED_FILES:
        pinned, path = files.get(filename) or {}, directory / filename
        if not path.is_file() or not pinned.get("sha256"):
            raise IntegrityError(f"bundled {name}: {filename} is missing or not pinned")
        size = path.stat().st_size
        if size != pinned.get("size"):
            raise IntegrityError(
                f"bundled {name}: {filename} has {size} bytes, the manifest pins {pinned.get('size')}"
                " (damaged install: reinstall ltzoo)"
            )
        if file_sha256(path) != pinned["sha256"]:
            raise IntegrityError(
                f"bundled {name}: {filename} does not match its pinned sha256 "
                f"{pinned['sha256'][:12]}... (damaged install: reinstall ltzoo)"
            )


def load_bundled(name: str, device: str | torch.device = "cpu") -> Ensemble:
    """The bundled copy of ``name``, verified against the manifest before it is built."""
    from .ensemble import Ensemble, record_source

    root = bundle_root()
    entry = read_manifest(root).get(name)
    if entry is None:
        raise ModelNotAvailableError(f"{name!r} has no bundled weights under {root}")
    directory = root / name
    _verify(name, directory, entry.get("files") or {})
    model = Ensemble.from_pretrained(directory, device)
    record_source(model, {"bundled": name, "sha256": entry["files"][WEIGHTS_NAME]["sha256"]})
    logger.info("loaded %s from the bundled copy in %s", name, directory)
    return model


def _file_pin(path: Path) -> dict[str, Any]:
    from .hashing import file_sha256

    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def add_to_bundle(
    model_dir: str | Path,
    root: Path | None = None,
    name: str | None = None,
    run: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Copy a saved model (``config.json`` + weights) into the bundle and pin it.

    ``model_dir`` is a model folder or a run folder holding ``model/``. The model is
    loaded once first (nothing unloadable is bundled). ``name``: the name to publish it
    under (a run is named after its directory, not its registry entry), written into the
    bundled ``config.json``; default the config's own. ``run``: the run it came from, for the
    record (default ``model_dir``). Returns (name, manifest entry).
    """
    from .ensemble import Ensemble

    src = Path(model_dir)
    if (src / "model").is_dir():
        src = src / "model"
    config = Ensemble.from_pretrained(src).config
    if name:
        config = replace(config, name=name)
    if not config.name:
        raise ValueError(f"{src}: config.json has no 'name'; cannot bundle an unnamed model")
    root = root or bundle_root()
    dest = root / config.name
    dest.mkdir(parents=True, exist_ok=True)
    for filename in BUNDLED_FILES:
        shutil.copyfile(src / filename, dest / filename)
    if name:
        raw = json.loads((dest / "config.json").read_text())
        write_json(dest / "config.json", {**raw, "name": name})
    entry: dict[str, Any] = {"files": {f: _file_pin(dest / f) for f in BUNDLED_FILES}}
    top1 = config.metrics.get("accuracy", {}).get("top1")
    if isinstance(top1, int | float):
        entry["top1"] = float(top1)
    entry["run"] = run or str(Path(model_dir))
    models = read_manifest(root)
    models[config.name] = entry
    _write_manifest(root, models)
    return config.name, entry


def _write_manifest(root: Path, models: dict[str, Any]) -> None:
    """Write the manifest atomically (temp file + rename)."""
    write_json(root / MANIFEST_NAME, {"format": 1, "models": dict(sorted(models.items()))})
