"""The data split a trained model was evaluated and calibrated on, rebuilt from its config."""

from __future__ import annotations

from ltzoo.zoo.config import EnsembleConfig

from .datasets import LTSplit, build_lt_dataset
from .transforms import build_transforms


def split_for_model(
    config: EnsembleConfig,
    dataset: str | None = None,
    root: str | None = None,
    val_max_per_class: int | None = None,
) -> LTSplit:
    """The long-tailed split recorded in ``config.extra["data"]`` (profile, seed, class order,
    validation size), with evaluation transforms only; ``dataset`` / ``root`` override the
    recorded dataset name and its location, ``val_max_per_class`` the validation split's
    size (the training images stay the same)."""
    info = config.extra.get("data", {})
    if val_max_per_class is None:
        val_max_per_class = info.get("val_max_per_class", 0)
    eval_tf = build_transforms(config.preprocess, (), train=False)
    return build_lt_dataset(
        dataset or info.get("name", config.dataset),
        root=root,
        rho=info.get("rho", 100),
        n_max=info.get("n_max"),
        seed=info.get("seed", 0),
        class_order=info.get("class_order"),
        val_per_class=info.get("val_per_class", 20),  # the split the model was calibrated on
        val_from_train=info.get("val_from_train", False),
        val_max_per_class=val_max_per_class,
        eval_transform=eval_tf,
        train_transform=eval_tf,
    )
