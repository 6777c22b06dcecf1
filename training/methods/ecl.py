"""ECL: Effective Collaborative Learning (Xu et al., IEEE TMM 2023), a RECONSTRUCTION.

**This is not the authors' method as published.** ECL has no public code and we have
only the paper's abstract (``shared/seeds/001_007a5d408064c1fb.txt``). Everything below
is our reading of the four parts the abstract names; every rule, weight and default is
our own choice, and no number from the paper is used or reproduced.

Parts (each switchable from the recipe's ``[method_params]``):

1. **Multi-expert collaborative learning** (always on). Each expert's *label classifier*
   (``expert.classifier``, the one inference uses) is trained with balanced CE on
   ``zb_k = z_k + log(n)``, summed over experts, plus online distillation among experts:
   ``mutual_kl`` (NCL's NBOD, ``distill_weight / (K-1) * sum_{i != j} KL(p_j || p_i)`` on
   balanced logits, no temperature, no stop-gradient, exactly as NCL). NCL's Hard Category
   Mining partial view is **off by default** (``hcm = false``): the abstract does not
   mention it, and leaving it out keeps ECL's ablation separable from NCL's. With
   ``hcm = true`` the partial view ``mask * zb_k`` (``hard_category_mask`` on the first
   expert's raw logits) adds its CE and mutual KL exactly as in :class:`NCLLoss`, so
   ECL with every other part off and ``hcm = true`` equals NCL's loss.
2. **Re-weighted distillation** (``reweight``). Each expert gets a training-only
   *distillation classifier* (same head type as the label classifier, on the same
   feature, stored on this method in ``self.dist_heads``, never published). It is
   supervised ONLY by online distillation: ``KL(t_k || softmax(zd_k + log n))`` with the
   teacher ``t_k`` = mean of the OTHER experts' balanced label-classifier probabilities,
   **detached**. Detaching keeps the label classifiers (used at inference) from being
   pulled toward a head that never sees a label, and keeps the comparison below a
   measurement of knowledge flowing *from* the peers rather than two heads co-adapting.
   By default the distillation classifier's loss also trains the expert's feature
   (``dist_head_detach_feature = false``): the abstract presents both classifiers as
   parts of the trained expert. Comparing the two classifiers gives the weights by
   :data:`REWEIGHT_RULE`; they multiply the per-sample KL of part 1 (full and, if on,
   partial view; via ``mutual_kl(..., sample_weight=...)``) and the distillation
   classifier's loss. Current weights: ``self.class_weights`` (C,), gaps: ``self.class_gap``.
3. **Feature-level distillation** (``feature_distill_weight``): with ``u_k = f_k / |f_k|``
   and the detached ensemble feature ``e = normalize(mean_k u_k)``,
   ``L = feature_distill_weight * mean_k mean_i (1 - cos(f_k_i, e_i))``.
4. **Contrastive proxy branch** (``contrastive_weight``): the MoCo-style
   :class:`~training.methods.contrastive.MoCoBranch` shared with NCL (per-expert
   projection head, EMA key encoder, queue), times ``contrastive_weight``. We keep the
   self-supervised variant: the abstract calls it a "proxy task", and a supervised
   contrastive loss on an instance-sampled long-tailed batch would be dominated by the
   head classes, which is what the rest of ECL tries to counter.

Shared stem (optional): the registry's ``layout = "shared"`` entries split the backbone
after ``shared_stages`` stages (ResNet-32: conv stem + stage 1; ResNeXt-50: conv stem +
layer1 + layer2); the stem receives every expert's gradient summed, with no rescaling. The
Fashion-MNIST-LT and CIFAR-10-LT entries use independent experts instead: on Fashion-MNIST-LT's
validation split the shared stem left the three experts within 0.5 points of each other and
the ensemble 2 points lower (README, "ECL diversity study"); the CIFAR-100-LT and ImageNet-LT
entries keep the shared stem (not re-tested).

Inference: the :class:`zoo.Ensemble` forward, i.e. the mean of the label classifiers'
logits; they are trained on balanced logits, so ``logit_prior = "uniform"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltzoo.zoo import Ensemble
from ltzoo.zoo.models import build_head

from ..distributed import sum_over_ranks
from ..precision import float32_loss
from .base import Method, balanced_logits, sum_tensors
from .contrastive import MoCoParams, optional_moco
from .ncl import hard_category_mask, mutual_kl

#: The exact re-weighting rule (also meant for the model card).
REWEIGHT_RULE = (
    "Re-weighted distillation (our reconstruction; the ECL abstract gives no formula). "
    "For every training sample i of class y and every expert k, the transfer gap is "
    "g_ki = p_label_k[i, y] - p_dist_k[i, y] (detached), where p_label_k = softmax(z_k + log n) is "
    "the label classifier's and p_dist_k = softmax(zd_k + log n) the distillation classifier's "
    "balanced probability; g_i = mean_k g_ki. Per class c a gap EMA is kept: after each batch in "
    "which c occurs, gap_c <- m * gap_c + (1 - m) * mean_{i: y_i = c} g_i (m = reweight_momentum, "
    "start 0; classes absent from the batch keep their value). Class weights are "
    "r_c = clamp(1 + gamma * (gap_c - mean_c' gap_c'), w_min, w_max) and w_c = r_c / mean_c' r_c' "
    "(mean 1 over classes). Sample i's distillation terms (mutual KL between label classifiers and "
    "the distillation classifier's KL) are multiplied by w_{y_i}, using the weights from before "
    "the current batch's EMA update."
)


@dataclass
class ECLParams(MoCoParams):
    # -- part 1: collaborative learning --------------------------------------------------
    #: weight of the balanced CE of the label classifiers (summed over experts)
    ce_weight: float = 1.0
    #: weight of the mutual KL among label classifiers (NCL's nbod_weight)
    distill_weight: float = 0.6
    #: NCL's hard-category partial view (CE + mutual KL on mask * zb); off: not in the abstract
    hcm: bool = False
    #: hard-category set size when ``hcm`` is on
    num_hard: int = 3
    # -- part 2: re-weighted distillation -------------------------------------------------
    #: distillation classifiers + class weights from comparing them with the label classifiers
    reweight: bool = True
    #: weight of the distillation classifiers' (re-weighted) KL loss
    dist_head_weight: float = 1.0
    #: train only the distillation head with its loss (true) or also the expert's feature (false)
    dist_head_detach_feature: bool = False
    #: gamma in w = clamp(1 + gamma * centred gap, w_min, w_max)
    reweight_gamma: float = 2.0
    #: EMA momentum of the per-class gap (applied per batch in which the class occurs)
    reweight_momentum: float = 0.9
    reweight_min: float = 0.5
    reweight_max: float = 2.0
    # -- part 3: feature-level distillation ------------------------------------------------
    feature_distill_weight: float = 1.0
    # -- part 4: contrastive proxy branch (MoCo), 0 disables it ----------------------------
    contrastive_weight: float = 0.5


@float32_loss
def feature_distillation(features: Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """``weight * mean_k mean_i (1 - cos(f_k_i, e_i))``, ``e = normalize(mean_k normalize(f_k))`` detached."""
    units = [F.normalize(f.float(), dim=1) for f in features]
    ens = F.normalize(torch.stack(units).mean(0), dim=1).detach()
    per_expert = [(1 - (u * ens).sum(1)).mean() for u in units]
    return weight * torch.stack(per_expert).mean()


def peer_teachers(balanced: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each expert k: the detached mean of the OTHER experts' balanced probabilities."""
    probs = torch.stack([z.detach().float().softmax(1) for z in balanced])  # (K, B, C)
    k = probs.shape[0]
    total = probs.sum(0)
    return [(total - probs[i]) / (k - 1) for i in range(k)]


@float32_loss
def distillation_head_loss(
    dist_balanced: Sequence[torch.Tensor],
    teachers: Sequence[torch.Tensor],
    sample_weight: torch.Tensor | None,
) -> torch.Tensor:
    """``sum_k mean_i w_i * KL(t_k,i || softmax(zd_k,i + log n))`` (zd already balanced)."""
    total = dist_balanced[0].new_zeros((), dtype=torch.float32)
    for zd, t in zip(dist_balanced, teachers, strict=True):
        per_sample = F.kl_div(F.log_softmax(zd.float(), dim=1), t, reduction="none").sum(1)
        if sample_weight is not None:
            per_sample = per_sample * sample_weight
        total = total + per_sample.mean()
    return total


def true_class_gap(
    label_balanced: Sequence[torch.Tensor],
    dist_balanced: Sequence[torch.Tensor],
    labels: torch.Tensor,
) -> torch.Tensor:
    """Per sample, mean over experts of ``p_label[y] - p_dist[y]`` (balanced probabilities), detached."""
    idx = labels[:, None]
    gaps = [
        z.detach().float().softmax(1).gather(1, idx) - zd.detach().float().softmax(1).gather(1, idx)
        for z, zd in zip(label_balanced, dist_balanced, strict=True)
    ]
    return torch.stack(gaps).mean(0).squeeze(1)


class ECL(Method):
    """ECL (reconstruction): collaborative learning + re-weighted distillation + feature
    distillation + MoCo proxy branch. See the module docstring and :data:`REWEIGHT_RULE`."""

    card_notes = "**Re-weighting rule (ours, from the abstract):** " + REWEIGHT_RULE

    name = "ecl"
    Params = ECLParams

    class_gap: torch.Tensor
    class_weights: torch.Tensor

    def __init__(self, model: Ensemble, class_counts: Sequence[int], params: ECLParams) -> None:
        super().__init__(model, class_counts, params)
        self.params: ECLParams = params
        if params.reweight_min <= 0 or params.reweight_max < params.reweight_min:
            raise ValueError("need 0 < reweight_min <= reweight_max")
        if not 0 <= params.reweight_momentum < 1:
            raise ValueError("reweight_momentum must be in [0, 1)")
        cfg = model.config
        num_classes = len(list(class_counts))
        self.dist_heads: nn.ModuleList | None = None
        if params.reweight:
            in_features = cfg.neck_dim or model.feature_dim
            self.dist_heads = nn.ModuleList(
                build_head(
                    cfg.head,
                    in_features,
                    num_classes,
                    bias=cfg.head_bias,
                    scale=cfg.cosine_scale,
                    learn_scale=cfg.learn_scale,
                )
                for _ in range(model.num_experts)
            )
        self.register_buffer("class_gap", torch.zeros(num_classes))
        self.register_buffer("class_weights", torch.ones(num_classes))
        #: (per-sample gap, labels) of the last training batch, for after_step
        self.pending_gap: tuple[torch.Tensor, torch.Tensor] | None = None
        self.moco = optional_moco(model, params)

    # -- re-weighting ----------------------------------------------------------------------
    def weights_from_gap(self, gap: torch.Tensor) -> torch.Tensor:
        """``r = clamp(1 + gamma * (gap - mean gap), w_min, w_max)``, returned as ``r / mean(r)``."""
        p = self.params
        r = (1 + p.reweight_gamma * (gap - gap.mean())).clamp(p.reweight_min, p.reweight_max)
        return r / r.mean()

    @torch.no_grad()
    def update_class_weights(self, sample_gap: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA of the per-class gap over classes present in the batch (under torchrun, the
        batches of all ranks, so the weights are the same on every rank), then new class
        weights."""
        c = self.class_gap.numel()
        counts = torch.bincount(labels, minlength=c).to(self.class_gap.dtype)
        sums = torch.zeros_like(self.class_gap).index_add_(
            0, labels, sample_gap.to(self.class_gap.dtype)
        )
        counts, sums = sum_over_ranks(torch.stack([counts, sums])).unbind(0)
        present = counts > 0
        batch_mean = sums[present] / counts[present]
        m = self.params.reweight_momentum
        self.class_gap[present] = m * self.class_gap[present] + (1 - m) * batch_mean
        self.class_weights.copy_(self.weights_from_gap(self.class_gap))

    # -- loss --------------------------------------------------------------------------------
    def terms(self, feats: Sequence[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every loss term (already weighted) from the experts' features; updates the class weights."""
        p = self.params
        experts = self.model.expert_list
        logits = [e.classifier(f) for e, f in zip(experts, feats, strict=True)]
        full = [balanced_logits(z.float(), self.log_counts) for z in logits]
        sample_w = self.class_weights[labels] if self.dist_heads is not None else None

        terms: dict[str, torch.Tensor] = {
            "ce": p.ce_weight * sum_tensors(F.cross_entropy(z, labels) for z in full),
            "mutual_kl": mutual_kl(full, p.distill_weight, sample_weight=sample_w),
        }
        if p.hcm:
            mask = hard_category_mask(logits[0], labels, p.num_hard)
            partial = [mask * z for z in full]
            terms["ce_hcm"] = p.ce_weight * sum_tensors(F.cross_entropy(z, labels) for z in partial)
            terms["mutual_kl_hcm"] = mutual_kl(partial, p.distill_weight, sample_weight=sample_w)
        if self.dist_heads is not None and len(full) > 1:
            head_in = [f.detach() for f in feats] if p.dist_head_detach_feature else feats
            dist = [
                balanced_logits(h(f).float(), self.log_counts)
                for h, f in zip(self.dist_heads, head_in, strict=True)
            ]
            terms["dist_head"] = p.dist_head_weight * distillation_head_loss(
                dist, peer_teachers(full), sample_w
            )
            if self.training:  # applied in after_step: forward mutates no buffer it reads
                self.pending_gap = (true_class_gap(full, dist, labels), labels)
        if p.feature_distill_weight > 0 and len(feats) > 1:
            terms["feature"] = feature_distillation(feats, p.feature_distill_weight)
        return terms

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        h = self.model.stem(images)
        feats = [e.forward_features(h) for e in self.model.expert_list]
        terms = self.terms(feats, labels)
        if self.moco is not None:
            terms["contrastive"] = self.params.contrastive_weight * self.moco(feats, images)
        loss = sum_tensors(terms.values())
        logs = {k: float(v.detach()) for k, v in terms.items()}
        if self.dist_heads is not None:
            logs["reweight_min"] = float(self.class_weights.min())
            logs["reweight_max"] = float(self.class_weights.max())
        return loss, logs

    def after_step(self) -> None:
        """The class weights' EMA update from the last training batch's gaps (the step used
        the weights from before it), then the MoCo branch's (queue the step's keys, move
        the key encoder)."""
        if self.pending_gap is not None:
            self.update_class_weights(*self.pending_gap)
            self.pending_gap = None
        if self.moco is not None:
            self.moco.after_step(self.model)
