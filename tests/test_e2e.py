"""End to end: the README's demo pipeline with a tiny budget (real Hub client, ORT, LitServe, HTTP)."""

import os
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_demo_pipeline_end_to_end(tmp_path, capsys, monkeypatch):
    from ltzoo.demo import run_demo

    # the demo sets HF_HOME / HF_ENDPOINT / LTZOO_HUB_ORG for itself; keep them out of other tests
    for var in ("HF_HOME", "HF_ENDPOINT", "LTZOO_HUB_ORG"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert run_demo(tmp_path, epochs=1, max_steps=2, eval_subset=100, num_images=3) == 0
    out = capsys.readouterr().out
    for marker in (
        "[1/9]",
        "[5/9] push",
        "outputs identical to the trained model: True",
        "max |p_onnx - p_torch|",
        "server stopped cleanly",
        "every step passed",
    ):
        assert marker in out
    assert (tmp_path / "model.onnx").is_file()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert out.count("  true ") == 3  # three images classified over HTTP
    from ltzoo.zoo.bundle import is_bundled

    if is_bundled("ncl-resnet32-fmnistlt"):  # the shipped model classifies the same test images
        assert "shipped ncl-resnet32-fmnistlt" in out
