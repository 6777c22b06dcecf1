"""Training precision: ``run.precision = "auto" | "fp32" | "bf16"`` resolved for a device.

* ``fp32``: no autocast.
* ``bf16``: the method's forward runs under ``torch.autocast(dtype=bfloat16)``, so the
  experts' convolutions and linear layers compute in bf16; every loss is computed in fp32
  (:func:`float32_loss`); BatchNorm statistics, master weights, optimiser state,
  checkpoints, published weights and exports stay fp32. On a CPU without native bf16
  (neither AVX512-BF16 nor AMX) bf16 is emulated and slower than fp32, so a request for it
  there gets one warning line and fp32.
* ``auto``: fp32 on every CPU, because bf16 failed the accuracy-parity check: on
  Fashion-MNIST-LT, Balanced Softmax matched fp32 but all three NCL seeds hit loss spikes
  in bf16 that the fp32 runs never show (README, "Training in bf16"); ``bf16`` is opt-in.
  On a GPU, bf16 where it has it, else fp16 with the gradient scaler (classic AMP).

What was used is recorded in ``run.json``, ``results.json`` and the model card
(:meth:`Precision.record`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

PRECISIONS = ("auto", "fp32", "bf16")
#: CPU flags (``/proc/cpuinfo``) that mean native bf16 matrix kernels in oneDNN
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

#: whether ``auto`` picks bf16 on a CPU that has it: only once accuracy parity with fp32 is
#: measured (README, "Training in bf16"); it did not hold for NCL
AUTO_BF16_ON_CPU = False

logger = logging.getLogger("ltzoo.training")
_LOW = (torch.float16, torch.bfloat16)
F = TypeVar("F", bound=Callable[..., Any])


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (Linux); empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first processor's ISA flags (Linux); empty where ``cpuinfo`` cannot be read."""
    return set(cpu_info(cpuinfo).get("flags", "").split())


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """What a run computes in: ``used`` is ``fp32``, ``bf16`` or ``fp16`` (CUDA only)."""

    requested: str
    used: str
    device_type: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.used)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.used == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context a training forward runs in (a no-op for fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def record(self) -> dict[str, str]:
        """What ``run.json``, ``results.json`` and the model card say about precision."""
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision ``requested`` (one of :data:`PRECISIONS`) gives on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"run.precision must be one of {PRECISIONS}, got {requested!r}")
    kind = device.type
    if requested == "fp32":
        return Precision(requested, "fp32", kind, "asked for")
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(requested, "bf16", kind, "CUDA autocast, the GPU has bf16")
        if requested == "bf16":
            logger.warning("run.precision=bf16: this GPU has no bf16; using fp16 autocast")
        return Precision(requested, "fp16", kind, "CUDA autocast with the gradient scaler")
    if kind != "cpu":
        return Precision(requested, "fp32", kind, f"no autocast on {kind}")
    if requested == "auto" and not AUTO_BF16_ON_CPU:
        return Precision(requested, "fp32", kind, "auto is fp32 on CPUs: bf16 lost accuracy (NCL)")
    if cpu_has_bf16():
        return Precision(requested, "bf16", kind, "the CPU has AVX512-BF16 or AMX")
    if requested == "bf16":
        logger.warning(
            "run.precision=bf16: this CPU has neither AVX512-BF16 nor AMX, where bf16 is "
            "slower than fp32; training in fp32 instead"
        )
        return Precision(requested, "fp32", kind, "bf16 asked for; the CPU has no bf16")
    return Precision(requested, "fp32", kind, "the CPU has no bf16")


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW else value
    if isinstance(value, list | tuple):
        return type(value)(_upcast(v) for v in value)
    return value


def float32_loss(fn: F) -> F:
    """Run a loss in fp32 whatever autocast is active: fp16/bf16 tensor arguments (also
    inside lists and tuples) are cast to fp32 and autocast is off inside, so softmax,
    log-softmax, KL and contrastive logits never round to 8 bits of mantissa. fp32 and fp64
    inputs pass through unchanged (the fp32 path is exactly what it was)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # one plain `with` (no ExitStack): torch.compile traces it without a graph break
        device_type = "cuda" if torch.is_autocast_enabled("cuda") else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn(*_upcast(args), **{k: _upcast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
