"""Shifted test priors, EM prior estimation on a model, and the cost report."""

import pytest
import torch

from ltzoo import zoo
from ltzoo.cost import cost_report
from ltzoo.training.shifted import resample, shifted_prior


def test_shifted_prior_ratio_and_direction():
    fwd = shifted_prior(10, 50, "forward")
    bwd = shifted_prior(10, 50, "backward")
    assert fwd.sum() == pytest.approx(1) and fwd[0] / fwd[-1] == pytest.approx(50)
    assert torch.allclose(bwd, fwd.flip(0))


def test_resample_follows_prior_and_is_seeded():
    labels = torch.arange(10).repeat_interleave(100)
    prior = shifted_prior(10, 10, "forward")
    idx = resample(labels, prior, seed=3)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts[0] == 100 and counts[-1] == 10
    assert torch.equal(idx, resample(labels, prior, seed=3))
    assert not torch.equal(idx, resample(labels, prior, seed=4))


def test_true_and_estimated_prior_beat_balanced_on_shifted_synthetic_set():
    """A classifier calibrated for the uniform prior, evaluated on a forward-LT set."""
    from ltzoo.zoo import calibration as cal

    g = torch.Generator().manual_seed(0)
    c, n = 10, 20000
    prior = shifted_prior(c, 50, "forward").float()
    labels = torch.multinomial(prior, n, replacement=True, generator=g)
    # x_c ~ N(1.2 [c == y], 1): the exact uniform-prior posterior is softmax(1.2 x)
    logits = 1.2 * (torch.randn(n, c, generator=g) + 1.2 * torch.nn.functional.one_hot(labels, c))
    uniform = torch.full((c,), 1 / c, dtype=torch.float64)

    def acc(shift):
        return ((logits + shift).argmax(1) == labels).float().mean().item()

    est = cal.estimate_prior_em(logits.softmax(1))
    assert (est - prior.double()).abs().sum() < 0.1
    balanced = acc(torch.zeros(c))
    oracle = acc(cal.prior_shift(prior.double(), uniform).float())
    em = acc(cal.prior_shift(est, uniform).float())
    assert oracle > balanced + 0.02 and em > balanced + 0.02
    assert em >= oracle - 0.01  # the EM estimate recovers most of the gain


def test_cost_report_grows_with_experts():
    model = zoo.Ensemble(zoo.EnsembleConfig(num_experts=3))
    rows = cost_report(model, batch_sizes=(1,), repeats=1)["rows"]
    assert [r["experts"] for r in rows] == [1, 2, 3]
    assert rows[2]["parameters"] == 3 * rows[0]["parameters"]
    assert (
        rows[2]["macs_per_image"] == 3 * rows[0]["macs_per_image"] > 40e6
    )  # ResNet-32 on 28x28: ~52M MACs
    assert all(r["torch_cpu_ms_batch1"] > 0 for r in rows)
