"""`zoo.Ensemble`: the one object that travels from training to export and serving."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from . import calibration as cal
from .cards import render_card
from .config import EnsembleConfig
from .files import CONFIG_NAME as CONFIG_NAME  # re-exported: zoo.ensemble.CONFIG_NAME
from .files import WEIGHTS_NAME as WEIGHTS_NAME
from .files import atomic_write
from .models import Expert, as_experts, build_experts
from .preprocess import Preprocess

if TYPE_CHECKING:
    from hashlib import _Hash as Hash


@dataclass
class Prediction:
    """Calibrated output of :meth:`Ensemble.predict` for a batch of B images."""

    probs: torch.Tensor  # (B, C) calibrated probabilities
    top_indices: torch.Tensor  # (B, k)
    top_probs: torch.Tensor  # (B, k)
    labels: list[list[str]]  # class names of the top-k, per image
    disagreement: torch.Tensor  # (B,) mean pairwise KL between experts


class Ensemble(nn.Module):
    """K experts plus everything needed to turn pixels into calibrated probabilities.

    * ``forward(x)`` -> combined logits (mean of the experts' logits), shape (B, C).
    * ``expert_logits(x)`` -> per-expert logits, shape (K, B, C).
    * ``predict(images, top_k=5, prior="balanced")`` -> :class:`Prediction` with
      calibrated probabilities (prior adjustment, then the fitted temperature).

    Example::

        >>> import zoo
        >>> model = zoo.load("ncl-resnet32-fmnistlt", pretrained=False)
        >>> model.predict(torch.zeros(1, 1, 28, 28)).probs.shape
        torch.Size([1, 10])
    """

    stem: nn.Module
    experts: nn.ModuleList
    feature_dim: int

    def __init__(
        self, config: EnsembleConfig, pretrained_backbone: str | Path | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.stem, self.experts, self.feature_dim = build_experts(config, pretrained_backbone)
        self.transform = Preprocess(config.preprocess)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_list(self) -> list[Expert]:
        """The experts as a typed list (``self.experts`` is their ``nn.ModuleList``)."""
        return as_experts(self.experts)

    def expert_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's classifier input feature (after its neck)."""
        h = self.stem(x)
        return [e.forward_features(h) for e in self.expert_list]

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every expert, stacked: (K, B, C)."""
        h = self.stem(x)
        return torch.stack([e(h) for e in self.experts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Combined logits: the mean of the experts' logits."""
        return self.expert_logits(x).mean(0)

    # -- calibration (all in zoo.calibration) --------------------------------------------
    def source_prior(self) -> torch.Tensor:
        """The class prior the combined logits are calibrated for."""
        return cal.source_prior(self.config)

    def prior_shift(self, prior: cal.PriorSpec = None) -> torch.Tensor:
        """Logit shift for a target prior spec (default: the config's), to be applied as
        ``softmax((logits + shift) / T)``; see :func:`zoo.calibration.log_prior_shift`."""
        return cal.log_prior_shift(self.config, prior)

    def calibrated_probs(self, logits: torch.Tensor, prior: cal.PriorSpec = None) -> torch.Tensor:
        """Prior-adjusted, temperature-scaled probabilities from combined logits."""
        return cal.calibrated_probs(logits, self.prior_shift(prior), self.config.temperature)

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image(s) of any size and mode -> normalised batch tensor (B, C, H, W)."""
        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.transform(im) for im in images])

    @torch.inference_mode()
    def predict(
        self,
        images: Image.Image | Sequence[Image.Image] | torch.Tensor,
        top_k: int = 5,
        prior: cal.PriorSpec = None,
    ) -> Prediction:
        """Calibrated top-k predictions for PIL image(s) or a preprocessed tensor batch.

        ``prior`` is "balanced" (default), "train", "estimate" (EM on this batch, Saerens
        et al. 2002; at least ``MIN_ESTIMATE_BATCH`` images) or a vector of class weights.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
            raise ValueError(f"top_k must be an integer, got {top_k!r}")
        if not 1 <= top_k <= self.config.num_classes:
            raise ValueError(f"top_k must be in [1, {self.config.num_classes}], got {top_k}")
        x = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        cal.check_estimate_batch(prior, len(x))
        device = next(self.parameters()).device
        expert_logits = self.expert_logits(x.to(device)).float().cpu()
        shift = cal.batch_log_prior_shift(self.config, prior, expert_logits)
        probs, disagreement = cal.calibrate(expert_logits, shift, self.config.temperature)
        top_probs, top_idx = probs.topk(top_k, dim=1)
        names = self.config.class_names
        return Prediction(
            probs=probs,
            top_indices=top_idx,
            top_probs=top_probs,
            labels=[[names[i] for i in row] for row in top_idx.tolist()],
            disagreement=disagreement,
        )

    def select_experts(self, indices: Sequence[int]) -> Ensemble:
        """A new ensemble that keeps only the experts at ``indices`` (distinct, shares no tensors)."""
        if not indices or any(not 0 <= i < self.num_experts for i in indices):
            raise ValueError(
                f"expert indices must be in [0, {self.num_experts - 1}], got {list(indices)}"
            )
        if len(set(indices)) != len(indices):
            raise ValueError(f"expert indices must be distinct, got {list(indices)}")
        cfg = copy.deepcopy(self.config)
        cfg = replace(
            cfg, num_experts=len(indices), extra={**cfg.extra, "expert_subset": list(indices)}
        )
        sub = Ensemble(cfg)
        sub.stem.load_state_dict(self.stem.state_dict())
        for dst, i in zip(sub.experts, indices, strict=True):
            dst.load_state_dict(self.experts[i].state_dict())
        return sub.to(next(self.parameters()).device).eval()

    # -- persistence -----------------------------------------------------------------
    def weights_digest(self, digest: Hash | None = None) -> Hash:
        """Feed every tensor's name and bytes (dtype-exact, layout-free) into ``digest`` (a
        new sha256 by default) and return it: equal weights give equal digests, whatever
        device or memory format holds them."""
        digest = hashlib.sha256() if digest is None else digest
        for name, tensor in self.state_dict().items():
            digest.update(name.encode())
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest

    def save_pretrained(self, directory: str | Path, card: bool = True) -> Path:
        """Write ``model.safetensors``, ``config.json`` and (``card``) a model card ``README.md``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        # written through open() (not safetensors' own writer, which creates files with mode
        # 0600), so the file gets the usual umask-derived mode like config.json and README.md
        data = save_safetensors(state, metadata={"format": "pt", "library": "ltzoo"})
        # each file atomic, config.json (what marks a directory as a model) after the weights:
        # a training run killed mid-save never leaves a model that counts as saved but is torn
        atomic_write(directory / WEIGHTS_NAME, data)
        self.config.save(directory / CONFIG_NAME)
        if card:
            atomic_write(directory / "README.md", render_card(self.config).encode())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Ensemble:
        """Load an ensemble saved by :meth:`save_pretrained` from a local directory (strict:
        a missing file, tensor or an unexpected tensor is an error; nothing is unpickled)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: not an ltzoo model directory")
        model = cls(EnsembleConfig.load(config_path))
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights_path} is not a valid safetensors file: {exc}") from exc
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


def record_source(model: Ensemble, source: dict[str, Any] | None) -> None:
    """Replace ``model.config`` by a copy whose ``extra["source"]`` is ``source`` (where the
    weights came from; ``None`` removes it). The config itself is frozen."""
    extra = {k: v for k, v in model.config.extra.items() if k != "source"}
    if source is not None:
        extra["source"] = source
    model.config = replace(model.config, extra=extra)
