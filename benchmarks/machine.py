"""Benchmarks are only true on an idle machine: every benchmark records the load average
before and after, and refuses to write results when the machine is busy.

    guard = LoadGuard.start(allow_busy=args.allow_busy)   # exits 3 on a busy machine
    ...
    report["machine"] = guard.finish()                   # loadavg before/after, label

The limit is 0.75 x the number of cores for the 1-minute load average before the run (1.5
on this project's 2-core CI machine); the load after is recorded, not judged, since the
benchmark's own threads raise it. With ``--allow-busy`` the run goes ahead and the JSON says
``"measured under load"``; README tables print that label next to such figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from ltzoo.training.precision import cpu_info

BUSY_FRACTION = 0.75
UNDER_LOAD = "measured under load"
IDLE = "idle machine"


def busy_limit() -> float:
    """The highest 1-minute load average that still counts as idle."""
    return BUSY_FRACTION * (os.cpu_count() or 1)


def add_allow_busy(parser: argparse.ArgumentParser) -> None:
    """The ``--allow-busy`` flag every benchmark takes."""
    parser.add_argument(
        "--allow-busy",
        action="store_true",
        help=f"run even when the 1-minute load average is above {busy_limit():.2f}; the "
        f"results are then labelled '{UNDER_LOAD}'",
    )


#: instruction-set extensions that change which kernels (fp32, INT8, bf16) are fast
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def process_cmdline(pid: int | str) -> bytes:
    """A process's NUL-separated argv from /proc (b"" once it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def cpu_model_and_isa(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """The CPU's model name and which of :data:`ISA_FLAGS` it has (Linux; empty elsewhere):
    ratios measured on an AVX2-only CPU and on one with VNNI/AMX differ, INT8's above all."""
    fields = cpu_info(cpuinfo)
    if not fields:
        return {}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", ""), "isa": [f for f in ISA_FLAGS if f in flags]}


@dataclass
class LoadGuard:
    """The load average when a benchmark started, and whether it was allowed to be busy."""

    before: tuple[float, float, float]
    allow_busy: bool

    @classmethod
    def start(cls, allow_busy: bool = False) -> LoadGuard:
        before = os.getloadavg()
        if before[0] > busy_limit() and not allow_busy:
            sys.exit(
                f"refusing to benchmark: 1-minute load average {before[0]:.2f} > "
                f"{busy_limit():.2f} on {os.cpu_count()} cores (stop other work and retry, "
                f"or pass --allow-busy to label the results '{UNDER_LOAD}')"
            )
        return cls(before, allow_busy)

    def finish(self) -> dict[str, object]:
        """What goes into the results JSON under ``"machine"``."""
        after = os.getloadavg()
        # the benchmark's own threads raise the load while it runs: only what was running
        # before it started says whether the machine was shared
        busy = self.before[0] > busy_limit()
        return {
            "cpu": platform.processor() or platform.machine(),
            **cpu_model_and_isa(),
            "cores": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in self.before],
            "loadavg_after": [round(x, 2) for x in after],
            "busy_limit_1m": busy_limit(),
            "label": UNDER_LOAD if busy else IDLE,
        }
