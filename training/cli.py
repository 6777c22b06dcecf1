"""`ltzoo train`, `ltzoo eval`, `ltzoo calibrate`, `ltzoo demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .engine import train

    cfg = load_recipe(args.recipe, args.overrides)  # every error surfaces here, before training
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    run_dir = train(cfg, args.out, resume=args.resume)
    print(
        f"run directory: {run_dir}\n  model: {run_dir / 'model'}\n  results: {run_dir / 'results.json'}"
    )
    return 0


def _model_and_split(args: argparse.Namespace):
    import zoo

    from .data import build_lt_dataset, build_transforms

    model_path = Path(args.model)
    model = zoo.load(
        str(model_path / "model")
        if (model_path / "model" / "config.json").is_file()
        else args.model
    )
    info = model.config.extra.get("data", {})
    split = build_lt_dataset(
        args.data or info.get("name", model.config.dataset),
        root=args.data_root,
        rho=info.get("rho", 100),
        n_max=info.get("n_max"),
        seed=info.get("seed", 0),
        class_order=info.get("class_order"),
        eval_transform=build_transforms(model.config.preprocess, (), train=False),
        train_transform=build_transforms(model.config.preprocess, (), train=False),
    )
    return model, split


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import calibrate_and_evaluate

    model, split = _model_and_split(args)
    temperature = model.config.temperature
    results = calibrate_and_evaluate(model, split, plots_dir=args.plots)
    results["calibration"]["stored_temperature"] = temperature
    if args.shifted:
        from .shifted import shifted_prior_report

        results["shifted"] = shifted_prior_report(model, split)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    acc = results["accuracy"]
    print(
        f"top-1 {acc['top1']:.2f}  many {acc['many']}  medium {acc['medium']}  few {acc['few']}  "
        f"ECE {results['calibration']['ece_before']:.2f}% -> {results['calibration']['ece_after']:.2f}% (T={results['calibration']['temperature']:.3f})"
    )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .evaluate import calibrate_and_evaluate

    model, split = _model_and_split(args)
    results = calibrate_and_evaluate(model, split)
    out = Path(args.out or args.model)
    model.save_pretrained(out)
    c = results["calibration"]
    print(
        f"temperature {c['temperature']:.4f}; ECE {c['ece_before']:.2f}% -> {c['ece_after']:.2f}%; saved to {out}"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``eval`` and ``calibrate``."""
    p = sub.add_parser(
        "train",
        help="train a recipe (single process or under torchrun)",
        description="Train a recipe from training/recipes (or a .toml path). "
        "Override any key with key=value, e.g. optim.epochs=5 data.rho=50.",
    )
    p.add_argument("recipe", help="recipe name (e.g. fmnistlt_ncl) or path to a .toml file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.05")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the config, train nothing"
    )
    p.set_defaults(func=_cmd_train)

    for name, func, help_text in (
        (
            "eval",
            _cmd_eval,
            "evaluate overall and on many/medium/few-shot classes, with calibration metrics",
        ),
        (
            "calibrate",
            _cmd_calibrate,
            "fit the temperature on the balanced validation split and store it",
        ),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="run directory, model directory, registry name or Hub repo id")
        p.add_argument(
            "--data", default=None, help="dataset name (default: the one the model was trained on)"
        )
        p.add_argument("--data-root", default=None, help="dataset root directory")
        if name == "eval":
            p.add_argument("--out", default=None, help="write the results JSON here")
            p.add_argument(
                "--plots", default=None, help="directory for per-class and reliability plots"
            )
            p.add_argument(
                "--shifted",
                action="store_true",
                help="also evaluate on forward/backward long-tailed test priors",
            )
        else:
            p.add_argument(
                "--out", default=None, help="where to save the calibrated model (default: in place)"
            )
        p.set_defaults(func=func)
