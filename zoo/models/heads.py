"""Classifier heads and the CBD projection neck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Logits = scale * cos(feature, class weight) (+ bias).

    NCL uses scale 16 with a learnable bias on ImageNet-LT; CBD scale 20 without bias.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 16.0,
        learn_scale: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        scale_t = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale_t)
        else:
            self.register_buffer("scale", scale_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))
        return logits if self.bias is None else logits + self.bias


class ProjectionNeck(nn.Module):
    """CBD student projection: Dense(out) + ReLU + L2 normalisation."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.relu(self.fc(x)), dim=1)


def build_head(
    kind: str,
    in_features: int,
    num_classes: int,
    *,
    bias: bool = True,
    scale: float = 16.0,
    learn_scale: bool = False,
) -> nn.Module:
    """A ``"linear"`` or ``"cosine"`` classifier."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes, bias=bias)
    if kind == "cosine":
        return CosineClassifier(in_features, num_classes, scale, learn_scale, bias)
    raise ValueError(f"unknown head {kind!r}; choose 'linear' or 'cosine'")
