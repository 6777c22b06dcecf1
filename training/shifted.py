"""Evaluation under shifted test priors (the test-agnostic protocol).

The balanced test set is resampled, seeded, to forward long-tailed (same head classes as
training) and backward long-tailed (reversed) priors with imbalance 2, 5, 10 and 50.
On each set we compare three serving-time prior options: "balanced" (the default),
the true test prior (an oracle), and the prior estimated by EM from the unlabelled
predictions (Saerens et al., 2002). Logits are computed once and reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ltzoo.zoo import Ensemble
from ltzoo.zoo import calibration as cal

from .evaluate import accuracy_report, collect_logits

IMBALANCES = (2, 5, 10, 50)


def shifted_prior(num_classes: int, imbalance: float, direction: str) -> torch.Tensor:
    """Exponential prior with max/min ratio ``imbalance``; "forward" puts class 0 at the head."""
    c = torch.arange(num_classes, dtype=torch.float64)
    prior = (1.0 / imbalance) ** (c / (num_classes - 1))
    if direction == "backward":
        prior = prior.flip(0)
    return prior / prior.sum()


def resample(labels: torch.Tensor, prior: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded subset of a balanced set whose class frequencies follow ``prior``."""
    g = torch.Generator().manual_seed(seed)
    per_class = torch.bincount(labels, minlength=len(prior))
    n_max = int(per_class.min())
    keep = []
    for c, p in enumerate(prior.tolist()):
        n = max(1, round(n_max * p / float(prior.max())))
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep)


def _score(
    logits: torch.Tensor, labels: torch.Tensor, model: Ensemble, prior, counts
) -> dict[str, float]:
    probs = model.calibrated_probs(logits, prior)
    acc = accuracy_report(probs.log(), labels, counts)
    return {"top1": acc["top1"], "ece": cal.expected_calibration_error(probs, labels) * 100}


def shifted_prior_report(
    model: Ensemble,
    split,
    seed: int = 0,
    plot: str | Path | None = None,
    test_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Accuracy and ECE on forward/backward-LT test sets with balanced, true and EM priors.

    ``test_logits``: :func:`collect_logits` of ``split.test`` if already computed (the
    model's calibration is applied here, so logits from before it was fitted are the same)."""
    if test_logits is None:
        test_logits = collect_logits(model, split.test)
    expert_logits, labels = test_logits
    logits = expert_logits.mean(0)
    counts = split.class_counts
    rows = []
    for direction in ("forward", "backward"):
        for imbalance in IMBALANCES:
            prior = shifted_prior(logits.shape[1], imbalance, direction)
            idx = resample(labels, prior, seed)
            z, y = logits[idx], labels[idx]
            estimate = cal.estimate_prior_em(model.calibrated_probs(z, "balanced"))
            rows.append(
                {
                    "direction": direction,
                    "imbalance": imbalance,
                    "n": len(idx),
                    "balanced": _score(z, y, model, "balanced", counts),
                    "true_prior": _score(z, y, model, prior, counts),
                    "em_estimate": _score(z, y, model, estimate, counts),
                    "em_l1_error": float((estimate - prior).abs().sum()),
                }
            )
    if plot is not None:
        _plot(rows, Path(plot), model.config.name)
    return {"seed": seed, "rows": rows}


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, direction in zip(axes, ("forward", "backward"), strict=True):
        sub = [r for r in rows if r["direction"] == direction]
        xs = [r["imbalance"] for r in sub]
        for key, label in (
            ("balanced", "prior=balanced"),
            ("em_estimate", "prior=estimate (EM)"),
            ("true_prior", "true prior"),
        ):
            ax.plot(xs, [r[key]["top1"] for r in sub], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xticks(list(IMBALANCES), [str(i) for i in IMBALANCES])
        ax.minorticks_off()
        ax.set_title(f"{direction}-LT test")
        ax.set_xlabel("test imbalance")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
