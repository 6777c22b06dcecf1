"""Training precision (run.precision): resolution per CPU, bf16 numerics against fp32 on a
fixed batch, the non-finite-loss guard, and what a run records.

bf16 autocast runs on any x86 CPU (emulated where it has no native bf16), so these tests
check the mathematics everywhere; only the speed needs AVX512-BF16 or AMX.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from test_engine import TINY, needs_fmnist

from ltzoo.training import precision
from ltzoo.training.config import load_recipe
from ltzoo.training.engine import MAX_NONFINITE_STEPS, Trainer, train
from ltzoo.training.methods import METHODS
from ltzoo.training.precision import float32_loss, resolve_precision
from ltzoo.zoo import Ensemble
from ltzoo.zoo.cards import render_card
from ltzoo.zoo.config import EnsembleConfig
from ltzoo.zoo.registry import get_entry

COUNTS = [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
CPU = torch.device("cpu")


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)


@pytest.fixture
def fp32_only_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)


def test_cpu_flags_read_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu amx_bf16\n"
    )
    assert precision.cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_bf16_on_a_cpu_with_bf16_and_auto_stays_fp32_there(bf16_cpu):
    p = resolve_precision("bf16", CPU)
    assert (p.used, p.autocast_dtype, p.needs_grad_scaler) == ("bf16", torch.bfloat16, False)
    assert resolve_precision("fp32", CPU).used == "fp32"
    # bf16 failed the accuracy-parity check for NCL (README), so auto does not pick it
    assert resolve_precision("auto", CPU).used == "fp32"
    assert precision.AUTO_BF16_ON_CPU is False


def test_auto_is_fp32_on_a_cpu_without_bf16(fp32_only_cpu, caplog):
    with caplog.at_level(logging.WARNING, "ltzoo.training"):
        p = resolve_precision("auto", CPU)
    assert p.used == "fp32" and p.autocast_dtype is None and not caplog.records


def test_bf16_on_a_cpu_without_bf16_says_so_in_one_line_and_trains_fp32(fp32_only_cpu, caplog):
    with caplog.at_level(logging.WARNING, "ltzoo.training"):
        p = resolve_precision("bf16", CPU)
    assert p.used == "fp32" and p.record()["requested"] == "bf16"
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert "neither AVX512-BF16 nor AMX" in message and "fp32 instead" in message


def test_float32_loss_turns_autocast_off_and_leaves_fp32_and_fp64_alone():
    @float32_loss
    def product(pair):
        a, b = pair
        return a @ b, torch.is_autocast_enabled("cpu")

    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16  # what the loss would have computed in
        out, autocast_inside = product([x.bfloat16(), x])
    assert out.dtype == torch.float32 and not autocast_inside
    assert product((x.double(), x.double()))[0].dtype == torch.float64


def _method(recipe: str, **params):
    cfg = load_recipe(recipe)
    config = get_entry(cfg.model).build_config(class_counts=COUNTS)
    cls = METHODS[cfg.method]
    method = cls(Ensemble(config), COUNTS, cls.Params.from_dict({**cfg.method_params, **params}))
    if cfg.method == "cbd":  # random frozen teachers shaped as stage 1 trains them
        from ltzoo.training.methods.cbd import teacher_run_config

        teachers = [
            Ensemble(get_entry(t.model).build_config(**t.model_overrides, class_counts=COUNTS))
            for t in (teacher_run_config(cfg, i, s) for i, s in enumerate(method.specs))
        ]
        method.set_teachers(teachers)
    return method.to(memory_format=torch.channels_last)


def _terms_and_grads(method, images, labels, dtype):
    torch.manual_seed(1)  # same random key views inside the methods
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss, parts = method(images, labels)
    assert loss.dtype == torch.float32  # the loss is computed in fp32 in both modes
    method.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    return loss.item(), parts, grads


@pytest.mark.parametrize(
    "recipe, params",
    [
        ("fmnistlt_ncl", {"contrastive_weight": 1.0}),  # NIL + NBOD + HCM + the MoCo branch
        ("fmnistlt_ecl", {}),
        ("fmnistlt_bs", {}),
        ("fmnistlt_cbd", {}),
    ],
)
def test_bf16_loss_terms_and_gradients_match_fp32_on_a_fixed_batch(recipe, params):
    torch.manual_seed(0)
    method = _method(recipe, **params)
    images = torch.randn(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(32) % 10
    state = {k: v.clone() for k, v in method.state_dict().items()}
    loss32, parts32, grads32 = _terms_and_grads(method, images, labels, "fp32")
    method.load_state_dict(state)  # BN statistics and queues as before the fp32 pass
    loss16, parts16, grads16 = _terms_and_grads(method, images, labels, "bf16")

    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for name, value in parts32.items():  # nil_full, nil_hcm, nbod_full, nbod_hcm, contrastive
        # Hard-class mining picks each image's top non-target logits: where two nearly tie,
        # bf16 rounding can pick the other, a step rather than a rounding error (NCL's nbod_hcm
        # here: 1.34 % off on an AMX Xeon, 0.04-0.21 % for every other term and seed there)
        rel = 5e-2 if name.endswith("_hcm") else 1e-2
        assert parts16[name] == pytest.approx(value, rel=rel, abs=1e-3), name
    assert torch.isfinite(grads16).all()
    cosine = torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)
    assert cosine > 0.99, f"bf16 gradient direction differs from fp32: cosine {cosine:.4f}"
    assert (grads16.norm() / grads32.norm()).item() == pytest.approx(1.0, rel=0.05)
    # BN statistics, weights and (for MoCo) queues stay fp32 whatever the forward ran in
    assert all(v.dtype != torch.bfloat16 for v in method.state_dict().values())


class _Diverging(torch.nn.Module):
    """A "method" whose loss is non-finite for its first ``bad`` calls."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.bad, self.calls, self.after_steps = bad, 0, 0

    def forward(self, images, labels):
        self.calls += 1
        scale = float("nan") if self.calls <= self.bad else 1.0
        return (self.w * images).sum() * scale, {}

    def after_step(self):
        self.after_steps += 1


def _trainer(tmp_path, precision_name: str) -> Trainer:
    return Trainer(load_recipe("fmnistlt_ce", [f"run.precision={precision_name}"]), tmp_path)


def test_a_nonfinite_loss_skips_the_step_with_a_warning(tmp_path, caplog):
    trainer, method = _trainer(tmp_path, "fp32"), _Diverging(bad=1)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, "ltzoo.training"):
        assert (
            trainer.train_step(method, method, opt, trainer.grad_scaler(), x, None, "e0 s0") is None
        )
    assert torch.equal(method.w.detach(), torch.ones(3)) and method.after_steps == 0
    assert "non-finite loss nan at e0 s0" in caplog.text and "step skipped" in caplog.text
    loss, _ = trainer.train_step(method, method, opt, trainer.grad_scaler(), x, None, "e0 s1")
    assert torch.isfinite(loss) and method.after_steps == 1 and trainer.nonfinite_in_a_row == 0
    assert not torch.equal(method.w.detach(), torch.ones(3))


@pytest.mark.parametrize("recipe", ["fmnistlt_ncl", "fmnistlt_ecl"])
def test_a_skipped_step_leaves_the_moco_queue_as_it_was(tmp_path, recipe, monkeypatch):
    """Keys that overflowed (fp16 autocast) make the loss non-finite; the engine skips the
    step, and the queue must not keep them, or every later loss would be non-finite too."""
    trainer = _trainer(tmp_path, "fp32")
    method = _method(recipe, contrastive_weight=1.0, moco_queue=16)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    moco = method.moco
    queues, ptr = moco.queues.clone(), moco.queue_ptr.clone()
    real_keys = moco._keys
    monkeypatch.setattr(moco, "_keys", lambda images: [k * float("nan") for k in real_keys(images)])
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    assert trainer.train_step(method, method, opt, trainer.grad_scaler(), x, y, "e0 s0") is None
    assert torch.equal(moco.queues, queues) and torch.equal(moco.queue_ptr, ptr)
    monkeypatch.setattr(moco, "_keys", real_keys)
    loss, _ = trainer.train_step(method, method, opt, trainer.grad_scaler(), x, y, "e0 s1")
    assert torch.isfinite(loss) and torch.isfinite(moco.queues).all()
    assert (moco.queue_ptr == 4).all()  # the taken step's 4 keys, and only those, were queued


@pytest.mark.parametrize(
    "name, advice", [("bf16", "run.precision=fp32"), ("fp32", "a lower optim.lr")]
)
def test_many_nonfinite_losses_in_a_row_stop_the_run_naming_the_setting(
    tmp_path, bf16_cpu, name, advice
):
    trainer, method = _trainer(tmp_path, name), _Diverging(bad=10**6)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(MAX_NONFINITE_STEPS - 1):
        assert (
            trainer.train_step(
                method, method, opt, trainer.grad_scaler(), torch.ones(3), None, str(step)
            )
            is None
        )
    with pytest.raises(FloatingPointError, match="non-finite losses in a row") as err:
        trainer.train_step(method, method, opt, trainer.grad_scaler(), torch.ones(3), None, "last")
    assert advice in str(err.value) and "--resume" in str(err.value)


@needs_fmnist
def test_a_bf16_run_records_its_precision_and_saves_fp32_weights(tmp_path, bf16_cpu):
    cfg = load_recipe("fmnistlt_ce", [*TINY, "optim.epochs=1", "run.precision=bf16"])
    run = train(cfg, tmp_path / "run")
    expected = {"requested": "bf16", "used": "bf16", "reason": "the CPU has AVX512-BF16 or AMX"}
    assert json.loads((run / "run.json").read_text())["precision"] == expected
    assert json.loads((run / "results.json").read_text())["precision"] == expected
    config = EnsembleConfig.load(run / "model" / "config.json")
    assert config.extra["precision"] == expected
    assert "| training precision | bf16 autocast for the experts" in render_card(config)
    weights = load_file(run / "model" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
