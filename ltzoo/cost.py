"""What each expert costs: parameters, MACs and measured latency for 1..K experts."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

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
        from ltzoo.export.onnx import export_onnx, make_session
    except ImportError:
        return None
    session = make_session(export_onnx(sub, f"{tmp}/experts{sub.num_experts}.onnx"))
    return lambda x: session.run(["probs"], {"pixel_values": x.numpy()})


def cost_report(
    model: Ensemble, batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 10
) -> dict[str, Any]:
    """Per expert count k = 1..K: parameters, MACs per image, and median CPU latency (ms) of
    eager PyTorch and of the fused ONNX graph on ONNX Runtime."""
    model = model.eval().cpu()
    pre = model.config.preprocess
    x1 = torch.randn(1, pre.channels, *pre.input_size)
    rows = []
    for k in range(1, model.num_experts + 1):
        sub = model.select_experts(list(range(k))).cpu()
        row: dict[str, Any] = {
            "experts": k,
            "parameters": sum(p.numel() for p in sub.parameters()),
            "macs_per_image": count_macs(sub, x1),
        }
        with tempfile.TemporaryDirectory() as tmp:
            runners = {"torch_cpu": sub, "ort_cpu": _ort_runner(sub, tmp)}
            for b in batch_sizes:
                xb = x1.expand(b, -1, -1, -1).contiguous()
                for backend, run in runners.items():
                    if run is not None:
                        ms = _latency_ms(run, xb, repeats)
                        row[f"{backend}_ms_batch{b}"] = ms
                        row[f"{backend}_img_per_s_batch{b}"] = b / ms * 1000
        rows.append(row)
    return {
        "backends": ["torch-cpu", "onnxruntime-cpu (fused graph)"],
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
