"""Backbones, heads and multi-expert layouts.

Every backbone is a list of stages ending in a pooled, flattened feature, so one
code path builds all three layouts: independent experts (NCL), a shared stem with
per-expert later stages (ECL), and a single network (baselines, CBD student).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..config import EnsembleConfig
from .heads import CosineClassifier, ProjectionNeck, build_head
from .resnet_cifar import resnet32_stages
from .torchvision_resnets import BUILDERS as TORCHVISION_BUILDERS
from .torchvision_resnets import IMAGENET, torchvision_stages

BACKBONES = ("resnet32", *TORCHVISION_BUILDERS)

__all__ = [
    "BACKBONES",
    "IMAGENET",
    "CosineClassifier",
    "Expert",
    "ProjectionNeck",
    "as_experts",
    "backbone_stages",
    "build_experts",
    "build_head",
]


def backbone_stages(
    name: str, in_channels: int, pretrained: str | Path | None = None
) -> tuple[list[nn.Module], int]:
    """Stages of backbone ``name`` (stem ... pool) and the width of its pooled feature.

    ``pretrained``: :data:`IMAGENET` (torchvision's ImageNet weights) or a local
    torchvision state dict; ``None``: random initialisation.
    """
    if name == "resnet32":
        if pretrained is not None:
            raise ValueError("resnet32 has no pretrained weights")
        return resnet32_stages(in_channels)
    if name in TORCHVISION_BUILDERS:
        return torchvision_stages(name, in_channels, pretrained)
    raise ValueError(f"unknown backbone {name!r}; choose from {list(BACKBONES)}")


class Expert(nn.Module):
    """One expert: its own stages, an optional projection neck, a classifier."""

    def __init__(self, body: nn.Sequential, neck: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.neck = neck
        self.classifier = classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature the classifier sees (after the neck)."""
        return self.neck(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def as_experts(modules: Iterable[nn.Module]) -> list[Expert]:
    """The modules of an ``nn.ModuleList`` built by :func:`build_experts`, typed as experts
    (indexing or iterating an ``nn.ModuleList`` is typed as plain ``nn.Module``)."""
    return cast("list[Expert]", list(modules))


def build_experts(
    cfg: EnsembleConfig, pretrained: str | Path | None = None
) -> tuple[nn.Module, nn.ModuleList, int]:
    """Build ``(stem, experts, feature_dim)`` for ``cfg``'s layout.

    The stem is ``nn.Identity`` unless the layout is "shared". Each expert is built
    from its own backbone instance so experts start from different random weights
    (or all from the same ``pretrained`` backbone weights, see :func:`backbone_stages`).
    """
    split = cfg.shared_stages if cfg.layout == "shared" else 0
    channels = cfg.preprocess.channels
    nets = [backbone_stages(cfg.backbone, channels, pretrained) for _ in range(cfg.num_experts)]
    n_stages = len(nets[0][0])
    if not 0 <= split < n_stages:
        raise ValueError(f"shared_stages must be in [0, {n_stages - 1}] for {cfg.backbone}")
    if cfg.layout == "shared" and split == 0:
        raise ValueError("layout 'shared' needs shared_stages >= 1")
    stem: nn.Module = nn.Sequential(*nets[0][0][:split]) if split else nn.Identity()
    feat_dim = nets[0][1]
    experts = nn.ModuleList()
    for stages, _ in nets:
        neck: nn.Module = nn.Identity()
        in_features = feat_dim
        if cfg.neck_dim:
            neck, in_features = ProjectionNeck(feat_dim, cfg.neck_dim), cfg.neck_dim
        head = build_head(
            cfg.head,
            in_features,
            cfg.num_classes,
            bias=cfg.head_bias,
            scale=cfg.cosine_scale,
            learn_scale=cfg.learn_scale,
        )
        experts.append(Expert(nn.Sequential(*stages[split:]), neck, head))
    return stem, experts, feat_dim
