"""What "a model argument" means, the same on every command (push, info, export, serve,
eval, calibrate, download).

In this order, an argument is:

1. an ``.onnx`` file written by ``ltzoo export`` (only where a fused graph is accepted: serve);
2. a run directory of ``ltzoo train`` (it holds ``model/config.json``): its ``model/``;
3. a model directory (``config.json`` + ``model.safetensors``);
4. a registered model name (``ltzoo list``);
5. a Hub repo id ``organisation/name[@revision]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .ensemble import Ensemble
from .files import local_model_dir
from .hub_io import REPO_ID, load, split_revision
from .registry import get_entry, is_registered

ModelKind = Literal["onnx", "run", "directory", "registry", "hub"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model argument."""

    kind: ModelKind
    #: ``.onnx`` path, model directory (``RUN_DIR/model`` for a run), registry name or repo id
    target: str
    revision: str | None = None

    @property
    def spec(self) -> str:
        """The string :func:`zoo.load` (and ``serve``'s ``prepare``) understand."""
        return (
            f"{self.target}@{self.revision}"
            if self.kind == "hub" and self.revision
            else self.target
        )

    def hub_repo(self) -> tuple[str, str | None]:
        """``(repo id, revision)`` on the Hub, for registry names and repo ids."""
        if self.kind == "registry":
            entry = get_entry(self.target)
            return entry.resolved_hub_id(), self.revision or entry.revision
        if self.kind == "hub":
            return self.target, self.revision
        raise ValueError(f"{self.target} is a local {self.kind}, not a Hub model")


def _local(path: Path, arg: str) -> ModelRef:
    model_dir = local_model_dir(arg)
    return ModelRef("run" if model_dir != path else "directory", str(model_dir))


def resolve_model(arg: str, revision: str | None = None, allow_onnx: bool = False) -> ModelRef:
    """Resolve a command's MODEL argument (see the module docstring); clear errors otherwise.

    ``revision`` (``--revision``) wins over an ``@revision`` suffix of a repo id.
    """
    path = Path(arg)
    if path.suffix == ".onnx":
        if not allow_onnx:
            raise ValueError(
                f"{arg}: this command takes a model (run or model directory, registry name or "
                "Hub repo id), not an .onnx file"
            )
        if not path.is_file():
            raise FileNotFoundError(f"{arg} does not exist")
        return ModelRef("onnx", arg)
    if path.is_dir():
        return _local(path, arg)
    if is_registered(arg):
        return ModelRef("registry", arg, revision)
    if path.is_absolute() or (str(path.parent) != "." and path.parent.is_dir()):
        raise FileNotFoundError(
            f"{arg} does not exist (read as a local path: {path.parent} is a directory here)"
        )
    repo, at_revision = split_revision(arg)
    if not REPO_ID.fullmatch(repo):
        raise ValueError(
            f"{arg!r} is not a run or model directory, a registered model (see `ltzoo list`) "
            "or a Hub repo id 'organisation/name[@revision]'"
        )
    return ModelRef("hub", repo, revision or at_revision)


def load_model(
    arg: str | ModelRef,
    revision: str | None = None,
    pretrained: bool = True,
    device: str = "cpu",
) -> Ensemble:
    """:func:`zoo.load` of a resolved MODEL argument (run directories included)."""
    ref = arg if isinstance(arg, ModelRef) else resolve_model(arg, revision)
    if ref.kind == "onnx":
        raise ValueError(f"{ref.target} is an ONNX graph, not a loadable ensemble")
    return load(ref.target, revision=ref.revision, pretrained=pretrained, device=device)


__all__ = ["ModelRef", "load_model", "resolve_model"]
