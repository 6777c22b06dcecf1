"""Batched augmentation on uint8 tensors: the fast input path for in-memory datasets.

For datasets held in memory as decoded uint8 arrays (Fashion-MNIST, CIFAR), a training
batch is gathered as one uint8 tensor, moved to the training device, and augmented there
in one vectorised pass: no PIL image, no per-sample Python call, no worker process. It
draws from the same distributions as the per-sample pipeline in :mod:`.transforms`:

* ``crop_flip`` (inputs < 64 px): zero-pad the raw pixels by 4, crop ``input_size`` at a
  uniform offset in [-4, 4]^2, mirror with p = 0.5 (:class:`.transforms.PadRandomCrop` +
  :class:`.transforms.HorizontalFlip`);
* normalisation with the model's mean/std (:class:`zoo.preprocess.Preprocess`);
* ``cutout``: one zeroed square of the normalised image (:class:`.transforms.Cutout`).

Any other augmentation (AutoAugment, RandAugment, colour jitter, large-image crops) needs
PIL, so :func:`batched_augment_for` returns ``None`` and the engine keeps the per-sample
pipeline with DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ltzoo.zoo.config import PreprocessConfig

from .transforms import SMALL_IMAGE_MAX, cutout_size, parse_augmentation

#: Augmentations the batched path reproduces exactly (by distribution).
BATCHED_AUGMENTATIONS = ("crop_flip", "cutout")
PAD = 4


class BatchAugment(nn.Module):
    """uint8 batch (B, H, W) or (B, H, W, C) -> augmented, normalised float (B, C, H, W).

    The random draws (:meth:`draw`) are separate from their application (:meth:`augment`) so
    a test can check the application against the per-sample transforms pixel for pixel.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        preprocess: PreprocessConfig,
        crop_flip: bool,
        cutout: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.crop_flip, self.cutout = crop_flip, cutout
        self.channels_last = channels_last
        shape = (1, preprocess.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(shape), persistent=False)

    def draw(self, batch: int, height: int, width: int, device: torch.device) -> dict[str, Any]:
        """Per-sample random parameters: crop offsets, flips, cutout centres."""
        draws: dict[str, Any] = {}
        if self.crop_flip:
            draws["offsets"] = torch.randint(2 * PAD + 1, (batch, 2), device=device) - PAD
            draws["flip"] = torch.rand(batch, device=device) < 0.5
        if self.cutout:
            draws["centres"] = torch.stack(
                [
                    torch.randint(height, (batch,), device=device),
                    torch.randint(width, (batch,), device=device),
                ],
                dim=1,
            )
        return draws

    def augment(self, images: torch.Tensor, draws: dict[str, Any]) -> torch.Tensor:
        """Augment ``images`` (uint8, channels last in memory as decoded) with ``draws``."""
        x = images if images.ndim == 4 else images[..., None]
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W), a view until .float()
        if self.crop_flip:
            x = _shifted_crop(x, draws["offsets"])
            x = torch.where(draws["flip"][:, None, None, None], x.flip(-1), x)
        x = (x - self.mean) / self.std
        if self.cutout:
            x = x * _cutout_keep(x.shape, draws["centres"], self.cutout)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=layout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[1], images.shape[2]
        return self.augment(images, self.draw(images.shape[0], h, w, images.device))


def _shifted_crop(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Crop each image at (top, left) = offsets from its zero-padded version, same size."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + PAD + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + PAD + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices around a slice move to the front: (B, H, W, C)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout_keep(shape: torch.Size, centres: torch.Tensor, size: int) -> torch.Tensor:
    """1 outside, 0 inside each image's square (top-left at centre - size // 2, clipped)."""
    _, _, h, w = shape
    top_left = centres - size // 2
    ys = torch.arange(h, device=centres.device)
    xs = torch.arange(w, device=centres.device)
    in_y = (ys >= top_left[:, 0, None]) & (ys < top_left[:, 0, None] + size)  # (B, H)
    in_x = (xs >= top_left[:, 1, None]) & (xs < top_left[:, 1, None] + size)  # (B, W)
    inside = in_y[:, :, None] & in_x[:, None, :]
    return (~inside)[:, None].to(torch.float32)


class UInt8Batches(Dataset):
    """An in-memory dataset's raw uint8 images, fetched a whole batch at a time.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices; pair it with
    :func:`collate_uint8` (which keeps the batch as it is).
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def collate_uint8(batch: Any) -> Any:
    """The ``(images, labels)`` batch :meth:`UInt8Batches.__getitems__` already built."""
    return batch


def batched_augment_for(
    dataset: Dataset,
    preprocess: PreprocessConfig,
    augment: Sequence[str],
    channels_last: bool = False,
) -> BatchAugment | None:
    """A :class:`BatchAugment` reproducing ``augment`` on ``dataset``, or ``None`` when the
    dataset is not an in-memory uint8 array at the model's input size and mode, or an
    augmentation needs the per-sample (PIL) pipeline."""
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return None
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    h, w = preprocess.input_size
    if (int(images.shape[1]), int(images.shape[2])) != (h, w) or channels != preprocess.channels:
        return None
    names = [parse_augmentation(a)[0] for a in augment]
    if any(n not in BATCHED_AUGMENTATIONS for n in names) or min(h, w) >= SMALL_IMAGE_MAX:
        return None
    cutout = cutout_size(h, w) if "cutout" in names else 0
    return BatchAugment(preprocess, "crop_flip" in names, cutout, channels_last)
