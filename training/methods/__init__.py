"""Training methods. Each is a small :class:`Method`; the engine is shared."""

from __future__ import annotations

from .base import Method, MethodParams, balanced_logits
from .baselines import BalancedSoftmax, CrossEntropy
from .ncl import NCL, NCLLoss

METHODS: dict[str, type[Method]] = {m.name: m for m in (CrossEntropy, BalancedSoftmax, NCL)}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


__all__ = ["METHODS", "NCL", "BalancedSoftmax", "CrossEntropy", "NCLLoss", "Method", "MethodParams", "balanced_logits"]
