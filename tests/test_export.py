"""Fused ONNX export: parity, prior input, metadata, runtime without torch, fp16, INT8, TensorRT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx

from ltzoo import zoo
from ltzoo.export.onnx import (
    FusedEnsemble,
    check_parity,
    convert_fp16,
    default_prior_shift,
    export_onnx,
    fastest_int8,
    graph_feed,
    make_session,
    quantize_int8,
    read_metadata,
)
from ltzoo.training.data import read_idx
from ltzoo.zoo.calibration import expert_disagreement

FMNIST = Path("/usr/share/datasets/fashion-mnist")
COUNTS = [500, 300, 180, 110, 66, 40, 24, 14, 8, 5]
CASES = {
    "independent": dict(num_experts=3),
    "shared": dict(num_experts=2, layout="shared", shared_stages=2),
    "cosine_neck": dict(num_experts=1, layout="single", head="cosine", neck_dim=16),
    "temperature_train_prior": dict(
        num_experts=2, temperature=1.7, logit_prior="train", class_counts=COUNTS
    ),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Lazily export each case once per module: case -> (model, onnx path)."""
    cache: dict[str, tuple[zoo.Ensemble, Path]] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(case: str) -> tuple[zoo.Ensemble, Path]:
        if case not in cache:
            torch.manual_seed(0)
            model = zoo.Ensemble(zoo.EnsembleConfig(name=f"test-{case}", **CASES[case])).eval()
            path = export_onnx(
                model,
                root / f"{case}.onnx",
                expert_outputs=case == "independent",
                source={"repo_id": "org/test", "revision": "abc123"},
            )
            cache[case] = (model, path)
        return cache[case]

    return get


def _x(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_parity_probs_and_disagreement(exported, case):
    model, path = exported(case)
    sess = make_session(path)
    for batch in (1, 8):
        x = _x(batch, seed=batch)
        assert check_parity(model, path, x) <= TOL
        probs, dis = sess.run(["probs", "disagreement"], graph_feed(sess, x.numpy()))
        assert probs.shape == (batch, 10) and dis.shape == (batch,)
        with torch.inference_mode():
            ref = expert_disagreement(model.expert_logits(x), model.config.temperature).numpy()
        np.testing.assert_allclose(dis, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["independent", "temperature_train_prior"])
def test_custom_prior_through_log_prior_shift(exported, case):
    model, path = exported(case)
    prior = [0.02, 0.03, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2]
    for batch in (1, 8):
        assert check_parity(model, path, _x(batch), prior=prior) <= TOL
    assert check_parity(model, path, _x(8), prior="balanced") <= TOL
    # a different prior per image: a (B, C) feed overrides the (1, C) default
    per_image = torch.rand(8, 10, generator=torch.Generator().manual_seed(3)) + 0.01
    assert check_parity(model, path, _x(8), prior=per_image) <= TOL


#: a session as a plain onnxruntime user opens one (default log severity: warnings, on stderr)
PLAIN_SESSION = (
    "import sys, onnxruntime as ort; "
    "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
)


def test_prior_input_is_required_and_plain_onnxruntime_does_not_warn(exported):
    model, path = exported("temperature_train_prior")
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_SESSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "appears in graph inputs" not in done.stderr, done.stderr
    sess = make_session(path)
    assert {i.name: i.shape for i in sess.get_inputs()}["log_prior_shift"] == ["prior_batch", 10]
    assert sess.get_overridable_initializers() == []
    x = _x(4).numpy()
    default = model.prior_shift().numpy()[None].astype(np.float32)
    np.testing.assert_allclose(default_prior_shift(sess), default, atol=1e-7)
    implicit = sess.run(["probs"], graph_feed(sess, x))[0]  # no prior given: the default
    explicit = sess.run(["probs"], {"pixel_values": x, "log_prior_shift": default})[0]
    np.testing.assert_allclose(implicit, explicit, atol=1e-7)
    zero = sess.run(
        ["probs"], {"pixel_values": x, "log_prior_shift": np.zeros((1, 10), np.float32)}
    )[0]
    assert np.abs(zero - implicit).max() > 1e-3  # the train-prior model's default shift is not 0


def test_expert_outputs_and_fused_module(exported):
    model, path = exported("independent")
    x = _x(8)
    sess = make_session(path)
    probs, _dis, expert_probs = sess.run(None, graph_feed(sess, x.numpy()))
    assert expert_probs.shape == (3, 8, 10)
    with torch.inference_mode():
        fused = FusedEnsemble(model, expert_outputs=True).eval()
        ref = fused(x)
        logits = model.expert_logits(x)
    np.testing.assert_allclose(expert_probs, ref[2].numpy(), atol=TOL)
    np.testing.assert_allclose(
        ref[2].numpy(), torch.softmax(logits + model.prior_shift(), -1).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(probs, ref[0].numpy(), atol=TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_checker_and_metadata_round_trip(exported, case):
    model, path = exported(case)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pixel_values", "log_prior_shift"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = read_metadata(path)
    cfg = zoo.EnsembleConfig.from_dict(meta["ltzoo_config"])
    assert cfg == model.config
    np.testing.assert_allclose(
        meta["default_log_prior_shift"], model.prior_shift().numpy(), atol=1e-6
    )
    assert meta["source"] == {"repo_id": "org/test", "revision": "abc123"}
    assert (
        meta["ltzoo_version"] and meta["precision"] == "fp32" and meta["prior_input"] == "required"
    )


RUNTIME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions(); so.log_severity_level = 3
    sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    cfg = json.loads(meta["ltzoo_config"])
    x = np.load(sys.argv[2])
    shift = np.asarray(json.loads(meta["default_log_prior_shift"]), np.float32)[None]
    probs, dis = sess.run(["probs", "disagreement"], {"pixel_values": x, "log_prior_shift": shift})
    print(json.dumps({
        "top1": probs.argmax(1).tolist(), "classes": cfg["class_names"],
        "mean": cfg["preprocess"]["mean"], "torch_loaded": "torch" in sys.modules,
        "sum": probs.sum(1).tolist(),
    }))
    """
)


def test_runs_in_fresh_process_without_torch(exported, tmp_path):
    model, path = exported("shared")
    x = _x(8, seed=5)
    np.save(tmp_path / "x.npy", x.numpy())
    script = tmp_path / "run.py"
    script.write_text(RUNTIME_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(path), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False
    assert out["classes"] == model.config.class_names and out["mean"] == list(
        model.config.preprocess.mean
    )
    np.testing.assert_allclose(out["sum"], 1.0, atol=1e-5)
    with torch.inference_mode():
        assert out["top1"] == model.calibrated_probs(model(x)).argmax(1).tolist()


def _fmnist(split: str, n: int, model: zoo.Ensemble) -> torch.Tensor:
    if not (FMNIST / f"{split}-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found under {FMNIST}")
    images = read_idx(FMNIST / f"{split}-images-idx3-ubyte.gz")[:n].astype(np.float32) / 255.0
    pre = model.config.preprocess
    return ((torch.from_numpy(images)[:, None] - pre.mean[0]) / pre.std[0]).float()


def test_int8_runs_and_agrees_with_fp32(exported, tmp_path):
    model, path = exported("independent")
    calib = _fmnist("train", 128, model)
    q = quantize_int8(path, tmp_path / "int8.onnx", calib)
    meta = read_metadata(q)
    assert meta["precision"] == "int8"
    assert zoo.EnsembleConfig.from_dict(meta["ltzoo_config"]) == model.config
    assert "Softmax" not in {
        n.op_type for n in onnx.load(str(q)).graph.node if n.name.endswith("_quant")
    }
    x = _fmnist("t10k", 256, model).numpy()
    fp32_sess = make_session(path)
    fp32 = fp32_sess.run(["probs"], graph_feed(fp32_sess, x))[0]
    int8_sess = make_session(q)
    assert {i.name for i in int8_sess.get_inputs()} == {"pixel_values", "log_prior_shift"}
    int8 = int8_sess.run(["probs"], graph_feed(int8_sess, x))[0]
    agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    assert agreement >= 0.9, agreement
    np.testing.assert_allclose(int8.sum(1), 1.0, atol=1e-5)


def test_int8_keeps_the_fastest_form_that_agrees(exported, tmp_path):
    model, path = exported("independent")
    calib = _fmnist("train", 64, model)
    forms = ("qdq-u8s8-channel", "qoperator-u8s8-channel")
    out, report = fastest_int8(
        path,
        tmp_path / "best.onnx",
        calib,
        forms=forms,
        batches=(1, 8),
        min_time=0.05,
        min_agreement=0.9,  # random weights: near-tied logits flip more often than a trained model's
    )
    assert set(report["forms"]) == set(forms)
    agreeing = {k: v for k, v in report["forms"].items() if v["top1_agreement"] >= 0.9}
    geo = {k: np.exp(np.mean(np.log(list(v["ms"].values())))) for k, v in agreeing.items()}
    assert report["chosen"] == min(geo, key=geo.get)
    meta = read_metadata(out)
    assert (
        meta["int8_form"] == report["chosen"]
        and meta["int8_selection"]["chosen"] == report["chosen"]
    )
    with pytest.raises(ValueError, match="unknown INT8 form"):
        quantize_int8(path, tmp_path / "x.onnx", calib, form="int4")
    with pytest.raises(ValueError, match="--int8-form"):
        fastest_int8(path, tmp_path / "y.onnx", calib, forms=forms[:1], min_agreement=1.01)


def test_fp16_loads_and_keeps_float32_io(exported, tmp_path):
    # export_onnx(fp16=True) is export + this conversion; reuse the fp32 export to save time
    model, fp32 = exported("cosine_neck")
    path = convert_fp16(fp32, tmp_path / "fp16.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    float32 = onnx.TensorProto.FLOAT
    assert all(
        v.type.tensor_type.elem_type == float32 for v in [*proto.graph.input, *proto.graph.output]
    )
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    assert read_metadata(path)["precision"] == "fp16"
    try:
        sess = make_session(path)
    except Exception as exc:  # an ORT build without fp16 CPU kernels
        pytest.skip(f"onnxruntime cannot run fp16 on this CPU: {exc}")
    x = _x(8)
    probs = sess.run(["probs"], graph_feed(sess, x.numpy()))[0]
    assert probs.dtype == np.float32
    with torch.inference_mode():
        ref = model.calibrated_probs(model(x)).numpy()
    assert np.abs(probs - ref).max() < 2e-2


def test_cli_registers_export_and_rejects_bad_flags(tmp_path, capsys):
    from ltzoo.cli import build_parser, main

    args = build_parser().parse_args(
        ["export", "m", "--format", "onnx", "--int8", "--calib-size", "8"]
    )
    assert args.command == "export" and args.int8 and args.calib_size == 8
    assert main(["export", "ncl-resnet32-fmnistlt", "--fp16", "--int8", "--random-weights"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_tensorrt_missing_gives_clear_error(tmp_path):
    from ltzoo.export.tensorrt import build_engine

    try:
        import tensorrt  # noqa: F401

        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if has_trt:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(RuntimeError, match=r"ltzoo\[gpu\]"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


@pytest.mark.gpu
def test_tensorrt_engine(exported, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ltzoo.export.tensorrt import build_engine

    _, path = exported("independent")
    engine = build_engine(path, tmp_path / "m.engine", fp16=True, max_batch=8)
    assert engine.stat().st_size > 0


def test_serve_cache_exports_once_by_content_and_leaves_no_temp(tmp_path, monkeypatch):
    from ltzoo.serve.backends import export_cached

    monkeypatch.setenv("LTZOO_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = zoo.Ensemble(zoo.EnsembleConfig(name="test-cache", **CASES["shared"])).eval()
    path = export_cached(model)
    mtime = path.stat().st_mtime_ns
    assert export_cached(model) == path and path.stat().st_mtime_ns == mtime  # cached
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file beside it
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert export_cached(model) != path  # other weights, another file


def test_weights_past_protobufs_limit_go_beside_the_graph(tmp_path, monkeypatch):
    import ltzoo.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the graph were > 2 GB
    torch.manual_seed(0)
    model = zoo.Ensemble(zoo.EnsembleConfig(name="test-external", **CASES["shared"])).eval()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # an export killed mid-write left its staging folder; the next one clears it
    killed = tmp_path / f".big.onnx.{dead.pid}.tmp"
    killed.mkdir()
    (killed / "big.onnx.data").write_bytes(b"half")
    (tmp_path / "big.onnx.data").write_bytes(b"old")  # an earlier ltzoo's unhashed name
    (tmp_path / "big.onnx.bak.data").write_bytes(b"a user's")  # not ours
    path = export_onnx(model, tmp_path / "big.onnx")
    (tmp_path / "big.onnx.bak.data").unlink()  # kept; out of the way for the checks below
    graph, data = sorted(tmp_path.iterdir())
    assert graph == path and re.fullmatch(r"big\.onnx\.[0-9a-f]{16}\.data", data.name)
    assert os.path.getsize(data) > os.path.getsize(path)  # the weights moved out
    assert check_parity(model, path, _x(3)) <= TOL  # onnxruntime finds the weights
    assert export_onnx(model, path) == path and sorted(tmp_path.iterdir()) == [graph, data]


def test_an_export_killed_between_its_renames_leaves_the_old_graph_whole(tmp_path, monkeypatch):
    """Past protobuf's limit an export is two renames (data, then graph); a kill between them
    must not pair the old graph with the new weights."""
    import ltzoo.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    old, new = (
        zoo.Ensemble(zoo.EnsembleConfig(name="test-external", **CASES["shared"])).eval()
        for _ in range(2)
    )
    path = export_onnx(old, tmp_path / "big.onnx")
    renames = []

    def killed_after_the_data(src, dst):
        if renames:
            raise KeyboardInterrupt  # the process dies before the graph's rename
        renames.append(dst)
        os.rename(src, dst)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(onnx_export.os, "replace", killed_after_the_data)
        export_onnx(new, path)
    assert check_parity(old, path, _x(3)) <= TOL  # the old graph still reads its own weights
    assert len(list(tmp_path.glob("big.onnx.*.data"))) == 2  # and the new data lies unused
    export_onnx(new, path)  # the next export replaces the graph and clears both old files
    assert len(list(tmp_path.glob("big.onnx.*.data"))) == 1
    assert check_parity(new, path, _x(3)) <= TOL
