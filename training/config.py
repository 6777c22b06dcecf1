"""Typed run configuration loaded from recipe files (TOML) with ``key=value`` overrides.

Unknown keys, ill-typed and out-of-range values are errors raised at load time, so both
``--dry-run`` and the real run fail before any training starts.

Shortening a recipe: overriding only ``optim.epochs`` scales the recipe's
``optim.milestones`` and ``optim.warmup_epochs`` by the same ratio (the ones not overridden
themselves; see :meth:`OptimConfig.rescale`), and :func:`load_recipe` reports what it scaled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ltzoo.zoo.models import IMAGENET
from ltzoo.zoo.registry import get_entry

from .precision import PRECISIONS
from .registry import registered_methods

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
    #: a class with fewer than val_per_class unused images (CIFAR-10-LT's head, which the
    #: papers' profile trains on all 5,000 of) gives its validation images from its training
    #: images (head 5,000 -> 4,980), instead of the validation split shrinking (to none)
    val_from_train: bool = False
    #: a class with more unused images than val_per_class gives up to this many validation
    #: images (0: val_per_class, a balanced split); the figures fitted and measured on the
    #: split then weigh each class equally. More images for the calibration fit where the
    #: balanced size is capped by one class (CIFAR-10-LT's head: 20)
    val_max_per_class: int = 0
    augment: list[str] = field(default_factory=lambda: ["crop_flip"])
    train_split: str = ""
    val_split: str = ""
    test_split: str = ""
    workers: int = 0

    def validate(self) -> None:
        from .data.datasets import DEFAULT_N_MAX, NAMES

        if self.name not in NAMES:
            raise ConfigError(f"unknown data.name {self.name!r}; valid: {', '.join(NAMES)}")
        if self.rho < 1:
            raise ConfigError(f"data.rho must be >= 1, got {self.rho}")
        if self.val_per_class < 0:
            raise ConfigError("data.val_per_class must be >= 0")
        if self.val_max_per_class < 0:
            raise ConfigError("data.val_max_per_class must be >= 0")
        if self.val_max_per_class and self.name not in DEFAULT_N_MAX:
            raise ConfigError(
                f"data.val_max_per_class applies to {', '.join(DEFAULT_N_MAX)} only, not "
                f"{self.name!r} (its validation split comes from its own files)"
            )

    @property
    def num_classes(self) -> int | None:
        """Classes of the dataset, when known without reading it (not for imagefolder_lt)."""
        from ltzoo.zoo.datasets_meta import DATASETS

        return DATASETS[self.name].num_classes if self.name in DATASETS else None

    def train_size(self) -> int | None:
        """Training images of the long-tailed profile, for the profile datasets (else None)."""
        from .data import lt_counts
        from .data.datasets import DEFAULT_N_MAX

        if self.name not in DEFAULT_N_MAX or self.num_classes is None:
            return None
        return sum(lt_counts(self.n_max or DEFAULT_N_MAX[self.name], self.num_classes, self.rho))


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
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ConfigError(f"optim.gamma must be > 0 and finite, got {self.gamma}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(
                f"optim.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("multistep", "cosine", "constant"):
            raise ConfigError(
                f"optim.schedule must be multistep, cosine or constant, got {self.schedule!r}"
            )
        if any(not 0 < m < self.epochs for m in self.milestones):
            raise ConfigError(
                f"optim.milestones {self.milestones} must lie inside (0, {self.epochs})"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError("optim.warmup_epochs must be in [0, epochs)")

    def rescale(self, from_epochs: int, milestones: bool = True, warmup: bool = True) -> list[str]:
        """Scale a schedule written for ``from_epochs`` to ``self.epochs``, in place.

        Milestones are scaled and rounded (those leaving ``(0, epochs)`` are dropped), the
        warm-up scaled and capped at ``epochs - 1``. Returns what changed, as messages.
        """
        ratio, notes = self.epochs / from_epochs, []
        if milestones and self.milestones:
            scaled = sorted(
                {m for m in (round(m * ratio) for m in self.milestones) if 0 < m < self.epochs}
            )
            notes.append(f"optim.milestones {self.milestones} -> {scaled}")
            self.milestones = scaled
        if warmup and self.warmup_epochs:
            scaled_warmup = min(self.warmup_epochs * ratio, max(0.0, self.epochs - 1.0))
            notes.append(f"optim.warmup_epochs {self.warmup_epochs:g} -> {scaled_warmup:g}")
            self.warmup_epochs = scaled_warmup
        return notes


@dataclass
class RunSettings:
    seed: int = 0
    out: str = ""  # default: runs/<recipe>
    device: str = "auto"  # auto | cpu | cuda
    #: "auto" | "fp32" | "bf16": what the method's forward computes in (training/precision.py);
    #: auto is fp32 on CPUs (bf16 failed accuracy parity for NCL) and bf16 on GPUs that have
    #: it (else fp16 + scaler). Losses, weights and checkpoints stay fp32 in every mode
    precision: str = "auto"
    sync_bn: bool = True  # SyncBatchNorm under torchrun with >1 process
    eval_every: int = 0  # epochs; 0: only at the end
    max_steps_per_epoch: int = 0  # 0: full epochs (CI uses a few steps)
    eval_batch_size: int = 256
    eval_subset: int = 0  # evaluate on every k-th test image so N remain (0: the full test set)
    tensorboard: bool = False
    threads: int = 0  # torch intra-op threads on CPU; 0: leave the default
    #: channels-last memory format for the model and batches (faster convolutions with
    #: oneDNN on CPU and cuDNN on GPU; same mathematics, same saved weights)
    channels_last: bool = True
    #: in-memory datasets: augment whole uint8 batches on the device (training/data/batched.py)
    #: instead of per-sample PIL transforms, where the augmentations allow it
    batched_augment: bool = True
    #: run the method's forward (experts + loss) under torch.compile (inductor): about 1.1x
    #: the images/s on this project's CPU for NCL, ECL and CE, for a one-off compile of
    #: 16-68 s (benchmarks/bench_train_step.py --compile); same weights and checkpoints
    compile: bool = False
    #: the trained model's name (its config's ``name``: ``ltzoo serve``, plots and cards show
    #: it); "" takes the run directory's name. Never a registered model's name: those belong
    #: to the published weights (bundle a run under one with bundle_weights.py --name)
    name: str = ""

    def model_name(self, run_dir: str | Path) -> str:
        """The name a model trained in ``run_dir`` gets: ``run.name``, else the directory's
        name, with ``-run`` appended when that is a registered model's name."""
        from ltzoo.zoo.registry import is_registered

        name = self.name or Path(run_dir).resolve().name
        return f"{name}-run" if is_registered(name) else name

    def validate(self) -> None:
        if self.name:
            from ltzoo.zoo.registry import is_registered

            if is_registered(self.name):
                raise ConfigError(
                    f"run.name {self.name!r} is a registered model's name, which belongs to its "
                    "published weights; choose another name"
                )
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    f"run.device={self.device!r} but no CUDA device is available here; "
                    "use run.device=cpu (or auto)"
                )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"run.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.eval_batch_size < 1:
            raise ConfigError(f"run.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for key in ("max_steps_per_epoch", "eval_every", "eval_subset", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key} must be >= 0 (0: off), got {getattr(self, key)}")


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


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
    #: fields of the model's :class:`~zoo.config.EnsembleConfig` that replace the registry's
    model_overrides: dict[str, Any] = field(default_factory=dict)
    #: which of the method's stages to run, in order (empty: all of them); CBD has
    #: "teachers" (one engine run per teacher) then "student"
    stages: list[str] = field(default_factory=list)
    #: initial backbone weights: "" (random), "imagenet" (torchvision's ImageNet weights,
    #: downloaded once into the torch hub cache) or the path of a torchvision state dict
    pretrained_backbone: str = ""

    def validate(self) -> None:
        """Check every field, the method's parameters and the model overrides; ConfigError."""
        if self.method not in registered_methods():
            raise ConfigError(
                f"unknown method {self.method!r}; choose from {sorted(registered_methods())}"
            )
        self._validate_model()
        self.data.validate()
        self.optim.validate()
        self.run.validate()
        self._validate_stages()
        params = registered_methods()[self.method].Params.from_dict(
            self.method_params
        )  # unknown keys raise
        num_classes = self.data.num_classes
        num_hard = getattr(params, "num_hard", None)
        if num_classes and num_hard is not None and not 1 <= num_hard <= num_classes:
            raise ConfigError(
                f"method_params.num_hard must be in [1, {num_classes}] "
                f"({self.data.name} has {num_classes} classes), got {num_hard}"
            )
        train_size = self.data.train_size()
        if train_size is not None and self.optim.batch_size > train_size:
            raise ConfigError(
                f"optim.batch_size {self.optim.batch_size} is larger than the training set "
                f"({train_size} images of {self.data.name} at rho {self.data.rho:g})"
            )

    def _validate_model(self) -> None:
        """The model entry exists and its config builds with ``model_overrides``."""
        try:
            entry = get_entry(self.model)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        try:
            entry.build_config(**self.model_overrides)
        except ValueError as exc:
            raise ConfigError(f"model_overrides for {self.model}: {exc}") from None
        if (
            self.pretrained_backbone not in ("", IMAGENET)
            and not Path(self.pretrained_backbone).is_file()
        ):
            raise ConfigError(
                f"pretrained_backbone must be '', {IMAGENET!r} or an existing file, got "
                f"{self.pretrained_backbone!r}"
            )

    def _validate_stages(self) -> None:
        declared = list(registered_methods()[self.method].stages)
        if self.stages and [s for s in declared if s in self.stages] != self.stages:
            raise ConfigError(
                f"stages {self.stages} must be distinct stages of method {self.method!r}, in "
                f"order: {declared}"
            )

    def stage_names(self) -> list[str]:
        """The stages this run trains, in order."""
        return self.stages or list(registered_methods()[self.method].stages)

    def run_dir(self) -> Path:
        """Where the run goes when ``--out`` is not given: ``run.out`` or ``runs/<recipe>``."""
        return Path(self.run.out or Path("runs") / self.recipe)

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


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> set[str]:
    """Set ``key=value`` overrides in a raw (TOML/JSON) config, in place; returns the keys."""
    keys_set = set()
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a table")
        node[keys[-1]] = value
        keys_set.add(".".join(keys))
    return keys_set


def _build(raw: dict[str, Any], recipe: str, source: str) -> RunConfig:
    """A (not yet validated) :class:`RunConfig` from a raw config read from ``source``."""
    top = {
        "model",
        "method",
        "data",
        "optim",
        "run",
        "method_params",
        "model_overrides",
        "stages",
        "pretrained_backbone",
    }
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown} in {source}; valid: {sorted(top)}")
    return RunConfig(
        model=_coerce(raw.get("model", RunConfig.model), str, "model"),
        method=_coerce(raw.get("method", RunConfig.method), str, "method"),
        recipe=recipe,
        data=build_section(DataConfig, raw.get("data", {}), "data"),
        optim=build_section(OptimConfig, raw.get("optim", {}), "optim"),
        run=build_section(RunSettings, raw.get("run", {}), "run"),
        method_params=dict(raw.get("method_params", {})),
        model_overrides=dict(raw.get("model_overrides", {})),
        stages=_coerce(raw.get("stages", []), list[str], "stages"),
        pretrained_backbone=_coerce(raw.get("pretrained_backbone", ""), str, "pretrained_backbone"),
    )


def _scale_schedule(cfg: RunConfig, base_epochs: int, overridden: set[str]) -> list[str]:
    """When ``optim.epochs`` is overridden, scale the milestones / warm-up not overridden."""
    new = cfg.optim.epochs
    if "optim.epochs" not in overridden or new == base_epochs or base_epochs < 1:
        return []
    notes = cfg.optim.rescale(
        base_epochs,
        milestones="optim.milestones" not in overridden,
        warmup="optim.warmup_epochs" not in overridden,
    )
    if not notes:
        return []
    return [
        f"optim.epochs {base_epochs} -> {new}: scaled {'; '.join(notes)} "
        "(override them to choose other values)"
    ]


def load_recipe(
    recipe: str, overrides: list[str] | None = None, notes: list[str] | None = None
) -> RunConfig:
    """Load a recipe, apply ``key=value`` overrides, validate everything.

    What was adjusted for the overrides (a schedule scaled to new ``optim.epochs``) is
    appended to ``notes`` as messages for the user.
    """
    path = resolve_recipe_path(recipe)
    raw = tomllib.loads(path.read_text())
    base_epochs = _coerce(
        raw.get("optim", {}).get("epochs", OptimConfig.epochs), int, "optim.epochs"
    )
    overridden = _apply_overrides(raw, overrides)
    cfg = _build(raw, path.stem, path.name)
    scaled = _scale_schedule(cfg, base_epochs, overridden)
    if notes is not None:
        notes.extend(scaled)
    cfg.validate()
    return cfg


class _Unset:
    def __repr__(self) -> str:
        return "(not set)"


_MISSING = _Unset()


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


#: settings a resumed run may take anew: where the data is read from and how fast the run
#: goes, never what it computes (``run.device`` would change the precision ``auto`` picks)
RESUME_MAY_CHANGE = frozenset(
    {"run.threads", "data.workers", "data.root", "run.eval_batch_size", "run.tensorboard"}
)


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The configuration a run was started with (``run_dir/run.json``), for ``--resume``.

    Overrides that agree with it are accepted (the same command line plus ``--resume``), as
    are those of :data:`RESUME_MAY_CHANGE`; overrides that would change anything else are a
    :class:`ConfigError`: a resumed run keeps its settings.
    """
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: no run to resume there (drop --resume to start a new run)"
        )
    stored = json.loads(path.read_text())["config"]
    raw = {k: v for k, v in json.loads(json.dumps(stored)).items() if k != "recipe"}
    overridden = _apply_overrides(raw, overrides)
    cfg = _build(raw, stored.get("recipe", ""), str(path))
    _scale_schedule(cfg, stored.get("optim", {}).get("epochs", 0), overridden)
    new = cfg.to_dict()
    changed = [
        f"{k} {_lookup(stored, k)!r} -> {_lookup(new, k)!r}"
        for k in sorted(overridden)
        if _lookup(stored, k) != _lookup(new, k) and k not in RESUME_MAY_CHANGE
    ]
    if changed:
        raise ConfigError(
            f"--resume continues {run_dir} with the settings in its run.json; these overrides "
            f"would change them: {', '.join(changed)}. Drop them, or start a new run with "
            "another --out"
        )
    cfg.validate()
    return cfg


def _defining(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run config that define what it trains (device, threads, logging,
    data location and the stages to run may change between runs of the same thing)."""
    d = _plain(config)
    # a field added since a run was written (absent there) counts at its default
    data, optim = (
        {**_field_defaults(section), **d.get(key, {})}
        for key, section in (("data", DataConfig), ("optim", OptimConfig))
    )
    data = {k: v for k, v in data.items() if k not in ("root", "workers")}
    method = registered_methods().get(d.get("method"))
    params = d.get("method_params", {})
    if method is not None:
        params = {**_field_defaults(method.Params), **params}
    keys = ("model", "method", "model_overrides")
    return {k: d.get(k) for k in keys} | {
        "method_params": params,
        "optim": optim,
        "data": data,
        "seed": d.get("run", {}).get("seed"),
        "pretrained_backbone": d.get("pretrained_backbone", ""),
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists, dataclasses as dicts, the rest as str)."""

    def encode(obj: Any) -> Any:
        is_instance = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
        return dataclasses.asdict(obj) if is_instance else str(obj)

    return json.loads(json.dumps(value, default=encode))


def _field_defaults(section: type) -> dict[str, Any]:
    """The default of each field of the dataclass ``section`` that has one."""
    defaults = {}
    for f in dataclasses.fields(section):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return _plain(defaults)


def check_same_run(run_dir: Path, cfg: RunConfig) -> None:
    """``ValueError`` if ``run_dir`` holds a run (``run.json``) of another configuration."""
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        return
    stored = json.loads(run_json.read_text()).get("config", {})
    if _defining(stored) != _defining(cfg.to_dict()):
        raise ValueError(
            f"{run_dir} holds a run trained with a different configuration than the one "
            "this recipe derives now; delete it or use another run directory"
        )
