"""Long-tailed datasets, samplers and augmentations for training.

>>> from training.data import build_lt_dataset, build_sampler, build_transforms, lt_counts
>>> lt_counts(1000, 10, 100)
[1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
"""

from .datasets import (
    NAMES,
    ArrayImageDataset,
    FileListDataset,
    LTSplit,
    build_lt_dataset,
    read_idx,
    read_split_file,
)
from .model_split import split_for_model
from .profile import lt_counts
from .samplers import (
    SAMPLERS,
    ClassBalancedSampler,
    InstanceSampler,
    LTSampler,
    SqrtSampler,
    build_sampler,
)
from .transforms import AUGMENTATIONS, Cutout, TrainTransform, build_transforms

__all__ = [
    "AUGMENTATIONS",
    "NAMES",
    "SAMPLERS",
    "ArrayImageDataset",
    "ClassBalancedSampler",
    "Cutout",
    "FileListDataset",
    "InstanceSampler",
    "LTSampler",
    "LTSplit",
    "SqrtSampler",
    "TrainTransform",
    "build_lt_dataset",
    "build_sampler",
    "build_transforms",
    "lt_counts",
    "read_idx",
    "read_split_file",
    "split_for_model",
]
