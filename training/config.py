"""Typed run configuration loaded from recipe files (TOML) with ``key=value`` overrides.

Unknown keys and ill-typed values are errors raised before any training starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override is invalid."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist_lt"
    root: str = ""
    rho: float = 100.0
    n_max: int = 0  # 0: the dataset's standard n_max
    seed: int = 0
    class_order: list[int] = field(default_factory=list)
    val_per_class: int = 20
    augment: list[str] = field(default_factory=lambda: ["crop_flip"])
    train_split: str = ""
    val_split: str = ""
    test_split: str = ""
    workers: int = 0

    def validate(self) -> None:
        if self.rho < 1:
            raise ConfigError(f"data.rho must be >= 1, got {self.rho}")
        if self.val_per_class < 0:
            raise ConfigError("data.val_per_class must be >= 0")


@dataclass
class OptimConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 2e-4
    schedule: str = "multistep"  # "multistep" | "cosine" | "constant"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 5.0
    grad_clip: float = 0.0
    scale_lr_with_batch: bool = False  # CBD: lr x (global batch / 256)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("optim.epochs and optim.batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("multistep", "cosine", "constant"):
            raise ConfigError(
                f"optim.schedule must be multistep, cosine or constant, got {self.schedule!r}"
            )
        if any(not 0 < m < self.epochs for m in self.milestones):
            raise ConfigError(
                f"optim.milestones {self.milestones} must lie inside (0, {self.epochs})"
            )
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ConfigError("optim.warmup_epochs must be in [0, epochs)")


@dataclass
class RunSettings:
    seed: int = 0
    out: str = ""  # default: runs/<recipe>
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA only
    sync_bn: bool = True  # SyncBatchNorm under torchrun with >1 process
    eval_every: int = 0  # epochs; 0: only at the end
    max_steps_per_epoch: int = 0  # 0: full epochs (CI uses a few steps)
    eval_batch_size: int = 256
    eval_subset: int = 0  # evaluate on every k-th test image so N remain (0: the full test set)
    tensorboard: bool = False
    threads: int = 0  # torch intra-op threads on CPU; 0: leave the default


@dataclass
class RunConfig:
    """A full training run: which model (registry entry), which method, data, optimiser."""

    model: str = "ncl-resnet32-fmnistlt"
    method: str = "ncl"
    recipe: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSettings = field(default_factory=RunSettings)
    method_params: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from zoo.registry import get_entry

        from .methods import METHODS

        try:
            get_entry(self.model)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        self.data.validate()
        self.optim.validate()
        METHODS[self.method].Params.from_dict(self.method_params)  # raises on unknown keys

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "run": RunSettings}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert ``value`` against a dataclass field type; ConfigError if impossible."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return value if value is None else _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; valid: {sorted(names)}"
        )
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()})


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.05"`` -> (["optim", "lr"], 0.05); values parsed as TOML, else strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe name (``fmnistlt_ncl``) or a path to a ``.toml`` file."""
    path = Path(recipe)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = RECIPES_DIR / f"{recipe}.toml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    raise ConfigError(f"no recipe {recipe!r}; available: {available}")


def load_recipe(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe, apply ``key=value`` overrides, validate everything."""
    path = resolve_recipe_path(recipe)
    raw = tomllib.loads(path.read_text())
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a table")
        node[keys[-1]] = value
    top = {"model", "method", "data", "optim", "run", "method_params", "model_overrides"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {unknown} in {path.name}; valid: {sorted(top)}"
        )
    cfg = RunConfig(
        model=_coerce(raw.get("model", RunConfig.model), str, "model"),
        method=_coerce(raw.get("method", RunConfig.method), str, "method"),
        recipe=path.stem,
        data=build_section(DataConfig, raw.get("data", {}), "data"),
        optim=build_section(OptimConfig, raw.get("optim", {}), "optim"),
        run=build_section(RunSettings, raw.get("run", {}), "run"),
        method_params=dict(raw.get("method_params", {})),
        model_overrides=dict(raw.get("model_overrides", {})),
    )
    cfg.validate()
    return cfg
