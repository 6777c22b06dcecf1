"""What each expert costs: parameters, MACs and measured latency for 1..K experts."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .zoo.ensemble import Ensemble


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (torch's FlopCounterMode counts 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() // 2


def _latency_ms(fn, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def _ort_runner(sub: Ensemble, tmp: str):
    """``x -> probs`` through the fused ONNX graph on ONNX Runtime (CPU), exported once;
    None without the export extra."""
    try:
        from ltzoo.export.onnx import export_onnx, graph_feed, make_session
    except ImportError:
        return None
    session = make_session(export_onnx(sub, f"{tmp}/experts{sub.num_experts}.onnx"))
    return lambda x: session.run(["probs"], graph_feed(session, x.numpy()))


def _measure(
    sub: Ensemble, x1: torch.Tensor, batch_sizes: tuple[int, ...], repeats: int, bar: tqdm
) -> dict[str, Any]:
    """One row of :func:`cost_report` for the experts of ``sub``; ``bar`` advances by one step
    for the parameters, MACs and ONNX export, and one per batch size timed."""
    row: dict[str, Any] = {
        "experts": sub.num_experts,
        "parameters": sum(p.numel() for p in sub.parameters()),
        "macs_per_image": count_macs(sub, x1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"torch_cpu": sub, "ort_cpu": _ort_runner(sub, tmp)}
        bar.update()
        for b in batch_sizes:
            xb = x1.expand(b, -1, -1, -1).contiguous()
            for backend, run in runners.items():
                if run is not None:
                    ms = _latency_ms(run, xb, repeats)
                    row[f"{backend}_ms_batch{b}"] = ms
                    row[f"{backend}_img_per_s_batch{b}"] = b / ms * 1000
            bar.update()
    return row


def cost_report(
    model: Ensemble, batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 10
) -> dict[str, Any]:
    """Per expert count k = 1..K: parameters, MACs per image, and median CPU latency (ms) of
    eager PyTorch and of the fused ONNX graph on ONNX Runtime. A progress bar on stderr shows
    the measuring (about a minute for three ResNet-32 experts)."""
    model = model.eval().cpu()
    pre = model.config.preprocess
    x1 = torch.randn(1, pre.channels, *pre.input_size)
    steps = model.num_experts * (1 + len(batch_sizes))
    rows = []
    with tqdm(
        total=steps, desc="measuring cost", unit="step", leave=False, dynamic_ncols=True
    ) as bar:
        for k in range(1, model.num_experts + 1):
            bar.set_postfix_str(f"{k}/{model.num_experts} experts")
            sub = model.select_experts(list(range(k))).cpu()
            rows.append(_measure(sub, x1, batch_sizes, repeats, bar))
    return {
        "backends": ["torch-cpu", "onnxruntime-cpu (fused graph)"],
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
