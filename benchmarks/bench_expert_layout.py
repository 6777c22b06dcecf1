"""How to lay out K experts for training on a CPU: forward + backward of 3 x ResNet-32,
side by side in one run (interleaved rounds).

* ``separate``: K expert modules called in a Python loop (what ``zoo.Ensemble`` does);
* ``grouped``: the K experts as ONE network of grouped convolutions (``groups = K``): each
  layer concatenates the experts' weights and runs one convolution and one batch norm over
  K x the channels (the route "all K experts as one batched module");
* ``vmap``: ``torch.func.stack_module_state`` + ``vmap`` over ``functional_call``.

Batch norm uses batch statistics without updating running statistics in ``grouped`` and
``vmap`` (vmap cannot update them in place), so both do slightly less work than a real
step: an upper bound on what the layouts could gain. Fashion-MNIST (1x28x28) and CIFAR
(3x32x32) shapes, batch 64, channels-last and NCHW.

    python benchmarks/bench_expert_layout.py [--rounds 5] [--allow-busy]

Writes benchmarks/results/expert_layout_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import LoadGuard, add_allow_busy  # noqa: E402
from ltzoo.zoo.models.resnet_cifar import resnet32_stages  # noqa: E402

K, BATCH, CLASSES = 3, 64, 10


def build_experts(channels: int, memory_format: torch.memory_format) -> nn.ModuleList:
    def expert() -> nn.Sequential:
        stages, width = resnet32_stages(channels)
        return nn.Sequential(*stages, nn.Linear(width, CLASSES))

    return nn.ModuleList(expert() for _ in range(K)).to(memory_format=memory_format)


def _conv(convs: list[nn.Conv2d], h: torch.Tensor, groups: int) -> torch.Tensor:
    c = convs[0]
    weight = torch.cat([m.weight for m in convs])
    return F.conv2d(h, weight, None, c.stride, c.padding, 1, groups)


def _bn(bns: list[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
    w, b = torch.cat([m.weight for m in bns]), torch.cat([m.bias for m in bns])
    return F.batch_norm(h, None, None, w, b, True, 0.1, 1e-5)


def _shortcut(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Option-A shortcut per expert: subsample, zero-pad each expert's channels."""
    if isinstance(block.shortcut, nn.Identity):
        return h
    s = h[:, :, ::2, ::2]
    b, kc, height, width = s.shape
    pad = block.shortcut.pad
    s = F.pad(s.reshape(b, K, kc // K, height, width), (0, 0, 0, 0, pad, pad))
    return s.reshape(b, -1, height, width)


def grouped_forward(experts: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The K experts as one grouped network; returns (K, B, C) logits."""
    stems = [e[0] for e in experts]
    h = F.relu(_bn([s[1] for s in stems], _conv([s[0] for s in stems], x, 1)), inplace=True)
    for stage in (1, 2, 3):
        for i in range(len(experts[0][stage])):
            blocks = [e[stage][i] for e in experts]
            out = _conv([b.conv1 for b in blocks], h, K)
            out = F.relu(_bn([b.bn1 for b in blocks], out), inplace=True)
            out = _bn([b.bn2 for b in blocks], _conv([b.conv2 for b in blocks], out, K))
            h = F.relu(out + _shortcut(blocks[0], h), inplace=True)
    feats = h.mean((2, 3)).reshape(len(x), K, -1)
    return torch.stack([experts[k][5](feats[:, k]) for k in range(K)])


def make_layouts(
    channels: int, memory_format: torch.memory_format
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    experts = build_experts(channels, memory_format)
    grouped = copy.deepcopy(experts)
    vmapped = copy.deepcopy(experts)
    for e in vmapped:
        replace_all_batch_norm_modules_(e)
    params, buffers = stack_module_state(list(vmapped))
    base = copy.deepcopy(vmapped[0]).to("meta")

    def vmap_forward(x: torch.Tensor) -> torch.Tensor:
        def one(p, b):
            return functional_call(base, (p, b), (x,))

        return torch.vmap(one)(params, buffers)

    return {
        "separate": lambda x: torch.stack([e(x) for e in experts]),
        "grouped": lambda x: grouped_forward(grouped, x),
        "vmap": vmap_forward,
    }


def time_layouts(channels: int, size: int, channels_last: bool, rounds: int) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(BATCH, channels, size, size).contiguous(memory_format=fmt)
    target = torch.randint(0, CLASSES, (BATCH,))
    layouts = make_layouts(channels, fmt)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    names = list(layouts)
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(3):
                t0 = time.perf_counter()
                logits = layouts[name](x)
                F.cross_entropy(logits.flatten(0, 1), target.repeat(K)).backward()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    ms = {name: round(1000 * statistics.median(ts), 1) for name, ts in times.items()}
    return {
        "ms_median": ms,
        "speedup_vs_separate": {n: round(ms["separate"] / v, 2) for n, v in ms.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    add_allow_busy(ap)
    args = ap.parse_args()
    guard = LoadGuard.start(args.allow_busy)
    rows = []
    for shape, (channels, size) in {"fmnist": (1, 28), "cifar": (3, 32)}.items():
        for channels_last in (True, False):
            row = {"shape": shape, "channels_last": channels_last}
            row |= time_layouts(channels, size, channels_last, args.rounds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "what": f"forward + backward of {K} x ResNet-32, batch {BATCH}, cross-entropy",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
        "machine": guard.finish(),
    }
    out = args.out or ROOT / "benchmarks" / "results" / "expert_layout_cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
