"""Shifted-prior evaluation and cost report of the Fashion-MNIST-LT models that ship.

    python benchmarks/eval_fmnistlt.py [--models NAME ...] [--repeats 20] [--allow-busy]

Loads each model by name (``zoo.load``: the Hub when reachable, else the bundled weights),
rebuilds its test split, and writes

* benchmarks/results/shifted_fmnistlt.json: top-1 and ECE on forward/backward long-tailed
  resamplings of the balanced test set, with the balanced prior, the true test prior and the
  EM estimate (what ``prior=`` on ``predict`` and the server recovers); plots in docs/img/;
* benchmarks/results/cost_fmnistlt.json: parameters, MACs and one-thread latency of 1..K
  experts, eager PyTorch vs the fused ONNX graph (a timing: refused on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import LoadGuard, add_allow_busy  # noqa: E402
from benchmarks.report import REGISTRY_NAMES  # noqa: E402
from ltzoo import zoo  # noqa: E402
from ltzoo.cost import cost_report  # noqa: E402
from ltzoo.training.data import split_for_model  # noqa: E402
from ltzoo.training.shifted import shifted_prior_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS_IMG = ROOT / "docs" / "img"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", nargs="+", default=list(REGISTRY_NAMES.values()), help="registry names"
    )
    ap.add_argument("--repeats", type=int, default=20, help="latency repeats per measurement")
    add_allow_busy(ap)
    args = ap.parse_args()
    guard = LoadGuard.start(args.allow_busy)
    torch.set_num_threads(1)
    shifted: dict = {}
    cost: dict = {"rows_per_model": {}}
    for name in args.models:
        model = zoo.load(name)
        split = split_for_model(model.config)
        plot = DOCS_IMG / f"shifted_{name.split('-')[0]}.png"
        shifted[name] = shifted_prior_report(model, split, plot=plot)
        cost["rows_per_model"][name] = cost_report(model, repeats=args.repeats)
        print(f"{name}: done", flush=True)
    cost["machine"] = guard.finish()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shifted_fmnistlt.json").write_text(json.dumps(shifted, indent=2) + "\n")
    (RESULTS / "cost_fmnistlt.json").write_text(json.dumps(cost, indent=2) + "\n")


if __name__ == "__main__":
    main()
