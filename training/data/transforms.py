"""Training augmentations and evaluation preprocessing (PIL image -> normalised tensor).

Evaluation is exactly :class:`zoo.preprocess.Preprocess`, the pipeline that ships with
every model, so what is measured at training time is what serving computes.

Training applies the requested augmentations in a fixed canonical order, whatever the
order of the names:

1. convert to the model's mode ("L" or "RGB", via :func:`zoo.preprocess.to_model_mode`);
2. ``crop_flip`` -- pad-4 random crop + horizontal flip for small inputs (< 64 px),
   ``RandomResizedCrop`` + flip for larger ones;
3. ``autoaugment`` (CIFAR-10 policy; ``autoaugment:imagenet`` / ``:svhn`` also accepted)
   and ``randaugment`` (``n=2, m=10``; ``randaugment:N:M`` to choose);
4. ``simclr_jitter`` -- SimCLR colour jitter of strength ``s`` (``simclr_jitter:S``, default
   0.5, SimCLR's CIFAR setting): brightness, contrast and saturation ``0.8 s``, hue ``0.2 s``,
   with p=0.8, + random grayscale p=0.2 (1-channel images: brightness/contrast only, no
   grayscale);
5. resize to ``input_size`` and normalise with the config's mean/std (``Preprocess``);
6. ``cutout`` -- one zeroed square on the normalised tensor, 16 px at 32 px input and
   scaled with the input size otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from ltzoo.zoo.config import PreprocessConfig
from ltzoo.zoo.preprocess import Preprocess, to_model_mode

AUGMENTATIONS = ("crop_flip", "autoaugment", "randaugment", "cutout", "simclr_jitter")
_AA_POLICIES = {
    "cifar10": T.AutoAugmentPolicy.CIFAR10,
    "imagenet": T.AutoAugmentPolicy.IMAGENET,
    "svhn": T.AutoAugmentPolicy.SVHN,
}
#: Inputs smaller than this (shorter side) get the CIFAR-style pad-and-crop.
SMALL_IMAGE_MAX = 64


def cutout_size(height: int, width: int) -> int:
    """Cutout's square side: 16 px at 32 px input, scaled with the input size."""
    return max(1, round(16 * min(height, width) / 32))


class Cutout:
    """Zero one ``size`` x ``size`` square (clipped at the border) of a (C, H, W) tensor."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"cutout size must be >= 1, got {size}")
        self.size = int(size)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        half = self.size // 2
        y0, y1 = max(0, cy - half), min(h, cy - half + self.size)
        x0, x1 = max(0, cx - half), min(w, cx - half + self.size)
        t = t.clone()
        t[..., y0:y1, x0:x1] = 0.0
        return t

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


class PadRandomCrop:
    """CIFAR-style augmentation: zero-pad by ``padding`` then crop ``size`` at random.

    Same distribution as ``T.RandomCrop(size, padding)`` but one PIL call (``Image.crop``
    fills outside the image with 0), which keeps a Fashion-MNIST epoch cheap on CPU.
    Images of another size are resized (bilinear) first.
    """

    def __init__(self, size: tuple[int, int], padding: int = 4) -> None:
        self.size = (int(size[0]), int(size[1]))  # (h, w)
        self.padding = int(padding)

    def __call__(self, image: Image.Image) -> Image.Image:
        h, w = self.size
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        top, left = (torch.randint(2 * self.padding + 1, (2,)) - self.padding).tolist()
        return image.crop((left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"PadRandomCrop(size={self.size}, padding={self.padding})"


class HorizontalFlip:
    """Mirror left-right with probability ``p`` (torch RNG, so DataLoader seeding applies)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(())) < self.p:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class _ToMode:
    """Picklable wrapper around :func:`to_model_mode` (DataLoader workers pickle transforms)."""

    def __init__(self, channels: int, background: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.channels = channels
        self.background = background

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_model_mode(image, self.channels, self.background)

    def __repr__(self) -> str:
        return f"ToModelMode(channels={self.channels})"


class TrainTransform:
    """PIL image -> augmented, normalised (C, H, W) tensor."""

    def __init__(
        self,
        pil_steps: Sequence[Callable],
        finish: Preprocess,
        tensor_steps: Sequence[Callable] = (),
        augment: Sequence[str] = (),
    ) -> None:
        self.pil_steps = list(pil_steps)
        self.finish = finish
        self.tensor_steps = list(tensor_steps)
        self.augment = tuple(augment)

    def _finish(self, image: Image.Image) -> torch.Tensor:
        cfg = self.finish.cfg
        h, w = cfg.input_size
        if image.size == (w, h) and image.mode == ("L" if cfg.channels == 1 else "RGB"):
            # Fast path, numerically identical to Preprocess for an image that is already in
            # model mode and at input size (what the crops produce): skip its no-op resize.
            arr = np.asarray(image, dtype=np.float32) / 255.0
            t = torch.from_numpy(arr)
            t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
            return (t - self.finish.mean) / self.finish.std
        return self.finish(image)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        for step in self.pil_steps:
            image = step(image)
        t = self._finish(image)
        for step in self.tensor_steps:
            t = step(t)
        return t

    def __repr__(self) -> str:
        steps = [*self.pil_steps, "Preprocess", *self.tensor_steps]
        return "TrainTransform(" + ", ".join(map(str, steps)) + ")"


def parse_augmentation(name: str) -> tuple[str, list[str]]:
    """``'randaugment:2:9'`` -> ``('randaugment', ['2', '9'])``; unknown names are errors."""
    base, *args = str(name).strip().split(":")
    base = base.strip().lower()
    if base not in AUGMENTATIONS:
        raise ValueError(
            f"unknown augmentation {name!r}; valid names: {', '.join(AUGMENTATIONS)} "
            "(randaugment also as 'randaugment:N:M', autoaugment as 'autoaugment:POLICY', "
            "simclr_jitter as 'simclr_jitter:STRENGTH')"
        )
    return base, args


def _jitter_strength(args: list[str]) -> float:
    """The ``S`` of ``simclr_jitter:S`` (default 0.5). torchvision caps hue at 0.5, so S <= 2.5."""
    try:
        strength = float(args[0]) if args else 0.5
    except ValueError:
        raise ValueError(
            f"simclr_jitter takes 'simclr_jitter:S' with a number, got {args}"
        ) from None
    if len(args) > 1 or not 0 < strength <= 2.5:
        raise ValueError(f"simclr_jitter needs one strength in (0, 2.5], got {args}")
    return strength


def build_transforms(
    preprocess: PreprocessConfig, augment: Sequence[str] = (), train: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """Return a callable mapping a PIL image (any mode) to a normalised (C, H, W) tensor.

    ``train=False`` (or ``train=True`` with no augmentation) is exactly
    ``zoo.preprocess.Preprocess(preprocess)``. See the module docstring for the names.
    """
    if isinstance(augment, str):
        augment = [a for a in augment.split(",") if a.strip()]
    parsed = [parse_augmentation(a) for a in augment]  # validate names even for eval
    if not train or not parsed:
        return Preprocess(preprocess)

    opts: dict[str, list[str]] = {}
    for base, args in parsed:
        opts[base] = args
    h, w = preprocess.input_size
    channels = preprocess.channels
    pil: list[Callable] = [_ToMode(channels, preprocess.background_rgb)]
    finish_cfg = preprocess

    if "crop_flip" in opts:
        if min(h, w) < SMALL_IMAGE_MAX:
            pil.append(PadRandomCrop((h, w), padding=4))
        else:
            pil.append(T.RandomResizedCrop((h, w), interpolation=T.InterpolationMode.BILINEAR))
        pil.append(HorizontalFlip(0.5))
        # The crop already produced input_size: the final step only normalises.
        finish_cfg = dataclasses.replace(preprocess, resize="resize")

    if "autoaugment" in opts:
        args = opts["autoaugment"]
        policy = (args[0] if args else "cifar10").lower()
        if policy not in _AA_POLICIES or len(args) > 1:
            raise ValueError(
                f"autoaugment policy must be one of {sorted(_AA_POLICIES)}, got {':'.join(args)!r}"
            )
        pil.append(T.AutoAugment(_AA_POLICIES[policy]))

    if "randaugment" in opts:
        args = opts["randaugment"]
        try:
            n = int(args[0]) if len(args) > 0 else 2
            m = int(args[1]) if len(args) > 1 else 10
        except ValueError:
            raise ValueError(
                f"randaugment takes 'randaugment:N:M' with integers, got {args}"
            ) from None
        if len(args) > 2 or n < 0 or not 0 <= m <= 30:
            raise ValueError(f"randaugment needs N >= 0 and 0 <= M <= 30, got {args}")
        pil.append(T.RandAugment(num_ops=n, magnitude=m))

    if "simclr_jitter" in opts:
        s = _jitter_strength(opts["simclr_jitter"])
        if channels == 1:
            # Hue/saturation/grayscale are meaningless on one channel: keep brightness/contrast.
            pil.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s)], p=0.8))
        else:
            pil.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
            pil.append(T.RandomGrayscale(p=0.2))

    tensor: list[Callable] = []
    if "cutout" in opts:
        tensor.append(Cutout(cutout_size(h, w)))

    return TrainTransform(pil, Preprocess(finish_cfg), tensor, [a for a, _ in parsed])
