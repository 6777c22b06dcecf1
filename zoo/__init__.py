"""ltzoo.zoo: the model zoo for long-tailed recognition with multi-expert ensembles.

>>> from ltzoo import zoo
>>> model = zoo.load("ecl-resnext50-imagenetlt", pretrained=False)
>>> [row["name"] for row in zoo.list_models("ncl")][:2]
['ncl-resnet32-fmnistlt', 'ncl-resnet32-cifar100lt-r100']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use: importing zoo loads no torch
    from .config import EnsembleConfig, PreprocessConfig, shot_group
    from .ensemble import Ensemble, Prediction
    from .errors import IntegrityError, ModelNotAvailableError
    from .hub_io import download, load, push_to_hub
    from .registry import get_entry, list_models

#: public name -> submodule defining it (imported lazily, so `ltzoo --help` stays fast)
_LAZY = {
    "EnsembleConfig": "config",
    "PreprocessConfig": "config",
    "shot_group": "config",
    "Ensemble": "ensemble",
    "Prediction": "ensemble",
    "IntegrityError": "errors",
    "ModelNotAvailableError": "errors",
    "download": "hub_io",
    "load": "hub_io",
    "push_to_hub": "hub_io",
    "get_entry": "registry",
    "list_models": "registry",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Ensemble",
    "EnsembleConfig",
    "IntegrityError",
    "ModelNotAvailableError",
    "Prediction",
    "PreprocessConfig",
    "download",
    "get_entry",
    "list_models",
    "load",
    "push_to_hub",
    "shot_group",
]
