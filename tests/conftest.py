"""Shared test fixtures.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_CACHE when it is imported, so the
Hub environment is set here, before anything imports huggingface_hub or zoo: every test
session talks to a local Hub server (ltzoo.hub_server) and uses a fresh, empty cache.
"""

import atexit
import os
import shutil
import socket
import tempfile

with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as _sock:
    _sock.bind(("127.0.0.1", 0))
    HUB_PORT = _sock.getsockname()[1]
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="ltzoo-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ["HF_ENDPOINT"] = HUB_URL
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_var, None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """URL of a local Hub server (the HF_ENDPOINT of this session) on a temporary store."""
    from huggingface_hub import constants

    from ltzoo.hub_server import HubServer

    assert constants.ENDPOINT == HUB_URL, "huggingface_hub was imported before tests/conftest.py"
    with HubServer(tmp_path_factory.mktemp("hub-store"), port=HUB_PORT) as server:
        yield server.url


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    """The Hugging Face cache directory of this session (HF_HUB_CACHE)."""
    return Path(os.environ["HF_HUB_CACHE"])


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """imagefolder_lt with 10 classes: imbalanced train, 3 val and 6 test images per class."""
    import numpy as np
    from PIL import Image

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
