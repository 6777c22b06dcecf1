"""The shared engine: recipe validation, kill -9 + resume bit-identity, torchrun DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import ConfigError, load_recipe
from training.engine import lr_lambda

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist"
)
TINY = [
    "optim.warmup_epochs=0",
    "optim.milestones=[]",
    "run.max_steps_per_epoch=3",
    "data.val_per_class=2",
    "run.eval_subset=50",
    "optim.batch_size=16",
]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown key(s) ['optim.lrr']"),
        ("optim.lr='fast'", "optim.lr must be a number"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.milestones=[50]", "milestones"),
        ("data.rho=0.5", "data.rho"),
        ("method=nope", "unknown method"),
        ("model=nope", "no registered model"),
        ("method_params.num_hardd=3", "unknown key(s) ['method_params.num_hardd']"),
        ("bogus=1", "unknown top-level key"),
        ("run.amp=3", "run.amp must be true or false"),
    ],
)
def test_bad_recipe_values_fail_before_training(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("fmnistlt_ncl", [override])
    assert message in str(err.value)


def test_unknown_recipe_lists_available():
    with pytest.raises(ConfigError, match="fmnistlt_ncl"):
        load_recipe("no_such_recipe")


def test_cli_rejects_bad_key_with_exit_code_2(capsys):
    from zoo.cli import main

    assert main(["train", "fmnistlt_ce", "optim.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_every_recipe_loads():
    from training.config import RECIPES_DIR

    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    assert len(names) >= 10
    for name in names:
        load_recipe(name)


def test_warmup_then_multistep_schedule():
    cfg = load_recipe(
        "fmnistlt_ncl", ["optim.epochs=10", "optim.warmup_epochs=2", "optim.milestones=[6, 8]"]
    )
    fn = lr_lambda(cfg, steps_per_epoch=10)
    assert fn(0) == pytest.approx(1 / 20)
    assert fn(19) == pytest.approx(1.0)
    assert fn(59) == 1.0 and fn(60) == pytest.approx(0.1) and fn(80) == pytest.approx(0.01)


def _train_cmd(run_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zoo.cli",
        "train",
        "fmnistlt_ce",
        *TINY,
        f"optim.epochs={epochs}",
        "--out",
        str(run_dir),
        *extra,
    ]


@needs_fmnist
@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    subprocess.run(_train_cmd(ref, 4), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(
        _train_cmd(resumed, 4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    ckpt = resumed / "checkpoint.pt"
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpt.exists() and not (resumed / "results.json").exists(), (
        "run was not interrupted mid-way"
    )

    subprocess.run(
        _train_cmd(resumed, 4, "--resume"), check=True, env=env, capture_output=True, timeout=600
    )
    # Compare tensors, not file bytes: safetensors' JSON header order is not stable between saves.
    a = load_file(ref / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_fmnist
@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "zoo.cli",
        "train",
        "fmnistlt_ce",
        *TINY,
        "optim.epochs=2",
        "--out",
        str(run_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = json.loads((run_dir / "ddp.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert (
        ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    )  # identical weights on both ranks
    shard0, shard1 = set(ranks[0]["last_epoch_indices"]), set(ranks[1]["last_epoch_indices"])
    assert shard0 and shard1 and not shard0 & shard1  # each rank saw its own shard
    # one checkpoint, written by rank 0 only (no temp files left by a second writer)
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint.pt"]
    assert (run_dir / "model" / "model.safetensors").is_file()
