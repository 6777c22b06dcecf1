"""NCLLoss against hand computations (official NIL_NBOD semantics)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltzoo.training.methods.ncl import NCLLoss, hard_category_mask, mutual_kl

COUNTS = [50, 20, 10, 5, 2]


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from probabilities (reference implementation)."""
    return (p * (p.log() - q.log())).sum(1)


def test_hcm_mask_holds_target_and_top_others_of_first_expert():
    z0 = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0, 9.0]])
    target = torch.tensor([4, 0])
    mask = hard_category_mask(z0, target, num_hard=3)
    assert mask.tolist() == [[1, 1, 0, 0, 1], [1, 0, 0, 1, 1]]


def test_hcm_mask_uses_raw_logits_not_balanced():
    # Balancing by counts would reorder these; the mask must follow the raw logits.
    z0 = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]])
    mask = hard_category_mask(z0, torch.tensor([0]), num_hard=2)
    assert mask.tolist() == [[1, 0, 0, 0, 1]]


def test_loss_matches_hand_computation():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5) for _ in range(3)]
    target = torch.tensor([0, 1, 4, 2])
    loss_fn = NCLLoss(COUNTS, num_hard=2, nbod_weight=0.6)
    log_n = torch.tensor(COUNTS, dtype=torch.float32).log()
    mask = hard_category_mask(logits[0], target, 2)
    full = [z + log_n for z in logits]
    part = [mask * z for z in full]
    nil = sum(F.cross_entropy(z, target) + F.cross_entropy(m, target) for z, m in zip(full, part))
    nbod = 0.0
    for view in (full, part):
        probs = [z.softmax(1) for z in view]
        pair_sum = sum(_kl(probs[j], probs[i]).mean() for i in range(3) for j in range(3) if i != j)
        nbod = nbod + 0.6 * pair_sum / 2
    expected = nil + nbod
    got = loss_fn(logits, target)
    assert torch.allclose(got, expected, atol=1e-5)
    terms = loss_fn.terms(logits, target)
    assert set(terms) == {"nil_full", "nil_hcm", "nbod_full", "nbod_hcm"}


def test_gradients_reach_every_expert_without_stop_gradient():
    logits = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    target = torch.randint(0, 5, (6,))
    NCLLoss(COUNTS, num_hard=3).forward(logits, target).backward()
    for z in logits:
        assert z.grad is not None and z.grad.abs().sum() > 0
    # the NBOD term alone also sends gradient to every expert (each is teacher and student)
    zs = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    mutual_kl(zs, 0.6).backward()
    assert all(z.grad.abs().sum() > 0 for z in zs)


def test_single_expert_degenerates_to_balanced_softmax_plus_partial():
    z = torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    log_n = torch.tensor(COUNTS, dtype=torch.float32).log()
    mask = hard_category_mask(z, target, 3)
    expected = F.cross_entropy(z + log_n, target) + F.cross_entropy(mask * (z + log_n), target)
    assert torch.allclose(NCLLoss(COUNTS, num_hard=3)([z], target), expected, atol=1e-6)


def test_no_nan_when_probabilities_underflow():
    # gaps > 200 make softmax probabilities exactly 0 in float32
    a = torch.tensor([[300.0, 0.0, -300.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[-300.0, 300.0, 0.0, 0.0, 0.0]], requires_grad=True)
    c = torch.tensor([[0.0, -250.0, 250.0, 0.0, 0.0]], requires_grad=True)
    assert (a.softmax(1) == 0).any()
    loss = NCLLoss(COUNTS, num_hard=3)([a, b, c], torch.tensor([1]))
    loss.backward()
    assert math.isfinite(loss.item())
    for z in (a, b, c):
        assert torch.isfinite(z.grad).all()


def test_ncl_method_trains_all_experts_one_step():
    from ltzoo import zoo
    from ltzoo.training.methods import NCL

    cfg = zoo.EnsembleConfig(num_classes=5, class_counts=COUNTS, num_experts=2)
    model = zoo.Ensemble(cfg)
    method = NCL(model, COUNTS, NCL.Params(num_hard=2, contrastive_weight=1.0, moco_queue=32))
    loss, logs = method(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert {"nil_full", "nbod_full", "contrastive"} <= set(logs)
    for expert in model.experts:
        assert all(p.grad is not None for p in expert.parameters())
    before = [p.clone() for p in method.moco.key_encoder.parameters()]
    method.after_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, method.moco.key_encoder.parameters()))


@pytest.mark.parametrize("k", [2, 3])
def test_mutual_kl_sample_weight_scales(k):
    zs = [torch.randn(4, 5) for _ in range(k)]
    base = mutual_kl(zs, 1.0)
    assert torch.allclose(mutual_kl(zs, 1.0, torch.full((4,), 2.0)), 2 * base, atol=1e-6)
