"""`ltzoo train`, `ltzoo eval`, `ltzoo calibrate`, `ltzoo demo`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path


def _train_config(args: argparse.Namespace):  # -> tuple[RunConfig, Path]
    """The run's configuration and directory: the recipe's, or with ``--resume`` the run's own
    (``run.json``; overrides that would change what it trains are rejected). Every error
    surfaces here."""
    from .config import ConfigError, load_recipe, load_run_config
    from .engine import resumable

    notes: list[str] = []
    cfg = load_recipe(args.recipe, args.overrides, notes)
    run_dir = Path(args.out) if args.out else cfg.run_dir()
    if not args.resume:
        for note in notes:
            print(note)
        return cfg, run_dir
    if not resumable(run_dir):
        raise FileNotFoundError(
            f"no checkpoint to resume from in {run_dir} (no epoch of any stage finished there); "
            "run without --resume to start a new run"
        )
    resumed = load_run_config(run_dir, args.overrides)
    if resumed.recipe != cfg.recipe:
        raise ConfigError(f"{run_dir} is a run of recipe {resumed.recipe!r}, not {cfg.recipe!r}")
    if not _finished(run_dir):
        print(f"resuming {run_dir} with the settings in {run_dir / 'run.json'}")
    return resumed, run_dir


def _finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` ran to its end (evaluated, and saved as ``model/``)."""
    from ltzoo.zoo.files import CONFIG_NAME

    return (run_dir / "results.json").is_file() and (run_dir / "model" / CONFIG_NAME).is_file()


def _interrupted(args: argparse.Namespace, run_dir: Path) -> str:
    """The line printed after Ctrl+C: the last checkpointed epoch and how to continue."""
    from .engine import CHECKPOINT

    resume = shlex.join(["ltzoo", "train", args.recipe, "--out", str(run_dir), "--resume"])
    checkpoints = list(run_dir.rglob(CHECKPOINT)) if run_dir.is_dir() else []
    if not checkpoints:
        again = shlex.join(["ltzoo", "train", args.recipe, *args.overrides, "--out", str(run_dir)])
        return f"interrupted before the first epoch was checkpointed; start again with: {again}"
    # the newest: the method's own checkpoint or one of an earlier stage's runs (CBD's teachers)
    ckpt = max(checkpoints, key=lambda p: p.stat().st_mtime)
    where = "" if ckpt.parent == run_dir else f" of {ckpt.parent.relative_to(run_dir)}"
    try:
        import torch

        # mmap: only the pickled epoch number is read, not the saved tensors
        epoch = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["epoch"] + 1
        run_json = json.loads((ckpt.parent / "run.json").read_text())
        reached = f"epoch {epoch}/{run_json['config']['optim']['epochs']}"
    except (OSError, RuntimeError, ValueError, KeyError):  # still there, but unreadable
        reached = "the last epoch"
    return f"interrupted: {reached}{where} is checkpointed in {run_dir}; continue with: {resume}"


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    cfg, run_dir = _train_config(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.resume and _finished(run_dir):
        print(
            f"{run_dir} is already complete: the model is in {run_dir / 'model'} and its results "
            f"in {run_dir / 'results.json'} (nothing to resume)"
        )
        return 0
    try:
        run_dir = train(cfg, run_dir, resume=args.resume)
    except KeyboardInterrupt:
        interrupted = True  # reported below, once the traceback (and the progress bar) is gone
    else:
        interrupted = False
    if interrupted:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, said once
            print(f"ltzoo train: {_interrupted(args, run_dir)}", file=sys.stderr)
        return 130
    print(
        f"run directory: {run_dir}\n  model: {run_dir / 'model'}\n  results: {run_dir / 'results.json'}"
    )
    return 0


def _model_and_split(args: argparse.Namespace, ref):  # ref: zoo.resolve.ModelRef
    from ltzoo.zoo.resolve import load_model

    from .data import split_for_model

    model = load_model(ref)
    split = split_for_model(
        model.config,
        dataset=args.data,
        root=args.data_root,
        val_max_per_class=args.val_max_per_class,
    )
    return model, split


def _print_shifted(report: dict) -> None:
    """The shifted-prior report as a table (top-1 in %)."""
    print(
        f"{'test prior':10} {'imbalance':>9} {'n':>6} {'balanced':>9} {'EM est.':>8} "
        f"{'true prior':>10} {'EM L1 err':>9}"
    )
    for r in report["rows"]:
        print(
            f"{r['direction']:10} {r['imbalance']:>9} {r['n']:>6} {r['balanced']['top1']:>9.2f} "
            f"{r['em_estimate']['top1']:>8.2f} {r['true_prior']['top1']:>10.2f} "
            f"{r['em_l1_error']:>9.3f}"
        )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from ltzoo.zoo.resolve import resolve_model

    from .evaluate import calibrate_and_evaluate, collect_logits

    model, split = _model_and_split(args, resolve_model(args.model))
    temperature = model.config.temperature
    # the test set's logits, computed once: --shifted resamples the same ones
    test_logits = collect_logits(model, split.test) if args.shifted else None
    results = calibrate_and_evaluate(
        model,
        split,
        plots_dir=args.plots,
        class_bias=not args.temperature_only,
        test_logits=test_logits,
    )
    results["calibration"]["stored_temperature"] = temperature
    if test_logits is not None:
        from .shifted import shifted_prior_report

        results["shifted"] = shifted_prior_report(model, split, test_logits=test_logits)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    if args.shifted:
        _print_shifted(results["shifted"])
    _print_eval(model.config.name or args.model, len(split.test), results)
    return 0


def _print_eval(name: str, n: int, results: dict) -> None:
    """The evaluation as README promises it: raw top-1/top-5 and many/medium/few, each
    expert, the calibrated top-1 (what ``predict`` and the server return), ECE before/after.
    The raw and calibrated top-1 are the figures ``ltzoo list``/``info`` and the card show."""
    acc, calibrated, c = results["accuracy"], results["accuracy_calibrated"], results["calibration"]
    bias = " + per-class bias" if c.get("class_bias") else ""
    print(f"{name}: test set, {n} images (accuracies in %)")
    print(
        f"top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}  many {_pct(acc['many'])}  "
        f"medium {_pct(acc['medium'])}  few {_pct(acc['few'])}  (raw: argmax of the mean logits)"
    )
    print("experts top-1: " + " / ".join(f"{t:.2f}" for t in results["experts"]))
    print(
        f"calibrated top-1 {calibrated['top1']:.2f}  many {_pct(calibrated['many'])}  "
        f"medium {_pct(calibrated['medium'])}  few {_pct(calibrated['few'])}  (what `predict` and "
        f'the server return: prior "balanced", T={c["temperature"]:.3f}{bias})'
    )
    print(
        f"ECE {c['ece_before']:.2f}% -> {c['ece_after']:.2f}%  (balanced-prior softmax at T=1 -> "
        "calibrated)" + (f"  val top-1 {results['val']['top1']:.2f}" if "val" in results else "")
    )


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ltzoo.zoo.resolve import resolve_model

    from .evaluate import fit_calibration

    ref = resolve_model(args.model)
    if not (args.out or ref.kind in ("run", "directory")):
        raise ValueError(
            f"{args.model} is not a local model: pass --out DIR for the calibrated copy"
        )
    out = Path(args.out or ref.target)  # a run directory's model/, which eval and load read
    model, split = _model_and_split(args, ref)
    fit = fit_calibration(model, split, class_bias=not args.temperature_only)
    model.save_pretrained(out)
    bias = " and per-class bias" if fit["class_bias"] else ""
    print(
        f"calibrator {fit['method']!r} (chosen by cross-validation unless --temperature-only): "
        f"temperature {fit['temperature']:.4f}{bias} fitted on {fit['val_images']} validation "
        f"images (ECE there {fit['ece_before']:.2f}% -> {fit['ece_after']:.2f}%); saved to {out}; "
        f"test-set figures: ltzoo eval {shlex.quote(str(out))}"
    )
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``eval`` and ``calibrate``."""
    p = sub.add_parser(
        "train",
        help="train a recipe (single process or under torchrun)",
        description="Train a recipe from training/recipes (or a .toml path). "
        "Override any key with key=value, e.g. optim.epochs=5 data.rho=50. Overriding only "
        "optim.epochs scales the recipe's optim.milestones and optim.warmup_epochs by the same "
        "ratio (printed; override them too to choose). Every value is checked before training "
        "(also with --dry-run).",
    )
    p.add_argument("recipe", help="recipe name (e.g. fmnistlt_ncl) or path to a .toml file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.05")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's last checkpoint with the settings recorded in "
        "its run.json; overrides that would change them are rejected (start a new --out to "
        "change settings), but for how fast it runs and where the data is: run.threads, "
        "data.workers, data.root, run.eval_batch_size, run.tensorboard; an error if there is "
        "no checkpoint",
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
            "fit the calibration (temperature and per-class bias) on the validation "
            "split and store it in the model",
        ),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="run directory, model directory, registry name or Hub repo id")
        p.add_argument(
            "--data", default=None, help="dataset name (default: the one the model was trained on)"
        )
        p.add_argument("--data-root", default=None, help="dataset root directory")
        p.add_argument(
            "--val-max-per-class",
            type=_non_negative,
            default=None,
            metavar="N",
            help="let a class with more unused training images give up to N validation images "
            "(a larger, class-weighted split for the calibration fit; the training images do "
            "not change); default: the size the model was calibrated with",
        )
        p.add_argument(
            "--temperature-only",
            action="store_true",
            help="fit only the temperature (plain temperature scaling); default: none, the temperature "
            "or the temperature and a per-class bias, whichever cross-validates best on the "
            "validation split",
        )
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
                "--out",
                default=None,
                help="where to save the calibrated model (default: in place; for a run "
                "directory its model/, which eval and zoo.load read)",
            )
        p.set_defaults(func=func)
