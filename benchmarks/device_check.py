"""Everything ltzoo needs to verify on a lent GPU machine, in one call that ends by itself.

    bash scripts/device_check.sh          # on the GPU machine: all parts, < 8 minutes
    bash scripts/device_check.sh --plan   # on CPU: every part for a few steps + the time plan

Parts (each with its own time cap; a part that fails or hits its cap is recorded and the
next one still runs; every JSON is rewritten after each part, so partial results survive):

1. ``gpu_tests``: ``pytest -m gpu`` (CUDA training step with AMP, TensorRT engine when
   present), running while the trainings run;
2. ``train``: CUDA trainings run side by side on the one GPU: the Fashion-MNIST-LT zoo
   (all five recipes, 3 seeds, the recipes' schedule) and CIFAR-10-LT rho 100 (CE, Balanced
   Softmax, NCL; as many epochs as the cap allows, milestones scaled). A run that reaches the
   cap is stopped and evaluated from its last checkpoint (recorded as such). Results use
   the schema of ``benchmarks/results/fmnistlt.json`` (``train_fmnistlt.collect``);
3. ``infer``: inference speed of 3 x ResNet-32 (32 px) and 3 x ResNeXt-50 (224 px) at
   batch 1, 8, 32, 128: eager fp32, eager fp16 / bf16 autocast, CUDA graphs (bf16), and
   ``torch.compile`` (bf16, its own cap);
4. ``serve``: ``ltzoo serve --device cuda`` under load on 127.0.0.1 (``bench_serve.py``).

Files written to ``--out`` (at most 8): device_check.json (machine, plan, parts, GPU
tests), fmnistlt.json, cifar10lt.json, infer.json, serve.json, weights-1.tar, weights-2.tar
(seed-0 models as safetensors + config, while they fit in 2 x 15.5 MiB), and the log that
scripts/device_check.sh tees (device_check.log).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Seconds per part on the GPU machine. Trainings and GPU tests run side by side; the
#: timing parts run alone afterwards, on a quiet GPU. Their sum must stay under 8 minutes.
GPU_CAPS = {"setup": 15, "train": 255, "infer_eager": 35, "infer_compile": 55, "serve": 70}
GPU_TESTS_CAP = 150  # inside the train part's window
#: --plan on a 2-core CPU: generous upper bounds only (a shared, loaded 2-core machine took
#: 3-4 minutes; the GPU plan above is what must fit in 8 minutes)
PLAN_CAPS = {"setup": 90, "train": 240, "infer_eager": 120, "infer_compile": 120, "serve": 150}
FINISH_S = 10  # packing weights, writing JSON
PLAN_LIMIT_S = 8 * 60
#: CIFAR-10-LT epochs planned for the GPU run (paper: 200 for CE / BS, 400 for NCL); the
#: multistep milestones are scaled to the same fractions of the schedule.
CIFAR_EPOCHS = {"ce": 200, "bs": 200, "ncl": 40}
FMNIST = ("ce", "bs", "ncl", "ecl", "cbd")
MAX_PARALLEL_GPU = 9
WEIGHT_TAR_LIMIT = int(15.5 * 2**20)
PLAN_TINY = [
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "optim.milestones=[]",
    "run.max_steps_per_epoch=2",
    "run.eval_subset=50",
    "optim.batch_size=16",
    "data.workers=0",
    "run.threads=1",
    "run.device=cpu",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- subprocesses with caps -----------------------------------------------------------------
@dataclass
class Job:
    """One capped subprocess (its own process group, so a cap kills its children too)."""

    name: str
    cmd: list[str]
    log_path: Path
    cap_s: float
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    wall_s: float = 0.0
    timed_out: bool = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env},
        )

    def poll(self) -> int | None:
        """Exit code once finished (killed at the cap: timed_out and -9)."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None and time.monotonic() - self.t0 > self.cap_s:
            self.kill()
            self.timed_out, rc = True, -9
        if rc is not None:
            self.wall_s = round(time.monotonic() - self.t0, 1)
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(5)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(self) -> int:
        while (rc := self.poll()) is None:
            time.sleep(0.5)
        return rc

    def tail(self, n: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""

    def record(self, rc: int) -> dict[str, Any]:
        out: dict[str, Any] = {"rc": rc, "wall_s": self.wall_s, "cap_s": self.cap_s}
        out["status"] = "timed_out" if self.timed_out else ("ok" if rc == 0 else "failed")
        if rc != 0:
            out["log_tail"] = self.tail()
        return out


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# -- part 1: GPU tests --------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """Test files that hold ``gpu``-marked tests (collecting only those keeps it quick)."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in p.read_text()
    )


def gpu_tests_job(work: Path, cap: float) -> tuple[Job, Path]:
    xml = work / "gpu_tests.xml"
    cmd = _py("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs")
    return Job(
        "gpu_tests", [*cmd, f"--junitxml={xml}", *gpu_test_files()], work / "gpu_tests.log", cap
    ), xml


def junit_summary(xml: Path) -> dict[str, Any]:
    if not xml.is_file():
        return {}
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = tag
                message = (node.get("message") or "")[:300]
                break
        else:
            message = ""
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "time_s": float(case.get("time") or 0),
                "message": message,
            }
        )
    counts = {
        k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")
    }
    return {"counts": counts, "cases": cases}


# -- part 2: trainings --------------------------------------------------------------------------
@dataclass
class TrainSpec:
    """One training run: ``tag`` (collector name), recipe, seed, overrides."""

    group: str  # "fmnistlt" | "cifar10lt"
    tag: str
    recipe: str
    seed: int
    overrides: list[str]
    planned_epochs: int = 0
    simulate_cap: bool = False  # plan mode: stop at the first checkpoint, as at a cap

    def run_dir(self, work: Path) -> Path:
        return work / self.group / f"{self.tag}-s{self.seed}"

    def command(self, work: Path) -> list[str]:
        cmd = _py("-m", "ltzoo", "train", self.recipe, f"run.seed={self.seed}", *self.overrides)
        return [*cmd, "--out", str(self.run_dir(work))]


#: --plan trains these for a few steps (the batched GPU-augment path, the per-sample
#: AutoAugment path stopped at a simulated cap and finalized, CBD's teachers); every other
#: run of the GPU plan is validated (recipe + overrides) without training.
PLAN_RUNS = ("cifar10lt/ce", "cifar10lt/ncl", "fmnistlt/cbd")


def train_specs(args: argparse.Namespace) -> list[TrainSpec]:
    """CIFAR-10-LT runs first (the longest), then the Fashion-MNIST-LT zoo."""
    from train_fmnistlt import RECIPES

    specs: list[TrainSpec] = []
    cifar = [f"data.root={args.cifar}"] if args.cifar else []
    fm = [f"data.root={args.fmnist}"] if args.fmnist else []
    for tag, epochs in args.cifar_epochs.items():
        recipe = f"cifar10lt_r100_{tag}"
        if args.plan:
            over, epochs = [*PLAN_TINY, *cifar], 2
        else:
            # the config scales the milestones / warm-up to the same fractions of the schedule
            # (warm-up kept at the paper's 5 epochs: a short one diverged NCL at lr 0.1)
            over = ["run.device=cuda", *cifar, f"optim.epochs={epochs}", "optim.warmup_epochs=5"]
        specs.append(
            TrainSpec("cifar10lt", tag, recipe, 0, over, epochs, args.plan and tag == "ncl")
        )
    for tag in args.fmnist_methods:
        for seed in args.seeds:
            over = (
                [*PLAN_TINY, "data.val_per_class=2", *fm] if args.plan else ["run.device=cuda", *fm]
            )
            specs.append(TrainSpec("fmnistlt", tag, RECIPES[tag], seed, over))
    if not args.plan:
        return specs
    from ltzoo.training.config import load_recipe

    for s in specs:  # every run of the GPU plan, as a config (CUDA + schedule swapped for CPU)
        load_recipe(s.recipe, [f"run.seed={s.seed}", *s.overrides])
    return [s for s in specs if f"{s.group}/{s.tag}" in PLAN_RUNS]


def _epochs_done(run_dir: Path) -> tuple[int, float | None]:
    """Epochs logged in metrics.jsonl and the mean training images/s over them."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return len(rows), (round(sum(rates) / len(rates), 1) if rates else None)


def _checkpoint_epoch(run_dir: Path) -> int | None:
    from ltzoo.training.engine import CHECKPOINT, _load_checkpoint

    path = run_dir / CHECKPOINT
    return int(_load_checkpoint(path)["epoch"]) + 1 if path.is_file() else None


def finalize_from_checkpoint(spec: TrainSpec, work: Path, cap: float) -> dict[str, Any]:
    """Evaluate and save a run stopped at its cap: resume with ``epochs`` = the epochs its
    last checkpoint holds, so the engine skips training and runs its normal ending."""
    done = _checkpoint_epoch(spec.run_dir(work))
    if not done or spec.recipe.endswith("_cbd"):
        return {"finalized": False, "reason": "no checkpoint" if not done else "CBD: teachers"}
    run_dir = spec.run_dir(work)
    cmd = _py(str(Path(__file__)), "--finalize", str(run_dir))
    job = Job(f"{spec.tag}-s{spec.seed}-final", cmd, run_dir / "finalize.log", cap)
    job.start()
    rc = job.wait()
    return {"finalized": rc == 0, "epochs_at_stop": done, "finalize": job.record(rc)}


def finalize_run(run_dir: Path) -> None:
    """Resume ``run_dir`` (its run.json settings) with ``epochs`` cut to those its checkpoint
    holds: the engine trains no further step, evaluates, calibrates and saves the model; the
    rewritten run.json records the epochs actually trained."""
    from ltzoo.training.config import load_run_config
    from ltzoo.training.engine import train

    cfg = load_run_config(run_dir)
    cfg.optim.epochs = _checkpoint_epoch(run_dir) or cfg.optim.epochs
    cfg.optim.milestones = [m for m in cfg.optim.milestones if m < cfg.optim.epochs]
    cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, cfg.optim.epochs - 1)
    train(cfg, run_dir, resume=True)


def run_trainings(args: argparse.Namespace, work: Path, cap: float, extra_jobs: list[Job]) -> dict:
    """Run every TrainSpec (at most ``--parallel`` at a time) plus ``extra_jobs`` (GPU tests)
    side by side; trainings still running at ``cap`` are stopped and finalized."""
    specs = train_specs(args)
    deadline = time.monotonic() + cap
    finalize_reserve = 0 if args.plan else 40
    pending, running, runs = list(specs), [], {}
    for job in extra_jobs:
        job.start()
    while pending or running:
        while pending and len(running) < args.parallel:
            spec = pending.pop(0)
            left = deadline - finalize_reserve - time.monotonic()
            job = Job(
                f"{spec.tag}-s{spec.seed}",
                spec.command(work),
                spec.run_dir(work) / "train.log",
                max(1.0, left),
            )
            job.start()
            running.append((spec, job))
        for spec, job in list(running):
            if spec.simulate_cap and (spec.run_dir(work) / "checkpoint.pt").is_file():
                job.kill()
                job.timed_out = True
            rc = job.poll()
            if rc is None:
                continue
            running.remove((spec, job))
            rec = job.record(rc)
            rec["epochs_logged"], rec["train_images_per_s"] = _epochs_done(spec.run_dir(work))
            rec["epochs_planned"] = spec.planned_epochs or None
            if job.timed_out:
                rec.update(
                    finalize_from_checkpoint(spec, work, max(5.0, deadline - time.monotonic()))
                )
            runs[f"{spec.group}/{spec.tag}-s{spec.seed}"] = rec
            log(f"train {spec.group}/{spec.tag}-s{spec.seed}: {rec['status']} in {rec['wall_s']}s")
        time.sleep(0.5)
    return {"runs": runs, "specs": [s.__dict__ for s in specs]}


def collect_results(args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    """The benchmark JSONs (train_fmnistlt's schema) per dataset group, labelled."""
    from train_fmnistlt import collect

    written = {}
    specs = train_specs(args)
    for group in ("fmnistlt", "cifar10lt"):
        root = work / group
        if not any(root.glob("*-s*/results.json")):
            continue
        path = out / f"{group}.json"
        overrides = {s.tag: ",".join(s.overrides) for s in specs if s.group == group}
        summary = collect(root, path, overrides)
        for tag, entry in summary.items():
            data = json.loads((root / f"{tag}-s{entry['seed_list'][0]}" / "run.json").read_text())[
                "data"
            ]
            entry["dataset"] = data.get("variant", data.get("name"))
            entry["device"] = "cpu (plan)" if args.plan else "cuda"
        path.write_text(json.dumps(summary, indent=2))
        written[group] = str(path)
    return written


def pack_weights(work: Path, out: Path) -> dict[str, Any]:
    """Seed-0 models (config + safetensors) into at most 2 tars of <= 15.5 MiB each."""
    models = sorted(work.glob("*/*-s0/model"))
    tars: list[list[Path]] = [[], []]
    sizes = [0, 0]
    left_out = []
    for m in models:
        files = [f for f in (m / "config.json", m / "model.safetensors") if f.is_file()]
        size = sum(f.stat().st_size for f in files) + 4096
        slot = next((i for i in range(2) if sizes[i] + size <= WEIGHT_TAR_LIMIT), None)
        if slot is None:
            left_out.append(str(m.relative_to(work)))
            continue
        tars[slot].append(m)
        sizes[slot] += size
    written = []
    for i, group in enumerate(tars):
        if not group:
            continue
        path = out / f"weights-{i + 1}.tar"
        with tarfile.open(path, "w") as tar:
            for m in group:
                name = str(m.parent.relative_to(work))
                for f in ("config.json", "model.safetensors"):
                    if (m / f).is_file():
                        tar.add(m / f, arcname=f"{name}/{f}")
        written.append(
            {"file": path.name, "models": [str(m.parent.relative_to(work)) for m in group]}
        )
    return {"tars": written, "left_out": left_out}


# -- part 3: inference speed ------------------------------------------------------------------
def infer_worker(jsonl: Path, mode_set: str, plan: bool) -> None:
    """Measure and append one JSON row per (model, mode, batch) to ``jsonl`` as it goes."""
    import torch

    from ltzoo import zoo

    cuda = torch.cuda.is_available() and not plan
    device = torch.device("cuda" if cuda else "cpu")
    models = {
        "3x ResNet-32 (32 px)": (
            "ncl-resnet32-cifar10lt-r100",
            (1, 8) if plan else (1, 8, 32, 128),
        ),
        "3x ResNeXt-50 (224 px)": ("ncl-resnext50-imagenetlt", (1,) if plan else (1, 8, 32, 128)),
    }
    if mode_set == "eager":
        modes = ["fp32", "bf16"] if plan else ["fp32", "fp16", "bf16", "cuda_graph_bf16"]
    else:
        modes = ["compile_bf16"]
    plan_skip = (
        {("ncl-resnext50-imagenetlt", m) for m in ("bf16", "compile_bf16")} if plan else set()
    )
    min_time = 0.0 if plan else 0.4
    torch.backends.cudnn.benchmark = True
    for label, (name, batches) in models.items():
        torch.manual_seed(0)
        model = (
            zoo.load(name, pretrained=False).to(device).eval().to(memory_format=torch.channels_last)
        )
        size = model.config.preprocess.input_size
        for mode in modes:
            if (name, mode) in plan_skip:  # plan: ResNeXt-50's forward once, in fp32
                continue
            if plan and mode == "compile_bf16":
                batches = batches[:1]
            fwd = _forward_fn(model, mode, device, plan)
            for b in batches:
                x = torch.randn(b, 3, *size, device=device).contiguous(
                    memory_format=torch.channels_last
                )
                row = {
                    "model": label,
                    "registry_name": name,
                    "mode": mode,
                    "batch": b,
                    "device": str(device),
                }
                try:
                    row.update(_time_forward(fwd, model, x, min_time, cuda))
                except Exception as exc:  # recorded, the next measurement still runs
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                log(f"infer {label} {mode} b={b}: {row.get('ms_per_batch', row.get('error'))}")


def _forward_fn(model, mode: str, device, plan: bool):
    import torch

    dtype = {"fp16": torch.float16}.get(mode.split("_")[0], torch.bfloat16)
    amp, graph = mode != "fp32", mode == "cuda_graph_bf16"
    # On CPU (plan) only Dynamo's tracing is checked (backend "eager"), not Inductor.
    net = (
        torch.compile(model, backend="eager" if plan else "inductor", dynamic=False)
        if mode == "compile_bf16"
        else model
    )

    def eager(x):
        # no autocast weight-cast cache inside a CUDA graph capture
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype, enabled=amp, cache_enabled=not graph),
        ):
            return net(x).float()

    return _cuda_graph(eager) if graph else eager


def _cuda_graph(eager):
    """Wrap ``eager`` so each new input shape is captured once into a CUDA graph and replayed."""
    import torch

    graphs: dict[tuple, tuple] = {}

    def run(x):
        key = tuple(x.shape)
        if key not in graphs:
            static_x = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    eager(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = eager(static_x)
            graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_y

    return run


def _time_forward(fwd, model, x, min_time: float, cuda: bool) -> dict[str, Any]:
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    y = fwd(x)  # first call: compile / capture / cuDNN autotune
    sync()
    first = time.perf_counter() - t0
    warm, min_iters = (3, 5) if min_time else (0, 1)  # plan: the fewest forwards
    for _ in range(warm):
        fwd(x)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_time:
        fwd(x)
        n += 1
    sync()
    sec = (time.perf_counter() - t0) / n
    with torch.inference_mode():
        ref = model(x).float()
    diff = (torch.softmax(y.float(), -1) - torch.softmax(ref, -1)).abs().max().item()
    return {
        "ms_per_batch": round(sec * 1000, 4),
        "images_per_s": round(x.shape[0] / sec, 1),
        "iters": n,
        "first_call_s": round(first, 3),
        "max_prob_diff_vs_fp32": round(diff, 6),
    }


def infer_tables(rows: list[dict]) -> dict[str, Any]:
    """``{model: {mode: {batch: images/s}}}`` for reading side by side."""
    table: dict[str, Any] = {}
    for r in rows:
        table.setdefault(r["model"], {}).setdefault(r["mode"], {})[str(r["batch"])] = r.get(
            "images_per_s", r.get("error")
        )
    return table


# -- the whole check ------------------------------------------------------------------------------
def plan_table(plan: bool) -> list[dict[str, Any]]:
    rows = [
        {
            "part": "setup",
            "cap_s": GPU_CAPS["setup"],
            "what": "machine info, decode CIFAR-10 JPEGs once",
        },
        {
            "part": "train + gpu_tests",
            "cap_s": GPU_CAPS["train"],
            "what": f"side by side on the GPU: CIFAR-10-LT {CIFAR_EPOCHS} epochs, Fashion-MNIST-LT "
            f"x5 recipes x3 seeds, pytest -m gpu (cap {GPU_TESTS_CAP}s)",
        },
        {
            "part": "infer_eager",
            "cap_s": GPU_CAPS["infer_eager"],
            "what": "fp32, fp16, bf16, CUDA graphs",
        },
        {
            "part": "infer_compile",
            "cap_s": GPU_CAPS["infer_compile"],
            "what": "torch.compile (inductor, bf16)",
        },
        {
            "part": "serve",
            "cap_s": GPU_CAPS["serve"],
            "what": "ltzoo serve --device cuda, HTTP load on loopback",
        },
        {"part": "finish", "cap_s": FINISH_S, "what": "weights tars, JSON"},
    ]
    return rows


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    return info


class Check:
    """Runs the parts in order, rewriting ``device_check.json`` after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="ltzoo-device-check-"))
        self.t0 = time.monotonic()
        self.caps = PLAN_CAPS if args.plan else GPU_CAPS
        self.report: dict[str, Any] = {
            "mode": "plan (CPU, a few steps per part)" if args.plan else "gpu",
            "plan": plan_table(args.plan),
            "plan_total_s": sum(GPU_CAPS.values()) + FINISH_S,
            "parts": {},
        }

    def save(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "device_check.json").write_text(json.dumps(self.report, indent=2, default=str))

    def part(self, name: str, fn) -> None:
        t0 = time.monotonic()
        log(f"== {name}")
        try:
            result = fn()
            status = result.pop("status", "ok") if isinstance(result, dict) else "ok"
        except Exception as exc:  # a broken part is recorded; the next part still runs
            import traceback

            result, status = {"error": traceback.format_exc()[-3000:]}, "failed"
            log(f"{name} failed: {exc!r}")
        self.report["parts"][name] = {
            "status": status,
            "wall_s": round(time.monotonic() - t0, 1),
            **(result or {}),
        }
        self.save()

    # parts
    def setup(self) -> dict[str, Any]:
        self.report["machine"] = machine_info()
        if self.args.cifar:
            from ltzoo.training.data.datasets import read_jpeg_tree
            from ltzoo.zoo.datasets_meta import CIFAR10_CLASSES

            t0 = time.monotonic()
            read_jpeg_tree(self.args.cifar, CIFAR10_CLASSES)  # decodes and caches once for all runs
            return {"cifar_decode_s": round(time.monotonic() - t0, 1), "cifar": self.args.cifar}
        return {"status": "partial", "note": "no CIFAR-10 JPEG tar found: CIFAR-10-LT runs skipped"}

    def train(self) -> dict[str, Any]:
        cap = GPU_TESTS_CAP if not self.args.plan else 90
        tests, xml = gpu_tests_job(self.work, cap)
        result = run_trainings(self.args, self.work, self.caps["train"], [tests])
        rc = tests.wait()
        self.report["gpu_tests"] = {**tests.record(rc), **junit_summary(xml)}
        result["results"] = collect_results(self.args, self.work, self.out)
        result["weights"] = pack_weights(self.work, self.out)
        bad = [
            k for k, r in result["runs"].items() if r["status"] != "ok" and not r.get("finalized")
        ]
        result["status"] = "ok" if not bad and rc in (0, 5) else "partial"
        return result

    def infer(self, mode_set: str) -> dict[str, Any]:
        jsonl = self.work / f"infer-{mode_set}.jsonl"
        cmd = _py(str(Path(__file__)), "--infer-worker", str(jsonl), "--mode-set", mode_set)
        job = Job(
            f"infer_{mode_set}",
            [*cmd, *(["--plan"] if self.args.plan else [])],
            self.work / f"infer-{mode_set}.log",
            self.caps[f"infer_{mode_set}"],
        )
        job.start()
        rec = job.record(job.wait())
        rows = (
            [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
        )
        path = self.out / "infer.json"
        old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
        allrows = old["rows"] + rows
        path.write_text(
            json.dumps({"images_per_s": infer_tables(allrows), "rows": allrows}, indent=2)
        )
        rec["rows"] = len(rows)
        return rec

    def serve(self) -> dict[str, Any]:
        device = "cpu" if self.args.plan else "cuda"
        size = (
            [
                "--requests",
                "40",
                "--concurrency",
                "1,8",
                "--time-cap",
                "5",
                "--final-time-cap",
                "5",
                "--bare-time",
                "0.2",
            ]
            if self.args.plan
            else [
                "--requests",
                "3000",
                "--concurrency",
                "1,8,32,64",
                "--time-cap",
                "10",
                "--final-time-cap",
                "15",
                "--bare-time",
                "1",
                "--threads",
                "4",
            ]
        )
        # --allow-busy: right after the trainings the load average may still count as busy;
        # the JSON then says "measured under load" next to the load average it saw.
        cmd = _py(
            "benchmarks/bench_serve.py",
            "--allow-busy",
            "--backends",
            "torch",
            "--device",
            device,
            "--nobatch-requests",
            "0",
            *size,
            "--out",
            str(self.out / "serve.json"),
        )
        job = Job("serve", cmd, self.work / "serve.log", self.caps["serve"])
        job.start()
        rec = job.record(job.wait())
        rec["log_tail"] = job.tail(2500)
        return rec

    def run(self) -> int:
        self.save()
        self.part("setup", self.setup)
        self.part("train", self.train)
        self.part("infer_eager", lambda: self.infer("eager"))
        self.part("infer_compile", lambda: self.infer("compile"))
        self.part("serve", self.serve)
        self.save()
        print_plan(self.report)
        bad = [k for k, v in self.report["parts"].items() if v["status"] == "failed"]
        return 1 if bad else 0


def print_plan(report: dict[str, Any]) -> None:
    print("\ntime plan on the GPU machine (caps, seconds):")
    for row in report["plan"]:
        got = report["parts"].get(row["part"].split(" ")[0], {})
        print(
            f"  {row['part']:18s} {row['cap_s']:5d}   {row['what']}"
            + (f"   [this run: {got.get('status')}, {got.get('wall_s')} s]" if got else "")
        )
    print(f"  {'total':18s} {report['plan_total_s']:5d}   (limit {PLAN_LIMIT_S})")


def _default_data(env: str, candidates: list[Path]) -> str:
    if os.environ.get(env):
        return os.environ[env]
    return next((str(p) for p in candidates if p.exists()), "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--plan", action="store_true", help="CPU: every part for a few steps, print the plan"
    )
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "device_check"))
    p.add_argument("--work", default="", help="run directories (default: a temporary directory)")
    p.add_argument(
        "--cifar",
        default=_default_data(
            "LTZOO_CIFAR10_JPEG",
            [
                ROOT / ".device" / "data" / "cifar10-jpeg.tar.gz",
                ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
            ],
        ),
    )
    p.add_argument(
        "--fmnist",
        default=_default_data("LTZOO_FASHION_MNIST", [ROOT / ".device" / "data" / "fashion-mnist"]),
    )
    p.add_argument(
        "--cifar-epochs",
        default=",".join(f"{k}={v}" for k, v in CIFAR_EPOCHS.items()),
        help="tag=epochs,... for the CIFAR-10-LT rho 100 runs",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fmnist-methods", default=",".join(FMNIST))
    p.add_argument(
        "--parallel", type=int, default=0, help="trainings at a time (default 9 GPU, 2 plan)"
    )
    p.add_argument("--infer-worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--finalize", default="", help=argparse.SUPPRESS)
    p.add_argument("--mode-set", default="eager", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cifar_epochs = {
        k: int(v) for k, v in (x.split("=") for x in args.cifar_epochs.split(",") if x)
    }
    if not args.cifar:
        args.cifar_epochs = {}
    args.seeds = [int(s) for s in args.seeds.split(",")] if not args.plan else [0]
    args.fmnist_methods = [m for m in args.fmnist_methods.split(",") if m]
    args.parallel = args.parallel or (2 if args.plan else MAX_PARALLEL_GPU)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.infer_worker:
        infer_worker(Path(args.infer_worker), args.mode_set, args.plan)
        return 0
    if args.finalize:
        finalize_run(Path(args.finalize))
        return 0
    total = sum(GPU_CAPS.values()) + FINISH_S
    if total >= PLAN_LIMIT_S:
        raise SystemExit(f"time plan {total}s exceeds {PLAN_LIMIT_S}s")
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
