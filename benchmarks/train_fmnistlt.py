"""Train the Fashion-MNIST-LT zoo (same budget for every method) and collect results JSON.

    python benchmarks/train_fmnistlt.py --methods ce bs ncl --seeds 0 1 2

Each run goes to runs/bench/<recipe>-s<seed>/ (resumable: finished runs are skipped,
interrupted ones resume from their last checkpoint). The summary, with mean and spread
over seeds, goes to benchmarks/results/fmnistlt.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ltzoo.training.config import load_recipe
from ltzoo.training.engine import train
from ltzoo.zoo.files import write_json

RESULTS = Path(__file__).parent / "results" / "fmnistlt.json"
RECIPES = {
    "ce": "fmnistlt_ce",
    "bs": "fmnistlt_bs",
    "ncl": "fmnistlt_ncl",
    "cbd": "fmnistlt_cbd",
    "ecl": "fmnistlt_ecl",
}
KEYS = ("top1", "many", "medium", "few")


def run_one(
    recipe: str, seed: int, overrides: list[str], tag: str, root: Path = Path("runs/bench")
) -> dict:
    run_dir = root / f"{tag}-s{seed}"
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        t0 = time.time()
        cfg = load_recipe(recipe, [f"run.seed={seed}", *overrides])
        train(cfg, run_dir, resume=True)
        print(f"{tag} seed {seed}: {time.time() - t0:.0f}s", file=sys.stderr)
    return json.loads(results_path.read_text())


def _spread(values: list[float]) -> dict:
    """Mean, standard deviation (0 for one run) and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def summarise(runs: list[dict]) -> dict:
    """Mean / spread over seeds. A shot group with no class (CIFAR-10-LT rho 100 has no
    few-shot class: its tail keeps 50 images) is ``None`` in every run and stays ``None``."""
    out: dict = {"seeds": len(runs)}
    for k in KEYS:
        vals = [r["accuracy"][k] for r in runs]
        known = [v for v in vals if v is not None]
        out[k] = {
            "mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else 0.0,
            "runs": vals,
        }
    calibrated = [r["accuracy_calibrated"]["top1"] for r in runs if "accuracy_calibrated" in r]
    if len(calibrated) == len(runs):  # top-1 of the calibrated predictions (T + class bias)
        out["top1_calibrated"] = _spread(calibrated)
    val = [r["val"]["top1"] for r in runs if "val" in r]
    if len(val) == len(runs):  # what runs are chosen by (never the test set)
        out["val_top1"] = _spread(val)
        out["val_experts_top1"] = [r["val"]["experts"] for r in runs]
    # runs from before precision was recorded trained in fp32 (the engine had no bf16 then)
    out["precision"] = sorted({r.get("precision", {}).get("used", "fp32") for r in runs})
    out["calibration_method"] = sorted(
        {r["calibration"].get("method", "temperature") for r in runs}
    )
    for k in ("ece_before", "ece_after", "temperature"):
        vals = [r["calibration"][k] for r in runs]
        out[k] = {
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        }
    experts = [r["experts"] for r in runs]
    out["best_single_expert_top1"] = {"mean": statistics.fmean(max(e) for e in experts)}
    out["experts_top1"] = experts
    return out


def collect(
    root: Path = Path("runs/bench"), results: Path = RESULTS, overrides: dict | None = None
) -> dict:
    """Rebuild the summary of every tag with finished runs ``root/<tag>-s<seed>/`` (all seeds
    found; tags with no run under ``root`` keep their old entry), write it to ``results`` and
    return it; ``overrides`` (tag -> text) else the old file's."""
    old = json.loads(results.read_text()) if results.is_file() else {}
    runs: dict[str, list[tuple[int, dict]]] = {}
    for path in sorted(root.glob("*-s*/results.json")):
        tag, _, seed = path.parent.name.rpartition("-s")
        runs.setdefault(tag, []).append((int(seed), json.loads(path.read_text())))
    summary = dict(old)
    for tag, found in sorted(runs.items()):
        config = json.loads((root / f"{tag}-s{found[0][0]}" / "run.json").read_text())["config"]
        summary[tag] = {
            "recipe": config["recipe"],
            "epochs": config["optim"]["epochs"],
            "overrides": (overrides or {}).get(tag, old.get(tag, {}).get("overrides", "")),
            "seed_list": [s for s, _ in sorted(found, key=lambda x: x[0])],
            **summarise([r for _, r in sorted(found, key=lambda x: x[0])]),
        }
    summary = dict(sorted(summary.items()))
    write_json(results, summary)
    print({tag: summary[tag]["seeds"] for tag in summary}, file=sys.stderr)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(RECIPES),
        help="methods or name=recipe:override,override",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--collect", action="store_true", help="only rebuild the summary from finished runs"
    )
    args = ap.parse_args()
    if args.collect:
        collect()
        return
    for spec in args.methods:
        tag, _, rest = spec.partition("=")
        recipe, _, overrides = (rest or RECIPES[tag]).partition(":")
        runs = [run_one(recipe, s, [o for o in overrides.split(",") if o], tag) for s in args.seeds]
        # re-read just before writing: several copies of this script may run side by side
        summary = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        epochs = load_recipe(recipe, [o for o in overrides.split(",") if o]).optim.epochs
        summary[tag] = {
            "recipe": recipe,
            "epochs": epochs,
            "overrides": overrides,
            **summarise(runs),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_json(RESULTS, summary)
        print(tag, {k: round(summary[tag][k]["mean"], 2) for k in KEYS}, file=sys.stderr)


if __name__ == "__main__":
    main()
