"""Downloaded weights are checked against the Hub's checksum; a bad copy never sticks (issue 19.4).

Each test runs its own local Hub (to reach its storage) and a fresh cache; hub_io reads
HF_ENDPOINT and HF_HUB_CACHE at call time, the real huggingface_hub client does the rest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from checks import same_weights
from huggingface_hub import HfApi, constants

from ltzoo import zoo
from ltzoo.hub_server import HubServer
from ltzoo.zoo import IntegrityError  # exported by the package
from ltzoo.zoo.ensemble import WEIGHTS_NAME

REPO = "test-org/integrity"


@pytest.fixture
def own_hub(tmp_path, monkeypatch):
    """(HfApi, storage dir) of a fresh local Hub used by hub_io, with an empty cache."""
    with HubServer(tmp_path / "store") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        yield HfApi(endpoint=server.url), tmp_path / "store"


def _publish(api: HfApi, store: Path, tmp_path: Path) -> tuple[zoo.Ensemble, Path]:
    """Upload a small model; return it and the server's blob file of its weights."""
    torch.manual_seed(0)
    model = zoo.Ensemble(zoo.EnsembleConfig(num_experts=1, layout="single")).eval()
    model.save_pretrained(tmp_path / "m")
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "m")
    sha = hashlib.sha256((tmp_path / "m" / WEIGHTS_NAME).read_bytes()).hexdigest()
    return model, store / "blobs" / sha[:2] / sha


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _cached_weight_blobs(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("blobs/*") if p.stat().st_size > 10_000]


def test_truncated_blob_served_once_does_not_poison_the_cache(own_hub, tmp_path):
    api, store = own_hub
    model, blob = _publish(api, store, tmp_path)
    good = blob.read_bytes()
    blob.write_bytes(good[: len(good) // 2])  # the Hub serves a truncated file
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        zoo.load(REPO)
    assert _cached_weight_blobs(tmp_path / "cache") == []  # evicted, nothing half-kept
    blob.write_bytes(good)  # the Hub is repaired: loading works again, no manual cleanup
    assert same_weights(model, zoo.load(REPO))


def test_flipped_byte_on_the_hub_does_not_load(own_hub, tmp_path):
    api, store = own_hub
    _, blob = _publish(api, store, tmp_path)
    _flip_byte(blob)
    with pytest.raises(IntegrityError, match=r"model.safetensors as served by the Hub"):
        zoo.load(REPO)


def test_flipped_byte_in_the_cache_is_refetched_or_evicted(own_hub, tmp_path, monkeypatch):
    api, store = own_hub
    model, _ = _publish(api, store, tmp_path)
    assert same_weights(model, zoo.load(REPO))
    [cached] = _cached_weight_blobs(tmp_path / "cache")
    _flip_byte(cached)
    assert same_weights(model, zoo.load(REPO))  # online: evicted and downloaded again

    [cached] = _cached_weight_blobs(tmp_path / "cache")
    _flip_byte(cached)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(IntegrityError, match="did not match the Hub's checksum and was removed"):
        zoo.load(REPO)
    assert _cached_weight_blobs(tmp_path / "cache") == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert same_weights(model, zoo.load(REPO))
