"""One calibration path: every runtime gives the same probabilities, and the formula exists once.

On the same model, pixels and priors (train / balanced / explicit, temperature != 1):
``Ensemble.predict`` (eager torch), the fused ONNX graph in a real onnxruntime session, the
serve torch backend and the TensorRT backend's host re-weighting (run on the CPU provider's
default-prior output; the part that runs on the host, without TensorRT) agree; the serve
decoder's shift is the zoo's. A structural test checks that the calibrated softmax, the prior
resolution and the re-weighting are written only in ``zoo/calibration.py``. Last, the serve
decoder checks pixel budgets itself and changes no process-global PIL or warnings state.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import HTTPException
from PIL import Image

from ltzoo import zoo
from ltzoo.zoo import calibration as cal

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [500, 300, 180, 110, 66, 40, 24, 14, 8, 5]
PRIORS = {
    "train": "train",
    "balanced": "balanced",
    "explicit": [0.02, 0.03, 0.05, 0.1, 0.3, 0.2, 0.1, 0.1, 0.05, 0.05],
}
#: CE-like (logits follow the training prior) and balanced-method configs, both with T != 1
BIAS = [0.4, -0.3, 0.2, -0.5, 0.1, 0.3, -0.2, 0.0, 0.25, -0.25]  # mean zero, as fitted
CONFIGS: dict[str, dict[str, Any]] = {
    "train_logits": dict(logit_prior="train", temperature=1.7, class_bias=BIAS),
    "uniform_logits": dict(logit_prior="uniform", temperature=0.6),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches: one intra-op thread (two threads on a loaded 2-core box are ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _model(case: str) -> zoo.Ensemble:
    """3 experts sharing their first two stages (cheap), built once per case."""
    torch.manual_seed(0)
    cfg = zoo.EnsembleConfig(
        name=f"paths-{case}", layout="shared", shared_stages=2, class_counts=COUNTS
    )
    return zoo.Ensemble(dataclasses.replace(cfg, **CONFIGS[case])).eval()


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2


def _rows(shift: torch.Tensor, batch: int) -> np.ndarray:
    return np.repeat(shift.numpy()[None], batch, axis=0).astype(np.float32)


@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory):
    """The train-logits model exported once, with an onnxruntime session on it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from ltzoo.export.onnx import export_onnx, make_session

    model = _model("train_logits")
    path = export_onnx(model, tmp_path_factory.mktemp("paths") / "m.onnx")
    return model, path, make_session(path, threads=1)


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("prior", list(PRIORS))
def test_torch_paths_identical(case, prior):
    """Ensemble.predict, the serve decoder + torch backend, and calibrate() on raw logits."""
    from ltzoo.serve.backends import TorchBackend
    from ltzoo.serve.decoding import RequestDecoder

    model, x, spec = _model(case), _x(), PRIORS[prior]
    pred = model.predict(x, top_k=1, prior=spec)
    shift = cal.log_prior_shift(model.config, spec)
    decoder = RequestDecoder(model.config, max_pixels=10_000, max_images=4)
    np.testing.assert_array_equal(decoder.parse_prior(spec, from_form=False), shift.numpy())
    probs, disagreement = TorchBackend(model).predict(x.numpy(), _rows(shift, len(x)))
    np.testing.assert_allclose(probs, pred.probs.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(disagreement, pred.disagreement.numpy(), rtol=1e-6, atol=1e-7)
    # the formula written out, once, here: softmax((mean_k z_k + s) / T)
    with torch.no_grad():
        z = model.expert_logits(x).mean(0).double()
    t = model.config.temperature
    expected = torch.softmax((z + shift.double()) / t, -1)
    np.testing.assert_allclose(pred.probs.numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_class_bias_is_applied_to_the_calibrated_balanced_posterior():
    """Bias-corrected temperature scaling, written out: softmax((z + log u - log src) / T + b)."""
    model, x = _model("train_logits"), _x()
    with torch.no_grad():
        z = model.expert_logits(x).mean(0).double()
    source = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    t, bias = model.config.temperature, torch.tensor(BIAS, dtype=torch.float64)
    expected = torch.softmax((z + math.log(1 / len(COUNTS)) - source.log()) / t + bias, -1)
    pred = model.predict(x, top_k=1, prior="balanced")
    np.testing.assert_allclose(pred.probs.numpy(), expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prior", list(PRIORS))
def test_onnx_graph_and_tensorrt_host_path_match_torch(onnx_case, prior):
    from ltzoo.serve.backends import TensorRTBackend

    model, path, sess = onnx_case
    x, spec = _x(), PRIORS[prior]
    pred = model.predict(x, top_k=1, prior=spec)
    shift = _rows(cal.log_prior_shift(model.config, spec), len(x))
    feed = {"pixel_values": x.numpy()}
    probs, disagreement = sess.run(["probs", "disagreement"], {**feed, "log_prior_shift": shift})
    np.testing.assert_allclose(probs, pred.probs.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(disagreement, pred.disagreement.numpy(), rtol=1e-4, atol=1e-6)
    # TensorRT runs the graph under its default prior; the host moves it to the asked one
    from ltzoo.export.onnx import read_metadata

    trt = TensorRTBackend.__new__(TensorRTBackend)  # no TensorRT here: only its host part
    trt.config, trt.metadata = model.config, read_metadata(path)
    trt._init_reweighting()
    default = trt.default_shift.astype(np.float32)  # what TensorRTBackend.predict feeds
    default_probs = sess.run(["probs"], {**feed, "log_prior_shift": default})[0]
    np.testing.assert_allclose(trt.reweight(default_probs, shift), probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        trt.reweight(default_probs, shift), pred.probs.numpy(), rtol=0, atol=1e-5
    )


def test_fused_graph_tail_is_the_zoo_module():
    pytest.importorskip("onnxscript")
    from ltzoo.export.onnx import FusedEnsemble

    assert type(FusedEnsemble(_model("train_logits")).tail) is cal.CalibrationTail


def test_expert_disagreement_is_mean_pairwise_symmetric_kl():
    z = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(2)) * 3
    logp = torch.log_softmax(z / 1.3, -1)
    pairs = [
        (logp[i].exp() * (logp[i] - logp[j])).sum(-1) for i in range(4) for j in range(4) if i != j
    ]
    expected = torch.stack(pairs).mean(0)
    torch.testing.assert_close(cal.expert_disagreement(z, 1.3), expected, rtol=1e-5, atol=1e-6)


# -- structural: the formula exists once --------------------------------------------------------
#: package sources (the real folders; ltzoo/ links them, so only its own top-level files)
SOURCES = [p for d in ("zoo", "training", "export", "serve") for p in (ROOT / d).rglob("*.py")]
SOURCES += sorted((ROOT / "ltzoo").glob("*.py"))
#: where a softmax may legitimately be written outside zoo/calibration.py: the training
#: losses of the methods (NCL's / ECL's distillation terms), which act on training logits,
#: not on a calibrated ensemble output
SOFTMAX_ALLOWED = ("zoo/calibration.py", "training/methods/")
#: prior resolution and the calibrated shift are called only inside zoo/calibration.py
CALIBRATION_ONLY = {"resolve_prior", "calibrated_shift"}


def _calls(path: Path) -> list[tuple[str, int]]:
    """(called name, line) of every call in ``path`` (``f(...)``, ``a.b.f(...)``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            out.append((name, node.lineno))
    return out


def _where(names: set[str], allowed: tuple[str, ...] = (), only: str = "") -> list[str]:
    """``file:line name`` of calls to ``names`` in the sources under ``only`` that are not
    under an ``allowed`` prefix."""
    hits = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(only) and not rel.startswith(allowed):
            hits += [f"{rel}:{line} {name}" for name, line in _calls(path) if name in names]
    return hits


def test_calibrated_softmax_is_written_only_in_zoo_calibration():
    assert len(SOURCES) > 30  # the scan sees the package
    assert _where({"softmax", "log_softmax"}, SOFTMAX_ALLOWED) == []


def test_prior_resolution_and_reweighting_only_in_zoo_calibration():
    assert _where(CALIBRATION_ONLY, ("zoo/calibration.py",)) == []
    assert _where({"exp"}, only="serve/") == []  # serve re-weights through the zoo


# -- serve decoding: no process-global image state -----------------------------------------------
def test_decoder_checks_pixels_itself_and_changes_no_global_state():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_reliability import header_only_png

    from ltzoo.serve.decoding import RequestDecoder

    decoder = RequestDecoder(_model("uniform_logits").config, max_pixels=1_000_000, max_images=4)
    blob = header_only_png(10_000, 10_000)  # above PIL's warning limit, below its hard ceiling
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(HTTPException) as exc:
            decoder.load_image(blob, "image")
    assert exc.value.status_code == 413
    assert "10000x10000 = 100000000 pixels" in exc.value.detail["message"]  # the header check
    # PIL's warning reached the caller's filters: the decoder installed no filter of its own
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in seen)
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
