"""ltzoo: a model zoo for long-tailed recognition with multi-expert ensembles.

>>> import zoo
>>> model = zoo.load("ecl-resnext50-imagenetlt", pretrained=False)
>>> [row["name"] for row in zoo.list_models("ncl")][:2]
['ncl-resnet32-fmnistlt', 'ncl-resnet32-cifar100lt-r100']
"""

from .config import EnsembleConfig, PreprocessConfig, shot_group
from .ensemble import Ensemble, Prediction
from .hub_io import ModelNotAvailableError, download, load, push_to_hub
from .registry import get_entry, list_models

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "EnsembleConfig",
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
