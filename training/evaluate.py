"""Evaluation: top-1/top-5 overall and on many/medium/few-shot classes, per expert,
per class; calibration fitted on the validation split (each class weighing the same); plots."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ltzoo.zoo import Ensemble
from ltzoo.zoo import calibration as cal
from ltzoo.zoo.config import shot_group

GROUPS = ("many", "medium", "few")


@torch.inference_mode()
def collect_logits(
    model: Ensemble, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert logits (K, N, C) and labels (N,) over ``dataset``."""
    model = model.to(device).eval()
    chunks, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="evaluating", leave=False, dynamic_ncols=True):
        chunks.append(model.expert_logits(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(chunks, dim=1), torch.cat(labels)


def group_masks(labels: torch.Tensor, class_counts: Sequence[int]) -> dict[str, torch.Tensor]:
    """Boolean mask over samples for each many/medium/few group (all "many" without counts)."""
    num_classes = len(class_counts) if class_counts else int(labels.max()) + 1
    groups = [shot_group(n) for n in class_counts] if class_counts else ["many"] * num_classes
    sample_groups = [groups[i] for i in labels.tolist()]
    return {g: torch.tensor([sg == g for sg in sample_groups], dtype=torch.bool) for g in GROUPS}


def accuracy_report(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Sequence[int],
    weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """top-1, top-5, many/medium/few (in %), and per-class top-1 for combined logits (N, C);
    with ``weights`` (e.g. :func:`~ltzoo.zoo.calibration.class_balanced_weights` on a
    validation split) each image counts that much in the top-1, top-5 and group figures."""
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    correct = (pred == labels).float()
    k = min(5, num_classes)
    top5 = (logits.topk(k, 1).indices == labels[:, None]).any(1).float()

    def mean(hits: torch.Tensor, mask: torch.Tensor | slice = slice(None)) -> float:
        if weights is None:
            return float(hits[mask].mean() * 100)
        w = weights[mask].double()
        return float((hits[mask].double() * w).sum() / w.sum() * 100)

    per_class = [
        mean(correct, labels == c) if (labels == c).any() else float("nan")
        for c in range(num_classes)
    ]
    report: dict[str, Any] = {"top1": mean(correct), "top5": mean(top5)}
    for g, mask in group_masks(labels, class_counts).items():
        report[g] = mean(correct, mask) if mask.any() else None
    report["per_class"] = per_class
    return report


def evaluate(
    model: Ensemble,
    dataset: Dataset,
    class_counts: Sequence[int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Accuracy of the ensemble and of each expert on ``dataset``, every class weighing the
    same (the plain accuracy on a balanced set; a validation split may be imbalanced)."""
    expert_logits, labels = collect_logits(model, dataset, batch_size, device)
    weights = cal.validation_weights(labels)
    return {
        "accuracy": accuracy_report(expert_logits.mean(0), labels, class_counts, weights),
        "experts": [
            accuracy_report(z, labels, class_counts, weights)["top1"] for z in expert_logits
        ],
    }


def _grouped_calibration(
    probs: torch.Tensor, labels: torch.Tensor, counts: Sequence[int]
) -> dict[str, Any]:
    """Calibration metrics overall and on the test samples of many/medium/few-shot classes."""
    report: dict[str, Any] = cal.calibration_metrics(probs, labels)
    for g, mask in group_masks(labels, counts).items():
        if mask.any():
            report[g] = cal.calibration_metrics(probs[mask], labels[mask])
    return report


def _fit_on_val(
    model: Ensemble,
    val_logits: tuple[torch.Tensor, torch.Tensor],
    counts: Sequence[int],
    class_bias: bool,
) -> dict[str, Any]:
    """Fit the calibration on the val split's balanced-prior logits and store it in
    ``model.config``: with ``class_bias``, the family (none, temperature, temperature + class
    bias) that :func:`~ltzoo.zoo.calibration.select_calibrator` picks by cross-validation on
    the val split, else the temperature alone. Returns the family, each family's held-out NLL
    and the val split's top-1 of the ensemble and of each expert."""
    expert_val, val_labels = val_logits
    val_combined = expert_val.mean(0)
    balanced_val = val_combined + cal.balanced_shift(model.config)
    weights = cal.validation_weights(val_labels)
    family, held_out_nll = "temperature", dict[str, float]()
    if class_bias and len(val_labels) >= 2:
        family, held_out_nll = cal.select_calibrator(balanced_val, val_labels, weights=weights)
    temperature, bias = cal.fit_calibrator(family, balanced_val, val_labels, weights=weights)
    model.config = dataclasses.replace(model.config, temperature=temperature, class_bias=bias)
    return {
        "calibrator": family,
        "calibrator_held_out_nll": held_out_nll,
        "top1": accuracy_report(val_combined, val_labels, counts, weights)["top1"],
        "experts": [accuracy_report(z, val_labels, counts, weights)["top1"] for z in expert_val],
    }


def _record_val_split(model: Ensemble, split) -> None:
    """Record the size of the validation split the calibration was just fitted on in
    ``config.extra["data"]``, so that ``ltzoo eval`` / ``calibrate`` rebuild the same split."""
    recorded, info = model.config.extra.get("data"), getattr(split, "info", {})
    if recorded is None:  # a model without its data settings: nothing to rebuild from
        return
    data = {k: v for k, v in recorded.items() if k != "val_max_per_class"}
    if "val_max_per_class" in info:
        data["val_max_per_class"] = info["val_max_per_class"]
    if "sizes" in data:
        data["sizes"] = {**data["sizes"], "val": len(split.val)}
    model.config = dataclasses.replace(model.config, extra={**model.config.extra, "data": data})


def fit_calibration(
    model: Ensemble,
    split,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    class_bias: bool = True,
) -> dict[str, Any]:
    """What ``ltzoo calibrate`` does: fit the calibration on the val split alone (the
    test set is not run) and store it in ``model.config``. Returns the fit and the val split's
    ECE (in %) of the balanced-prior softmax at T = 1 and of the calibrated probabilities.

    The config's recorded test metrics that depend on the calibration (``accuracy_calibrated``,
    ``calibration``) no longer hold and are dropped; ``ltzoo eval`` measures them again."""
    if split.val is None or len(split.val) == 0:
        raise ValueError(
            "the model's dataset split has no validation images: nothing to fit the calibration on"
        )
    val_logits = collect_logits(model, split.val, batch_size, device)
    expert_val, val_labels = val_logits
    combined = expert_val.mean(0)
    before = cal.calibrated_probs(combined, cal.balanced_shift(model.config), 1.0)
    val = _fit_on_val(model, val_logits, split.class_counts, class_bias)
    _record_val_split(model, split)
    after = cal.calibrated_probs(
        combined, cal.log_prior_shift(model.config, "balanced"), model.config.temperature
    )
    weights = cal.validation_weights(val_labels)
    stale = ("accuracy_calibrated", "calibration")
    metrics = {k: v for k, v in model.config.metrics.items() if k not in stale}
    model.config = dataclasses.replace(model.config, metrics=metrics)
    return {
        "method": val["calibrator"],
        "temperature": model.config.temperature,
        "class_bias": model.config.class_bias,
        "val_images": len(val_labels),
        "val": val,
        "ece_before": cal.expected_calibration_error(before, val_labels, weights=weights) * 100,
        "ece_after": cal.expected_calibration_error(after, val_labels, weights=weights) * 100,
    }


def calibrate_and_evaluate(
    model: Ensemble,
    split,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    plots_dir: str | Path | None = None,
    class_bias: bool = True,
    test_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Fit the calibration on the val split (after the balanced prior adjustment):
    the temperature and, with ``class_bias``, a per-class bias (bias-corrected temperature
    scaling); store it in ``model.config`` and report test accuracy and calibration
    before/after, and the val split's top-1 (ensemble and per expert: the numbers to choose
    runs by). Without a val split the model stays uncalibrated (T = 1, no bias).

    ``test_logits``: :func:`collect_logits` of ``split.test`` when the caller has them
    already (``ltzoo eval --shifted`` reuses them), so the test set is run once."""
    counts = split.class_counts
    if test_logits is None:
        test_logits = collect_logits(model, split.test, batch_size, device)
    expert_test, test_labels = test_logits
    combined = expert_test.mean(0)
    balanced = cal.balanced_shift(model.config)
    results: dict[str, Any] = {
        "accuracy": accuracy_report(combined, test_labels, counts),
        "accuracy_balanced_prior": accuracy_report(combined + balanced, test_labels, counts),
        "experts": [accuracy_report(z, test_labels, counts)["top1"] for z in expert_test],
    }
    before = _grouped_calibration(
        cal.calibrated_probs(combined, balanced, 1.0), test_labels, counts
    )
    model.config = dataclasses.replace(model.config, temperature=1.0, class_bias=[])
    if split.val is not None and len(split.val) > 0:
        val_logits = collect_logits(model, split.val, batch_size, device)
        # what choices between runs are made on (never the test set)
        results["val"] = _fit_on_val(model, val_logits, counts, class_bias)
        _record_val_split(model, split)
    temperature, bias = model.config.temperature, model.config.class_bias
    method = results["val"]["calibrator"] if "val" in results else "none"
    calibrated = cal.calibrated_probs(
        combined, cal.log_prior_shift(model.config, "balanced"), temperature
    )
    results["accuracy_calibrated"] = accuracy_report(calibrated.log(), test_labels, counts)
    after = _grouped_calibration(calibrated, test_labels, counts)
    results["calibration"] = {
        "method": method,
        "temperature": temperature,
        "class_bias": bias,
        "before": before,
        "after": after,
        "ece_before": before["ece"] * 100,
        "ece_after": after["ece"] * 100,
    }
    acc = results["accuracy"]
    metrics = {
        "accuracy": {k: acc[k] for k in ("top1", "top5", *GROUPS)},
        "experts_top1": results["experts"],
        "accuracy_calibrated": results["accuracy_calibrated"]["top1"],
        "calibration": {
            k: results["calibration"][k]
            for k in ("method", "temperature", "ece_before", "ece_after")
        },
    }
    model.config = dataclasses.replace(model.config, metrics=metrics)
    if plots_dir is not None:
        plot_per_class(
            acc["per_class"],
            counts,
            Path(plots_dir) / "per_class_accuracy.png",
            model.config.name,
            class_names=model.config.class_names,
        )
        plot_reliability(
            calibrated,
            test_labels,
            Path(plots_dir) / "reliability.png",
            model.config.name,
        )
    return results


def plot_per_class(
    per_class: Sequence[float],
    counts: Sequence[int],
    path: Path,
    title: str = "",
    class_names: Sequence[str] = (),
) -> Path:
    """Per-class test accuracy, one bar per class from the largest training class to the
    smallest, each named on the x axis with its training image count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(class_names) or [str(c) for c in range(len(per_class))]
    order = sorted(range(len(per_class)), key=lambda c: -counts[c]) if counts else []
    order = order or list(range(len(per_class)))
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    group = [shot_group(counts[c]) if counts else "many" for c in order]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(order)), 4))
    ax.bar(range(len(order)), [per_class[c] for c in order], color=[colors[g] for g in group])
    for g, c in colors.items():
        ax.bar([0], [0], color=c, label=g)
    ax.set_xticks(
        range(len(order)),
        [f"{names[c]} ({counts[c]})" if counts else names[c] for c in order],
        rotation=60,
        ha="right",
        fontsize=7 if len(order) > 20 else 9,
    )
    ax.set_xlabel("class (training images)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "per-class accuracy")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(
    probs: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "", n_bins: int = 15
) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, with the ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1])
    accs = [float(correct[idx == b].mean()) if (idx == b).any() else 0.0 for b in range(n_bins)]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(edges[:-1], accs, width=1 / n_bins, align="edge", edgecolor="k", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ece = cal.expected_calibration_error(probs, labels, n_bins) * 100
    ax.set_title(f"{title} ECE={ece:.2f}%")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
