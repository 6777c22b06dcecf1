"""prior="estimate" against batch size: top-1 of the shipped Fashion-MNIST-LT models on
batches drawn from the balanced test set, balanced or resampled to a forward long-tailed
prior (imbalance 10, 50), with the balanced prior, plain EM (``strength=0``), EM shrunk
toward the model's prior (``zoo.calibration.EM_PRIOR_STRENGTH`` pseudo-images) and the
true batch prior. Writes ``benchmarks/results/prior_estimate_fmnistlt.json``.

    python benchmarks/bench_prior_estimate.py [NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ltzoo import zoo
from ltzoo.training.data import split_for_model
from ltzoo.training.evaluate import collect_logits
from ltzoo.training.shifted import shifted_prior
from ltzoo.zoo import calibration as cal

OUT = Path(__file__).resolve().parent / "results" / "prior_estimate_fmnistlt.json"
SIZES = (32, 64, 128, 256, 512, 1024, 2048)


def measure(name: str, seed: int = 0) -> dict[str, dict[str, float]]:
    model = zoo.load(name)
    cfg = model.config
    z, y = collect_logits(model, split_for_model(cfg).test)
    zm = z.mean(0)
    bal_probs = cal.calibrated_probs(zm, cal.log_prior_shift(cfg, "balanced"), cfg.temperature)
    by_class = [torch.nonzero(y == c).flatten() for c in range(cfg.num_classes)]
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, float]] = {}
    for setting in ("balanced", "fwd10", "fwd50"):
        p = (
            torch.full((cfg.num_classes,), 1 / cfg.num_classes)
            if setting == "balanced"
            else shifted_prior(cfg.num_classes, int(setting[3:]), "forward").float()
        )
        for size in SIZES:
            trials = 100 if size <= 256 else 30
            acc = dict.fromkeys(("balanced", "em_plain", "em_shrunk", "true_prior"), 0.0)
            for _ in range(trials):
                labels = torch.multinomial(p, size, replacement=True, generator=g)
                idx = torch.stack(
                    [
                        by_class[c][torch.randint(len(by_class[c]), (1,), generator=g)[0]]
                        for c in labels.tolist()
                    ]
                )
                yb, pb, zb = y[idx], bal_probs[idx], zm[idx]
                acc["balanced"] += (pb.argmax(1) == yb).float().mean().item()
                for key, strength in (("em_plain", 0.0), ("em_shrunk", cal.EM_PRIOR_STRENGTH)):
                    est = cal.estimate_prior_em(pb, strength=strength)
                    pr = cal.calibrated_probs(zb, cal.log_prior_shift(cfg, est), cfg.temperature)
                    acc[key] += (pr.argmax(1) == yb).float().mean().item()
                pr = cal.calibrated_probs(zb, cal.log_prior_shift(cfg, p.double()), cfg.temperature)
                acc["true_prior"] += (pr.argmax(1) == yb).float().mean().item()
            rows[f"{setting} {size}"] = {k: round(100 * v / trials, 2) for k, v in acc.items()}
            print(name, setting, size, rows[f"{setting} {size}"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", default=["ce-resnet32-fmnistlt", "ncl-resnet32-fmnistlt"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        "note": "top-1 (%) averaged over 100 batches (30 from 512 images); seed 0 of each model",
        "em_prior_strength": cal.EM_PRIOR_STRENGTH,
        "models": {n: measure(n) for n in args.names},
    }
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
