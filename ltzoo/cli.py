"""`ltzoo`: one command line, a thin layer over the library.

Each package registers its own subcommands (``add_parsers(subparsers)``) and keeps
heavy imports inside the handlers, so ``ltzoo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

#: packages whose ``cli.add_parsers`` contribute subcommands, in help order
_SUBCOMMAND_PACKAGES = ("training", "export", "serve")


def _cmd_list(args: argparse.Namespace) -> int:
    from .zoo.registry import list_models

    rows = list_models(args.filter)
    if not rows:
        print(
            f"ltzoo list: error: no registered model matches {args.filter!r} "
            "(a method, backbone, dataset or part of a name; `ltzoo list` shows them all)",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'name':34} {'method':17} {'backbone':16} {'K':>2} {'paper':>6} "
        f"{'shipped':>7} {'predict':>7} {'mean ± std (seeds)':>20}  provenance"
    )
    for r in rows:
        paper = r["paper"].get("top1")
        shipped = r["measured"].get("shipped", {})
        over = r["measured"].get("over_seeds", {})
        raw, calibrated = shipped.get("accuracy", {}).get("top1"), shipped.get("top1_calibrated")
        mean = (
            f"{over['top1']['mean']:.2f} ± {over['top1']['std']:.2f} ({over['seeds']})"
            if "top1" in over
            else "-"
        )
        print(
            f"{r['name']:34} {r['method']:17} {r['backbone']:16} {r['experts']:>2} "
            f"{paper if paper is not None else '-':>6} {_f2(raw):>7} {_f2(calibrated):>7} "
            f"{mean:>20}  {r['provenance'].split(';')[0][:40]}"
        )
    if any(r["measured"] for r in rows):
        print(
            "\ntop-1 on the balanced test set, in %. shipped: the model that ships (seed 0), "
            "argmax of its raw logits; predict: the same model as `predict` and the server "
            "return it (calibrated, balanced prior; for CE that is post-hoc logit adjustment); "
            "mean ± std: the method over its training seeds (raw). `ltzoo eval NAME` "
            "recomputes the shipped figures."
        )
    return 0


def _f2(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cmd_info(args: argparse.Namespace) -> int:
    from .zoo.registry import get_entry
    from .zoo.resolve import load_model, resolve_model

    ref = resolve_model(args.model, args.revision)
    registered = ref.kind == "registry"
    if registered and not (args.cost or args.pretrained):
        entry = get_entry(args.model)
        row = {k: v for k, v in vars(entry).items()}
        row["config"] = dict(entry.config)  # a read-only mapping: printed as JSON, not repr
        row.update(
            hub_id=entry.resolved_hub_id(), provenance=entry.provenance, measured=entry.measured
        )
        if entry.measured:
            row["measured_note"] = (
                "measured.shipped: the model that ships (seed 0), raw top-1 and top1_calibrated "
                "as `predict` and the server return it; `ltzoo eval NAME` recomputes them. "
                "measured.over_seeds: the method's mean ± std over its training seeds (none "
                "where one seed was trained, as on CIFAR-10-LT; measured.budget says its run)."
            )
        print(json.dumps(row, indent=2, default=str))
        return 0
    # --pretrained: the published weights' config; --cost alone: the registered architecture
    model = load_model(ref, pretrained=not registered or args.pretrained)
    info = model.config.to_dict()
    info["parameters"] = sum(p.numel() for p in model.parameters())
    if args.cost:
        from .cost import cost_report

        info["cost"] = cost_report(model)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .zoo.hub_io import push_to_hub
    from .zoo.resolve import load_model

    model = load_model(args.model)
    oid = push_to_hub(
        model,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        commit_message=args.message,
        tag=args.tag,
    )
    tagged = f", tagged {args.tag}" if args.tag else ""
    print(f"pushed {args.model} to {args.repo_id}@{args.revision or 'main'} (commit {oid}{tagged})")
    return 0


def _cmd_push_zoo(args: argparse.Namespace) -> int:
    from .zoo.hub_io import push_zoo

    for name, repo, oid in push_zoo(
        args.org, revision=args.revision, tag=args.tag, private=args.private
    ):
        print(f"pushed {name} to {repo}@{args.revision or 'main'} (commit {oid})")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .zoo.hub_io import download
    from .zoo.resolve import resolve_model

    print(download(*resolve_model(args.model, args.revision).hub_repo()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        args.workdir, epochs=args.epochs, max_steps=args.max_steps, eval_subset=args.eval_subset
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltzoo",
        description="Long-tailed recognition model zoo: train, evaluate, calibrate, publish, export and serve multi-expert ensembles.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list registered models")
    p.add_argument(
        "filter",
        nargs="?",
        default="",
        help="only models with this method, backbone or dataset, or this part of the name "
        "(e.g. ce, resnet32, fmnistlt, ncl-cifar100lt)",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "info", help="show a model's registry entry or config (and cost with --cost)"
    )
    p.add_argument("model", help="registry name, Hub repo id or local directory")
    p.add_argument("--revision", default=None)
    p.add_argument(
        "--cost", action="store_true", help="parameters, MACs and measured latency per expert count"
    )
    p.add_argument(
        "--pretrained", action="store_true", help="load published weights for a registry name"
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("push", help="publish a model directory to the Hugging Face Hub")
    p.add_argument("model", help="run directory / model directory / repo id to publish")
    p.add_argument("repo_id", help="target repo, e.g. my-org/ncl-resnet32-fmnistlt")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--tag", default=None, help="also tag the new commit (immutable, e.g. v1.0)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default="Upload ltzoo ensemble", help="commit message")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "push-zoo", help="publish every bundled model, with its card, to a Hub organisation"
    )
    p.add_argument("org", help="target organisation: each model goes to ORG/<name>")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--tag", default=None, help="also tag each new commit (e.g. v1.0)")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=_cmd_push_zoo)

    p = sub.add_parser("download", help="pre-fetch a model into the Hub cache for offline use")
    p.add_argument("model", help="registry name or Hub repo id")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser(
        "demo", help="run the whole pipeline end to end on Fashion-MNIST-LT (CPU, offline)"
    )
    p.add_argument("--workdir", default="artifacts/demo", help="where every artefact goes")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (0: full epochs)")
    p.add_argument("--eval-subset", type=int, default=2000, help="test images to evaluate on")
    p.set_defaults(func=_cmd_demo)

    for package in _SUBCOMMAND_PACKAGES:
        importlib.import_module(f".{package}.cli", __package__).add_parsers(sub)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something this setup cannot do (a bad value, a
    missing file or weights, a full disk, an unreachable Hub, a missing runtime), not a bug."""
    from .zoo.errors import UnavailableError

    types: list[type[BaseException]] = [ValueError, KeyError, OSError, UnavailableError]
    # only an imported module can have raised its exception: look them up, import nothing
    for module, name in (
        ("ltzoo.zoo.hub_io", "ModelNotAvailableError"),
        ("httpx", "TransportError"),  # huggingface_hub's HTTP client (connection refused, ...)
        ("httpx2", "TransportError"),
    ):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def _one_line(exc: BaseException) -> str:
    """The message of a user error on one line, without Python's decoration."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    elif not isinstance(exc, OSError | ValueError | KeyError | RuntimeError):  # a transport error
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        text = f"cannot reach the Hub at {endpoint} ({exc}); check the network or HF_ENDPOINT"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _stdout_closed() -> bool:
    """Whether nothing reads our stdout any more (``| head`` exited): a broken pipe there is
    the reader's choice, not an error; one on a socket (a Hub upload) still is."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), stdout replaced
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ltzoo`` console script.

    User errors (see :func:`_user_error_types`) end in one line on stderr and exit code 2;
    anything else is a bug and keeps its traceback. Ctrl+C ends in one line and exit code
    130; a closed pipe (``ltzoo list --json | head -1``) ends quietly, as ``SIGPIPE`` would.
    """
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe is found here, not at exit
        return code
    except KeyboardInterrupt:
        print(f"ltzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            # what is still buffered goes nowhere: Python's flush at exit would report it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE: the status of a command the pipe's signal ended
        if not isinstance(exc, _user_error_types()):
            raise
        print(f"ltzoo {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
