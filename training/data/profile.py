"""The exponential long-tail profile and seeded per-class selection of images.

``lt_counts`` is the profile of Cao et al. (LDAM) used by CIFAR-LT / NCL / ECL:
``n_c = int(n_max * (1 / rho) ** (c / (C - 1)))`` for the ``c``-th class of the
*ordered* classes, so class 0 is the head (``n_max`` images) and class ``C - 1`` the
tail (``n_max / rho`` images).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def lt_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """Images per class of the long-tailed profile: ``int(n_max * (1/rho) ** (c / (C-1)))``.

    Every class keeps at least one image (only matters for extreme ``rho``).

    >>> lt_counts(1000, 10, 100)
    [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    """
    n_max = int(n_max)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not rho >= 1:
        raise ValueError(f"rho (imbalance ratio n_max / n_min) must be >= 1, got {rho}")
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * (1.0 / rho) ** (c / (num_classes - 1)))) for c in range(num_classes)]


def check_class_order(class_order: Sequence[int] | None, num_classes: int) -> list[int]:
    """Validate a permutation of ``range(num_classes)`` (``None`` -> identity)."""
    if class_order is None:
        return list(range(num_classes))
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(
            f"class_order must be a permutation of range({num_classes}) "
            f"(original class ids, head first), got {list(class_order)}"
        )
    return order


def inverse_order(order: Sequence[int]) -> np.ndarray:
    """``new_label[original_label]`` for a class order (new label i = original order[i])."""
    inv = np.empty(len(order), dtype=np.int64)
    inv[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
    return inv


def select_lt(
    labels: np.ndarray,
    order: Sequence[int],
    counts: Sequence[int],
    *,
    seed: int,
    val_per_class: int,
    dataset: str,
    val_from_train: bool = False,
    val_max_per_class: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, list[int]]:
    """Pick the long-tailed train set and a validation set (balanced by default) from a pool.

    For new class ``i`` (original class ``order[i]``) the pool's images of that class are
    shuffled with a generator seeded by ``(seed, original class)``; the first ``counts[i]``
    become training images and the *last* ``val_per_class`` the validation images, so
    validation never overlaps training and is the same for every ``rho`` at a given seed.

    When a class has fewer unused images than ``val_per_class`` (e.g. CIFAR-10-LT's head with
    ``n_max=5000``) the validation split shrinks to the largest balanced size possible and a
    warning is emitted; if that is 0 there is no validation split. With ``val_from_train``
    such a class gives up training images instead (CIFAR-10-LT at ``n_max=5000``: the head
    trains on 4,980 and every other class keeps the papers' count).

    ``val_max_per_class`` above the balanced size lets every class with more unused images give
    up to that many (still its *last* ones, so the balanced images stay in): a larger but
    class-imbalanced split, which calibration and validation figures weigh class by class
    (:func:`ltzoo.zoo.calibration.class_balanced_weights`). CIFAR-10-LT's head can spare only
    20 images, its other classes hundreds.

    Returns ``(train_idx, train_labels, val_idx, val_labels, val_per_class_used, counts)``
    with new labels; ``counts`` are the training images per class actually taken.
    """
    labels = np.asarray(labels, dtype=np.int64)
    by_class = []
    for new, (orig, n) in enumerate(zip(order, counts, strict=True)):
        pool = np.flatnonzero(labels == orig)
        if n > len(pool):
            raise ValueError(
                f"{dataset}: class {new} (original id {orig}) needs {n} training images but the "
                f"pool has only {len(pool)}; lower n_max"
            )
        rng = np.random.default_rng([int(seed), int(orig)])
        by_class.append(pool[rng.permutation(len(pool))])
    if val_from_train:
        counts = [min(n, len(p) - val_per_class) for p, n in zip(by_class, counts, strict=True)]
        if min(counts) < 1:
            raise ValueError(
                f"{dataset}: val_per_class={val_per_class} leaves a class no training image"
            )
    spare = min(len(p) - n for p, n in zip(by_class, counts, strict=True))
    v = max(0, min(int(val_per_class), spare))
    if v < val_per_class:
        warnings.warn(
            f"{dataset}: only {spare} unused training images in the fullest class, so the "
            f"balanced validation split has {v} per class instead of {val_per_class}"
            + (" (no validation split)" if v == 0 else ""),
            stacklevel=3,
        )
    train_idx = np.concatenate([p[:n] for p, n in zip(by_class, counts, strict=True)])
    train_lab = np.concatenate([np.full(n, i, dtype=np.int64) for i, n in enumerate(counts)])
    if v:
        spares = [len(p) - n for p, n in zip(by_class, counts, strict=True)]
        sizes = [max(v, min(val_max_per_class, s)) for s in spares]
        val_idx = np.concatenate([p[len(p) - k :] for p, k in zip(by_class, sizes, strict=True)])
        val_lab = np.repeat(np.arange(len(order), dtype=np.int64), sizes)
    else:
        val_idx = np.zeros(0, dtype=np.int64)
        val_lab = np.zeros(0, dtype=np.int64)
    return train_idx, train_lab, val_idx, val_lab, v, list(counts)
