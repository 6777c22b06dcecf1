"""MoCo-style contrastive branch shared by NCL (its optional self-supervision) and ECL
(its "contrastive proxy task").

Per expert: a projection head on the expert's feature (query), an EMA copy of the whole
encoder + head (key), and a queue of negatives. The key view is a second, batch-level
augmentation of the same images (random flip + random translation), so the data pipeline
stays single-view; the official NCL code instead loads two augmented crops per image.
Under torchrun every rank queues the keys of all ranks (gathered in rank order, as the official
code's ``concat_all_gather``), so the queues stay identical across ranks without a broadcast;
and, unless its BatchNorm is synchronised, the key encoder runs on a batch shuffled across
ranks (MoCo's shuffle BN, the official code's ``shuffle_BN_DDP``). In one process both are
no-ops.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ltzoo.zoo import Ensemble
from ltzoo.zoo.models import as_experts

from ..distributed import gather_from_ranks, shuffle_across_ranks
from ..precision import float32_loss
from .base import MethodParams


@dataclass
class MoCoParams(MethodParams):
    """The MoCo branch's settings, shared by every method that can switch the branch on
    (NCL, ECL); ``contrastive_weight`` > 0 turns it on."""

    contrastive_weight: float = 0.0
    moco_dim: int = 64
    moco_queue: int = 1024
    moco_temperature: float = 0.2
    moco_momentum: float = 0.999


def projection_head(in_dim: int, out_dim: int) -> nn.Module:
    """MLP projection (Linear-ReLU-Linear), as in MoCo v2."""
    return nn.Sequential(
        nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim)
    )


def key_view(images: torch.Tensor, max_shift: float = 0.125) -> torch.Tensor:
    """A second random view of a batch: per-sample horizontal flip and translation."""
    b = images.shape[0]
    flip = torch.where(torch.rand(b, device=images.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(b, 2, device=images.device) * 2 - 1) * 2 * max_shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


@float32_loss
def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE with the positive key ``k`` and negatives ``queue`` (N, D); all L2-normalised."""
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCoBranch(nn.Module):
    """Per-expert MoCo: projection heads, momentum (EMA) key encoders, queues."""

    queues: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        model: Ensemble,
        dim: int = 64,
        queue_size: int = 1024,
        temperature: float = 0.2,
        momentum: float = 0.999,
    ) -> None:
        super().__init__()
        in_dim = model.config.neck_dim or model.feature_dim
        k = model.num_experts
        self.heads = nn.ModuleList(projection_head(in_dim, dim) for _ in range(k))
        self.key_encoder = copy.deepcopy(
            nn.ModuleDict({"stem": model.stem, "experts": model.experts})
        )
        self.key_heads = copy.deepcopy(self.heads)
        for p in [*self.key_encoder.parameters(), *self.key_heads.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("queues", F.normalize(torch.randn(k, queue_size, dim), dim=2))
        self.register_buffer("queue_ptr", torch.zeros(k, dtype=torch.long))
        self.temperature, self.momentum = temperature, momentum
        #: the last forward's keys, queued by :meth:`after_step` once its step was taken
        self.pending_keys: list[torch.Tensor] = []

    @torch.no_grad()
    def momentum_update(self, model: Ensemble) -> None:
        online = [*model.stem.parameters(), *model.experts.parameters(), *self.heads.parameters()]
        target = [*self.key_encoder.parameters(), *self.key_heads.parameters()]
        for p_k, p_q in zip(target, online, strict=True):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> list[torch.Tensor]:
        # Shuffle BN: under torchrun the key encoder's BatchNorm sees a batch mixed across
        # ranks, so a key cannot match its query through the statistics of one shared batch.
        # SyncBN's statistics are the global batch's whatever the order: nothing to shuffle.
        # (The walk is looked up per step, not cached: the engine converts to SyncBN after the
        # branch is built, and ~100 isinstance checks are nothing beside a forward.)
        sync_bn = any(isinstance(m, nn.SyncBatchNorm) for m in self.key_encoder.modules())
        view, restore = shuffle_across_ranks(key_view(images), enabled=not sync_bn)
        h = self.key_encoder["stem"](view)
        key_experts = cast(nn.ModuleList, self.key_encoder["experts"])
        keys = [
            F.normalize(head(e.forward_features(h)), dim=1)
            for e, head in zip(as_experts(key_experts), self.key_heads, strict=True)
        ]
        return list(restore(torch.stack(keys, dim=1)).unbind(1))  # one gather for all experts

    @torch.no_grad()
    def _enqueue(self, i: int, keys: torch.Tensor) -> None:
        size = self.queues.shape[1]
        keys = keys[-size:]  # more keys than slots (many ranks, a small queue): the last fill it
        ptr = int(self.queue_ptr[i])
        idx = (torch.arange(keys.shape[0], device=keys.device) + ptr) % size
        self.queues[i, idx] = keys.to(self.queues.dtype)
        self.queue_ptr[i] = (ptr + keys.shape[0]) % size

    def forward(self, expert_features: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Sum over experts of InfoNCE(query = projected feature, key = EMA encoder on a second view)."""
        keys = self._keys(images)
        loss = images.new_zeros(())
        for feat, head, key, queue in zip(
            expert_features, self.heads, keys, self.queues, strict=True
        ):
            q = F.normalize(head(feat), dim=1)
            loss = loss + info_nce(q, key, queue.detach(), self.temperature)
        self.pending_keys = keys
        return loss

    @torch.no_grad()
    def after_step(self, model: Ensemble) -> None:
        """Queue the keys of the step just taken, then move the key encoder. A step the engine
        skips (non-finite loss) queues nothing: an fp16 overflow in its keys would otherwise
        stay in the queue and make every later loss non-finite. Under torchrun the keys of
        every rank are queued."""
        if self.pending_keys:  # one gather for all experts: (ranks x batch, experts, dim)
            keys = gather_from_ranks(torch.stack(self.pending_keys, dim=1))
            for i in range(keys.shape[1]):
                self._enqueue(i, keys[:, i])
        self.pending_keys = []
        self.momentum_update(model)


def optional_moco(model: Ensemble, params: MoCoParams) -> MoCoBranch | None:
    """The MoCo branch ``params`` describe, or None when ``contrastive_weight`` is not > 0."""
    if not params.contrastive_weight > 0:
        return None
    return MoCoBranch(
        model,
        params.moco_dim,
        params.moco_queue,
        params.moco_temperature,
        params.moco_momentum,
    )
