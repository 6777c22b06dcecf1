"""torchrun / DDP helpers. A single process is just world size 1."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group started by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank. Ranks must agree to skip a step together:
    a rank that skipped alone would leave the others waiting in DDP's gradient all-reduce."""
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if _in_group():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank, concatenated along dim 0 in rank order (itself outside torchrun).
    Every rank must pass the same shape."""
    if not _in_group():
        return tensor
    tensor = tensor.contiguous()  # the outputs take its strides, and nccl wants them dense
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank, the same on all (itself outside torchrun)."""
    if not _in_group():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def shuffle_across_ranks(
    batch: torch.Tensor, enabled: bool = True
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """MoCo's shuffle BN: this rank's share of every rank's ``batch`` in one random order (the
    same on all ranks, drawn on rank 0), and ``restore``, which maps this rank's per-image
    outputs on that share back to its own images in their order. Outside torchrun, or when
    not ``enabled``: ``batch`` itself and the identity. Every rank must pass the same shape
    (the loader drops last)."""
    if not enabled or not _in_group():
        return batch, lambda out: out
    everyone = gather_from_ranks(batch)
    order = torch.randperm(len(everyone), device=batch.device)
    dist.broadcast(order, src=0)
    rank, n = dist.get_rank(), len(batch)
    mine = order.view(-1, n)[rank]
    back = torch.argsort(order).view(-1, n)[rank]  # where this rank's images went

    def restore(out: torch.Tensor) -> torch.Tensor:
        return gather_from_ranks(out)[back]

    return everyone[mine], restore


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
