"""Load test of ``ltzoo serve`` over real HTTP on loopback.

For each backend (torch, onnxruntime) on 3 x ResNet-32 (the Fashion-MNIST-LT config,
random weights: speed does not depend on the values) it measures, in one run:

* **bare**: the backend called in-process on preprocessed tensors (no HTTP, no decoding)
  at batch 1 and at the server's max batch size -> images/s;
* **breakdown**: per-request cost of the worker-side stages measured in-process
  (base64 + PNG decode + preprocess, backend at batch 1, response encoding);
* **server, batching on** (``--max-batch-size`` / ``--batch-timeout``) at each concurrency;
* **server, batching off** (``--max-batch-size 1``) at each concurrency.

Each server level sends at most ``--requests`` requests and stops at ``--time-cap``
seconds; it reports throughput, p50/p95/p99 latency and errors. The load generator is a
minimal keep-alive HTTP/1.1 client on asyncio (one connection per concurrent stream), so
that on a small machine the client steals as little CPU as possible from the server.
Optionally (``--resnext``) 3 x ResNeXt-50 (ImageNet-LT config, 224 px) with a few requests.

    python benchmarks/bench_serve.py                      # ~5-8 minutes on 2 CPU cores
    python benchmarks/bench_serve.py --requests 500 --concurrency 1,8 --backends torch
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import LoadGuard, add_allow_busy  # noqa: E402
from ltzoo import zoo  # noqa: E402
from ltzoo.net import free_port  # noqa: E402
from ltzoo.serve import DEFAULT_BATCH_TIMEOUT_S  # noqa: E402


# -- load generator -----------------------------------------------------------------------
def _http_request(port: int, body: bytes, api_key: str | None = None) -> bytes:
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if api_key:
        head += f"X-API-Key: {api_key}\r\n"
    return head.encode() + b"\r\n" + body


async def _stream(
    port: int,
    requests: list[bytes],
    counter: list[int],
    total: int,
    deadline: float,
    latencies: list[float],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while counter[0] < total and time.perf_counter() < deadline:
            i = counter[0]
            counter[0] += 1
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"{status}: {body[:200]!r}")
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(f"connection: {exc!r}")
    finally:
        writer.close()


async def _load(
    port: int, requests: list[bytes], total: int, concurrency: int, time_cap: float
) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counter = [0]
    start = time.perf_counter()
    deadline = start + time_cap
    await asyncio.gather(
        *(
            _stream(port, requests, counter, total, deadline, latencies, errors)
            for _ in range(concurrency)
        )
    )
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p95": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "mean": round(float(lat.mean()), 2) if len(lat) else None,
        },
        "hit_time_cap": len(latencies) < total,
    }


def run_load(
    port: int, requests: list[bytes], total: int, concurrency: int, time_cap: float
) -> dict:
    try:
        import uvloop

        return uvloop.run(_load(port, requests, total, concurrency, time_cap))
    except ImportError:
        return asyncio.run(_load(port, requests, total, concurrency, time_cap))


# -- server ----------------------------------------------------------------------------------


class ServerProcess:
    def __init__(
        self, model: str, backend: str, extra: list[str], log: Path, env: dict[str, str]
    ) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "ltzoo",
            "serve",
            model,
            "--backend",
            backend,
            "--port",
            str(self.port),
            *extra,
        ]
        self.cmd = cmd
        self.log = log
        self.proc = subprocess.Popen(
            cmd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )

    def wait_ready(self, limit: float = 180.0) -> float:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server died:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {limit}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def metrics_batches(port: int) -> dict[str, int]:
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith("ltzoo_batches_total{"):
            out[line.split('requests="')[1].split('"')[0]] = int(float(line.rsplit(" ", 1)[1]))
    return out


# -- in-process measurements ---------------------------------------------------------------
def _rate(fn, min_time: float, min_iters: int = 5) -> tuple[float, int]:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n, n


def bare_backend(
    backend: Any, cfg: zoo.EnsembleConfig, batch_sizes: list[int], min_time: float
) -> dict:
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.input_size
    out = {}
    for b in batch_sizes:
        x = np.random.default_rng(0).standard_normal((b, c, h, w)).astype(np.float32)
        shift = np.zeros((b, cfg.num_classes), np.float32)
        sec, n = _rate(lambda x=x, shift=shift: backend.predict(x, shift), min_time)
        out[str(b)] = {
            "batch_ms": round(sec * 1000, 3),
            "images_per_s": round(b / sec, 1),
            "iters": n,
        }
    return out


def breakdown(backend: Any, cfg: zoo.EnsembleConfig, payload: dict, min_time: float) -> dict:
    from ltzoo.serve.api import EnsembleAPI
    from ltzoo.serve.decoding import RequestDecoder

    decoder = RequestDecoder(cfg, 25_000_000, 64)
    decode_s, _ = _rate(lambda: decoder.decode({"kind": "json", "data": payload}), min_time)
    req = decoder.decode({"kind": "json", "data": payload})
    predict_s, _ = _rate(lambda: backend.predict(req.pixels, req.shift), min_time)
    api = EnsembleAPI.__new__(EnsembleAPI)
    api.names, api.groups = list(cfg.class_names), list(cfg.shot_groups)
    api.model_info = {"name": "bench", "revision": None, "temperature": 1.0, "backend": "x"}
    probs, dis = backend.predict(req.pixels, req.shift)
    encode_s, _ = _rate(
        lambda: api.encode_response({"request": req, "probs": probs, "disagreement": dis}), min_time
    )
    body = json.dumps(payload).encode()
    parse_s, _ = _rate(lambda: json.loads(body), min_time)
    return {
        "json_parse_ms": round(parse_s * 1000, 4),
        "decode_request_ms": round(decode_s * 1000, 4),
        "predict_batch1_ms": round(predict_s * 1000, 4),
        "encode_response_ms": round(encode_s * 1000, 4),
    }


def make_payloads(cfg: zoo.EnsembleConfig, n: int = 32) -> list[dict]:
    rng = np.random.default_rng(0)
    h, w = cfg.preprocess.input_size
    mode = "L" if cfg.preprocess.channels == 1 else "RGB"
    out = []
    for _ in range(n):
        shape = (h, w) if mode == "L" else (h, w, 3)
        im = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode(), "top_k": 5})
    return out


def bench_model(
    name: str,
    model: zoo.Ensemble,
    args: argparse.Namespace,
    workdir: Path,
    requests: int,
    concurrency: list[int],
    modes: list[str],
) -> dict:
    from ltzoo.serve.backends import OnnxRuntimeBackend, TorchBackend, export_cached

    cfg = model.config
    model_dir = workdir / name
    model.save_pretrained(model_dir, card=False)
    payloads = make_payloads(cfg)
    env = {
        "LTZOO_CACHE": str(workdir / "cache"),
        "OMP_NUM_THREADS": str(args.threads or os.cpu_count()),
    }
    os.environ["LTZOO_CACHE"] = env["LTZOO_CACHE"]
    result: dict[str, Any] = {"model": name, "backends": {}}
    for backend_name in args.backends:
        print(f"== {name} / {backend_name}", flush=True)
        t0 = time.perf_counter()
        if backend_name == "torch":
            backend = TorchBackend(model_dir, args.device, args.threads)
            source = str(model_dir)
        else:
            onnx_path = export_cached(model)
            print(
                f"   fused ONNX: {onnx_path.name} ({time.perf_counter() - t0:.1f}s incl. export)",
                flush=True,
            )
            backend = OnnxRuntimeBackend(onnx_path, "cpu", args.threads)
            source = str(onnx_path)
        entry: dict[str, Any] = {
            "bare": bare_backend(backend, cfg, sorted({1, args.max_batch_size}), args.bare_time),
            "breakdown": breakdown(backend, cfg, payloads[0], args.bare_time / 2),
            "backend_info": backend.info(),
        }
        del backend
        print(f"   bare {entry['bare']}\n   breakdown {entry['breakdown']}", flush=True)
        bodies = [json.dumps(p).encode() for p in payloads]
        for mode in modes:
            batching = mode == "batching_on"
            extra = [
                "--max-batch-size",
                str(args.max_batch_size if batching else 1),
                "--batch-timeout",
                str(args.batch_timeout if batching else 0),
                "--device",
                args.device if backend_name == "torch" else "cpu",
            ]
            if args.threads:
                extra += ["--threads", str(args.threads)]
            server = ServerProcess(
                source, backend_name, extra, workdir / f"{name}-{backend_name}-{mode}.log", env
            )
            try:
                startup = server.wait_ready()
                reqs = [_http_request(server.port, b) for b in bodies]
                run_load(server.port, reqs, 50, 4, 30)  # warm-up
                levels = []
                for c in concurrency:
                    before = metrics_batches(server.port)
                    cap = args.final_time_cap if c == max(concurrency) else args.time_cap
                    row = run_load(server.port, reqs, requests, c, cap)
                    after = metrics_batches(server.port)
                    sizes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    n_batches = sum(sizes.values())
                    row["model_batches"] = n_batches
                    row["mean_requests_per_batch"] = (
                        round(sum(int(k) * v for k, v in sizes.items()) / n_batches, 2)
                        if n_batches
                        else None
                    )
                    levels.append(row)
                    print(
                        f"   {mode:12s} c={c:3d} {row['throughput_rps']:8.1f} req/s  p50 {row['latency_ms']['p50']} "
                        f"p95 {row['latency_ms']['p95']} p99 {row['latency_ms']['p99']} ms  errors {row['errors']}  "
                        f"req/batch {row['mean_requests_per_batch']}",
                        flush=True,
                    )
                entry[mode] = {
                    "startup_s": round(startup, 1),
                    "server_args": extra,
                    "levels": levels,
                }
            finally:
                server.stop()
        result["backends"][backend_name] = entry
    return result


def targets(res: dict, max_batch: int) -> dict:
    out = {}
    for name, entry in res["backends"].items():
        lv = {row["concurrency"]: row for row in entry.get("batching_on", {}).get("levels", [])}
        bare1 = entry["bare"]["1"]["images_per_s"]
        best = max((row["throughput_rps"] for row in lv.values()), default=0.0)
        t: dict[str, Any] = {
            "bare_batch1_images_per_s": bare1,
            "best_server_rps": best,
            "server_vs_bare_batch1": round(best / bare1, 3),
        }
        t["target_0.5x_bare_batch1"] = best >= 0.5 * bare1
        if 64 in lv:
            t["c64_requests"], t["c64_errors"] = lv[64]["requests"], lv[64]["errors"]
            t["target_5000_at_c64_no_errors"] = lv[64]["requests"] >= 5000 and lv[64]["errors"] == 0
        if 32 in lv and lv[32]["latency_ms"]["p50"]:
            ratio = lv[32]["latency_ms"]["p99"] / lv[32]["latency_ms"]["p50"]
            t["c32_p99_over_p50"] = round(ratio, 2)
            t["target_p99_le_3x_p50_at_c32"] = ratio <= 3.0
        out[name] = t
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--requests", type=int, default=5000, help="requests per concurrency level (cap)"
    )
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument(
        "--nobatch-requests", type=int, default=1000, help="requests per level with batching off"
    )
    p.add_argument("--nobatch-concurrency", default="1,32")
    p.add_argument("--time-cap", type=float, default=30.0, help="seconds per level (cap)")
    p.add_argument(
        "--final-time-cap",
        type=float,
        default=80.0,
        help="seconds for the highest concurrency level (cap), to reach --requests there",
    )
    p.add_argument(
        "--bare-time", type=float, default=3.0, help="seconds per bare-backend measurement"
    )
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda: the torch backend's device (ORT stays on CPU)"
    )
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=DEFAULT_BATCH_TIMEOUT_S)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of the worker, also used for the bare runs (default 1)",
    )
    p.add_argument(
        "--resnext", action="store_true", help="also 3 x ResNeXt-50 (224 px) with a few requests"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_cpu.json"))
    add_allow_busy(p)
    args = p.parse_args()
    guard = LoadGuard.start(args.allow_busy)
    args.backends = [b for b in args.backends.split(",") if b]
    conc = [int(c) for c in args.concurrency.split(",")]
    nb_conc = [int(c) for c in args.nobatch_concurrency.split(",")]

    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "ltzoo serve: HTTP load on loopback (benchmarks/bench_serve.py)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {
            "requests_per_level": args.requests,
            "time_cap_s": args.time_cap,
            "final_time_cap_s": args.final_time_cap,
            "max_batch_size": args.max_batch_size,
            "batch_timeout_s": args.batch_timeout,
            "threads": args.threads,
            "device": args.device,
            "payload": "JSON base64 28x28 grayscale PNG, top_k=5",
            "client": "asyncio keep-alive HTTP/1.1, one connection per concurrent stream",
        },
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="ltzoo-bench-serve-") as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        small = zoo.load("ncl-resnet32-fmnistlt", pretrained=False)
        res = bench_model(
            "ncl-resnet32-fmnistlt", small, args, workdir, args.requests, conc, ["batching_on"]
        )
        if args.nobatch_requests > 0:
            nb_args = {**vars(args), "bare_time": 0.3, "time_cap": 20.0, "final_time_cap": 20.0}
            nb = bench_model(
                "ncl-resnet32-fmnistlt",
                small,
                argparse.Namespace(**nb_args),
                workdir,
                args.nobatch_requests,
                nb_conc,
                ["batching_off"],
            )
            for name, entry in nb["backends"].items():
                res["backends"][name]["batching_off"] = entry["batching_off"]
        res["targets"] = targets(res, args.max_batch_size)
        results["models"].append(res)
        if args.resnext:
            big = zoo.load("ncl-resnext50-imagenetlt", pretrained=False)
            big_args = argparse.Namespace(
                **{
                    **vars(args),
                    "bare_time": 5.0,
                    "max_batch_size": 8,
                    "time_cap": 60.0,
                    "final_time_cap": 60.0,
                }
            )
            results["models"].append(
                bench_model(
                    "ncl-resnext50-imagenetlt", big, big_args, workdir, 24, [1, 8], ["batching_on"]
                )
            )
        for mode_logs in workdir.glob("*.log"):
            text = mode_logs.read_text()
            if "Traceback" in text:
                print(f"!! traceback in {mode_logs.name}:\n{text[-2000:]}", flush=True)
    results["machine"].update(guard.finish())
    results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["models"][0]["targets"], indent=2))
    print(f"wrote {args.out} in {results['total_wall_s']} s")


if __name__ == "__main__":
    main()
