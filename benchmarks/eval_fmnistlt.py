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

import zoo
from training.data import build_lt_dataset, build_transforms
from training.shifted import shifted_prior_report
from zoo.cost import cost_report

RESULTS = Path(__file__).parent / "results"
DOCS_IMG = Path(__file__).parents[1] / "docs" / "img"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tags", nargs="+", default=["ce", "bs", "ncl", "cbd", "ecl"])
    ap.add_argument("--repeats", type=int, default=20, help="latency repeats per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shifted, cost = {}, {}
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
        cost[tag] = cost_report(model, repeats=args.repeats)
        for name in ("per_class_accuracy.png", "reliability.png"):
            if (run / "plots" / name).is_file():
                DOCS_IMG.mkdir(parents=True, exist_ok=True)
                shutil.copy(run / "plots" / name, DOCS_IMG / f"{tag}_{name}")
        print(f"{tag}: done")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shifted_fmnistlt.json").write_text(json.dumps(shifted, indent=2))
    (RESULTS / "cost_fmnistlt.json").write_text(json.dumps(cost, indent=2))


if __name__ == "__main__":
    main()
