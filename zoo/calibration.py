"""Calibration of long-tailed ensembles: prior adjustment, temperature, metrics.

A model's combined logits ``z`` are calibrated for some class prior ``pi_src`` (uniform
for balanced methods, the training prior for plain CE). Serving under a target prior
``pi_tgt`` is Bayes' rule in logit space::

    z' = z + log(pi_tgt) - log(pi_src)

and the temperature ``T`` (fitted by NLL on the validation split, each class weighing the
same, after the balanced adjustment) then divides the adjusted logits: ``p = softmax(z' / T)``.

This module is the one calibration path: prior resolution for a model config
(:func:`log_prior_shift`, :func:`batch_log_prior_shift` for ``prior="estimate"``), the
calibrated softmax (:func:`calibrated_probs`), expert disagreement and their combination
(:func:`calibrate`, :class:`CalibrationTail`, traceable to ONNX). ``Ensemble.predict``, the
fused ONNX graph and its parity check, the serve backends and evaluation all call these.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import EnsembleConfig

PriorSpec = str | Sequence[float] | torch.Tensor | None
logger = logging.getLogger("zoo")


def _validate_prior(prior: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The one place a prior is checked and normalised (float64 vector summing to 1)."""
    if prior.ndim != 1 or prior.numel() != num_classes:
        raise ValueError(f"prior must have {num_classes} entries, got shape {tuple(prior.shape)}")
    if not torch.isfinite(prior).all():
        raise ValueError("prior contains NaN or infinite values")
    if (prior < 0).any():
        raise ValueError("prior entries must be >= 0")
    peak = prior.max()
    if peak <= 0:
        raise ValueError("prior must have a positive sum")
    # Scale to a peak of 1 first: the sum of finite weights can overflow (2 x 1e308 = inf).
    scaled = prior / peak
    return scaled / scaled.sum()


def resolve_prior(
    spec: PriorSpec, class_counts: Sequence[int] | None, num_classes: int
) -> torch.Tensor:
    """Turn ``"balanced"``, ``"train"`` or a vector of class weights into a probability vector.

    Raises ``ValueError`` with a message saying what is wrong for invalid priors.
    """
    if spec is None or (isinstance(spec, str) and spec == "balanced"):
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    if isinstance(spec, str):
        if spec == "train":
            if not class_counts:
                raise ValueError("prior='train' needs the model's training class counts")
            return _validate_prior(torch.tensor(class_counts, dtype=torch.float64), num_classes)
        if is_estimate(spec):
            raise ValueError(
                "prior='estimate' is estimated from a batch: pass it to Ensemble.predict "
                f"(at least {MIN_ESTIMATE_BATCH} images), or estimate the prior once with "
                "zoo.calibration.estimate_prior_em and pass it as a list of class weights"
            )
        raise ValueError(
            f"unknown prior {spec!r}; use 'balanced', 'train', 'estimate' (EM on a batch, in "
            f"Ensemble.predict) or a list of {num_classes} numbers"
        )
    try:
        vec = torch.as_tensor(spec, dtype=torch.float64).flatten()
    except (TypeError, ValueError, OverflowError) as exc:  # Overflow: 10**400
        raise ValueError(f"prior must be a list of {num_classes} numbers") from exc
    return _validate_prior(vec, num_classes)


def prior_shift(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``log(target) - log(source)``; classes with target prior 0 get a very negative shift."""
    return torch.log(target.clamp_min(1e-12)) - torch.log(source.clamp_min(1e-12))


def calibrated_shift(
    target: torch.Tensor,
    source: torch.Tensor,
    temperature: float,
    class_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logit shift ``s`` such that ``softmax((z + s) / T)`` is Bayes-correct for ``target``.

    The temperature ``T`` and the per-class bias ``b`` (bias-corrected temperature scaling;
    zero when not fitted) are fitted on balanced logits ``z + log(u) - log(source)`` (u
    uniform), so the calibrated balanced posterior is
    ``softmax((z + log u - log source) / T + b)``; moving it to another prior multiplies it
    by ``target / u``. Inside the ``/ T`` both become ``T * b + T * (log target - log u)``.
    With ``T = 1`` and no bias this is ``log target - log source``.
    """
    uniform = torch.full_like(source, 1.0 / source.numel())
    shift = prior_shift(uniform, source) + temperature * prior_shift(target, uniform)
    return shift if class_bias is None else shift + temperature * class_bias.to(shift)


def calibrated_probs(logits: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((logits + shift) / T): the one place the calibrated softmax is written."""
    return torch.softmax((logits + shift.to(logits)) / temperature, dim=-1)


def reweight_probs(
    probs: torch.Tensor, shift: torch.Tensor, base_shift: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Move probabilities computed under ``base_shift`` to ``shift`` without the logits (float64).

    Exact: ``softmax((z + s) / T) = normalise(softmax((z + s_b) / T) * exp((s - s_b) / T))``.
    Used where the shift cannot be fed to the graph (TensorRT freezes it to its default).
    """
    delta = (shift.double() - base_shift.double()) / temperature
    weighted = probs.double() * torch.exp(delta - delta.amax(dim=-1, keepdim=True))
    return weighted / weighted.sum(dim=-1, keepdim=True)


# -- prior resolution for a model config --------------------------------------------------------
def source_prior(config: EnsembleConfig) -> torch.Tensor:
    """The class prior a model's combined logits are calibrated for, from ``config.logit_prior``:
    the training prior (``class_counts``) for "train", uniform for "uniform"."""
    spec = "train" if config.logit_prior == "train" else "balanced"
    return resolve_prior(spec, config.class_counts, config.num_classes)


def balanced_shift(config: EnsembleConfig) -> torch.Tensor:
    """float32 (C,) ``log u - log source``: the balanced adjustment of raw combined logits,
    before any fitted temperature or bias (what calibration is fitted on)."""
    source = source_prior(config)
    return prior_shift(torch.full_like(source, 1.0 / source.numel()), source).float()


def requested_prior(config: EnsembleConfig, prior: PriorSpec = None) -> PriorSpec:
    """The target prior spec: ``prior``, or the config's ``default_prior`` when None."""
    return (config.default_prior or "balanced") if prior is None else prior


def log_prior_shift(config: EnsembleConfig, prior: PriorSpec = None) -> torch.Tensor:
    """float32 (C,) shift ``s`` such that ``softmax((z + s) / T)`` serves target ``prior``.

    ``prior``: "balanced", "train", a vector of class weights, or None (``default_prior``);
    see :func:`calibrated_shift`. Raises ``ValueError`` (with the reason) for invalid priors.
    """
    target = resolve_prior(requested_prior(config, prior), config.class_counts, config.num_classes)
    bias = torch.tensor(config.class_bias, dtype=torch.float64) if config.class_bias else None
    return calibrated_shift(target, source_prior(config), config.temperature, bias).float()


def is_estimate(prior: PriorSpec) -> bool:
    """Whether ``prior`` asks for the batch's prior to be estimated (``"estimate"``)."""
    return isinstance(prior, str) and prior == "estimate"


def check_estimate_batch(prior: PriorSpec, batch_size: int) -> None:
    """Refuse ``prior="estimate"`` on fewer than :data:`MIN_ESTIMATE_BATCH` images."""
    if is_estimate(prior) and batch_size < MIN_ESTIMATE_BATCH:
        raise ValueError(
            f'prior="estimate" needs a batch of at least {MIN_ESTIMATE_BATCH} images '
            f"(got {batch_size}): EM on so few collapses onto the predicted classes. Estimate "
            "the prior offline on a batch (zoo.calibration.estimate_prior_em) and pass it "
            "as a list of class weights"
        )


def batch_log_prior_shift(
    config: EnsembleConfig, prior: PriorSpec, expert_logits: torch.Tensor
) -> torch.Tensor:
    """:func:`log_prior_shift`, where ``prior="estimate"`` is first resolved by EM
    (:func:`estimate_prior_em`) on the balanced posteriors of this batch's (K, B, C) logits."""
    if is_estimate(prior):
        check_estimate_batch(prior, expert_logits.shape[1])
        balanced = calibrated_probs(
            expert_logits.mean(0), log_prior_shift(config, "balanced"), config.temperature
        )
        prior = estimate_prior_em(balanced)
    return log_prior_shift(config, prior)


# -- the calibration tail: expert logits -> probabilities + disagreement --------------------------
def calibrate(
    expert_logits: torch.Tensor, shift: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert logits (K, B, C) and a (C,), (1, C) or (B, C) log-prior shift ->
    ``(probs, disagreement)``: ``softmax((mean_k z_k + shift) / T)`` (B, C) and
    :func:`expert_disagreement` (B,)."""
    probs = calibrated_probs(expert_logits.mean(0), shift, temperature)
    return probs, expert_disagreement(expert_logits, temperature)


class CalibrationTail(nn.Module):
    """:func:`calibrate` as a module (traceable to ONNX): what the fused graph ends with.

    ``forward(expert_logits, log_prior_shift) -> (probs, disagreement[, expert_probs])``;
    ``expert_probs`` (K, B, C) = ``softmax((z_k + shift) / T)``, each expert calibrated like
    the ensemble, when ``expert_outputs``.
    """

    def __init__(self, temperature: float, expert_outputs: bool = False) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.expert_outputs = expert_outputs

    def forward(
        self, expert_logits: torch.Tensor, log_prior_shift: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        probs, disagreement = calibrate(expert_logits, log_prior_shift, self.temperature)
        if not self.expert_outputs:
            return probs, disagreement
        expert_probs = calibrated_probs(expert_logits, log_prior_shift, self.temperature)
        return probs, disagreement, expert_probs


def class_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image weights (float64, mean 1) under which every class present weighs the same:
    all ones on a balanced split. The validation fits and figures use them, so that an
    imbalanced split (``data.val_max_per_class``) still stands for a balanced test set."""
    counts = torch.bincount(labels).double()
    return (len(labels) / ((counts > 0).sum() * counts))[labels]


def validation_weights(labels: torch.Tensor) -> torch.Tensor | None:
    """:func:`class_balanced_weights` of a validation split, or ``None`` when its classes are
    balanced already (all ones: the unweighted computation, bit for bit)."""
    counts = torch.bincount(labels)
    return None if counts[counts > 0].unique().numel() <= 1 else class_balanced_weights(labels)


def _nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy, each image weighted by ``weights`` when given."""
    if weights is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising NLL of ``softmax(logits / T)`` (LBFGS on log T), clamped to a sane range."""
    temperature, _ = fit_calibrator("temperature", logits, labels)
    return temperature


def fit_temperature_and_bias(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[float, list[float]]:
    """Bias-corrected temperature scaling (Alexandari et al., ICML 2020): ``T`` and a mean-zero
    per-class bias ``b`` minimising NLL of ``softmax(logits / T + b)``.

    One temperature cannot undo class-dependent miscalibration, which long-tailed training
    leaves behind; the bias can, and it keeps EM prior estimation (``prior="estimate"``)
    well founded. Fit on a balanced split with every class present (for an imbalanced one,
    :func:`fit_calibrator` with :func:`class_balanced_weights`)."""
    return fit_calibrator("temperature + class bias", logits, labels)


#: the calibrator families :func:`select_calibrator` chooses from, simplest first
CALIBRATORS = ("none", "temperature", "temperature + class bias")


def fit_calibrator(
    family: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    warn: bool = True,
    weights: torch.Tensor | None = None,
) -> tuple[float, list[float]]:
    """``(T, class_bias)`` of one of :data:`CALIBRATORS` fitted by NLL (``none``: T = 1),
    each image weighted by ``weights`` when given (:func:`class_balanced_weights`)."""
    if family not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {family!r}; choose from {CALIBRATORS}")
    if family == "none":
        return 1.0, []
    with_bias = family == "temperature + class bias"
    return _fit_nll(logits, labels, with_bias, warn, weights)


def select_calibrator(
    logits: torch.Tensor,
    labels: torch.Tensor,
    folds: int = 5,
    repeats: int = 4,
    seed: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[str, dict[str, float]]:
    """The calibrator family with the lowest held-out NLL on the validation split itself
    (``repeats`` x stratified ``folds``-fold cross-validation, seeded: the same split gives
    the same choice). Returns the family and each family's mean held-out NLL. ``weights``
    weigh each image in the fits and the held-out NLL (:func:`class_balanced_weights`).

    Eleven parameters (T + 10 biases) fitted on 200 validation images can overfit it: an NCL
    model whose balanced logits were already calibrated (CIFAR-10-LT, ECE 1.96 %) left the
    fit at 5.06 %. Cross-validation sees that on the validation split, without the test set.
    The choice is the simplest family within one standard error of the best (Breiman et al.,
    1984; the standard error of the per-fold differences): a bias that wins by less than the
    folds' noise is fitting the split."""
    logits, labels = logits.detach().double(), labels.clone()
    g = torch.Generator().manual_seed(seed)
    losses: dict[str, list[float]] = {f: [] for f in CALIBRATORS}
    for _ in range(repeats):
        fold = _stratified_positions(labels, g) % folds  # which fold each image falls in
        for k in range(folds):
            held_out = fold == k
            if held_out.all() or not held_out.any():
                continue
            for family in CALIBRATORS:
                fit_w, held_w = (
                    (None, None) if weights is None else (weights[~held_out], weights[held_out])
                )
                t, bias = fit_calibrator(
                    family, logits[~held_out], labels[~held_out], warn=False, weights=fit_w
                )
                adjusted = logits[held_out] / t + (torch.tensor(bias).double() if bias else 0.0)
                losses[family].append(float(_nll(adjusted, labels[held_out], held_w)))
    if len(losses["none"]) < 2:  # the standard error needs two folds
        raise ValueError(
            f"cross-validating a calibrator needs at least 2 images, got {len(labels)}"
        )
    mean = {f: statistics.fmean(v) for f, v in losses.items()}
    best = min(CALIBRATORS, key=mean.__getitem__)

    def within_one_se(family: str) -> bool:  # paired: every family is scored on the same folds
        gaps = [a - b for a, b in zip(losses[family], losses[best], strict=True)]
        return statistics.fmean(gaps) <= statistics.stdev(gaps) / len(gaps) ** 0.5

    return next(f for f in CALIBRATORS if within_one_se(f)), mean


def _stratified_positions(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image's position among the images of its class, in a fresh shuffle of the class:
    taken modulo the fold count, every fold gets an even share of every class."""
    positions = torch.empty_like(labels)
    for c in labels.unique():
        members = (labels == c).nonzero()[:, 0]
        positions[members[torch.randperm(len(members), generator=g)]] = torch.arange(len(members))
    return positions


# The fit's constants, shared by every calibrator family: LBFGS converges well within 200
# iterations on 10-1,000 classes, and T outside 0.05-100 means a broken model, not calibration.
_LBFGS_MAX_ITER = 200
_TEMPERATURE_RANGE = (0.05, 100.0)


def _fit_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    with_bias: bool,
    warn: bool = True,
    weights: torch.Tensor | None = None,
) -> tuple[float, list[float]]:
    logits = logits.detach().double().clone()  # clone: may be an inference-mode tensor
    labels = labels.clone()
    weights = None if weights is None else weights.detach().double().clone()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(
        logits.shape[-1] if with_bias else 1, dtype=torch.float64, requires_grad=True
    )
    params = [log_t, bias] if with_bias else [log_t]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=_LBFGS_MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(logits / log_t.exp() + (bias - bias.mean()), labels, weights)
        loss.backward()
        return loss

    opt.step(closure)
    # An untrained model's NLL keeps falling as T grows (towards uniform); keep T finite.
    fitted = float(log_t.detach().exp().item())
    temperature = min(max(fitted, _TEMPERATURE_RANGE[0]), _TEMPERATURE_RANGE[1])
    centred = (bias - bias.mean()).detach()
    if warn:
        bias_used = centred if with_bias else None
        _warn_if_unreliable(logits, labels, fitted, temperature, bias_used, weights)
    return temperature, centred.tolist() if with_bias else []


def _warn_if_unreliable(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fitted: float,
    temperature: float,
    bias: torch.Tensor | None,
    weights: torch.Tensor | None = None,
) -> None:
    """Warn (one line) when a fit stopped at a bound of the temperature or raised the ECE of
    the split it was fitted on by more than a calibrated model's chance ECE there
    (:func:`ece_sampling_noise`): what it stores then calibrates nothing (a diverged or
    untrained model?). A deliberately lax test: the fit lowers the NLL, not the ECE."""
    low, high = _TEMPERATURE_RANGE  # ``temperature``: ``fitted`` clamped to this range
    adjusted = logits / temperature + (0.0 if bias is None else bias)
    probs = torch.softmax(adjusted, -1)
    before = expected_calibration_error(torch.softmax(logits, -1), labels, weights=weights) * 100
    after = expected_calibration_error(probs, labels, weights=weights) * 100
    # An already calibrated model's ECE moves by sampling noise alone (NLL, not ECE, is fitted)
    noise = ece_sampling_noise(probs, weights=weights) * 100
    problems = []
    if not low < fitted < high:
        problems.append(
            f"the temperature stopped at its bound T={temperature:g} (range {low:g}-{high:g})"
        )
    if after > before + noise:
        problems.append(
            f"the validation ECE rose beyond its sampling noise ({before:.2f}% -> {after:.2f}%, "
            f"noise {noise:.2f}%)"
        )
    if problems:
        logger.warning(
            "calibration: %s on %d validation images: the fitted calibration is unreliable "
            "(a diverged or untrained model?)",
            " and ".join(problems),
            len(labels),
        )


def _binned(
    values: torch.Tensor, hits: torch.Tensor, n_bins: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width bin (right-closed): sample count (or weight), sum of ``values``, sum of
    ``hits`` (each weighted by ``weights`` when given)."""
    values = values.double().contiguous()
    w = torch.ones_like(values) if weights is None else weights.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(values, edges[1:-1], right=False)
    count = torch.bincount(idx, weights=w, minlength=n_bins)
    value_sum = torch.bincount(idx, weights=values * w, minlength=n_bins)
    hit_sum = torch.bincount(idx, weights=hits.double() * w, minlength=n_bins)
    return count, value_sum, hit_sum


def expected_calibration_error(
    probs: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int = 15,
    norm: str = "l1",
    weights: torch.Tensor | None = None,
) -> float:
    """Top-label ECE (``norm="l1"``) or MCE (``norm="max"``) with equal-width bins, each image
    counted with its weight in ``weights`` (e.g. :func:`class_balanced_weights`) when given.

    Without weights it matches torchmetrics' ``MulticlassCalibrationError`` (bins are
    right-closed).
    """
    conf, pred = probs.max(dim=1)
    count, conf_sum, acc_sum = _binned(conf, pred == labels, n_bins, weights)
    filled = count > 0
    if not filled.any():
        return 0.0
    if norm == "max":
        return float(((acc_sum - conf_sum).abs()[filled] / count[filled]).max())
    return float((acc_sum - conf_sum).abs().sum() / count.sum())


def ece_sampling_noise(
    probs: torch.Tensor, n_bins: int = 15, weights: torch.Tensor | None = None
) -> float:
    """The ECE a perfectly calibrated model with these confidences would show on this many
    images by chance: per bin of :func:`expected_calibration_error`, the mean absolute
    deviation of a binomial proportion (normal approximation, ``sqrt(2 c (1 - c) / (pi n))``
    at confidence ``c``, ``n`` the bin's effective size under ``weights``), averaged by weight.
    A change in ECE smaller than this is of the size chance alone gives a calibrated model."""
    conf = probs.max(dim=1).values
    w = torch.ones_like(conf, dtype=torch.float64) if weights is None else weights.double()
    count, conf_sum, squares = _binned(conf, w, n_bins, weights)  # squares: sum of w^2
    filled = count > 0
    c = conf_sum[filled] / count[filled]
    n_eff = count[filled] ** 2 / squares[filled]
    spread = (2 * c * (1 - c) / (math.pi * n_eff)).sqrt()
    return float((count[filled] * spread).sum() / count.sum())


def classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Mean over classes of the one-vs-rest calibration error of that class's probability."""
    errors = []
    for c in range(probs.shape[1]):
        count, p_sum, hit_sum = _binned(probs[:, c], labels == c, n_bins)
        errors.append(float((hit_sum - p_sum).abs().sum() / count.sum()))
    return sum(errors) / len(errors)


def calibration_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> dict[str, float]:
    """ECE, MCE, classwise ECE, NLL and Brier score of probabilities ``probs`` (N, C)."""
    probs = probs.double()
    onehot = F.one_hot(labels, probs.shape[1]).double()
    return {
        "ece": expected_calibration_error(probs, labels, n_bins),
        "mce": expected_calibration_error(probs, labels, n_bins, norm="max"),
        "classwise_ece": classwise_ece(probs, labels, n_bins),
        "nll": float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).mean()),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
    }


def expert_disagreement(expert_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean pairwise symmetric KL between experts' probabilities, per sample.

    ``expert_logits`` has shape (K, B, C); returns (B,). Zero for a single expert.
    """
    k = expert_logits.shape[0]
    if k < 2:
        return expert_logits.new_zeros(expert_logits.shape[1])
    logp = torch.log_softmax(expert_logits / temperature, dim=-1)
    p = logp.exp()
    # sum_{i != j} KL(p_i || p_j) = sum_{i,j} <p_i, logp_i - logp_j>
    #                             = K sum_i <p_i, logp_i> - <sum_i p_i, sum_j logp_j>
    self_term = (p * logp).sum(-1).sum(0)  # (B,)
    cross = (p.sum(0) * logp.sum(0)).sum(-1)  # (B,)
    return ((k * self_term - cross) / (k * (k - 1))).clamp_min(0.0)  # >= 0 up to rounding


#: fewest images ``prior="estimate"`` accepts: EM on a handful of predictions collapses
#: onto the classes predicted (one image always gives p = 1 for its top class)
MIN_ESTIMATE_BATCH = 32


#: Dirichlet strength of :func:`estimate_prior_em`'s shrinkage, in images: the estimate
#: counts as many pseudo-images drawn from the model's own prior as this
EM_PRIOR_STRENGTH = 100.0


def estimate_prior_em(
    probs: torch.Tensor,
    train_prior: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    strength: float = EM_PRIOR_STRENGTH,
) -> torch.Tensor:
    """Estimate the class prior of an unlabelled set by EM (Saerens et al., 2002), shrunk
    toward the model's prior.

    ``probs`` are calibrated posteriors under ``train_prior`` (uniform if None). Plain EM
    (``strength=0``) is the maximum-likelihood prior, which on a small batch is mostly noise
    and drives classes that happen to be rare in it to ~0 (on a balanced batch of 32
    Fashion-MNIST images it cost ~19 points of top-1). This is the MAP estimate under a
    Dirichlet prior centred on ``train_prior`` with ``strength`` pseudo-images: each M-step
    is ``(sum of responsibilities + strength * train_prior) / (N + strength)``, so a batch
    of N images moves the estimate by a weight N / (N + strength): about a quarter of the
    way at 32 images, almost all of it from a few thousand. No class falls below
    ``strength * train_prior / (N + strength)``. Where it pays (Fashion-MNIST-LT, CE and
    NCL, ``benchmarks/bench_prior_estimate.py``): from 32 images, the smallest batch
    ``predict`` accepts, when the batch's prior is shifted (+0.3 to +1.3 points of top-1
    over the balanced prior at 32 images, +1.2 to +3.2 at 512, for imbalance 10 to 50);
    on balanced batches it stays within 0.5 points of the balanced prior at every size
    (plain EM: -2.4 to -2.6 points at 32).

    Example:
        >>> probs = torch.softmax(torch.randn(32, 10), dim=1)
        >>> prior = estimate_prior_em(probs)  # (10,), sums to 1, near uniform at N = 32
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0 (pseudo-images), got {strength}")
    probs = probs.double()
    n, c = probs.shape
    src = (
        torch.full((c,), 1.0 / c, dtype=torch.float64)
        if train_prior is None
        else train_prior.double() / train_prior.double().sum()
    )
    prior = src.clone()
    for _ in range(max_iter):
        w = probs * (prior / src)
        w = w / w.sum(1, keepdim=True)
        new = (w.sum(0) + strength * src) / (n + strength)
        if (new - prior).abs().max() < tol:
            prior = new
            break
        prior = new
    return prior


__all__ = [
    "CALIBRATORS",
    "EM_PRIOR_STRENGTH",
    "MIN_ESTIMATE_BATCH",
    "CalibrationTail",
    "balanced_shift",
    "batch_log_prior_shift",
    "calibrate",
    "calibrated_probs",
    "calibrated_shift",
    "calibration_metrics",
    "check_estimate_batch",
    "classwise_ece",
    "estimate_prior_em",
    "expected_calibration_error",
    "expert_disagreement",
    "fit_calibrator",
    "fit_temperature",
    "fit_temperature_and_bias",
    "is_estimate",
    "log_prior_shift",
    "prior_shift",
    "requested_prior",
    "resolve_prior",
    "reweight_probs",
    "select_calibrator",
    "source_prior",
]
