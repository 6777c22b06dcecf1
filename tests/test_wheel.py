"""A wheel installed outside the repository carries its package data: model cards can be
written (zoo/data/card_template.md), recipes found and bundled weights loaded offline by
name, without the source tree. Everything installs under the one ``ltzoo`` namespace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ltzoo.zoo.bundle import add_to_bundle, read_manifest
from ltzoo.zoo.ensemble import Ensemble
from ltzoo.zoo.registry import get_entry

ROOT = Path(__file__).resolve().parents[1]
#: what the wheel is built from (copied, so that the build leaves nothing in the shared tree)
SOURCES = ("pyproject.toml", "README.md", "ltzoo", "zoo", "training", "export", "serve")
NAME = "ce-resnet32-fmnistlt"

CHILD = """
import sys
from pathlib import Path
from ltzoo import zoo
assert Path(zoo.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), zoo.__file__
model = zoo.Ensemble(zoo.EnsembleConfig(num_experts=1, layout="single", dataset="fashion_mnist_lt"))
model.save_pretrained(sys.argv[2], card=True)
loaded = zoo.load(sys.argv[3])  # offline, empty cache: the copy bundled in the wheel
assert loaded.config.extra["source"]["bundled"] == sys.argv[3], loaded.config.extra
"""


def _pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet"]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_installed_wheel_writes_cards_and_loads_bundled_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(  # ltzoo/{zoo,training,export,serve} stay links, as in the repo
                ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, src / name)
    Ensemble(get_entry(NAME).build_config()).save_pretrained(tmp_path / "model")
    add_to_bundle(tmp_path / "model", src / "zoo" / "weights")
    _pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "dist"), ".", cwd=src)
    [wheel] = (tmp_path / "dist").glob("ltzoo-*.whl")
    # README says how big the wheel is and how many models it carries: still true
    stated = re.search(
        r"With (\d+) models the wheel is (\d+\.\d) MB", (ROOT / "README.md").read_text()
    )
    assert stated, "README no longer states the wheel size"
    assert int(stated[1]) == len(read_manifest()), "README's model count is out of date"
    assert abs(wheel.stat().st_size / 1e6 - float(stated[2])) <= 0.5, wheel.stat().st_size
    members = zipfile.ZipFile(wheel).namelist()
    top_level = {m.split("/")[0] for m in members if not m.split("/")[0].endswith(".dist-info")}
    assert top_level == {"ltzoo"}, top_level  # no generic `training`, `export`, `serve`, `zoo`
    assert "ltzoo/zoo/data/card_template.md" in members
    assert "ltzoo/zoo/data/measured.json" in members
    assert any(m.startswith("ltzoo/training/recipes/") and m.endswith(".toml") for m in members)
    assert f"ltzoo/zoo/weights/{NAME}/model.safetensors" in members
    assert "ltzoo/py.typed" in members
    assert "ltzoo/serve/static/index.html" in members  # the page at /

    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    # run outside the repo, with PYTHONPATH shadowing the editable install
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    env.pop("LTZOO_BUNDLE_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(site), str(outside / "model"), NAME],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    card = (outside / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "zalando-datasets/fashion_mnist" in card
