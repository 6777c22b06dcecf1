"""Deterministic, DDP-aware samplers for long-tailed training.

Every sampler draws ONE global index sequence per epoch from a generator seeded by
``(seed, epoch)`` -- identical on every rank -- pads it (by wrapping around) to a multiple
of ``num_replicas`` and hands rank ``r`` the slice ``r::num_replicas``. Ranks therefore
see disjoint shards of the same global sequence, and ``len(sampler)`` is the per-rank
length ``ceil(num_samples / num_replicas)``. Call ``set_epoch(epoch)`` before each epoch.

Kinds:

* ``instance`` -- a random permutation of the dataset (several concatenated permutations
  when ``num_samples`` exceeds the dataset size);
* ``class_balanced`` -- pick a class uniformly, then an image of it uniformly;
* ``sqrt`` -- pick a class with probability proportional to ``sqrt(n_c)``, then an image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

SAMPLERS = ("instance", "class_balanced", "sqrt")


class LTSampler(Sampler[int]):
    """Base class: seeded global sequence per epoch, strided into per-rank shards."""

    kind = "base"

    def __init__(
        self,
        labels: Sequence[int],
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        num_samples: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) == 0:
            raise ValueError("cannot sample from an empty dataset")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {rank=} {num_replicas=}"
            )
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.num_samples = len(self.labels) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def global_indices(self) -> np.ndarray:
        """The epoch's full sequence (all ranks together), before padding."""
        raise NotImplementedError

    def _padded(self) -> np.ndarray:
        seq = self.global_indices()
        total = self.per_rank_length * self.num_replicas
        if total > len(seq):
            seq = np.resize(seq, total)  # wraps around, like DistributedSampler
        return seq

    @property
    def per_rank_length(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self._padded()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank_length

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self.labels)}, num_samples={self.num_samples}, "
            f"seed={self.seed}, epoch={self.epoch}, rank={self.rank}/{self.num_replicas})"
        )


class InstanceSampler(LTSampler):
    """Uniform over images: one permutation per epoch."""

    kind = "instance"

    def global_indices(self) -> np.ndarray:
        rng = self._generator()
        n = len(self.labels)
        reps = math.ceil(self.num_samples / n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[: self.num_samples]


class ClassProbabilitySampler(LTSampler):
    """Pick a class with fixed probabilities ``p_c``, then one of its images uniformly."""

    kind = "class_probability"

    def __init__(
        self, labels: Sequence[int], class_weights: Sequence[float] | None = None, **kw
    ) -> None:
        super().__init__(labels, **kw)
        self.classes, counts = np.unique(self.labels, return_counts=True)
        self.class_counts = counts
        order = np.argsort(self.labels, kind="stable")
        self._sorted = order
        self._start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        w = (
            self.class_weights(counts)
            if class_weights is None
            else np.asarray(class_weights, float)
        )
        if len(w) != len(counts) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("class_weights needs one non-negative weight per present class")
        self.class_probs = w / w.sum()

    def class_weights(self, counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def global_indices(self) -> np.ndarray:
        rng = self._generator()
        cls = rng.choice(len(self.class_probs), size=self.num_samples, p=self.class_probs)
        within = np.floor(rng.random(self.num_samples) * self.class_counts[cls]).astype(np.int64)
        return self._sorted[self._start[cls] + within]


class ClassBalancedSampler(ClassProbabilitySampler):
    """Every class equally likely (p_c = 1 / C)."""

    kind = "class_balanced"

    def class_weights(self, counts: np.ndarray) -> np.ndarray:
        return np.ones(len(counts))


class SqrtSampler(ClassProbabilitySampler):
    """Square-root sampling (p_c proportional to sqrt(n_c))."""

    kind = "sqrt"

    def class_weights(self, counts: np.ndarray) -> np.ndarray:
        return np.sqrt(counts.astype(float))


_KINDS: dict[str, type[LTSampler]] = {
    "instance": InstanceSampler,
    "class_balanced": ClassBalancedSampler,
    "sqrt": SqrtSampler,
}


def build_sampler(
    kind: str,
    labels: Sequence[int],
    *,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    num_samples: int | None = None,
) -> LTSampler:
    """Build an ``instance`` / ``class_balanced`` / ``sqrt`` sampler (see module docstring).

    ``num_samples`` is the global number of draws per epoch (default: the dataset size);
    each rank yields ``ceil(num_samples / num_replicas)`` indices.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown sampler {kind!r}; valid kinds: {', '.join(SAMPLERS)}")
    return _KINDS[kind](
        labels, seed=seed, num_replicas=num_replicas, rank=rank, num_samples=num_samples
    )
