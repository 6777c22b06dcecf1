"""Training methods. Each is a small :class:`Method`; the engine is shared."""

from __future__ import annotations

from .base import Method, MethodParams, balanced_logits
from .baselines import BalancedSoftmax, CrossEntropy
from .ecl import ECL
from .ncl import NCL, NCLLoss

METHODS: dict[str, type[Method]] = {m.name: m for m in (CrossEntropy, BalancedSoftmax, NCL, ECL)}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


__all__ = ["ECL", "METHODS", "NCL", "BalancedSoftmax", "CrossEntropy", "Method", "MethodParams", "NCLLoss", "balanced_logits"]
