"""Shifted-prior evaluation and cost report of the trained Fashion-MNIST-LT models.

    python benchmarks/eval_fmnistlt.py            # after benchmarks/train_fmnistlt.py

Reads runs/bench/<tag>-s0/model, writes benchmarks/results/shifted_fmnistlt.json,
benchmarks/results/cost_fmnistlt.json and plots under docs/img/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ltzoo import zoo
from ltzoo.cost import cost_report
from ltzoo.training.data import build_lt_dataset, build_transforms
from ltzoo.training.evaluate import calibrate_and_evaluate
from ltzoo.training.shifted import shifted_prior_report

RESULTS = Path(__file__).parent / "results"
DOCS_IMG = Path(__file__).parents[1] / "docs" / "img"


def int8_accuracy(model: zoo.Ensemble, split, workdir: Path) -> dict[str, float]:
    """Top-1 on the full test set of the fused fp32 graph vs its INT8 (QDQ) quantization,
    calibrated on the balanced validation split."""
    from ltzoo.export.onnx import export_onnx, make_session, quantize_int8

    fp32 = export_onnx(model, workdir / "fp32.onnx")
    calib = torch.stack([split.val[i][0] for i in range(len(split.val))])
    int8 = quantize_int8(fp32, workdir / "int8.onnx", calib)
    x = torch.stack([split.test[i][0] for i in range(len(split.test))]).numpy()
    y = torch.tensor([split.test[i][1] for i in range(len(split.test))])
    out = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        sess = make_session(path)
        probs = [
            sess.run(["probs"], {"pixel_values": x[i : i + 256]})[0] for i in range(0, len(x), 256)
        ]
        out[f"top1_{name}"] = float(
            (torch.from_numpy(__import__("numpy").concatenate(probs)).argmax(1) == y).float().mean()
            * 100
        )
    out["top1_change"] = out["top1_int8"] - out["top1_fp32"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tags", nargs="+", default=["ce", "bs", "ncl_lr05", "cbd", "ecl_lr05"])
    ap.add_argument("--repeats", type=int, default=20, help="latency repeats per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shifted_path, cost_path = RESULTS / "shifted_fmnistlt.json", RESULTS / "cost_fmnistlt.json"
    shifted = json.loads(shifted_path.read_text()) if shifted_path.is_file() else {}
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
    for tag in args.tags:
        run = Path("runs/bench") / f"{tag}-s0"
        if not (run / "model" / "config.json").is_file():
            print(f"skip {tag}: {run}/model missing")
            continue
        model = zoo.load(str(run / "model"))
        split = build_lt_dataset(
            "fashion_mnist_lt",
            eval_transform=build_transforms(model.config.preprocess, (), train=False),
        )
        shifted[tag] = shifted_prior_report(model, split, plot=DOCS_IMG / f"shifted_{tag}.png")
        # Does a larger balanced validation split (100 instead of 20 images per class; the
        # training images are the same) give a better temperature? Test logits are reused.
        big_val = build_lt_dataset(
            "fashion_mnist_lt",
            val_per_class=100,
            eval_transform=build_transforms(model.config.preprocess, (), train=False),
        )
        recal = calibrate_and_evaluate(model, big_val)["calibration"]
        shifted[tag]["recalibrated_val100"] = {
            k: recal[k] for k in ("temperature", "ece_before", "ece_after")
        }
        cost[tag] = cost_report(model, repeats=args.repeats)
        cost[tag]["int8"] = int8_accuracy(model, split, run)
        for name in ("per_class_accuracy.png", "reliability.png"):
            if (run / "plots" / name).is_file():
                DOCS_IMG.mkdir(parents=True, exist_ok=True)
                shutil.copy(run / "plots" / name, DOCS_IMG / f"{tag}_{name}")
        RESULTS.mkdir(parents=True, exist_ok=True)  # written after every model: a crash loses one
        shifted_path.write_text(json.dumps(shifted, indent=2))
        cost_path.write_text(json.dumps(cost, indent=2))
        print(f"{tag}: done")


if __name__ == "__main__":
    main()
