"""Copy trained models into the package's bundle (zoo/weights/) and pin them by sha256.

    python benchmarks/bundle_weights.py runs/fmnistlt_ncl_s0 runs/fmnistlt_bs_s0 ...
    python benchmarks/bundle_weights.py --root /tmp/bundle RUN_OR_MODEL_DIR ...

Each argument is a run folder (holding model/) or a model folder; the model's config
``name`` (or ``--name``: a run is named after its directory, so give the registry name
here) becomes its folder in the bundle. zoo/weights/manifest.json
records the sha256 and size of every bundled file, which ``zoo.load`` verifies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ltzoo.zoo.bundle import add_to_bundle, bundle_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or model folders")
    parser.add_argument(
        "--root", type=Path, default=None, help="bundle root (default: zoo/weights)"
    )
    parser.add_argument(
        "--name",
        default=None,
        help="publish one run under this (registry) name: runs are named after their "
        "directory, not the registered model",
    )
    args = parser.parse_args(argv)
    root = args.root or bundle_root()
    root.mkdir(parents=True, exist_ok=True)
    if args.name and len(args.runs) != 1:
        parser.error("--name takes exactly one run")
    for run in args.runs:
        name, entry = add_to_bundle(run, root, name=args.name)
        weights = entry["files"]["model.safetensors"]
        print(
            f"{name}: {weights['size'] / 1e6:.2f} MB sha256 {weights['sha256'][:16]}... top1 {entry.get('top1', '-')}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
