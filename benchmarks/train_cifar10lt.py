"""The CIFAR-10-LT zoo (rho 100): start or resume each run in the background, follow it, and
collect the finished ones into benchmarks/results/cifar10lt.json.

    python benchmarks/train_cifar10lt.py measure         # images/s of each recipe -> the plan
    python benchmarks/train_cifar10lt.py start ce bs     # one detached `ltzoo train` per tag
    python benchmarks/train_cifar10lt.py queue           # keep 2 going, in PLAN order, detached
                                                         # (default: runs not in the results)
    python benchmarks/train_cifar10lt.py status          # epoch reached, s/epoch, ETA
    python benchmarks/train_cifar10lt.py collect         # finished runs -> the results JSON
    python benchmarks/train_cifar10lt.py ship            # collect, bundle what is new, report
    python benchmarks/train_cifar10lt.py recalibrate     # refit shipped runs' calibration on
                                                         # their recipe's validation split

Runs live outside the work tree, in ``$LTZOO_RUNS`` (default ``~/ltzoo-runs``)
``/cifar10lt/<tag>-s0``, so a fresh checkout keeps them. Each checkpoints every epoch, and
``start`` on a run that has a ``run.json`` resumes it (``ltzoo train ... --resume``), losing
at most the epoch in progress. Data: the JPEG copy of CIFAR-10
(``../shared/data/cifar10-jpeg.tar.gz``, read straight from the tar and decoded once into
``$LTZOO_CACHE``). One seed per method: the Fashion-MNIST-LT zoo gives the seed spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import LoadGuard, process_cmdline  # noqa: E402
from benchmarks.train_fmnistlt import collect  # noqa: E402
from ltzoo.zoo.files import write_json  # noqa: E402

RUNS = Path(os.environ.get("LTZOO_RUNS", Path.home() / "ltzoo-runs")) / "cifar10lt"
RESULTS = ROOT / "benchmarks" / "results" / "cifar10lt.json"
DATA = os.environ.get("LTZOO_CIFAR10_JPEG", str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
#: every run: the batched augmentation path in the main process; one thread where it shares
#: the cores (two runs side by side give more images/s in total on 2 cores: README, "Planning
#: long runs"; :func:`start` sets the threads of a run the queue gives more)
COMMON = ["run.threads=1", "data.workers=0", "run.precision=auto"]
#: a run training alone gets every core: 1.7x the images/s of one thread, if less than two
#: runs side by side (README, "Planning long runs")
CORES = os.cpu_count() or 1
#: background runs yield the CPU to whatever else runs (tests, benchmarks' guards)
NICE = 19
#: tag -> (recipe, the budget's overrides); the budgets are the plan in README
PLAN: dict[str, tuple[str, list[str]]] = {
    "ce": ("cifar10lt_r100_ce", []),
    "bs": ("cifar10lt_r100_bs", []),
    "ncl": ("cifar10lt_r100_ncl", ["optim.epochs=200"]),
    "ncl_e100": ("cifar10lt_r100_ncl", ["optim.epochs=100"]),
    "cbd": ("cifar10lt_r100_cbd", []),
    "ecl": ("cifar10lt_r100_ecl", ["optim.epochs=200"]),
    "ecl_e100": ("cifar10lt_r100_ecl", ["optim.epochs=100"]),
}


#: what ``measure`` times: tag -> (recipe, overrides), two at a time on one thread each
MEASURE: dict[str, tuple[str, list[str]]] = {
    "ce": PLAN["ce"],
    "ncl_moco": ("cifar10lt_r100_ncl", []),
    "ncl_no_moco": ("cifar10lt_r100_ncl", ["method_params.contrastive_weight=0"]),
    "ecl": ("cifar10lt_r100_ecl", []),
    "cbd_teacher": ("cifar10lt_r100_cbd", ["stages=['teachers']"]),
}
PLAN_JSON = ROOT / "benchmarks" / "results" / "cifar10lt_plan.json"


def run_dir(tag: str) -> Path:
    return RUNS / f"{tag}-s0"


def training_pid(tag: str) -> int | None:
    """The pid of the ``ltzoo train`` writing ``tag``'s run directory, if one is running."""
    needle = str(run_dir(tag)).encode()
    for proc in Path("/proc").iterdir():
        argv = process_cmdline(proc.name).split(b"\0") if proc.name.isdigit() else []
        if b"ltzoo" in argv and b"train" in argv and needle in argv:
            return int(proc.name)
    return None


def finished(tag: str) -> bool:
    return (run_dir(tag) / "results.json").is_file()


def unlanded(tags: list[str]) -> list[str]:
    """``tags`` whose numbers are not in the results JSON yet: a run whose numbers landed is
    never retrained, even on a new machine that lost its directory."""
    landed = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    return [t for t in tags if t not in landed]


def start(tag: str, threads: int = 1) -> subprocess.Popen:
    """Start (or resume) ``tag`` on ``threads`` threads as a detached process at nice
    :data:`NICE`, logging to ``<run dir>/train.log``."""
    if (pid := training_pid(tag)) is not None:
        raise RuntimeError(f"{tag} is already training (pid {pid})")
    recipe, overrides = PLAN[tag]
    out = run_dir(tag)
    out.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if (out / "run.json").is_file() else []
    settings = [s for s in COMMON if not s.startswith("run.threads=")] + [f"run.threads={threads}"]
    argv = ["nice", "-n", str(NICE), sys.executable, "-m", "ltzoo", "train", recipe, *settings]
    argv += [f"data.root={DATA}", *overrides, "--out", str(out), *resume]
    env = {**os.environ, "TQDM_MININTERVAL": "30"}  # a progress line every 30 s in the log
    with open(out / "train.log", "a") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def running_threads(tag: str) -> int | None:
    """The ``run.threads`` the training of ``tag`` was started with (None when it is not
    training, or was started without that setting)."""
    pid = training_pid(tag)
    argv = process_cmdline(pid).split(b"\0") if pid is not None else []
    given = [a for a in argv if a.startswith(b"run.threads=")]
    return int(given[-1].split(b"=")[1]) if given else None


def checkpoint_age_s(tag: str) -> float:
    """Seconds since ``tag``'s newest checkpoint (of any stage) was written; inf if none."""
    times = [p.stat().st_mtime for p in run_dir(tag).rglob("checkpoint.pt")]
    return time.time() - max(times) if times else float("inf")


def worth_restarting(tag: str, threads: int, poll_s: float) -> bool:
    """Whether ``tag``, training on fewer than ``threads`` threads, wrote a checkpoint within
    the last ``poll_s`` and has more than its last epoch to go in the stage in progress (a
    restart then would only repeat the final evaluation)."""
    # stages train one after the other: the one in progress is the one not finished
    left = [s["epochs"] - s["epoch"] for s in progress(tag)["stages"] if s["epoch"] < s["epochs"]]
    return (
        (running_threads(tag) or threads) < threads
        and checkpoint_age_s(tag) < poll_s
        and bool(left)
        and left[0] > 1
    )


def restart(tag: str, threads: int, grace_s: float = 120.0) -> subprocess.Popen:
    """Stop ``tag``'s training (SIGTERM, SIGKILL after ``grace_s``; checkpoints are written
    atomically) and resume it from its checkpoint on ``threads`` threads."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if (pid := training_pid(tag)) is None:
            break
        with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
            os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while training_pid(tag) is not None and time.monotonic() < deadline:
            time.sleep(1)
    if (pid := training_pid(tag)) is not None:
        raise RuntimeError(f"{tag} (pid {pid}) outlived SIGKILL; not restarted")
    return start(tag, threads)


def queue(tags: list[str], streams: int, poll_s: float = 60.0, max_starts: int = 3) -> None:
    """Keep ``streams`` of ``tags`` training, in order, until all are finished.

    Runs already training (started by ``start`` or an earlier queue) count as streams; a run
    that stops unfinished is resumed, at most ``max_starts`` times (then left, logged). The
    cores are shared among the runs started together; a run left training alone is
    restarted on every core right after it writes a checkpoint (losing under a poll's
    worth of its epoch), which is not counted as a start."""
    starts = dict.fromkeys(tags, 0)
    while True:
        active = [t for t in tags if training_pid(t) is not None]
        waiting = [t for t in tags if t not in active and not finished(t)]
        runnable = [t for t in waiting if starts[t] < max_starts]
        if not active and not runnable:
            given_up = [t for t in waiting if starts[t] >= max_starts]
            print(f"queue done; given up after {max_starts} starts: {given_up or 'none'}")
            return
        new = runnable[: max(0, streams - len(active))]
        busy = sum(running_threads(t) or 1 for t in active)
        threads = max(1, (CORES - busy) // max(1, len(new)))
        for tag in new:
            starts[tag] += 1
            pid = start(tag, threads).pid
            print(
                f"{time.strftime('%F %T')} start {tag} (#{starts[tag]}, {threads} threads): pid {pid}"
            )
        if len(active) == 1 and not runnable:
            (alone,) = active
            if worth_restarting(alone, CORES, poll_s):
                pid = restart(alone, CORES).pid
                print(
                    f"{time.strftime('%F %T')} {alone} trains alone: on {CORES} threads, pid {pid}"
                )
        sys.stdout.flush()
        time.sleep(poll_s)


def measure(steps: int = 40) -> dict:
    """Images/s of each :data:`MEASURE` recipe over ``steps`` training steps (full
    augmentation, the run settings of :data:`COMMON`), two runs at a time as the real ones
    run, and the wall time of each at its recipe's (the paper's) epochs."""
    import tempfile

    from ltzoo.training.config import load_recipe

    guard = LoadGuard.start()
    rows: dict[str, dict] = {}
    tags = list(MEASURE)
    with tempfile.TemporaryDirectory() as tmp:
        for pair in (tags[i : i + 2] for i in range(0, len(tags), 2)):
            procs = {}
            for tag in pair:
                recipe, overrides = MEASURE[tag]
                over = [*COMMON, f"data.root={DATA}", *overrides, "optim.epochs=1"]
                over += [f"run.max_steps_per_epoch={steps}", "run.eval_subset=20"]
                argv = [sys.executable, "-m", "ltzoo", "train", recipe, *over]
                procs[tag] = subprocess.Popen(
                    [*argv, "--out", f"{tmp}/{tag}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            for tag, proc in procs.items():
                if proc.wait() != 0:
                    raise RuntimeError(f"measuring {tag} failed (exit {proc.returncode})")
                (row,) = _metrics(next(Path(tmp, tag).rglob("metrics.jsonl")))
                model = json.loads(next(Path(tmp, tag).rglob("model/config.json")).read_text())
                run = json.loads(next(Path(tmp, tag).rglob("run.json")).read_text())
                cfg = load_recipe(MEASURE[tag][0], [f"data.root={DATA}", *MEASURE[tag][1]])
                images = (cfg.data.train_size() or 0) - 10 * cfg.data.val_per_class
                rows[tag] = {
                    "images_per_s": round(row["images_per_s"], 1),
                    # what was timed: a recipe's layout can change after its row was measured
                    "model": cfg.model,
                    "layout": model["layout"],
                    "precision": run["precision"]["used"],
                    "recipe_epochs": cfg.optim.epochs,
                    "hours_at_recipe_epochs": round(
                        cfg.optim.epochs * images / row["images_per_s"] / 3600, 1
                    ),
                }
                print(tag, rows[tag], flush=True)
    report = {"steps": steps, "settings": COMMON, "two_runs_side_by_side": True, "rows": rows}
    report["machine"] = guard.finish()
    write_json(PLAN_JSON, report)
    return report


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(tag: str) -> dict:
    """Epochs done (every stage), median seconds per epoch (a paused epoch does not skew
    it), ETA of the stage in progress."""
    out = run_dir(tag)
    stages = sorted(out.rglob("metrics.jsonl"), key=lambda p: (p.parent != out, str(p)))
    report: dict = {"tag": tag, "finished": (out / "results.json").is_file(), "stages": []}
    for path in stages:
        rows = _metrics(path)
        config = json.loads((path.parent / "run.json").read_text())["config"]
        epochs = config["optim"]["epochs"]
        seconds = [r["epoch_s"] for r in rows if "epoch_s" in r]
        # the ETA's pace: the epochs on as many threads as the latest (a run moves to more)
        latest = [r["epoch_s"] for r in rows if _threads(r) == _threads(rows[-1])] if rows else []
        median = statistics.median(latest) if latest else None
        report["stages"].append(
            {
                "dir": str(path.parent.relative_to(out)) or ".",
                "epoch": len(rows),
                "epochs": epochs,
                "s_per_epoch": round(median, 1) if median else None,
                "eta_h": round((epochs - len(rows)) * median / 3600, 2) if median else None,
                "wall_h": round(sum(seconds) / 3600, 2),
            }
        )
    return report


def budget(tag: str) -> dict:
    """What a run's numbers cost: epochs, augmentation, MoCo, precision, wall time."""
    out = run_dir(tag)
    run = json.loads((out / "run.json").read_text())
    cfg = run["config"]
    rows = [r for p in out.rglob("metrics.jsonl") for r in _metrics(p) if "epoch_s" in r]
    one_thread = [r["epoch_s"] for r in rows if _threads(r) == 1]
    return {
        "epochs": cfg["optim"]["epochs"],
        "augment": cfg["data"]["augment"],
        "moco": cfg["method_params"].get("contrastive_weight", 0) > 0,
        "precision": run.get("precision", {}).get("used", "fp32"),
        # the sum holds the sessions' pauses and whatever shared the 2 cores; the median
        # epoch is what one epoch takes on one thread beside one other run
        "wall_h": round(sum(r["epoch_s"] for r in rows) / 3600, 2),
        "median_epoch_s": round(statistics.median(one_thread), 1) if one_thread else None,
        "epochs_by_threads": dict(sorted(Counter(str(_threads(r)) for r in rows).items())),
        "run_overrides": PLAN[tag][1],
    }


def _threads(row: dict) -> int:
    """The threads an epoch trained on (rows written before the engine recorded it: one)."""
    return int(row.get("threads", 1))


def collect_results() -> dict:
    summary = collect(RUNS, RESULTS)
    for tag in summary:
        if (run_dir(tag) / "results.json").is_file():
            summary[tag]["budget"] = budget(tag)
    write_json(RESULTS, summary)
    return summary


def ship() -> list[str]:
    """Everything a finished run needs to ship: :func:`recalibrate` what needs it, collect the
    results, bundle each finished run of a shipping model (not the half-budget runs) that is
    not bundled yet, under its registry name, then re-render README, measured.json and the
    cards. Returns the names bundled."""
    from benchmarks.report import CIFAR10LT_NAMES
    from ltzoo.zoo.bundle import add_to_bundle, read_manifest

    recalibrate(list(PLAN), render=False)  # runs calibrated before the recipe's split grew
    collect_results()
    bundled = read_manifest()
    new = {t: n for t, n in CIFAR10LT_NAMES.items() if finished(t) and n not in bundled}
    for tag, name in new.items():
        add_to_bundle(run_dir(tag), name=name)
        print(f"bundled {name} from {run_dir(tag)}")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")], check=True)
    return list(new.values())


def _recipe_val_max(tag: str) -> int:
    from ltzoo.training.config import load_recipe

    return load_recipe(PLAN[tag][0], [f"data.root={DATA}"]).data.val_max_per_class


def recalibrate(tags: list[str], render: bool = True) -> list[str]:
    """Refit, without retraining, the calibration of each run calibrated on a smaller
    validation split than its recipe now takes (``data.val_max_per_class``; runs started
    before the recipe grew it). A run whose directory is here is recalibrated there (its
    ``model/`` and ``results.json``, then collected, and re-bundled if it ships); a shipped
    run whose directory is gone, from its bundled copy (:func:`_recalibrate_bundled`).
    ``render``: re-render README, measured.json and the cards afterwards. Returns the tags
    recalibrated."""
    from benchmarks.recalibrate import recalibrate as recalibrate_run
    from benchmarks.report import CIFAR10LT_NAMES
    from ltzoo import zoo
    from ltzoo.zoo.bundle import add_to_bundle, read_manifest

    bundled, done = read_manifest(), []
    for tag in tags:
        name, want = CIFAR10LT_NAMES.get(tag, ""), _recipe_val_max(tag)
        if finished(tag):
            model = zoo.load(str(run_dir(tag) / "model"))
        elif name in bundled:
            model = zoo.load(name)
        else:
            continue  # neither trained here nor shipped
        data = model.config.extra.get("data")
        if data is None or data.get("val_max_per_class", 0) == want:
            continue  # no split recorded to rebuild, or calibrated on the recipe's already
        print(f"{tag}: recalibrating on val_max_per_class={want}", flush=True)
        if finished(tag):
            recalibrate_run(run_dir(tag), True, DATA, want, name=name or None)
            if name in bundled:  # a new one is bundled by ship
                add_to_bundle(run_dir(tag), name=name)
        else:
            _recalibrate_bundled(tag, model, want, bundled[name].get("run"))
        done.append(tag)
    if done:
        collect_results()
        if render:
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")], check=True)
    return done


def _recalibrate_bundled(tag: str, model, val_max: int, run: str | None) -> None:
    """Refit a shipped run's bundled copy (its directory is gone), re-summarise its entry in
    the results JSON from the new evaluation (the raw accuracies come from the same weights;
    the precision is the one the model records) and re-bundle it."""
    import tempfile

    from benchmarks.recalibrate import refit
    from benchmarks.train_fmnistlt import summarise
    from ltzoo.zoo.bundle import add_to_bundle
    from ltzoo.zoo.ensemble import record_source

    summary = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if tag not in summary:
        raise RuntimeError(f"{tag} ships but has no entry in {RESULTS.name} to update")
    results = refit(model, DATA, val_max)
    results["precision"] = model.config.extra.get("precision", {})
    summary[tag].update(summarise([results]))
    write_json(RESULTS, summary)
    with tempfile.TemporaryDirectory() as tmp:
        record_source(model, None)  # where it was loaded from, not what it is
        model.save_pretrained(tmp)
        add_to_bundle(tmp, name=model.config.name, run=run)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "command",
        choices=["measure", "start", "queue", "status", "collect", "ship", "recalibrate"],
    )
    ap.add_argument(
        "tags",
        nargs="*",
        help=f"runs, of {', '.join(PLAN)} (default: all; queue: those not in the results JSON)",
    )
    ap.add_argument("--streams", type=int, default=2, help="queue: runs side by side")
    ap.add_argument("--foreground", action="store_true", help="queue: do not detach")
    args = ap.parse_args()
    tags = args.tags or list(PLAN)
    if set(tags) - set(PLAN):
        ap.error(f"unknown run(s) {sorted(set(tags) - set(PLAN))}; choose from {list(PLAN)}")
    if args.command == "queue" and not args.tags:
        tags = unlanded(tags)
        if not tags:
            print(f"queue: every run's numbers are in {RESULTS.name}; nothing to train")
            return
    if args.command == "measure":
        measure()
    elif args.command == "start":
        for tag in tags:
            proc = start(tag)
            print(f"{tag}: pid {proc.pid}, log {run_dir(tag) / 'train.log'}")
    elif args.command == "queue" and args.foreground:
        queue(tags, args.streams)
    elif args.command == "queue":
        RUNS.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, __file__, "queue", *tags, "--streams", str(args.streams)]
        with open(RUNS / "queue.log", "a") as log:
            proc = subprocess.Popen(
                [*argv, "--foreground"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        print(f"queue: pid {proc.pid}, log {RUNS / 'queue.log'}")
    elif args.command == "status":
        for tag in tags:
            if run_dir(tag).is_dir():
                print(json.dumps(progress(tag)))
    elif args.command == "recalibrate":
        print(f"recalibrated: {recalibrate(tags) or 'none'}")
    elif args.command == "ship":
        names = ship()
        if names:  # the wheel test holds README's "With N models the wheel is X MB" to the wheel
            print(
                "new in the wheel: update README's wheel size (tests/test_wheel.py says by how much)"
            )
    else:
        print(json.dumps({t: e.get("top1", {}).get("mean") for t, e in collect_results().items()}))


if __name__ == "__main__":
    main()
