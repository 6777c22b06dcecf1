"""Calibration: temperature, prior adjustment, metrics, disagreement, EM prior estimation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ltzoo import zoo
from ltzoo.zoo import calibration as cal


def _synthetic(n=20000, c=10, temperature=2.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, c, generator=g) * 3
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    return true_logits * temperature, labels  # over-confident by `temperature`


def test_temperature_recovers_known_value():
    logits, labels = _synthetic(temperature=2.5)
    assert cal.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    logits, labels = _synthetic(temperature=0.6, seed=1)
    assert cal.fit_temperature(logits, labels) == pytest.approx(0.6, rel=0.05)


def test_temperature_reduces_ece():
    logits, labels = _synthetic(temperature=3.0)
    t = cal.fit_temperature(logits, labels)
    before = cal.expected_calibration_error(logits.softmax(1), labels)
    after = cal.expected_calibration_error((logits / t).softmax(1), labels)
    assert after < before / 3


def test_ece_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    logits, labels = _synthetic(n=5000, temperature=1.7)
    probs = logits.softmax(1)
    for norm in ("l1", "max"):
        ref = tm.MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)(probs, labels)
        assert cal.expected_calibration_error(probs, labels, 15, norm=norm) == pytest.approx(
            float(ref), abs=1e-6
        )


def test_balanced_prior_and_unit_temperature_leave_probs_unchanged():
    logits = torch.randn(5, 4)
    shift = cal.prior_shift(
        cal.resolve_prior("balanced", None, 4), cal.resolve_prior("balanced", None, 4)
    )
    assert torch.allclose(cal.calibrated_probs(logits, shift, 1.0), logits.softmax(1))


def test_custom_prior_shifts_predictions_toward_heavy_class():
    logits = torch.zeros(3, 4)
    prior = cal.resolve_prior([0.1, 0.1, 0.7, 0.1], None, 4)
    probs = cal.calibrated_probs(logits, cal.prior_shift(prior, torch.full((4,), 0.25)), 1.0)
    assert torch.allclose(probs, prior.float().expand(3, 4))


def test_training_prior_undoes_balancing():
    counts = [1000, 100, 10]
    log_n = torch.tensor(counts, dtype=torch.float32).log()
    balanced_logits = torch.randn(6, 3)
    cfg = zoo.EnsembleConfig(num_classes=3, num_experts=1, layout="single", class_counts=counts)
    model = zoo.Ensemble(cfg)
    # Balanced Softmax trains on z + log n: the "train" prior must give softmax(z + log n).
    got = model.calibrated_probs(balanced_logits, "train")
    assert torch.allclose(got, (balanced_logits + log_n).softmax(1), atol=1e-6)
    # and a CE model (logits follow the train prior) under "balanced" subtracts log n
    ce = zoo.Ensemble(dataclasses.replace(cfg, logit_prior="train"))
    got = ce.calibrated_probs(balanced_logits + log_n, "balanced")
    assert torch.allclose(got, balanced_logits.softmax(1), atol=1e-5)


@pytest.mark.parametrize(
    "prior, message",
    [
        ([0.5, 0.5], "must have 3 entries"),
        ([0.5, -0.1, 0.6], ">= 0"),
        ([0, 0, 0], "positive sum"),
        ([float("nan"), 1, 1], "NaN"),
        ("uniformish", "unknown prior"),
        (["a", "b", "c"], "list of 3 numbers"),
    ],
)
def test_invalid_priors_raise_clear_errors(prior, message):
    with pytest.raises(ValueError, match=message):
        cal.resolve_prior(prior, [3, 2, 1], 3)


OVERFLOW_PRIOR = [0, 0, 0, 0, 0, 1e308, 0, 1e308, 0, 0]  # finite, but the sum is inf


def test_prior_whose_sum_overflows_is_normalised():
    """Issue 28: divided by its sum the prior was all zeros (then the balanced answer)."""
    prior = cal.resolve_prior(OVERFLOW_PRIOR, None, 10)
    expected = torch.zeros(10, dtype=torch.float64)
    expected[[5, 7]] = 0.5
    assert torch.equal(prior, expected)
    tiny = cal.resolve_prior([5e-324, 0, 5e-324], None, 3)  # subnormal weights
    assert torch.equal(tiny, torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    cfg = zoo.EnsembleConfig(
        class_counts=[1000, 599, 359, 215, 129, 77, 46, 27, 16, 10], temperature=1e4
    )
    torch.manual_seed(0)
    model = zoo.Ensemble(cfg).eval()
    x = torch.randn(4, 1, 28, 28)
    got = model.predict(x, top_k=2, prior=OVERFLOW_PRIOR)
    assert set(got.top_indices.flatten().tolist()) == {5, 7}
    same = model.predict(x, top_k=2, prior=[0, 0, 0, 0, 0, 1, 0, 1, 0, 0])
    assert torch.allclose(got.probs, same.probs)
    assert not torch.allclose(got.probs, model.predict(x, top_k=2).probs)


@pytest.mark.parametrize(
    "prior, message",
    [
        ([1e308, float("inf"), 1e308], "NaN or infinite"),
        ([1e308, -1e308, 1e308], ">= 0"),
        ([0.0, -0.0, 0.0], "positive sum"),
        ([10**400, 1, 1], "list of 3 numbers"),  # too large for a float
    ],
)
def test_extreme_priors_stay_clear_errors(prior, message):
    with pytest.raises(ValueError, match=message):
        cal.resolve_prior(prior, None, 3)
    model = zoo.Ensemble(zoo.EnsembleConfig(num_classes=3, num_experts=1, layout="single"))
    with pytest.raises(ValueError, match=message):
        model.predict(torch.randn(2, 1, 28, 28), top_k=1, prior=prior)


def test_train_prior_needs_counts():
    with pytest.raises(ValueError, match="training class counts"):
        cal.resolve_prior("train", [], 3)


def test_metrics_perfect_and_known_values():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    m = cal.calibration_metrics(probs, labels)
    assert (
        m["ece"] == 0
        and m["mce"] == 0
        and m["brier"] == 0
        and m["nll"] == pytest.approx(0, abs=1e-9)
    )
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2]])
    labels = torch.tensor([0, 1])  # confidence 0.8, accuracy 0.5
    m = cal.calibration_metrics(probs, labels)
    assert m["ece"] == pytest.approx(0.3) and m["mce"] == pytest.approx(0.3)
    assert m["brier"] == pytest.approx((0.04 + 0.04 + 0.64 + 0.64) / 2)
    assert m["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 2)


def test_disagreement_zero_for_identical_experts_and_positive_otherwise():
    z = torch.randn(1, 4, 5)
    assert torch.allclose(cal.expert_disagreement(z.expand(3, 4, 5)), torch.zeros(4), atol=1e-6)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    d = cal.expert_disagreement(torch.stack([a, b]))
    pa, pb = a.log_softmax(1), b.log_softmax(1)
    sym = ((pa.exp() * (pa - pb)).sum(1) + (pb.exp() * (pb - pa)).sum(1)) / 2
    assert torch.allclose(d, sym, atol=1e-5)


def test_em_recovers_known_prior():
    g = torch.Generator().manual_seed(0)
    c, n = 5, 40000
    true_prior = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    labels = torch.multinomial(true_prior, n, replacement=True, generator=g)
    # calibrated posteriors under a uniform prior: class-conditional Gaussians in logit space
    logits = torch.randn(n, c, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, c)
    # x_c ~ N(2 [c == y], 1): the exact posterior under a uniform prior is softmax(2 x)
    probs = (2 * logits).softmax(1)
    est = cal.estimate_prior_em(probs)
    assert (est - true_prior.double()).abs().max() < 0.03


def test_predict_prior_modes_and_topk():
    # a high temperature keeps a random network's probabilities away from saturation
    cfg = zoo.EnsembleConfig(
        class_counts=[1000, 599, 359, 215, 129, 77, 46, 27, 16, 10], temperature=1e4
    )
    torch.manual_seed(0)
    model = zoo.Ensemble(cfg).eval()
    x = torch.randn(3, 1, 28, 28)
    bal = model.predict(x, top_k=3)
    train = model.predict(x, top_k=3, prior="train")
    est = model.predict(torch.randn(32, 1, 28, 28), top_k=3, prior="estimate")
    assert bal.top_indices.shape == (3, 3) and len(bal.labels[0]) == 3
    assert torch.allclose(bal.probs.sum(1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(bal.probs, train.probs)
    assert est.probs.shape == (32, 10)
    assert (bal.disagreement >= 0).all()
    with pytest.raises(ValueError, match="top_k"):
        model.predict(x, top_k=11)
    for bad in (2.5, "3", True):
        with pytest.raises(ValueError, match="top_k must be an integer"):
            model.predict(x, top_k=bad)


def test_prior_adjustment_is_bayes_correct_with_a_temperature():
    """p_target ∝ p_balanced(T) * target / uniform, whatever the temperature."""
    counts = [500, 50, 5]
    cfg = zoo.EnsembleConfig(
        num_classes=3, num_experts=1, layout="single", class_counts=counts, temperature=0.6
    )
    model = zoo.Ensemble(cfg)
    z = torch.randn(4, 3) * 3
    balanced = model.calibrated_probs(z, "balanced")
    assert torch.allclose(balanced, (z / 0.6).softmax(1), atol=1e-6)
    target = torch.tensor([0.2, 0.3, 0.5])
    expected = balanced * target
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(model.calibrated_probs(z, target.tolist()), expected, atol=1e-5)


def test_bias_corrected_temperature_scaling_recovers_a_class_dependent_miscalibration():
    """Labels drawn from softmax(z / T0 + b0): a temperature alone cannot fit them, T + bias can."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 5, generator=g) * 3
    true_t, true_bias = 2.0, torch.tensor([0.8, -0.6, 0.3, -0.9, 0.4])
    labels = torch.multinomial(torch.softmax(logits / true_t + true_bias, -1), 1, generator=g)[:, 0]
    t, bias = cal.fit_temperature_and_bias(logits, labels)
    assert abs(t - true_t) < 0.1
    assert abs(sum(bias)) < 1e-9  # mean zero: the bias is defined up to a constant
    torch.testing.assert_close(torch.tensor(bias), true_bias - true_bias.mean(), atol=0.06, rtol=0)
    # per-class calibration: what the single temperature misses (0.074 vs 0.007 here)
    t_only = cal.fit_temperature(logits, labels)
    ece_t = cal.classwise_ece(torch.softmax(logits / t_only, -1), labels)
    ece_b = cal.classwise_ece(torch.softmax(logits / t + torch.tensor(bias), -1), labels)
    assert ece_b < ece_t / 4, (ece_b, ece_t)


def test_class_bias_is_validated():
    with pytest.raises(ValueError, match="3 class biases for 10 classes"):
        zoo.EnsembleConfig(num_classes=10, class_bias=[0.0, 0.1, -0.1])
    with pytest.raises(ValueError, match="class_bias"):
        zoo.EnsembleConfig(num_classes=2, class_bias=[float("nan"), 0.0])


def test_calibrate_and_evaluate_reports_validation_top1_of_ensemble_and_experts():
    """Runs are chosen on the val split: its top-1 (ensemble, each expert) is in the results."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from ltzoo.training.evaluate import calibrate_and_evaluate, collect_logits

    counts = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    torch.manual_seed(0)
    model = zoo.Ensemble(zoo.EnsembleConfig(class_counts=counts)).eval()

    def data(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, 1, 28, 28), torch.arange(n) % 10)

    split = SimpleNamespace(test=data(40), val=data(30), class_counts=counts)
    results = calibrate_and_evaluate(model, split, batch_size=16)
    logits, labels = collect_logits(model, split.val)
    top1 = [float((z.argmax(1) == labels).float().mean() * 100) for z in logits]
    ensemble = float((logits.mean(0).argmax(1) == labels).float().mean() * 100)
    val = results["val"]
    assert (val["top1"], val["experts"]) == (pytest.approx(ensemble), pytest.approx(top1))
    # the calibrator was chosen on the val split, and what is stored is what was chosen
    assert val["calibrator"] == results["calibration"]["method"] in cal.CALIBRATORS
    assert set(val["calibrator_held_out_nll"]) == set(cal.CALIBRATORS)
    fitted = cal.fit_calibrator(val["calibrator"], *_balanced_val(model, split), warn=False)
    assert (model.config.temperature, model.config.class_bias) == fitted
    calibrate_and_evaluate(model, split, batch_size=16, class_bias=False)  # --temperature-only
    assert model.config.class_bias == [] and model.config.temperature != 1.0


def _balanced_val(model, split):
    from ltzoo.training.evaluate import collect_logits

    logits, labels = collect_logits(model, split.val)
    return logits.mean(0) + cal.balanced_shift(model.config), labels


def _drawn_from(logits, temperature=1.0, bias=None, seed=0):
    """Labels drawn from softmax(logits / T + bias): the calibration those logits need."""
    g = torch.Generator().manual_seed(seed)
    adjusted = logits / temperature + (0.0 if bias is None else bias)
    return torch.multinomial(torch.softmax(adjusted, -1), 1, generator=g)[:, 0]


def test_select_calibrator_fits_nothing_to_logits_already_calibrated_on_a_small_split():
    """A balanced split of 20 images per class (what ltzoo holds out), labels drawn from
    softmax(z): the logits need no calibration, and T + 10 biases would fit noise."""
    logits = torch.randn(4000, 10, generator=torch.Generator().manual_seed(1)) * 2
    labels = _drawn_from(logits)
    keep = torch.cat([(labels == c).nonzero()[:20, 0] for c in range(10)])
    family, nll = cal.select_calibrator(logits[keep], labels[keep])
    assert family != "temperature + class bias", nll
    assert nll["temperature + class bias"] > min(nll.values())


@pytest.mark.parametrize(
    ("temperature", "bias", "expected"),
    [
        (3.0, None, "temperature"),
        (2.0, torch.tensor([1.5, -1.0, 0.5, -1.5, 0.5]), "temperature + class bias"),
    ],
)
def test_select_calibrator_finds_the_miscalibration_there_is(temperature, bias, expected):
    logits = torch.randn(2000, 5, generator=torch.Generator().manual_seed(2)) * 3
    family, nll = cal.select_calibrator(logits, _drawn_from(logits, temperature, bias))
    assert family == expected, nll


def test_select_calibrator_is_seeded_and_stratified():
    logits = torch.randn(60, 3, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(60) % 3
    assert cal.select_calibrator(logits, labels) == cal.select_calibrator(logits, labels)
    positions = cal._stratified_positions(labels, torch.Generator().manual_seed(0))
    for c in range(3):  # each class's images take positions 0..19 once: even folds
        assert sorted(positions[labels == c].tolist()) == list(range(20))
    with pytest.raises(ValueError, match="unknown calibrator"):
        cal.fit_calibrator("platt", logits, labels)


def _replicated_to_balance(logits: torch.Tensor, labels: torch.Tensor):
    """Each image repeated (largest class size / its class's size) times: a balanced set."""
    counts = torch.bincount(labels)
    repeats = counts.max() // counts[labels]
    return logits.repeat_interleave(repeats, 0), labels.repeat_interleave(repeats)


COUNTS = [150, 50, 30, 10, 5]  # training images per class: many, medium x2, few x2


def test_an_imbalanced_validation_split_weighs_like_its_balanced_replica():
    """class_balanced_weights: the fit, its cross-validated choice's NLL, the ECE and the
    top-1 of an imbalanced split are those of the same split with each class repeated to
    balance (the CIFAR-10-LT recipes' split: 20 head images, up to 1,000 of the others)."""
    from ltzoo.training.evaluate import accuracy_report

    g = torch.Generator().manual_seed(4)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([10, 20, 40, 80, 40])])
    logits = torch.randn(len(labels), 5, generator=g) * 2 + 1.5 * F.one_hot(labels, 5)
    weights = cal.class_balanced_weights(labels)
    assert torch.allclose(weights.mean(), torch.tensor(1.0, dtype=torch.float64))
    for c in range(5):  # every class weighs the same
        assert math.isclose(float(weights[labels == c].sum()), len(labels) / 5)
    rep_logits, rep_labels = _replicated_to_balance(logits, labels)
    assert torch.equal(cal.class_balanced_weights(rep_labels), torch.ones(len(rep_labels)).double())
    family = "temperature + class bias"
    t_w, bias_w = cal.fit_calibrator(family, logits, labels, warn=False, weights=weights)
    t_r, bias_r = cal.fit_calibrator(family, rep_logits, rep_labels, warn=False)
    assert math.isclose(t_w, t_r, rel_tol=1e-4)
    torch.testing.assert_close(torch.tensor(bias_w), torch.tensor(bias_r), atol=1e-4, rtol=0)
    unweighted_t, _ = cal.fit_calibrator(family, logits, labels, warn=False)
    assert not math.isclose(unweighted_t, t_r, rel_tol=1e-3)  # the weights do something
    probs, rep_probs = logits.softmax(1), rep_logits.softmax(1)
    for norm in ("l1", "max"):
        assert math.isclose(
            cal.expected_calibration_error(probs, labels, norm=norm, weights=weights),
            cal.expected_calibration_error(rep_probs, rep_labels, norm=norm),
            rel_tol=1e-9,
        )
    weighted = accuracy_report(logits, labels, COUNTS, weights)  # many, medium and few
    replica = accuracy_report(rep_logits, rep_labels, COUNTS)
    for key in ("top1", "top5", "many", "medium", "few"):
        assert math.isclose(weighted[key], replica[key], rel_tol=1e-9), key
    assert weighted["top1"] != accuracy_report(logits, labels, COUNTS)["top1"]


def test_cross_validation_on_an_imbalanced_split_judges_the_balanced_posterior():
    """Labels drawn from softmax(z) (calibrated for a balanced population), then a split
    keeping 1 .. 1/16 of each class. Unweighted, the split's own prior looks like a
    miscalibration that a class bias fixes; weighed class by class, there is nothing to fit."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(30_000, 5, generator=g) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
    kept = (
        torch.rand(len(labels), generator=g)
        < torch.tensor([1, 1 / 2, 1 / 4, 1 / 8, 1 / 16])[labels]
    )
    z, y = logits[kept], labels[kept]
    assert cal.select_calibrator(z, y)[0] == "temperature + class bias"
    assert cal.select_calibrator(z, y, weights=cal.class_balanced_weights(y))[0] == "none"
    assert cal.validation_weights(y) is not None
    assert cal.validation_weights(torch.arange(20) % 5) is None  # balanced: unweighted
