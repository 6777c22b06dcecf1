"""Training throughput by precision, side by side in one run, for NCL, ECL, CE and CBD's
student, at Fashion-MNIST and CIFAR-100 shapes.

* ``reference``: what the official NCL code does: K separate ResNet-32 networks in a Python
  loop, torchvision per-sample transforms (RandomCrop(pad 4) + flip + ToTensor + Normalize)
  in a DataLoader, NCL's loss, fp32 (CE and CBD's student: one network, cross-entropy). No
  ECL reference (ECL has no public code).
* ``fp32``: the ltzoo engine (channels-last, batched uint8 augmentation) with
  ``run.precision=fp32``.
* ``bf16``: the same with ``run.precision=bf16``: the forward under CPU autocast, losses in
  fp32 (training/precision.py). What ``auto`` picks on a CPU with AVX512-BF16 or AMX.
* ``bf16+compile`` (``--compile``): ``bf16`` with ``run.compile`` (inductor); its cold
  compile time is reported.

A step is what a training loop does per batch: fetch it from the loader, augment, forward,
backward, optimiser step. Variants are interleaved (a few steps each, rotating order) so
machine noise hits them alike; peak memory (RSS) is measured for each variant in its own
subprocess. ``--parallel`` adds, for planning long runs, the aggregate images/s of one NCL
run on 2 threads against two runs on 1 thread each (separate processes, at the same time).

    python benchmarks/bench_train_step.py [--rounds 6] [--steps 4] [--compile] [--parallel]

Writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import os
import tempfile

# A cold inductor cache, so compile_s is what a user pays the first time. Set before torch
# is imported: torch reads (and fixes) the cache folder while it loads.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ltzoo-inductor-"))

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import LoadGuard, add_allow_busy
from ltzoo.training.config import load_recipe
from ltzoo.training.data import ArrayImageDataset, build_transforms, lt_counts
from ltzoo.training.engine import Trainer
from ltzoo.training.methods import METHODS
from ltzoo.training.methods.cbd import CBDParams, teacher_run_config
from ltzoo.training.methods.ncl import NCLLoss
from ltzoo.training.precision import resolve_precision
from ltzoo.zoo import Ensemble
from ltzoo.zoo.config import PreprocessConfig
from ltzoo.zoo.models.resnet_cifar import resnet32_stages
from ltzoo.zoo.registry import get_entry

BATCH = 64
SHAPES = {
    "fmnist": dict(channels=1, size=28, classes=10, n_max=1000, num_hard=3),
    "cifar100": dict(channels=3, size=32, classes=100, n_max=500, num_hard=30),
}
METHOD_NAMES = ("ncl", "ecl", "ce", "cbd")
#: engine variants: the run.precision each one trains with
PRECISION_VARIANTS = {"fp32": "fp32", "bf16": "bf16"}
VARIANTS = ("reference", *PRECISION_VARIANTS)
COMPILED = "bf16+compile"


@dataclass
class Setting:
    method: str
    shape: str

    @property
    def spec(self) -> dict:
        return SHAPES[self.shape]

    @property
    def preprocess(self) -> PreprocessConfig:
        c, s = self.spec["channels"], self.spec["size"]
        return PreprocessConfig(input_size=(s, s), channels=c, mean=(0.5,) * c, std=(0.25,) * c)

    def data(self) -> tuple[torch.Tensor, list[int], list[int]]:
        """Synthetic uint8 images with long-tailed labels (the step does not look at pixels)."""
        counts = lt_counts(self.spec["n_max"], self.spec["classes"], 100)
        labels = [c for c, n in enumerate(counts) for _ in range(n)][: 16 * BATCH]
        rng = np.random.default_rng(0)
        s, c = self.spec["size"], self.spec["channels"]
        shape = (len(labels), s, s) if c == 1 else (len(labels), s, s, c)
        return torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)), labels, counts

    def model_config(self, model: str, counts: list[int], **overrides):
        classes = self.spec["classes"]
        return get_entry(model).build_config(
            **overrides,
            num_classes=classes,
            class_names=[f"c{i}" for i in range(classes)],
            class_counts=counts,
            preprocess=self.preprocess,
        )


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class EngineRunner:
    """The ltzoo engine's own build_loader / device_batch / train_step, in one precision."""

    def __init__(self, setting: Setting, precision: str, compiled: bool = False) -> None:
        recipe = load_recipe(f"fmnistlt_{setting.method}")
        recipe.run.precision, recipe.run.compile = precision, compiled
        recipe.run.device = "cpu" if not torch.cuda.is_available() else "cuda"
        recipe.optim.batch_size = BATCH
        if "num_hard" in recipe.method_params:
            recipe.method_params["num_hard"] = setting.spec["num_hard"]
        self.trainer = Trainer(recipe, run_dir="/nonexistent")
        images, labels, counts = setting.data()
        cls = METHODS[recipe.method]
        model = Ensemble(setting.model_config(recipe.model, counts))
        self.method = cls(model, counts, cls.Params.from_dict(recipe.method_params))
        if recipe.method == "cbd":  # the student distils frozen teachers (random ones here)
            self.method.set_teachers(_cbd_teachers(recipe, setting, counts))
        self.method.to(self.trainer.device).to(memory_format=torch.channels_last)
        tf = build_transforms(setting.preprocess, recipe.data.augment, train=True)
        train = ArrayImageDataset(images, labels, tf, preprocess=setting.preprocess)
        split = SimpleNamespace(train=train, train_labels=labels)
        self.batches = _cycle(self.trainer.build_loader(split, self.method))
        self.optimizer = self.trainer.build_optimizer(self.method)
        self.scaler = self.trainer.grad_scaler()
        self.forward = self.trainer.forward_for(self.method)
        self.compile_s: float | None = None
        if compiled:  # the first steps compile forward and backward graphs
            t0 = time.perf_counter()
            for _ in range(2):
                self.step()
            self.compile_s = round(time.perf_counter() - t0, 1)

    def step(self) -> None:
        t = self.trainer
        images, labels = t.device_batch(*next(self.batches))
        t.train_step(self.forward, self.method, self.optimizer, self.scaler, images, labels)


def _cbd_teachers(recipe, setting: Setting, counts: list[int]) -> list[Ensemble]:
    """Randomly initialised teachers shaped as CBD's stage 1 trains them."""
    specs = CBDParams.from_dict(recipe.method_params).specs()
    configs = [teacher_run_config(recipe, i, spec) for i, spec in enumerate(specs)]
    return [Ensemble(setting.model_config(t.model, counts, **t.model_overrides)) for t in configs]


class _PILDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: list[int], transform: Callable) -> None:
        self.images, self.labels, self.transform = images.numpy(), labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class ReferenceRunner:
    """Plain user code: K separate ResNet-32 in a Python loop, torchvision transforms."""

    def __init__(self, setting: Setting) -> None:
        spec, pre = setting.spec, setting.preprocess
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        experts = 3 if setting.method == "ncl" else 1  # CBD's student: one network

        def network() -> nn.Module:
            stages, width = resnet32_stages(spec["channels"])
            return nn.Sequential(*stages, nn.Linear(width, spec["classes"]))

        self.nets = nn.ModuleList(network() for _ in range(experts)).to(self.device)
        images, labels, counts = setting.data()
        tf = T.Compose(
            [
                T.RandomCrop(spec["size"], padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(pre.mean, pre.std),
            ]
        )
        loader = DataLoader(_PILDataset(images, labels, tf), BATCH, shuffle=True, drop_last=True)
        self.batches = _cycle(loader)
        self.loss = NCLLoss(counts, spec["num_hard"]).to(self.device) if experts > 1 else None
        self.optimizer = torch.optim.SGD(
            self.nets.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=2e-4
        )

    def step(self) -> None:
        x, y = (t.to(self.device) for t in next(self.batches))
        logits = [net(x) for net in self.nets]
        loss = self.loss(logits, y) if self.loss is not None else F.cross_entropy(logits[0], y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def make_runner(variant: str, setting: Setting):
    if variant == "reference":
        return ReferenceRunner(setting)
    if variant == COMPILED:
        return EngineRunner(setting, "bf16", compiled=True)
    return EngineRunner(setting, PRECISION_VARIANTS[variant])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(
    setting: Setting, rounds: int, steps: int, compiled: bool = False
) -> dict[str, dict]:
    """Per variant: images/s and median step time over ``rounds`` x ``steps`` (round 0 is warm-up)."""
    variants = [v for v in VARIANTS if not (v == "reference" and setting.method == "ecl")]
    variants += [COMPILED] if compiled else []
    runners = {v: make_runner(v, setting) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds + 1):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            for _ in range(steps):
                _sync()
                t0 = time.perf_counter()
                runners[v].step()
                _sync()
                if r:
                    times[v].append(time.perf_counter() - t0)
    stats = {
        v: {
            "images_per_s": round(BATCH * len(ts) / sum(ts), 1),
            "step_ms_median": round(1000 * statistics.median(ts), 1),
            "steps_timed": len(ts),
        }
        for v, ts in times.items()
    }
    if compiled:
        stats[COMPILED]["compile_s"] = runners[COMPILED].compile_s
    return stats


def peak_rss_mb(variant: str, setting: Setting) -> float:
    """Peak RSS (VmHWM) of a fresh process that builds ``variant`` and runs 3 steps.

    VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``fork`` + ``exec``, so a child
    would report at least this (large) process's RSS.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from benchmarks.bench_train_step import Setting, make_runner; "
        f"r = make_runner({variant!r}, Setting({setting.method!r}, {setting.shape!r})); "
        "[r.step() for _ in range(3)]; "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(int(out.stdout.split()[-1]) / 1024, 1)


def _throughput_child(variant: str, setting: Setting, threads: int, steps: int) -> list[str]:
    """argv of a process that trains ``variant`` on ``threads`` threads and prints images/s."""
    code = (
        f"import sys, time, torch; sys.path.insert(0, {str(ROOT)!r}); "
        f"torch.set_num_threads({threads}); "
        "from benchmarks.bench_train_step import BATCH, Setting, make_runner; "
        f"r = make_runner({variant!r}, Setting({setting.method!r}, {setting.shape!r})); "
        "[r.step() for _ in range(3)]; t0 = time.perf_counter(); "
        f"[r.step() for _ in range({steps})]; "
        f"print(BATCH * {steps} / (time.perf_counter() - t0))"
    )
    return [sys.executable, "-c", code]


def parallel_runs(variant: str, setting: Setting, steps: int) -> dict:
    """Aggregate images/s of one run on 2 threads vs two runs on 1 thread each, at once."""

    def run_together(n: int, threads: int) -> list[float]:
        procs = [
            subprocess.Popen(_throughput_child(variant, setting, threads, steps), stdout=PIPE)
            for _ in range(n)
        ]
        return [float(proc.communicate()[0].split()[-1]) for proc in procs]

    one = run_together(1, 2)
    two = run_together(2, 1)
    return {
        "variant": variant,
        "method": setting.method,
        "shape": setting.shape,
        "one_run_2_threads_images_per_s": round(one[0], 1),
        "two_runs_1_thread_images_per_s": [round(v, 1) for v in two],
        "two_runs_total_images_per_s": round(sum(two), 1),
        "gain_two_runs_vs_one": round(sum(two) / one[0], 2),
    }


def measure(setting: Setting, args: argparse.Namespace, device: str) -> dict:
    """One row: every variant's speed (and memory), with the ratios README shows."""
    row: dict = {"method": setting.method, "shape": setting.shape, "batch": BATCH}
    row["variants"] = time_interleaved(setting, args.rounds, args.steps, args.compile)
    if not args.no_memory and device == "cpu":
        for v, stats in row["variants"].items():
            if v != COMPILED:  # a fresh process would measure the compiler's memory
                stats["peak_rss_mb"] = peak_rss_mb(v, setting)
    speed = {v: s["images_per_s"] for v, s in row["variants"].items()}
    row["speedup_bf16_vs_fp32"] = round(speed["bf16"] / speed["fp32"], 2)
    if "reference" in speed:
        row["speedup_fp32_vs_reference"] = round(speed["fp32"] / speed["reference"], 2)
        row["speedup_bf16_vs_reference"] = round(speed["bf16"] / speed["reference"], 2)
    if COMPILED in speed:
        row["speedup_compiled_vs_bf16"] = round(speed[COMPILED] / speed["bf16"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds per variant")
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument(
        "--compile", action="store_true", help="add bf16 + torch.compile (minutes to compile)"
    )
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="add one NCL run on 2 threads vs two runs on 1 thread (CIFAR shape, auto precision)",
    )
    ap.add_argument("--out", type=Path, default=None)
    add_allow_busy(ap)
    args = ap.parse_args()
    guard = LoadGuard.start(args.allow_busy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = resolve_precision("auto", torch.device(device)).used
    results = []
    for shape in args.shapes:
        for method in args.methods:
            row = measure(Setting(method, shape), args, device)
            print(json.dumps(row), flush=True)
            results.append(row)
    report: dict = {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "auto_precision": auto,
        "results": results,
        "peak_rss_note": "VmHWM of a fresh process per variant (build + 3 steps); CPU only",
    }
    if args.parallel:
        report["parallel"] = parallel_runs(auto, Setting("ncl", "cifar100"), 8 * args.steps)
        print(json.dumps(report["parallel"]), flush=True)
    report["machine"] = guard.finish()
    out = args.out or ROOT / "benchmarks" / "results" / f"train_step_{device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
