"""File names of a saved ensemble (torch-free, so `ltzoo list` and the registry stay light),
and where a local directory keeps its model."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def local_model_dir(directory: str | Path) -> Path:
    """The model directory of a local ``directory``: a run directory's ``model/``, or
    ``directory`` itself; ``FileNotFoundError`` saying what is missing otherwise."""
    path = Path(directory)
    if (path / "model" / CONFIG_NAME).is_file():
        return path / "model"
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "run.json").is_file():
        raise FileNotFoundError(
            f"run directory {directory} has no model/ yet (training has not finished): "
            f"resume it with `ltzoo train RECIPE --out {directory} --resume`"
        )
    raise FileNotFoundError(
        f"{directory} is neither a model directory (config.json, model.safetensors) "
        "nor a run directory of `ltzoo train` (model/)"
    )


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "local_model_dir"]
