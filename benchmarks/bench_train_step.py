"""Training-step cost: one NCL step (3 experts, NIL + NBOD) vs 3 x one CE step of a single
expert on the same batch, side by side in one run; plus peak memory.

    python benchmarks/bench_train_step.py [--batch 64] [--repeats 20]

Writes benchmarks/results/train_step_cpu.json (or _cuda on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import zoo
from training.methods import METHODS

COUNTS = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]


def _method(name: str, experts: int, params: dict, device: torch.device):
    layout = "independent" if experts > 1 else "single"
    model = zoo.Ensemble(
        zoo.EnsembleConfig(num_experts=experts, layout=layout, class_counts=COUNTS)
    )
    cls = METHODS[name]
    method = cls(model, COUNTS, cls.Params.from_dict(params)).to(device)
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    return method, opt


def _step_ms(method, opt, x, y, repeats: int, device: torch.device) -> list[float]:
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = method(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    ce, ce_opt = _method("ce", 1, {}, device)
    ncl, ncl_opt = _method("ncl", 3, {"num_hard": 3}, device)
    # interleave the two so machine load affects both alike
    ce_ms, ncl_ms = [], []
    for _ in range(max(1, args.repeats // 5)):
        ce_ms += _step_ms(ce, ce_opt, x, y, 5, device)
        ncl_ms += _step_ms(ncl, ncl_opt, x, y, 5, device)
    ce_med, ncl_med = statistics.median(ce_ms), statistics.median(ncl_ms)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "ce_single_expert_step_ms": ce_med,
        "ncl_3_experts_step_ms": ncl_med,
        "ratio_ncl_vs_3x_ce": ncl_med / (3 * ce_med),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else None,
        "loadavg": list(__import__("os").getloadavg()),
    }
    out = Path(__file__).parent / "results" / f"train_step_{device.type}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
