"""`ltzoo demo`: the whole pipeline end to end on Fashion-MNIST-LT, on a CPU, offline.

Build the long-tailed data -> train a short NCL run -> evaluate (many/medium/few) ->
calibrate -> push to a local Hub-compatible server -> ``zoo.load`` it back by name ->
export the fused ONNX graph and check parity -> serve it with LitServe -> classify real
Fashion-MNIST test images over HTTP -> shut down.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

from .net import free_port

DEMO_MODEL = "ncl-resnet32-fmnistlt"
DEMO_ORG = "ltzoo-demo"


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not healthy after {timeout:.0f}s")


def run_demo(
    workdir: str | Path = "artifacts/demo",
    epochs: int = 5,
    max_steps: int = 0,
    eval_subset: int = 2000,
    num_images: int = 6,
) -> int:
    """Run every step; each prints where its artefacts are. Returns a process exit code."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # zoo.hub_io reads these at call time (the Hub client itself reads them at import).
    os.environ["HF_HOME"] = str(workdir / "hf_home")
    os.environ["LTZOO_HUB_ORG"] = DEMO_ORG
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from ltzoo.hub_server import HubServer

    hub = HubServer(workdir / "hub").start()
    os.environ["HF_ENDPOINT"] = hub.url
    total = 9
    try:
        import torch

        from ltzoo import zoo
        from ltzoo.training.config import load_recipe
        from ltzoo.training.data import build_lt_dataset
        from ltzoo.training.engine import train

        _step(1, total, "Fashion-MNIST-LT (rho=100) from /usr/share/datasets/fashion-mnist")
        split = build_lt_dataset("fashion_mnist_lt")
        for name, n in zip(split.class_names, split.class_counts, strict=True):
            print(f"  {name:12} {n:5d} training images ({zoo.shot_group(n)}-shot)")
        # torch's Dataset type has no __len__; every split here is a sized map-style dataset
        n_val = len(cast(Sized, split.val)) if split.val is not None else 0
        n_test = len(cast(Sized, split.test))
        print(f"  val {n_val} (balanced), test {n_test} (balanced)")

        _step(2, total, f"train NCL, 3 x ResNet-32, {epochs} epoch(s) (recipe fmnistlt_ncl)")
        overrides = [
            f"optim.epochs={epochs}",
            f"optim.warmup_epochs={min(1.0, epochs / 2)}",
            "optim.milestones=[]",
            f"run.eval_subset={eval_subset}",
            "run.name=ltzoo-demo-ncl",  # a run of ours, not the shipped ncl-resnet32-fmnistlt
        ]
        if max_steps:
            overrides.append(f"run.max_steps_per_epoch={max_steps}")
        run_dir = train(load_recipe("fmnistlt_ncl", overrides), workdir / "run")
        print(f"  run directory: {run_dir} (checkpoint.pt, metrics.jsonl, plots/)")

        _step(3, total, f"evaluate on {eval_subset or 10000} balanced test images")
        model = zoo.Ensemble.from_pretrained(run_dir / "model")
        acc = model.config.metrics["accuracy"]
        print(
            f"  top-1 {acc['top1']:.2f}%  many {acc['many']:.2f}%  medium {acc['medium']:.2f}%  few {acc['few']:.2f}%"
        )
        print(
            f"  experts top-1: {', '.join(f'{a:.2f}%' for a in model.config.metrics['experts_top1'])}"
        )

        _step(4, total, "calibrate: temperature fitted on the balanced validation split")
        c = model.config.metrics["calibration"]
        print(f"  T = {c['temperature']:.3f}; ECE {c['ece_before']:.2f}% -> {c['ece_after']:.2f}%")
        print(f"  plots: {run_dir / 'plots'}")

        _step(5, total, f"push to the local Hub-compatible server at {hub.url}")
        repo = f"{DEMO_ORG}/{DEMO_MODEL}"
        commit = zoo.push_to_hub(model, repo, commit_message="ltzoo demo")
        print(f"  pushed {repo} (commit {commit[:12]}); Hub storage: {workdir / 'hub'}")

        _step(6, total, f"zoo.load({DEMO_MODEL!r}) by registry name (LTZOO_HUB_ORG={DEMO_ORG})")
        loaded = zoo.load(DEMO_MODEL)
        x = split.test[0][0][None]
        same = torch.equal(loaded(x), model.eval()(x))
        print(
            f"  loaded from cache {os.environ['HF_HOME']}; outputs identical to the trained model: {same}"
        )
        if not same:
            raise RuntimeError("loaded model differs from the pushed one")

        _step(
            7, total, "export ONE fused ONNX graph (experts + mean + prior + temperature + softmax)"
        )
        from ltzoo.export.onnx import check_parity, export_onnx

        onnx_path = export_onnx(loaded, workdir / "model.onnx")
        batch = torch.stack([split.test[i][0] for i in range(16)])
        diff = max(
            check_parity(loaded, onnx_path, batch[:1]), check_parity(loaded, onnx_path, batch)
        )
        print(
            f"  {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB); max |p_onnx - p_torch| = {diff:.2e}"
        )
        if diff > 1e-4:
            raise RuntimeError("ONNX parity check failed")

        _step(8, total, "serve with LitServe (ONNX Runtime backend) and classify over HTTP")
        _serve_and_classify(onnx_path, num_images)

        _step(9, total, "the same test images with the NCL model that ships with ltzoo")
        _compare_with_shipped(model, split.test, eval_subset or 10000)
        print("\ndemo finished: every step passed.")
        print(
            f"to see it in a browser: ltzoo serve {onnx_path} --backend onnxruntime --port 8000\n"
            "  then open the page at http://127.0.0.1:8000/"
        )
        return 0
    finally:
        hub.stop()


def _compare_with_shipped(model: Any, test: Any, limit: int) -> None:
    """Top-1 of the demo's short training vs the bundled, fully trained NCL model."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from ltzoo.zoo.bundle import is_bundled, load_bundled

    if not is_bundled(DEMO_MODEL):
        print(f"  {DEMO_MODEL} is not bundled in this installation: skipped")
        return
    shipped = load_bundled(DEMO_MODEL)
    n = min(limit, len(test))
    loader = DataLoader(Subset(test, range(0, len(test), max(1, len(test) // n))[:n]), 500)
    correct = {"demo": 0, "shipped": 0}
    with torch.inference_mode():
        for x, y in loader:
            for key, m in (("demo", model.eval()), ("shipped", shipped)):
                correct[key] += int((m(x).argmax(1) == y).sum())
    print(
        f"  top-1 on {n} test images: this demo's short training {100 * correct['demo'] / n:.2f}%, "
        f"shipped {DEMO_MODEL} (recipe {shipped.config.recipe}) {100 * correct['shipped'] / n:.2f}%"
    )


def _serve_and_classify(onnx_path: Path, num_images: int) -> None:
    import httpx
    import numpy as np
    from PIL import Image

    from ltzoo.training.data import read_idx
    from ltzoo.training.data.datasets import FASHION_MNIST_DIR
    from ltzoo.zoo.datasets_meta import FASHION_MNIST_CLASSES

    images = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "ltzoo",
        "serve",
        str(onnx_path),
        "--backend",
        "onnxruntime",
        "--port",
        str(port),
        "--max-batch-size",
        "8",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        _wait_healthy(url, proc)
        print(f"  serving at {url} (POST /predict, GET /info, /docs; page: {url}/)")
        rng = np.random.default_rng(0)
        for i in rng.choice(len(labels), num_images, replace=False):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(images[i], dtype=np.uint8)).save(buf, format="PNG")
            r = httpx.post(
                f"{url}/predict",
                files={"file": ("image.png", buf.getvalue(), "image/png")},
                data={"top_k": "3"},
                timeout=30,
            )
            r.raise_for_status()
            body = r.json()
            top = body["predictions"][0]
            alts = ", ".join(
                f"{p['label']} {p['probability']:.2f}" for p in body["predictions"][1:]
            )
            print(
                f"  true {FASHION_MNIST_CLASSES[int(labels[i])]:12} -> {top['label']:12} p={top['probability']:.3f} "
                f"({top['group']}-shot class; next: {alts}; disagreement {body['disagreement']:.3f})"
            )
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print("  server stopped cleanly")
