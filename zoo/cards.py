"""Model cards rendered from ``zoo/data/card_template.md`` (Hub metadata in the YAML header).

The template is package data, so an installed wheel can write cards too.
"""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

from .config import EnsembleConfig
from .measured import measured_metrics

TEMPLATE_PATH = Path(__file__).resolve().parent / "data" / "card_template.md"

_LT_SUBSET = (
    "a long-tailed subset of the {source} training set (exponential class profile, "
    "imbalance ratio and largest class size in the recipe), evaluated on the balanced test set"
)
#: ltzoo dataset name -> (Hub dataset id or "", what the long-tailed variant is)
DATASET_CARDS: dict[str, tuple[str, str]] = {
    "fashion_mnist_lt": (
        "zalando-datasets/fashion_mnist",
        _LT_SUBSET.format(source="Fashion-MNIST")
        + " (Fashion-MNIST-LT: at most 1,000 images per class, imbalance ratio 100)",
    ),
    "cifar10_lt": ("uoft-cs/cifar10", _LT_SUBSET.format(source="CIFAR-10")),
    "cifar100_lt": ("uoft-cs/cifar100", _LT_SUBSET.format(source="CIFAR-100")),
    "imagenet_lt": (
        "ILSVRC/imagenet-1k",
        "ImageNet-LT (Liu et al., CVPR 2019): a long-tailed subset of ImageNet-1k, "
        "115.8k images, 1,280 to 5 per class; balanced 50k validation set",
    ),
    "places_lt": ("", "Places-LT (Liu et al., CVPR 2019): a long-tailed subset of Places-365"),
    "inat2018": ("", "iNaturalist 2018, naturally long-tailed (8,142 species)"),
}


def _dataset_fields(dataset: str) -> dict[str, str]:
    """Template fields describing ``dataset``: a Hub ``datasets:`` id only where one exists."""
    hub_id, desc = DATASET_CARDS.get(dataset, ("", "custom dataset"))
    return {
        "datasets_yaml": f"datasets:\n- {hub_id}\n" if hub_id else "",
        "dataset_type": hub_id or dataset or "unknown",
        "dataset_title": dataset or "unknown",
        "dataset_desc": desc,
    }


_SUMMARIES = {
    "ncl": "NCL (Nested Collaborative Learning, Li et al. CVPR 2022): K independent experts trained "
    "together with balanced cross-entropy on full and hard-category (partial) views, plus "
    "mutual online distillation between every pair of experts. Inference averages the experts' logits.",
    "ecl": "ECL (Effective Collaborative Learning, Xu et al. IEEE TMM 2023), **reconstructed from the "
    "paper's abstract; there is no official code and these numbers are ours.** Experts "
    "(independent, or on a shared stem: see the config's layout) learn with balanced CE, online "
    "distillation re-weighted by comparing a label classifier with a distillation classifier, "
    "feature-level distillation to the ensemble feature, "
    "and a contrastive proxy branch. Inference averages the label classifiers' logits.",
    "cbd": "CBD (Class-Balanced Distillation, Iscen et al. BMVC 2021): a student trained from scratch "
    "with class-balanced sampling, distilling the normalised, concatenated features of "
    "instance-sampled teachers; cosine classifier on a projected, L2-normalised feature.",
    "ce": "Baseline: one network trained with plain cross-entropy and instance sampling.",
    "balanced_softmax": "Baseline: Balanced Softmax (Ren et al. 2020), cross-entropy on logits + log(class counts).",
}


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


def _metric_rows(metrics: dict[str, Any]) -> tuple[str, str]:
    """The card's YAML metrics and its table of this model's own figures (its config's
    ``metrics``: what ``ltzoo eval`` computes), raw and as ``predict`` returns them."""
    acc = metrics.get("accuracy", {})
    cal = metrics.get("calibration", {})
    yaml_lines, table = [], []
    for key in ("top1", "many", "medium", "few"):
        if acc.get(key) is not None:  # None: no class of that group in the data
            yaml_lines.append(
                f"    - type: accuracy\n      name: {key} accuracy\n      value: {acc[key]:.2f}"
            )
    if acc:
        table.append(
            "| top-1 (raw logits) | top-1 as `predict` returns it | top-5 | many | medium | few "
            "| ECE before | ECE after |"
        )
        table.append("|---|---|---|---|---|---|---|---|")
        table.append(
            f"| {_fmt(acc.get('top1'))} | {_fmt(metrics.get('accuracy_calibrated'))} | "
            f"{_fmt(acc.get('top5'))} | {_fmt(acc.get('many'))} | {_fmt(acc.get('medium'))} | "
            f"{_fmt(acc.get('few'))} | {_fmt(cal.get('ece_before'))} | "
            f"{_fmt(cal.get('ece_after'))} |"
        )
    if not yaml_lines:
        yaml_lines.append("    - type: accuracy\n      name: top1 accuracy\n      value: null")
    return "\n".join(yaml_lines), "\n".join(
        table
    ) or "Not measured yet: train it with the recipe below."


def _over_seeds_rows(name: str) -> str:
    """The registered method's mean ± std over its training seeds (``measured.json``), as a
    second table clearly apart from this model's own figures; "" when there is none."""
    over = measured_metrics().get(name, {}).get("over_seeds", {})
    if "top1" not in over:
        return ""
    cell = lambda k: (  # noqa: E731
        f"{over[k]['mean']:.2f} ± {over[k]['std']:.2f}" if k in over else "-"
    )
    return "\n".join(
        [
            "\n",
            f"The method over {over['seeds']} training seeds ({', '.join(map(str, over['seed_list']))}; "
            "mean ± std; the model above is one of them, seed 0), for comparison, not the "
            "figures of these weights:",
            "",
            "| top-1 (raw logits) | top-1 calibrated | many | medium | few | ECE before | ECE after |",
            "|---|---|---|---|---|---|---|",
            f"| {cell('top1')} | {cell('top1_calibrated')} | {cell('many')} | {cell('medium')} | "
            f"{cell('few')} | {cell('ece_before')} | {cell('ece_after')} |",
        ]
    )


_LOGIT_ADJUSTMENT = (
    "\n\nThe raw logits of plain CE carry the training prior; `predict`'s default "
    '`prior="balanced"` subtracts its log, so what `predict` returns is CE + post-hoc logit '
    "adjustment (Menon et al., ICLR 2021), not plain CE: that is why its top-1 is above the "
    "raw one."
)


def _validation_desc(config: EnsembleConfig) -> str:
    """The validation split the calibration was fitted on, as the model records it."""
    images = config.extra.get("data", {}).get("sizes", {}).get("val")
    where = f"{images} validation images" if images else "the validation split"
    return f"{where}, each class weighing the same"


def _precision_desc(record: dict[str, str] | None) -> str:
    """How the weights were trained: ``extra["precision"]`` as the engine recorded it."""
    if not record:
        return "fp32 (not recorded: trained before ltzoo recorded it)"
    if record.get("used") == "fp32":
        return f"fp32 ({record.get('reason', '')})"
    return (
        f"{record.get('used')} autocast for the experts, losses and weights in fp32 "
        f"({record.get('reason', '')}); the published weights are fp32"
    )


def render_card(config: EnsembleConfig, extra: str = "") -> str:
    """The model card (README.md) of ``config``: Hub metadata, provenance, metrics, usage."""
    metrics_yaml, table = _metric_rows(config.metrics)
    pre = config.preprocess
    if config.extra.get("card_notes"):
        extra = f"\n## Method notes\n\n{config.extra['card_notes']}\n" + extra
    teachers = config.extra.get("teachers")
    if teachers:
        extra += "\n## Teachers (CBD stage 1)\n\n" + "\n".join(f"- {t}" for t in teachers) + "\n"
    return Template(TEMPLATE_PATH.read_text()).safe_substitute(
        name=config.name or "ltzoo-ensemble",
        method=config.method or "unknown",
        dataset=config.dataset or "unknown",
        **_dataset_fields(config.dataset),
        metrics_yaml=metrics_yaml,
        summary=_SUMMARIES.get(config.method, ""),
        provenance=config.provenance or "unspecified",
        backbone=config.backbone,
        num_experts=config.num_experts,
        layout=config.layout,
        num_classes=config.num_classes,
        recipe=config.recipe or "-",
        training_precision=_precision_desc(config.extra.get("precision")),
        input_desc=f"{pre.channels}x{pre.input_size[0]}x{pre.input_size[1]}, mean {pre.mean}, std {pre.std}, {pre.resize}",
        temperature=f"{config.temperature:.4f}"
        + (
            " and a per-class bias (bias-corrected temperature scaling, fitted on "
            f"{_validation_desc(config)})"
            if config.class_bias
            else ""
        ),
        logit_prior=config.logit_prior,
        results_table="This model (the weights in this repo; `ltzoo eval "
        f"{config.name or 'MODEL'}` recomputes these):\n\n"
        + table
        + (_LOGIT_ADJUSTMENT if config.method == "ce" and config.metrics else "")
        + _over_seeds_rows(config.name),
        extra=extra,
    )
