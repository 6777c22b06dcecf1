"""Image -> tensor preprocessing that travels with the model (like torchvision weights' transforms).

Handles any PIL mode (RGB, L, RGBA, P, I;16, ...) and EXIF orientation, so serving and
evaluation cannot drift from what the model was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import PreprocessConfig


def to_model_mode(
    image: Image.Image, channels: int, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Apply EXIF rotation and convert any mode to "L" (1 channel) or "RGB" (3 channels).

    Transparent pixels are composited onto ``background``
    (:attr:`PreprocessConfig.background_rgb`: the training images' background).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: rescale to 8 bit by the type's range, not by clipping.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        # 32-bit float greyscale: [0, 1] is the float convention (scaled, not clipped to
        # black); other values are read as 0-255 grey levels
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(backdrop, rgba)
    return image.convert("L" if channels == 1 else "RGB")


class Preprocess:
    """Callable turning a PIL image into a normalised (C, H, W) float tensor."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std).view(-1, 1, 1)

    def _resize(self, image: Image.Image) -> Image.Image:
        h, w = self.cfg.input_size
        if self.cfg.resize == "resize":
            return image.resize((w, h), Image.Resampling.BILINEAR)
        short = round(min(h, w) / self.cfg.crop_pct)
        scale = short / min(image.size)
        resized = image.resize(
            (max(w, round(image.width * scale)), max(h, round(image.height * scale))),
            Image.Resampling.BILINEAR,
        )
        left, top = (resized.width - w) // 2, (resized.height - h) // 2
        return resized.crop((left, top, left + w, top + h))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self._resize(to_model_mode(image, self.cfg.channels, self.cfg.background_rgb))
        arr = np.asarray(image, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        return (t - self.mean) / self.std
