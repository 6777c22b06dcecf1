"""Typed configuration of an :class:`~zoo.Ensemble`, saved as ``config.json``.

The config is plain data: the architecture itself always comes from code
(``zoo.models``), the Hub only stores this file and the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Layout = Literal["independent", "shared", "single"]
HeadKind = Literal["linear", "cosine"]
LogitPrior = Literal["uniform", "train"]

#: OLTR convention: many-shot > 100 training images, medium 20..100, few < 20.
MANY_SHOT_MIN = 101
FEW_SHOT_MAX = 19


def shot_group(count: int) -> str:
    """Return ``"many"``, ``"medium"`` or ``"few"`` for a class with ``count`` training images."""
    if count >= MANY_SHOT_MIN:
        return "many"
    if count <= FEW_SHOT_MAX:
        return "few"
    return "medium"


@dataclass
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

    def __post_init__(self) -> None:
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.resize not in ("resize", "resize_crop"):
            raise ValueError(f"resize must be 'resize' or 'resize_crop', got {self.resize!r}")


@dataclass
class EnsembleConfig:
    """Everything needed to rebuild an ensemble and turn pixels into calibrated probabilities."""

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
    default_prior: str = "balanced"
    name: str = ""
    method: str = ""
    recipe: str = ""
    dataset: str = ""
    provenance: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            self.preprocess = PreprocessConfig(**self.preprocess)
        if self.layout == "single" and self.num_experts != 1:
            raise ValueError("layout 'single' needs num_experts=1")
        if self.layout not in ("independent", "shared", "single"):
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"unknown head {self.head!r}; choose 'linear' or 'cosine'")
        if self.num_experts < 1 or self.num_classes < 2:
            raise ValueError("need num_experts >= 1 and num_classes >= 2")
        if not self.class_names:
            self.class_names = [f"class_{i}" for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.class_counts and len(self.class_counts) != self.num_classes:
            raise ValueError(
                f"{len(self.class_counts)} class counts for {self.num_classes} classes"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def shot_groups(self) -> list[str]:
        """many/medium/few group of every class (all "many" when counts are unknown)."""
        return [shot_group(c) for c in self.class_counts] or ["many"] * self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EnsembleConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
