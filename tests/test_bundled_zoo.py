"""Weights shipped with the package: pinned, verified, the offline fallback of zoo.load(name),
and published in one go with `ltzoo push-zoo` (issue 20.3, 20.4)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from checks import same_weights
from huggingface_hub import HfApi, constants

from ltzoo import zoo
from ltzoo.cli import main as cli_main
from ltzoo.net import free_port
from ltzoo.zoo import bundle
from ltzoo.zoo.ensemble import WEIGHTS_NAME
from ltzoo.zoo.hub_io import IntegrityError
from ltzoo.zoo.registry import get_entry, list_models

NAME = "ce-resnet32-fmnistlt"
FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def tiny_bundle(tmp_path, monkeypatch) -> tuple[zoo.Ensemble, Path]:
    """A bundle root (LTZOO_BUNDLE_DIR) holding one randomly initialised registry model."""
    torch.manual_seed(0)
    model = zoo.Ensemble(get_entry(NAME).build_config(class_counts=[100] * 10)).eval()
    model.save_pretrained(tmp_path / "run" / "model")
    root = tmp_path / "bundle"
    root.mkdir()
    name, entry = bundle.add_to_bundle(tmp_path / "run", root)
    assert name == NAME and entry["files"][WEIGHTS_NAME]["size"] > 0
    monkeypatch.setenv(bundle.BUNDLE_ENV, str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    return model, root


def test_offline_with_empty_cache_loads_the_bundled_copy(tiny_bundle, monkeypatch):
    model, _ = tiny_bundle
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = zoo.load(NAME)
    assert same_weights(model, loaded)
    assert loaded.config.extra["source"]["bundled"] == NAME
    assert (
        get_entry(NAME).bundled["files"][WEIGHTS_NAME]["sha256"]
        == (loaded.config.extra["source"]["sha256"])
    )
    assert {r["name"]: r["bundled"] for r in list_models("fmnistlt")}[NAME] is True


def test_unreachable_hub_falls_back_to_the_bundle(tiny_bundle, monkeypatch):
    model, _ = tiny_bundle
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    loaded = zoo.load(NAME)
    assert same_weights(model, loaded) and "bundled" in loaded.config.extra["source"]
    # an explicitly requested revision is never silently replaced by the bundle
    with pytest.raises(zoo.ModelNotAvailableError):
        zoo.load(NAME, revision="v9")


@pytest.mark.parametrize("damage", ["flip", "truncate", "config"])
def test_damaged_bundle_is_a_clear_error(tiny_bundle, monkeypatch, damage):
    _, root = tiny_bundle
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = root / NAME / (WEIGHTS_NAME if damage != "config" else "config.json")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    else:
        data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"bundled {NAME}: .*(pins|pinned sha256)"):
        zoo.load(NAME)


def test_push_zoo_round_trips_through_the_local_hub(tiny_bundle, hub_server, monkeypatch, capsys):
    model, _ = tiny_bundle
    assert cli_main(["push-zoo", "zoo-org", "--tag", "v1.0"]) == 0
    assert f"zoo-org/{NAME}" in capsys.readouterr().out
    card = HfApi().hf_hub_download(f"zoo-org/{NAME}", "README.md", cache_dir=None)
    assert "zalando-datasets/fashion_mnist" in Path(card).read_text()
    monkeypatch.setenv("LTZOO_HUB_ORG", "zoo-org")
    loaded = zoo.load(NAME)
    assert same_weights(model, loaded)
    assert loaded.config.extra["source"] == {"repo_id": f"zoo-org/{NAME}", "revision": "main"}
    assert same_weights(model, zoo.load(f"zoo-org/{NAME}@v1.0"))


def test_bundle_script_writes_a_pinned_manifest(tmp_path, capsys):
    torch.manual_seed(1)
    zoo.Ensemble(get_entry(NAME).build_config()).save_pretrained(tmp_path / "m")
    script = runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "benchmarks/bundle_weights.py")
    )
    assert script["main"](["--root", str(tmp_path / "b"), str(tmp_path / "m")]) == 0
    assert f"{NAME}: " in capsys.readouterr().out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    files = manifest["models"][NAME]["files"]
    assert set(files) == {WEIGHTS_NAME, "config.json"} and len(files[WEIGHTS_NAME]["sha256"]) == 64


def _fmnist_test_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ltzoo.training.data import read_idx

    images = read_idx(FMNIST_TEST / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FMNIST_TEST / "t10k-labels-idx1-ubyte.gz")[:n]
    return torch.from_numpy(images.copy()).float().div(255).unsqueeze(1), torch.from_numpy(
        labels.astype("int64")
    )


def test_every_fmnistlt_model_loads_offline(tmp_path, monkeypatch):
    """Every Fashion-MNIST-LT model shipped with the package loads offline from an empty
    cache and reaches its measured top-1 (1000 test images, +-3 points)."""
    monkeypatch.delenv(bundle.BUNDLE_ENV, raising=False)
    manifest = bundle.read_manifest()
    names = [r["name"] for r in list_models() if r["dataset"] == "fashion_mnist_lt"]
    shipped = [n for n in names if n in manifest]
    if not shipped:
        pytest.skip(f"no Fashion-MNIST-LT weights bundled yet under {bundle.bundle_root()}")
    if not (FMNIST_TEST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST test set not installed under {FMNIST_TEST}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    images, labels = _fmnist_test_images(1000)
    for name in shipped:
        model = zoo.load(name)
        assert model.config.extra["source"]["bundled"] == name
        pre = model.config.preprocess
        x = (images - torch.tensor(pre.mean).view(1, -1, 1, 1)) / torch.tensor(pre.std).view(
            1, -1, 1, 1
        )
        with torch.inference_mode():
            top1 = (model(x).argmax(1) == labels).float().mean().item() * 100
        expected = manifest[name].get(
            "top1", get_entry(name).measured["shipped"]["accuracy"]["top1"]
        )
        assert abs(top1 - expected) <= 3.0, f"{name}: top-1 {top1:.1f} vs {expected:.1f}"
