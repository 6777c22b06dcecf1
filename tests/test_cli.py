"""The `ltzoo` command line: one model resolver, one-line user errors, lazy imports, eval output."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ltzoo import zoo
from ltzoo.cli import main
from ltzoo.zoo.resolve import resolve_model


def _small_model(num_classes: int = 10, **extra) -> zoo.Ensemble:
    torch.manual_seed(0)
    config = zoo.EnsembleConfig(
        num_classes=num_classes,
        num_experts=1,
        layout="single",
        class_counts=[40 // (i + 1) + 2 for i in range(num_classes)],
        name="cli-test",
    )
    config.extra.update(extra)
    return zoo.Ensemble(config).eval()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished run directory as `ltzoo train` leaves it (run.json + model/)."""
    run = tmp_path / "run"
    _small_model(data={"name": "imagefolder_lt", "rho": None}).save_pretrained(run / "model")
    (run / "run.json").write_text("{}")
    return run


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """imagefolder_lt with 10 classes: imbalanced train, 3 val and 6 test images per class."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, per_class in (("train", None), ("val", 3), ("test", 6)):
        for c in range(10):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class or 12 - c):
                pixels = rng.integers(0, 255, (28, 28), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(d / f"{i}.png")
    return root


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"ltzoo {command}: error: "), err
    return err


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


# --- 18.11: help and list without torch ----------------------------------------------------
def test_help_and_list_do_not_import_torch():
    code = (
        "import sys, ltzoo.cli\n"
        "try:\n    ltzoo.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert ltzoo.cli.main(['list', 'ncl']) == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "ncl-resnet32-fmnistlt" in out and out.strip().endswith("TORCH False")


def test_list_without_match_says_so(capsys):
    assert main(["list", "nonexistent"]) == 1
    assert "no registered model matches 'nonexistent'" in capsys.readouterr().err


# --- 18.5: one resolver ----------------------------------------------------------------------
def test_resolver_kinds(run_dir, tmp_path):
    assert resolve_model(str(run_dir)) == zoo.resolve.ModelRef("run", str(run_dir / "model"))
    assert resolve_model(str(run_dir / "model")).kind == "directory"
    assert resolve_model("ncl-resnet32-fmnistlt").kind == "registry"
    ref = resolve_model("my-org/my-model@v1")
    assert (ref.kind, ref.target, ref.revision, ref.spec) == (
        "hub",
        "my-org/my-model",
        "v1",
        "my-org/my-model@v1",
    )
    assert resolve_model("my-org/my-model@v1", revision="dev").revision == "dev"
    (tmp_path / "m.onnx").write_bytes(b"")
    assert resolve_model(str(tmp_path / "m.onnx"), allow_onnx=True).kind == "onnx"
    with pytest.raises(ValueError, match=r"not an \.onnx file"):
        resolve_model(str(tmp_path / "m.onnx"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))  # looks like org/name, but tmp_path is local
    with pytest.raises(ValueError, match="not a run or model directory"):
        resolve_model("no-such-model")
    (run_dir / "model" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="--resume"):
        resolve_model(str(run_dir))  # an unfinished run says how to finish it


@pytest.mark.parametrize(
    "argv",
    [
        ["push", "{d}", "org/repo"],
        ["info", "{d}"],
        ["export", "{d}"],
        ["serve", "{d}"],
        ["eval", "{d}"],
        ["calibrate", "{d}"],
    ],
)
def test_every_command_resolves_models_the_same_way(argv, tmp_path, capsys):
    argv = [a.format(d=tmp_path) for a in argv]  # a directory that holds no model
    assert main(argv) == 2
    assert "neither a model directory" in _one_line_error(capsys, argv[0])


def test_run_directory_works_for_push_info_and_export(run_dir, hub_server, tmp_path, capsys):
    assert main(["push", str(run_dir), "test-org/from-run-dir"]) == 0
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["name"] == "cli-test"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file()


# --- 18.6: one-line user errors ---------------------------------------------------------------
def test_user_errors_are_one_line(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    # a registered model with no bundled weights (the Fashion-MNIST-LT ones ship in the package)
    name = "ncl-resnet32-cifar100lt-r100"
    assert main(["export", name, "--out", str(tmp_path / "x.onnx")]) == 2
    assert f"cannot load 'ltzoo/{name}'" in _one_line_error(capsys, "export")
    assert main(["info", name, "--pretrained"]) == 2
    _one_line_error(capsys, "info")
    assert main(["download", name]) == 2
    assert "unreachable" in _one_line_error(capsys, "download")
    assert main(["push", str(run_dir), "org/repo"]) == 2
    assert "cannot reach the Hub" in _one_line_error(capsys, "push")
    assert main(["train", "fmnistlt_ce", "run.device=tpu", "--dry-run"]) == 2
    assert "run.device must be auto, cpu, cuda" in _one_line_error(capsys, "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="TensorRT may be usable here")
def test_tensorrt_export_checks_first(tmp_path, capsys):
    out = tmp_path / "m.engine"
    argv = ["export", "ncl-resnet32-fmnistlt", "--random-weights", "--format", "tensorrt"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "TensorRT" in _one_line_error(capsys, "export")
    assert not list(tmp_path.iterdir())  # no ONNX export happened before the check


# --- 18.4 / 18.8 / 18.11: calibrate in place, eval output ------------------------------------
def test_calibrate_updates_the_run_model(run_dir, image_folder, capsys):
    argv = ["--data", "imagefolder_lt", "--data-root", str(image_folder)]
    before = json.loads((run_dir / "model" / "config.json").read_text())["temperature"]
    assert main(["calibrate", str(run_dir), *argv]) == 0
    assert not (run_dir / "config.json").exists()  # not written next to model/
    assert zoo.load(str(run_dir / "model")).config.temperature != before
    assert main(["eval", str(run_dir), *argv, "--shifted"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^forward\s+2\s", out, re.M) and re.search(r"^backward\s+50\s", out, re.M)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("top-1") and not re.search(r"\d\.\d{3,}", summary.split("ECE")[0])


def test_calibrate_needs_out_for_a_hub_model(capsys):
    assert main(["calibrate", "ncl-resnet32-fmnistlt"]) == 2
    assert "--out" in _one_line_error(capsys, "calibrate")


# --- 18.9: prior="estimate" needs a batch ------------------------------------------------------
def test_estimate_prior_needs_a_batch():
    model = _small_model()
    with pytest.raises(ValueError, match="at least 32 images"):
        model.predict(torch.randn(1, 1, 28, 28), prior="estimate")
    pred = model.predict(torch.randn(32, 1, 28, 28), prior="estimate")
    assert pred.probs.shape == (32, 10)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert 'pil_image, top_k=3, prior="balanced")  # or "train", [weights...]' in readme
