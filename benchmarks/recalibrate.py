"""Refit the calibration of trained runs (Fashion-MNIST-LT, CIFAR-10-LT) without retraining them.

    python benchmarks/recalibrate.py runs/bench/*-s[0-9]     # then --collect, report
    python benchmarks/recalibrate.py --data-root DIR ~/ltzoo-runs/cifar10lt/ncl_e100-s0
    python benchmarks/recalibrate.py --val-max-per-class 1000 --data-root DIR RUN...

For each run directory: rebuild its data split from the model's recorded data settings, fit
the calibration on the validation split (the family cross-validation picks there;
``--temperature-only``: the temperature alone; ``--val-max-per-class``: a larger split, each
class weighing the same, recorded in the model), save the calibrated model in ``RUN/model`` and
update the calibration entries of ``RUN/results.json`` (its accuracy entries come from the same logits and stay).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ltzoo import zoo
from ltzoo.training.data import split_for_model
from ltzoo.training.evaluate import calibrate_and_evaluate
from ltzoo.zoo.ensemble import Ensemble
from ltzoo.zoo.files import write_json


def refit(
    model: Ensemble,
    data_root: str | None = None,
    val_max: int | None = None,
    class_bias: bool = True,
    plots_dir: Path | None = None,
) -> dict:
    """Rebuild ``model``'s data split from its recorded settings (``val_max``: the validation
    split's size per class, default as recorded), refit its calibration there and evaluate it:
    :func:`~ltzoo.training.evaluate.calibrate_and_evaluate`'s results."""
    split = split_for_model(model.config, root=data_root, val_max_per_class=val_max)
    return calibrate_and_evaluate(model, split, class_bias=class_bias, plots_dir=plots_dir)


def recalibrate(
    run: Path,
    class_bias: bool,
    data_root: str | None = None,
    val_max: int | None = None,
    name: str | None = None,
) -> dict:
    """Recalibrate ``run`` (see the module's doc); ``name``: the model's name from now on (the
    name it ships under, which the plots' titles show), default its own."""
    model = zoo.load(str(run / "model"))
    if name:
        model.config = dataclasses.replace(model.config, name=name)
    results = refit(model, data_root, val_max, class_bias, plots_dir=run / "plots")
    model.save_pretrained(run / "model")
    path = run / "results.json"
    stored = json.loads(path.read_text())
    stored["calibration"] = results["calibration"]
    stored["accuracy_calibrated"] = results["accuracy_calibrated"]
    stored["val"] = results["val"]  # the calibrator chosen there
    write_json(path, stored)
    return results["calibration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of ltzoo train")
    parser.add_argument("--temperature-only", action="store_true", help="no per-class bias")
    parser.add_argument(
        "--data-root", default=None, help="dataset root (CIFAR-10-LT: the JPEG tar)"
    )
    parser.add_argument(
        "--val-max-per-class",
        type=int,
        default=None,
        help="validation images per class where a class has them (default: as recorded)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        c = recalibrate(run, not args.temperature_only, args.data_root, args.val_max_per_class)
        print(
            f"{run}: {c['method']}, T {c['temperature']:.3f}, ECE {c['ece_before']:.2f}% -> {c['ece_after']:.2f}%"
        )


if __name__ == "__main__":
    main()
