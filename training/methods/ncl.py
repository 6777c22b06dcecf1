"""NCL: Nested Collaborative Learning (Li et al., CVPR 2022), faithful to Bazinga699/NCL.

Checked against the official ``NIL_NBOD`` loss (lib/loss/loss.py):

* balanced logits ``zb_k = z_k + log(n)`` (raw class counts),
* Hard Category Mining: the hard set is the target plus the top ``num_hard - 1`` other
  classes by the FIRST expert's RAW logits; the partial view is ``mask * zb_k``
  (non-hard classes set to zero, not -inf),
* NIL = sum_k CE(zb_k, y) + CE(mask * zb_k, y),
* NBOD = w / (K - 1) * sum_{i != j} KL(p_j || p_i) (batch mean), once on the full and once
  on the partial view, no temperature, no stop-gradient.

One deliberate numerical difference: the official code takes ``log(softmax + 1e-9)``; we
use ``log_softmax`` and ``kl_div(..., log_target=True)``, which is exact and has no NaN
gradients when a probability underflows to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltzoo.zoo import Ensemble

from ..precision import float32_loss
from .base import Method, balanced_logits, sum_tensors
from .contrastive import MoCoParams, optional_moco


def hard_category_mask(
    first_expert_logits: torch.Tensor, target: torch.Tensor, num_hard: int
) -> torch.Tensor:
    """1 for the target and the top ``num_hard - 1`` other classes of the first expert, else 0."""
    num_hard = min(num_hard, first_expert_logits.shape[1])
    scores = first_expert_logits.detach().scatter(1, target[:, None], float("inf"))
    hard = scores.topk(num_hard, dim=1).indices
    return torch.zeros_like(first_expert_logits).scatter(1, hard, 1.0)


@float32_loss
def mutual_kl(
    logits: Sequence[torch.Tensor], weight: float, sample_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """NBOD: ``weight / (K-1) * sum_{i != j} KL(p_j || p_i)``, batch mean, computed from log-probs.

    ``sample_weight`` (B,) optionally re-weights each sample's KL (ECL's re-weighted distillation).
    Returns 0 for a single expert.
    """
    k = len(logits)
    if k < 2:
        return logits[0].new_zeros(())
    logps = [F.log_softmax(z, dim=1) for z in logits]
    total = logits[0].new_zeros(())
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            # KL(p_j || p_i) per sample = sum_c p_j (log p_j - log p_i)
            per_sample = F.kl_div(logps[i], logps[j], reduction="none", log_target=True).sum(1)
            if sample_weight is not None:
                per_sample = per_sample * sample_weight
            total = total + per_sample.mean()
    return weight * total / (k - 1)


class NCLLoss(nn.Module):
    """NIL + NBOD for a list of K expert logits (each (B, C)) and targets (B,)."""

    log_counts: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[int],
        num_hard: int = 30,
        nbod_weight: float = 0.6,
        nbod_weight_hcm: float | None = None,
        ce_ratio: float = 1.0,
        hcm_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer(
            "log_counts",
            torch.tensor(list(class_counts), dtype=torch.float32).log(),
            persistent=False,
        )
        self.num_hard = num_hard
        self.nbod_weight = nbod_weight
        self.nbod_weight_hcm = nbod_weight if nbod_weight_hcm is None else nbod_weight_hcm
        self.ce_ratio, self.hcm_ratio = ce_ratio, hcm_ratio

    @float32_loss
    def terms(
        self, expert_logits: Sequence[torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The four terms separately: nil_full, nil_hcm, nbod_full, nbod_hcm."""
        mask = hard_category_mask(expert_logits[0], target, self.num_hard)
        full = [balanced_logits(z.float(), self.log_counts) for z in expert_logits]
        partial = [mask * z for z in full]
        return {
            "nil_full": sum_tensors(F.cross_entropy(z, target) for z in full) * self.ce_ratio,
            "nil_hcm": sum_tensors(F.cross_entropy(z, target) for z in partial) * self.hcm_ratio,
            "nbod_full": mutual_kl(full, self.nbod_weight),
            "nbod_hcm": mutual_kl(partial, self.nbod_weight_hcm),
        }

    def forward(self, expert_logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return sum_tensors(self.terms(expert_logits, target).values())


@dataclass
class NCLParams(MoCoParams):
    #: hard-category set size m (about 30% of C: 30 CIFAR-100, 300 ImageNet-LT, 3 for 10 classes)
    num_hard: int = 30
    nbod_weight: float = 0.6
    #: MoCo-style contrastive branch per expert (0 disables it)
    contrastive_weight: float = 0.0


class NCL(Method):
    """NCL on the shared engine: K independent experts, NIL + NBOD (+ optional MoCo)."""

    name = "ncl"
    Params = NCLParams

    def __init__(self, model: Ensemble, class_counts: Sequence[int], params: NCLParams) -> None:
        super().__init__(model, class_counts, params)
        self.params: NCLParams = params
        self.criterion = NCLLoss(class_counts, params.num_hard, params.nbod_weight)
        self.moco = optional_moco(model, params)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        h = self.model.stem(images)
        experts = self.model.expert_list
        feats = [e.forward_features(h) for e in experts]
        logits = [e.classifier(f) for e, f in zip(experts, feats, strict=True)]
        terms = self.criterion.terms(logits, labels)
        if self.moco is not None:
            terms["contrastive"] = self.params.contrastive_weight * self.moco(feats, images)
        loss = sum_tensors(terms.values())
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def after_step(self) -> None:
        if self.moco is not None:
            self.moco.after_step(self.model)
