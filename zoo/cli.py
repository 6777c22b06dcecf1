"""`ltzoo`: one command line, a thin layer over the library.

Each package registers its own subcommands (``add_parsers(subparsers)``) and keeps
heavy imports inside the handlers, so ``ltzoo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

#: packages whose ``cli.add_parsers`` contribute subcommands, in help order
_SUBCOMMAND_PACKAGES = ("training", "export", "serve")


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_models

    rows = list_models(args.filter)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'name':34} {'method':17} {'backbone':16} {'K':>2} {'paper':>6} {'measured':>8}  provenance"
    )
    for r in rows:
        paper = r["paper"].get("top1")
        measured = r["measured"].get("accuracy", {}).get("top1")
        print(
            f"{r['name']:34} {r['method']:17} {r['backbone']:16} {r['experts']:>2} "
            f"{paper if paper is not None else '-':>6} "
            f"{f'{measured:.2f}' if measured is not None else '-':>8}  {r['provenance'].split(';')[0][:40]}"
        )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .registry import get_entry, is_registered

    if is_registered(args.model) and not args.cost:
        entry = get_entry(args.model)
        row = {k: v for k, v in vars(entry).items()}
        row.update(
            hub_id=entry.resolved_hub_id(), provenance=entry.provenance, measured=entry.measured
        )
        print(json.dumps(row, indent=2, default=str))
        return 0
    from .hub_io import load

    model = load(
        args.model,
        revision=args.revision,
        pretrained=not is_registered(args.model) or args.pretrained,
    )
    info = model.config.to_dict()
    info["parameters"] = sum(p.numel() for p in model.parameters())
    if args.cost:
        from .cost import cost_report

        info["cost"] = cost_report(model)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub_io import load, push_to_hub

    model = load(args.model)
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
    from .bundle import push_zoo

    for name, repo, oid in push_zoo(
        args.org, revision=args.revision, tag=args.tag, private=args.private
    ):
        print(f"pushed {name} to {repo}@{args.revision or 'main'} (commit {oid})")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .hub_io import download
    from .registry import get_entry, is_registered

    repo = get_entry(args.model).resolved_hub_id() if is_registered(args.model) else args.model
    print(download(repo, args.revision))
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
    p.add_argument("filter", nargs="?", default="", help="only names containing this text")
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
        importlib.import_module(f"{package}.cli").add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ltzoo`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"ltzoo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
