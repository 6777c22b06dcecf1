"""Baselines: plain cross-entropy and Balanced Softmax (Ren et al., NeurIPS 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..precision import float32_loss
from .base import Method, MethodParams, balanced_logits

cross_entropy = float32_loss(F.cross_entropy)


@dataclass
class NoParams(MethodParams):
    pass


class CrossEntropy(Method):
    """One network, cross-entropy, instance sampling. Its logits follow the training prior."""

    name = "ce"
    Params = NoParams

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.model(images)
        loss = cross_entropy(logits, labels)
        return loss, {"ce": loss.item()}


class BalancedSoftmax(Method):
    """Cross-entropy on z + log(n_c); the raw logits are then the balanced-test predictor."""

    name = "balanced_softmax"
    Params = NoParams

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.model(images)
        loss = cross_entropy(balanced_logits(logits, self.log_counts), labels)
        return loss, {"bs": loss.item()}
