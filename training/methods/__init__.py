"""Training methods. Each is a small :class:`Method`; the engine is shared."""

from __future__ import annotations

from ..registry import METHODS as _REGISTRY
from ..registry import register_method
from .base import Method, MethodParams, StageRun, balanced_logits
from .baselines import BalancedSoftmax, CrossEntropy
from .cbd import CBD, CBDParams
from .ecl import ECL
from .ncl import NCL, NCLLoss

for _method in (CrossEntropy, BalancedSoftmax, NCL, ECL, CBD):
    register_method(_method)

#: method name -> method class: the table of :mod:`training.registry`, typed
METHODS: dict[str, type[Method]] = _REGISTRY


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
    "StageRun",
    "balanced_logits",
]
