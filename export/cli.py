"""`ltzoo export`: fuse an ensemble into one ONNX graph (fp32/fp16/INT8) or a TensorRT engine."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, cast

#: tolerance of ``--check`` on the float32 graph (max |p_onnx - p_torch|)
CHECK_TOL = 1e-4
#: --int8 --check on real images (a fresh draw from --calib-data): the INT8 graph's top-1
#: must agree with the fp32 model's on this fraction of them, and no calibrated probability
#: may move by more than INT8_MAX_DIFF
INT8_MIN_AGREEMENT = 0.98
INT8_MAX_DIFF = 0.25
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``ltzoo export``."""
    p = sub.add_parser(
        "export",
        help="export an ensemble as one fused ONNX graph (probabilities out) or a TensorRT engine",
        description=(
            "Fuse all experts, the logit mean, the prior shift, the temperature and the softmax into "
            "one ONNX graph with the model config in its metadata."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="run directory, model directory, registry name or Hub repo id[@rev]",
    )
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    p.add_argument(
        "--out", type=Path, default=None, help="output file (default: ./<name>[.fp16|.int8].onnx)"
    )
    p.add_argument("--opset", type=int, default=18)
    p.add_argument(
        "--fp16", action="store_true", help="float16 experts (inputs/outputs stay float32)"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="static INT8 quantization with calibration images; measures every form of "
        "export.onnx.INT8_FORMS on this machine and keeps the fastest that agrees with fp32",
    )
    p.add_argument(
        "--int8-form",
        default=None,
        metavar="FORM",
        help="with --int8: use this form without measuring (e.g. qdq-u8s8-channel)",
    )
    p.add_argument(
        "--calib-data",
        default="fashion_mnist_lt",
        help="dataset name (training.data) or a directory of images for --int8",
    )
    p.add_argument("--calib-size", type=int, default=256, help="number of calibration images")
    p.add_argument(
        "--expert-outputs", action="store_true", help="also output expert_probs [K, B, C]"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help=f"parity vs PyTorch on random inputs (batch 1 and 16); exit 1 if > {CHECK_TOL:g}; "
        f"with --int8, on --calib-size real images from --calib-data instead: exit 1 unless "
        f"top-1 agrees on >= {INT8_MIN_AGREEMENT:.0%} and max |dp| <= {INT8_MAX_DIFF:g}",
    )
    p.add_argument("--revision", default=None, help="Hub revision")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="registry name only: build the architecture with random weights (no download)",
    )
    p.set_defaults(func=_cmd_export)


def _default_out(model: Any, args: argparse.Namespace) -> Path:
    name = model.config.name or Path(args.model.rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    suffix = ".fp16" if args.fp16 else ".int8" if args.int8 else ""
    return Path(f"{name}{suffix}.onnx")


def load_calibration_images(
    spec: str, model: Any, n: int, seed: int = 0, test: bool = False
):  # -> torch.Tensor
    """``n`` preprocessed calibration images from a directory of images or a dataset name
    (its validation split; ``test=True``: its test split, images calibration never saw)."""
    import torch

    path = Path(spec)
    if path.is_dir():
        from PIL import Image

        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {path}")
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(files), generator=gen)[:n].tolist()
        images = []
        for i in pick:
            with Image.open(files[i]) as im:
                images.append(model.preprocess(im))
        return torch.cat(images)
    try:
        from ltzoo.training.data import build_lt_dataset
    except ImportError as exc:
        raise ValueError(
            f"--calib-data {spec!r} is not a directory and the dataset loader (training.data) "
            f"is unavailable ({exc}); pass a directory of images"
        ) from exc
    split = build_lt_dataset(spec, seed=seed)
    has_val = getattr(split, "val", None) is not None and not test
    data = cast(Any, split.val if has_val else split.test)  # Sized
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data), generator=gen)[:n].tolist()
    return torch.stack([data[i][0] for i in pick]).float()


def _check(model: Any, onnx_path: Path, precision: str) -> bool:
    import torch

    from .onnx import check_parity

    cfg = model.config
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.input_size
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in (1, 16):
        x = torch.randn(batch, c, h, w, generator=gen)
        diff = check_parity(model, onnx_path, x)
        worst = max(worst, diff)
        print(f"parity batch {batch:>2}: max |p_onnx - p_torch| = {diff:.3g}")
    if precision != "fp32":
        print(
            f"check: {precision} graph, max diff {worst:.3g} (tolerance {CHECK_TOL:g} applies to fp32 only)"
        )
        return True
    ok = worst <= CHECK_TOL
    print(f"check {'passed' if ok else 'FAILED'}: max diff {worst:.3g} (tolerance {CHECK_TOL:g})")
    return ok


def _check_int8(model: Any, onnx_path: Path, images: Any, what: str) -> bool:
    """The INT8 verdict on real images: top-1 agreement with the fp32 model and the largest
    change of a calibrated probability, each against its threshold."""
    from .onnx import compare_predictions

    r = compare_predictions(model, onnx_path, images)
    ok = r["top1_agreement"] >= INT8_MIN_AGREEMENT and r["max_diff"] <= INT8_MAX_DIFF
    print(
        f"check {'passed' if ok else 'FAILED'} (int8 vs the fp32 model on {r['n']} {what}): "
        f"top-1 agreement {r['top1_agreement']:.1%} (>= "
        f"{INT8_MIN_AGREEMENT:.0%}), max |dp| {r['max_diff']:.3f} (<= {INT8_MAX_DIFF:g}), "
        f"mean max |dp| {r['mean_diff']:.4f}"
    )
    return ok


def _int8_table(report: dict) -> str:
    """The forms :func:`export.onnx.fastest_int8` measured, one line each."""
    lines = ["INT8 form                  speed-up vs fp32 (batch: x)   top-1 agreement"]
    for name, row in report["forms"].items():
        speed = "  ".join(f"b{b}: {v:.2f}x" for b, v in row["speedup_vs_fp32"].items())
        mark = "  <- chosen" if name == report["chosen"] else ""
        lines.append(f"{name:26s} {speed:30s} {row['top1_agreement']:.1%}{mark}")
    return "\n".join(lines)


def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from ltzoo.zoo.resolve import load_model, resolve_model

    from .onnx import INT8_FORMS, export_onnx, fastest_int8, quantize_int8

    if args.fp16 and args.int8:
        raise ValueError("choose one of --fp16 and --int8")
    if args.int8_form is not None and (not args.int8 or args.int8_form not in INT8_FORMS):
        raise ValueError(f"--int8-form needs --int8 and one of {sorted(INT8_FORMS)}")
    if args.int8 and args.format == "tensorrt":
        raise ValueError("--int8 is for --format onnx (TensorRT INT8 needs its own calibrator)")
    ref = resolve_model(args.model, args.revision)
    if args.random_weights and ref.kind != "registry":
        raise ValueError("--random-weights needs a registry name")
    if args.format == "tensorrt":  # before loading and the ONNX export, not after
        from .tensorrt import require_tensorrt

        require_tensorrt()
    model = load_model(ref, pretrained=not args.random_weights)
    out = args.out or _default_out(model, args)
    source = model.config.extra.get("source") or {
        "repo_id": args.model,
        "revision": args.revision or "",
    }
    if args.format == "tensorrt":
        from .tensorrt import build_engine

        onnx_path = out.with_suffix(".onnx")
        export_onnx(
            model, onnx_path, opset=args.opset, expert_outputs=args.expert_outputs, source=source
        )
        if args.check and not _check(model, onnx_path, "fp32"):
            return 1
        engine = build_engine(onnx_path, out.with_suffix(".engine"), fp16=args.fp16)
        print(f"wrote {onnx_path} and {engine}")
        return 0
    if args.int8:
        calib = load_calibration_images(args.calib_data, model, args.calib_size)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(
                model,
                Path(tmp) / "fp32.onnx",
                opset=args.opset,
                expert_outputs=args.expert_outputs,
                source=source,
            )
            if args.int8_form:
                quantize_int8(fp32, out, calib, form=args.int8_form)
            else:
                _, report = fastest_int8(fp32, out, calib)
                print(_int8_table(report))
        precision = "int8"
    else:
        export_onnx(
            model,
            out,
            opset=args.opset,
            expert_outputs=args.expert_outputs,
            fp16=args.fp16,
            source=source,
        )
        precision = "fp16" if args.fp16 else "fp32"
    print(f"wrote {out} ({precision}, {out.stat().st_size / 1e6:.1f} MB)")
    if args.check and precision == "int8":
        # a dataset: its test split, images the calibration never saw; a directory: its images
        if Path(args.calib_data).is_dir():
            images, what = calib, f"the calibration images of {args.calib_data}"
        else:
            images = load_calibration_images(args.calib_data, model, args.calib_size, test=True)
            what = f"{args.calib_data} test images"
        return 0 if _check_int8(model, out, images, what) else 1
    if args.check and not _check(model, out, precision):
        return 1
    return 0
