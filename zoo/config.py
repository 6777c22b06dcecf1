"""Typed configuration of an :class:`~zoo.Ensemble`, saved as ``config.json``.

The config is plain data: the architecture itself always comes from code
(``zoo.models``), the Hub only stores this file and the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .files import write_json

Layout = Literal["independent", "shared", "single"]
HeadKind = Literal["linear", "cosine"]
LogitPrior = Literal["uniform", "train"]

#: OLTR convention: many-shot > 100 training images, medium 20..100, few < 20.
MANY_SHOT_MIN = 101
FEW_SHOT_MAX = 19

#: Bounds every config is checked against before anything is built (a config.json from
#: a Hub repo is untrusted input: a 1 KB file must not allocate or compute without bound).
MAX_CLASSES = 100_000
MAX_EXPERTS = 64
MAX_STAGES = 16
MAX_INPUT_SIDE = 4096
MAX_NECK_DIM = 65_536
MAX_CLASS_COUNT = 10**12
MAX_TEXT_CHARS = 100_000
#: tests give random networks a high temperature (1e4) to keep probabilities unsaturated
TEMPERATURE_RANGE = (1e-3, 1e6)
#: a calibration bias beyond this would override the logits, not correct them
CLASS_BIAS_RANGE = (-50.0, 50.0)
COSINE_SCALE_RANGE = (1e-3, 1e4)
MAX_CONFIG_BYTES = 64 * 1024 * 1024
#: Largest model a config may describe (4 GB of fp32), estimated before building.
MAX_PARAMETERS = 10**9
#: Approximate backbone sizes and pooled-feature widths, for that estimate only.
_BACKBONE_SIZE = {"resnet32": (0.47e6, 64)}
_DEFAULT_BACKBONE_SIZE = (60e6, 2048)  # the largest torchvision backbone here (ResNet-152)


def _int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int if it is an integer (not a bool or a string) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_show(value)}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {_show(number)}")
    return number


def _float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    number = float(value)
    above_low = low < number if low_open else low <= number
    if not (math.isfinite(number) and above_low and number <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be finite and in {interval}, got {_show(value)}")
    return number


def _text(name: str, value: Any, max_chars: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_show(value)}")
    if len(value) > max_chars:
        raise ValueError(f"{name} is longer than {max_chars} characters")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_show(value)}")
    return value


def _sequence(name: str, value: Any, max_len: int) -> list[Any]:
    """A list/tuple of at most ``max_len`` items (checked before anything is iterated)."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list, got {_show(value)}")
    if len(value) > max_len:
        raise ValueError(f"{name} has {len(value)} items, at most {max_len} allowed")
    return list(value)


def _show(value: Any, n: int = 60) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= n else text[:n] + "..."


def shot_group(count: int) -> str:
    """Return ``"many"``, ``"medium"`` or ``"few"`` for a class with ``count`` training images."""
    if count >= MANY_SHOT_MIN:
        return "many"
    if count <= FEW_SHOT_MAX:
        return "few"
    return "medium"


def _set(obj: object, name: str, value: Any) -> None:
    """Store a checked/normalised field value on a frozen dataclass (``__post_init__`` only)."""
    object.__setattr__(obj, name, value)


def logit_prior_for(method: str) -> LogitPrior:
    """Which class prior a method's raw logits are calibrated for: the one place that decides.

    Plain cross-entropy ("ce") learns the training prior; every balanced method here
    (Balanced Softmax, NCL, ECL, CBD) learns logits for the uniform prior.
    """
    return "train" if method == "ce" else "uniform"


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the network's input tensor (like torchvision weights' transforms)."""

    input_size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    #: "resize": resize straight to ``input_size``; "resize_crop": resize the short side to
    #: ``input_size / crop_pct`` then centre-crop (ImageNet evaluation policy).
    resize: Literal["resize", "resize_crop"] = "resize"
    crop_pct: float = 0.875
    #: what transparent pixels are composited onto: a grey level 0-255 or ``[r, g, b]``,
    #: the background of the training images (0, black, for Fashion-MNIST). White when a
    #: ``config.json`` lacks it, as before the field existed.
    background: int | tuple[int, int, int] = 255

    def __post_init__(self) -> None:
        size = _sequence("preprocess.input_size", self.input_size, 2)
        if len(size) != 2:
            raise ValueError(f"preprocess.input_size must be [height, width], got {_show(size)}")
        _set(
            self,
            "input_size",
            tuple(_int("preprocess.input_size", s, 1, MAX_INPUT_SIDE) for s in size),
        )
        _set(self, "channels", _int("preprocess.channels", self.channels, 1, 3))
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess.channels must be 1 or 3, got {self.channels}")
        mean = _sequence("preprocess.mean", self.mean, 3)
        _set(self, "mean", tuple(_float("preprocess.mean", m, -1e3, 1e3) for m in mean))
        std = _sequence("preprocess.std", self.std, 3)
        _set(self, "std", tuple(_float("preprocess.std", v, 0.0, 1e3, low_open=True) for v in std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("preprocess.mean and preprocess.std need one value per channel")
        if self.resize not in ("resize", "resize_crop"):
            raise ValueError(
                f"preprocess.resize must be 'resize' or 'resize_crop', got {_show(self.resize)}"
            )
        _set(
            self, "crop_pct", _float("preprocess.crop_pct", self.crop_pct, 0.0, 1.0, low_open=True)
        )
        if isinstance(self.background, list | tuple):
            rgb = _sequence("preprocess.background", self.background, 3)
            if len(rgb) != 3:
                raise ValueError(
                    f"preprocess.background must be a grey level or [r, g, b], got {_show(rgb)}"
                )
            _set(self, "background", tuple(_int("preprocess.background", c, 0, 255) for c in rgb))
        else:
            _set(self, "background", _int("preprocess.background", self.background, 0, 255))

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """:attr:`background` as an ``(r, g, b)`` triple."""
        bg = self.background
        return (bg, bg, bg) if isinstance(bg, int) else bg


@dataclass(frozen=True)
class EnsembleConfig:
    """Everything needed to rebuild an ensemble and turn pixels into calibrated probabilities.

    Frozen: a config is checked once, when it is built; code that needs another value
    builds a new one with :func:`dataclasses.replace` (which checks it again).
    """

    backbone: str = "resnet32"
    num_classes: int = 10
    num_experts: int = 3
    #: "independent": K full networks (NCL); "shared": a shared stem of ``shared_stages``
    #: stages then per-expert later stages (ECL); "single": one network (baselines, CBD).
    layout: Layout = "independent"
    shared_stages: int = 0
    head: HeadKind = "linear"
    head_bias: bool = True
    cosine_scale: float = 16.0
    learn_scale: bool = False
    #: CBD student: Dense(neck_dim) + ReLU + L2 norm between pooled feature and classifier.
    neck_dim: int | None = None
    class_names: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    #: Which class prior the raw combined logits are calibrated for: "uniform" for
    #: balanced methods (Balanced Softmax, NCL, ECL, CBD), "train" for plain CE.
    logit_prior: LogitPrior = "uniform"
    temperature: float = 1.0
    #: Per-class bias of bias-corrected temperature scaling (fitted with the temperature on
    #: the validation split, each class weighing the same; mean zero, empty = none): the
    #: calibrated balanced posterior is ``softmax(z_balanced / T + class_bias)``.
    class_bias: list[float] = field(default_factory=list)
    default_prior: str = "balanced"
    name: str = ""
    method: str = ""
    recipe: str = ""
    dataset: str = ""
    provenance: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_architecture()
        _set(self, "num_classes", _int("num_classes", self.num_classes, 2, MAX_CLASSES))
        self._check_size()  # before default class names are generated
        self._check_classes()
        self._check_calibration_and_text()

    def _check_size(self) -> None:
        if self.estimated_parameters() > MAX_PARAMETERS:
            raise ValueError(
                f"this config describes about {self.estimated_parameters():.3g} parameters "
                f"(num_experts={self.num_experts}, num_classes={self.num_classes}, "
                f"neck_dim={self.neck_dim}), more than the limit of {MAX_PARAMETERS:.0e}"
            )

    def estimated_parameters(self) -> float:
        """An upper estimate of the parameter count, computed without building anything."""
        body, width = _BACKBONE_SIZE.get(self.backbone, _DEFAULT_BACKBONE_SIZE)
        neck = self.neck_dim or 0
        head = width * neck + (neck or width) * self.num_classes
        return float(self.num_experts * (body + head))

    def _check_architecture(self) -> None:
        if isinstance(self.preprocess, dict):
            keys = {f.name for f in dataclasses.fields(PreprocessConfig)}
            if set(self.preprocess) - keys:
                raise ValueError(f"unknown preprocess keys: {sorted(set(self.preprocess) - keys)}")
            _set(self, "preprocess", PreprocessConfig(**self.preprocess))
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"preprocess must be an object, got {_show(self.preprocess)}")
        _set(self, "backbone", _text("backbone", self.backbone, 100))
        if self.layout not in ("independent", "shared", "single"):
            raise ValueError(f"unknown layout {_show(self.layout)}")
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"unknown head {_show(self.head)}; choose 'linear' or 'cosine'")
        _set(self, "num_experts", _int("num_experts", self.num_experts, 1, MAX_EXPERTS))
        if self.layout == "single" and self.num_experts != 1:
            raise ValueError("layout 'single' needs num_experts=1")
        _set(self, "shared_stages", _int("shared_stages", self.shared_stages, 0, MAX_STAGES))
        _set(self, "head_bias", _flag("head_bias", self.head_bias))
        _set(self, "learn_scale", _flag("learn_scale", self.learn_scale))
        _set(self, "cosine_scale", _float("cosine_scale", self.cosine_scale, *COSINE_SCALE_RANGE))
        if self.neck_dim is not None:
            _set(self, "neck_dim", _int("neck_dim", self.neck_dim, 1, MAX_NECK_DIM))

    def _check_classes(self) -> None:
        names = _sequence("class_names", self.class_names, MAX_CLASSES)
        if not names:
            names = [f"class_{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        _set(self, "class_names", [_text("class_names[]", n, 1000) for n in names])
        counts = _sequence("class_counts", self.class_counts, MAX_CLASSES)
        if counts and len(counts) != self.num_classes:
            raise ValueError(f"{len(counts)} class counts for {self.num_classes} classes")
        _set(self, "class_counts", [_int("class_counts[]", c, 0, MAX_CLASS_COUNT) for c in counts])

    def _check_calibration_and_text(self) -> None:
        if self.logit_prior not in ("uniform", "train"):
            raise ValueError(
                f"logit_prior must be 'uniform' or 'train', got {_show(self.logit_prior)}"
            )
        _set(self, "temperature", _float("temperature", self.temperature, *TEMPERATURE_RANGE))
        bias = _sequence("class_bias", self.class_bias, MAX_CLASSES)
        if bias and len(bias) != self.num_classes:
            raise ValueError(f"{len(bias)} class biases for {self.num_classes} classes")
        _set(self, "class_bias", [_float("class_bias[]", b, *CLASS_BIAS_RANGE) for b in bias])
        for name in ("default_prior", "name", "method", "recipe", "dataset", "provenance"):
            _set(self, name, _text(name, getattr(self, name)))
        for name in ("metrics", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be an object, got {_show(getattr(self, name))}")

    @property
    def shot_groups(self) -> list[str]:
        """many/medium/few group of every class (all "many" when counts are unknown)."""
        return [shot_group(c) for c in self.class_counts] or ["many"] * self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleConfig:
        """Build a config from plain data (e.g. a parsed config.json), checking every field."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EnsembleConfig:
        """Read and check a ``config.json``; any problem is a ``ValueError`` naming the file."""
        path = Path(path)
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not an ltzoo config")
        try:
            return cls.from_dict(json.loads(path.read_bytes()))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"invalid config {path}: {exc}") from None
