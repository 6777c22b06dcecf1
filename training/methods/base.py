"""The method interface: build modules, compute a batch's loss, choose a sampler.

A method never owns the training loop; :mod:`training.engine` drives every method,
and every stage of it (:attr:`Method.stages`).
Training-only modules (MoCo encoders, distillation classifiers, teachers) live on the
method, the inference modules on ``self.model`` (a :class:`zoo.Ensemble`), which is
what gets published.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ltzoo.zoo import Ensemble
from ltzoo.zoo.config import LogitPrior, logit_prior_for

from ..config import RunConfig, build_section
from ..precision import float32_loss


@dataclass
class MethodParams:
    """Base of each method's hyper-parameters (the recipe's ``[method_params]`` table)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodParams:
        return build_section(cls, values, "method_params")


@dataclass(frozen=True)
class StageRun:
    """One engine run of an earlier stage of a method (e.g. one CBD teacher).

    The engine trains it in ``<run dir>/<subdir>`` with the usual checkpoint and resume
    semantics (:meth:`training.engine.Trainer.run_stage`).
    """

    stage: str
    subdir: str
    config: RunConfig


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``Params``, and implement :meth:`forward`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: which training sampler the method needs ("instance", "class_balanced", "sqrt")
    sampler: ClassVar[str] = "instance"
    #: which prior the trained model's logits are calibrated for: decided by
    #: :func:`zoo.config.logit_prior_for` from ``name`` (set for each subclass)
    logit_prior: ClassVar[LogitPrior] = "uniform"
    #: the method's stages in order: the last trains ``self.model``; each earlier one is a
    #: set of engine runs it needs first (:meth:`stage_runs`), trained by the engine
    stages: ClassVar[tuple[str, ...]] = ("train",)
    #: text the model card should carry about this method (e.g. an exact loss rule)
    card_notes: ClassVar[str] = ""

    log_counts: torch.Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.logit_prior = logit_prior_for(cls.name)

    @classmethod
    def stage_runs(cls, cfg: RunConfig, stage: str) -> list[StageRun]:
        """The engine runs of the earlier stage ``stage`` of ``cfg`` (none by default)."""
        return []

    def __init__(self, model: Ensemble, class_counts: Sequence[int], params: MethodParams) -> None:
        super().__init__()
        self.model = model
        self.params = params
        counts = torch.tensor(list(class_counts), dtype=torch.float32)
        if (counts <= 0).any():
            raise ValueError("every class needs at least one training image")
        self.register_buffer("log_counts", counts.log(), persistent=False)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one batch and a dict of scalars to log."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook after each optimiser step (e.g. momentum encoder update)."""

    def prepare(self, context: dict[str, Any]) -> None:
        """Hook before training, after the earlier stages ran (CBD loads its teachers).

        ``context`` holds the run's pieces: ``"trainer"`` and ``"split"``. The engine
        restores the global RNG state after it.
        """


def sum_tensors(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` of one or more tensors, typed as a tensor (not ``Tensor | int``)."""
    total = sum(terms)
    assert isinstance(total, torch.Tensor), "sum_tensors needs at least one tensor"
    return total


@float32_loss
def balanced_logits(logits: torch.Tensor, log_counts: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax / logit adjustment: z + log(n_c), broadcast over the batch (in fp32
    at least: log(n_c) up to ~9 does not survive bf16's 8-bit mantissa)."""
    return logits + log_counts.to(logits.dtype)
