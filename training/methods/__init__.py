"""Training methods. Each is a small :class:`Method`; the engine is shared."""

from __future__ import annotations

from .base import Method, MethodParams, balanced_logits
from .baselines import BalancedSoftmax, CrossEntropy
from .cbd import CBD, CBDParams
from .ecl import ECL
from .ncl import NCL, NCLLoss

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (CrossEntropy, BalancedSoftmax, NCL, ECL, CBD)
}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


__all__ = [
    "CBD",
    "ECL",
    "METHODS",
    "NCL",
    "BalancedSoftmax",
    "CBDParams",
    "CrossEntropy",
    "Method",
    "MethodParams",
    "NCLLoss",
    "balanced_logits",
]
