"""The shared engine: recipe validation, kill -9 + resume bit-identity, torchrun DDP."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltzoo.training.config import ConfigError, load_recipe
from ltzoo.training.engine import lr_lambda

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
        ("run.precision=fp16", "run.precision must be one of auto, fp32, bf16"),
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
    from ltzoo.cli import main

    assert main(["train", "fmnistlt_ce", "optim.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_every_recipe_loads():
    from ltzoo.training.config import RECIPES_DIR

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


@pytest.mark.parametrize(
    "warmup_epochs, steps_per_epoch, warmup_steps",
    [(0.25, 5, 2), (0.1, 30, 3), (1.5, 7, 11), (2, 10, 20)],
)
def test_fractional_warmup_never_exceeds_the_lr(warmup_epochs, steps_per_epoch, warmup_steps):
    cfg = load_recipe(
        "fmnistlt_ce",
        ["optim.epochs=4", f"optim.warmup_epochs={warmup_epochs}", "optim.milestones=[]"],
    )
    fn = lr_lambda(cfg, steps_per_epoch)
    values = [fn(step) for step in range(4 * steps_per_epoch)]
    warm, after = values[:warmup_steps], values[warmup_steps:]
    assert warm == sorted(warm) and max(warm) <= 1.0
    assert warm[-1] == 1.0 and warm[-2] < 1.0  # the warm-up ends exactly on the recipe's lr
    assert after == [1.0] * len(after)


def test_issue_27_scaled_warmup_keeps_the_recipe_lr():
    """``optim.epochs=2 run.max_steps_per_epoch=5`` on fmnistlt_ce (lr 0.05, 5 of 40 epochs of
    warm-up, scaled to 0.25 epochs = 1.25 steps) once ran its second step at lr 0.08."""
    cfg = load_recipe("fmnistlt_ce", ["optim.epochs=2", "run.max_steps_per_epoch=5"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, 5))
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(cfg.optim.lr) == 0.05
    assert lrs[:2] == pytest.approx([0.025, 0.05])


def _train_cmd(run_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ltzoo",
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


def _torchrun(args: list[str], timeout: float = 600) -> None:
    """Two CPU ranks (gloo) under ``torch.distributed.run``; on failure or timeout the whole
    process group goes, and the assertion shows both outputs' tails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [*cmd, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"stdout: {out[-2000:]}\nstderr: {err[-8000:]}"


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    # ECL with the MoCo branch (NCL's too) and class weights every rank must keep the same
    [["fmnistlt_ce"], ["fmnistlt_ncl"], ["fmnistlt_ecl", "method_params.contrastive_weight=1.0"]],
    ids=["ce", "ncl", "ecl-moco"],
)
def test_torchrun_two_process_gloo(tmp_path, recipe):
    run_dir = tmp_path / "ddp"
    _torchrun(["-m", "ltzoo", "train", *recipe, *TINY, "optim.epochs=2", "--out", str(run_dir)])
    ranks = json.loads((run_dir / "ddp.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert (
        ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    )  # identical weights on both ranks
    shard0, shard1 = set(ranks[0]["last_epoch_indices"]), set(ranks[1]["last_epoch_indices"])
    assert shard0 and shard1 and not shard0 & shard1  # each rank saw its own shard
    # one checkpoint, written by rank 0 only (no temp files left by a second writer)
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint.pt"]
    assert (run_dir / "model" / "model.safetensors").is_file()


# --- issue 18.7 / 19.8: everything the run would reject, rejected at load (and by --dry-run) ---
@pytest.mark.parametrize(
    "recipe, override, message",
    [
        ("fmnistlt_ce", "data.name=bogus", "unknown data.name 'bogus'"),
        ("fmnistlt_ce", "run.device=tpu", "run.device must be auto, cpu, cuda or cuda:N"),
        ("fmnistlt_ncl", "method_params.num_hard=50", "method_params.num_hard must be in [1, 10]"),
        ("fmnistlt_ce", "optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("fmnistlt_ce", "optim.momentum=2", "optim.momentum must be in [0, 1)"),
        ("fmnistlt_ce", "optim.gamma=-1", "optim.gamma must be > 0 and finite"),
        ("fmnistlt_ce", "optim.gamma=0", "optim.gamma must be > 0 and finite"),
        ("fmnistlt_ce", "optim.lr=inf", "optim.lr must be > 0 and finite"),
        ("fmnistlt_ce", "optim.lr=nan", "optim.lr must be > 0 and finite"),
        ("fmnistlt_ce", "run.eval_batch_size=0", "run.eval_batch_size must be >= 1"),
        ("fmnistlt_ce", "optim.batch_size=100000", "larger than the training set ("),
        ("fmnistlt_ce", "run.max_steps_per_epoch=-1", "run.max_steps_per_epoch must be >= 0"),
        ("fmnistlt_ce", "data.val_max_per_class=-1", "data.val_max_per_class must be >= 0"),
        (
            "imagenetlt_resnet50_ce",
            "data.val_max_per_class=50",
            "data.val_max_per_class applies to fashion_mnist_lt",
        ),
    ],
)
def test_dry_run_rejects_what_the_run_would(recipe, override, message, capsys):
    from ltzoo.cli import main

    assert main(["train", recipe, override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_rejected_at_load():
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        load_recipe("fmnistlt_ce", ["run.device=cuda"])


def test_overriding_only_epochs_scales_the_schedule(capsys):
    from ltzoo.cli import main

    base = load_recipe("fmnistlt_ce").optim
    assert base.milestones and base.warmup_epochs  # the recipe has both
    notes: list[str] = []
    cfg = load_recipe("fmnistlt_ce", ["optim.epochs=1"], notes)
    assert (cfg.optim.milestones, cfg.optim.warmup_epochs) == ([], 0.0)
    assert notes and f"optim.epochs {base.epochs} -> 1" in notes[0]
    cfg = load_recipe("fmnistlt_ce", [f"optim.epochs={2 * base.epochs}"])
    doubled = ([2 * m for m in base.milestones], 2 * base.warmup_epochs)
    assert (cfg.optim.milestones, cfg.optim.warmup_epochs) == doubled
    cfg = load_recipe("fmnistlt_ce", [f"optim.epochs={2 * base.epochs}", "optim.milestones=[1]"])
    assert (cfg.optim.milestones, cfg.optim.warmup_epochs) == ([1], doubled[1])  # explicit: kept
    assert main(["train", "fmnistlt_ce", "optim.epochs=1", "--dry-run"]) == 0
    assert f"scaled optim.milestones {base.milestones} -> []" in capsys.readouterr().out


# --- issue 18.2: --resume continues with the run's own settings --------------------------------
def _recorded_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A run directory as an interrupted `ltzoo train` leaves it (run.json + a checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_recipe("fmnistlt_ce", overrides)
    (run / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "data": {}}))
    (run / "checkpoint.pt").write_bytes(b"")
    return run


def test_resume_takes_the_settings_of_run_json(tmp_path, capsys):
    from ltzoo.cli import main
    from ltzoo.training.config import RESUME_MAY_CHANGE

    run = _recorded_run(tmp_path, ["optim.epochs=3", "optim.lr=0.05"])
    opts = ["--out", str(run), "--resume", "--dry-run"]
    assert main(["train", "fmnistlt_ce", *opts]) == 0
    out = capsys.readouterr().out
    optim = json.loads(out[out.index("{") :])["optim"]
    recorded = json.loads((run / "run.json").read_text())["config"]["optim"]
    assert (optim["epochs"], optim["lr"]) == (3, 0.05) and optim == recorded
    assert main(["train", "fmnistlt_ce", "optim.epochs=3", *opts]) == 0  # same command + --resume
    capsys.readouterr()
    assert main(["train", "fmnistlt_ce", "optim.lr=0.1", *opts]) == 2
    assert "would change them: optim.lr 0.05 -> 0.1" in capsys.readouterr().err
    assert main(["train", "fmnistlt_ce", "run.threads=2", "data.workers=0", *opts]) == 0
    out = capsys.readouterr().out  # how fast it goes and where the data is may change
    assert json.loads(out[out.index("{") :])["run"]["threads"] == 2
    assert main(["train", "fmnistlt_ce", "run.precision=bf16", *opts]) == 2  # what it computes
    assert "would change them: run.precision 'auto' -> 'bf16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # --help names each one a resume may change
    assert all(key in shown for key in RESUME_MAY_CHANGE)
    assert main(["train", "fmnistlt_ncl", *opts]) == 2
    assert "is a run of recipe 'fmnistlt_ce'" in capsys.readouterr().err
    (run / "checkpoint.pt").unlink()
    assert main(["train", "fmnistlt_ce", *opts]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so(tmp_path):
    run = _recorded_run(tmp_path, TINY)  # an empty checkpoint: resuming would fail on it
    (run / "results.json").write_text('{"accuracy": {}}')
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    stamp = (run / "results.json").stat().st_mtime_ns
    done = subprocess.run(
        [sys.executable, "-m", "ltzoo", "train", "fmnistlt_ce", "--out", str(run), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{run} is already complete: the model is in {run / 'model'} and its results in "
        f"{run / 'results.json'} (nothing to resume)"
    ]
    assert (run / "results.json").stat().st_mtime_ns == stamp


@needs_fmnist
def test_ctrl_c_during_train_says_how_to_resume(tmp_path):
    from ltzoo.cli import main

    run = tmp_path / "run"
    # A shell's background job (`pytest &`) starts with SIGINT ignored, which a child inherits
    # through exec; a handled SIGINT is reset to the default there, as a terminal's process has.
    # (Not preexec_fn: it is unsafe in a process with threads, as torch's.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            _train_cmd(run, 200),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    said = [line for line in err.splitlines() if "--resume" in line]
    assert len(said) == 1, err[-3000:]
    assert re.search(r"ltzoo train: interrupted: epoch \d+/200 is checkpointed in ", said[0])
    command = said[0].split("continue with: ")[1]
    assert command == f"ltzoo train fmnistlt_ce --out {run} --resume"
    # the command given resumes this run (--dry-run: validated, not trained)
    assert main([*command.split()[1:], "--dry-run"]) == 0


class _Crash(Exception):
    pass


@needs_fmnist
@pytest.mark.slow
def test_resume_after_a_crash_logs_every_epoch_once(tmp_path, monkeypatch):
    import ltzoo.training.engine as engine
    from ltzoo.cli import main

    run, real_save, saves = tmp_path / "run", engine.atomic_save, []

    def crash_at_second_save(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise _Crash  # killed after epoch 1 trained, before its checkpoint
        real_save(obj, path)

    monkeypatch.setattr(engine, "atomic_save", crash_at_second_save)
    with pytest.raises(_Crash):
        main(["train", "fmnistlt_ce", *TINY, "optim.epochs=2", "run.threads=1", "--out", str(run)])
    recorded = json.loads((run / "run.json").read_text())["config"]
    monkeypatch.setattr(engine, "atomic_save", real_save)
    resumed = ["run.threads=2", "--out", str(run), "--resume"]  # how fast, not what: may change
    assert main(["train", "fmnistlt_ce", *resumed]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # 2 epochs (run.json), no repeat
    assert [r["threads"] for r in rows] == [1, 2]  # each epoch says what it trained on
    recorded["run"]["threads"] = 2
    assert json.loads((run / "run.json").read_text())["config"] == recorded
    assert (run / "model" / "model.safetensors").is_file()


def test_disk_full_during_checkpoint_save(tmp_path, monkeypatch):
    import ltzoo.training.engine as engine

    def full_disk(obj, fh):
        fh.write(b"partial checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.torch, "save", full_disk)
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError, match=re.escape(f"no space left on device: {target}")):
        engine.atomic_save({"epoch": 0}, target)
    assert list(tmp_path.iterdir()) == []  # the .tmp file is gone


# --- issue 17: the Places-LT recipe's ImageNet-pretrained backbone reaches the builder --------
def test_imagenet_pretrained_backbone_reaches_the_builder(tmp_path, monkeypatch):
    """``pretrained_backbone = "imagenet"`` goes from the recipe through the engine to
    torchvision's weights API; only the download itself is stubbed (no internet here)."""
    from types import SimpleNamespace

    import torch.hub
    import torchvision.models as tvm

    from ltzoo.training.engine import Trainer

    one_expert = ["model_overrides.num_experts=1", 'model_overrides.layout="single"']
    cfg = load_recipe("placeslt_resnet152_ncl", [*one_expert, "run.device=cpu"])
    assert cfg.pretrained_backbone == "imagenet"
    torch.manual_seed(0)
    published = tvm.resnet152().state_dict()  # stands in for the downloaded file
    urls = []

    def download(url, dst, hash_prefix=None, progress=True):
        urls.append(url)
        torch.save(published, dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    classes = 365
    split = SimpleNamespace(
        class_counts=[5] * classes, class_names=[f"c{i}" for i in range(classes)], info={}
    )
    model = Trainer(cfg, tmp_path / "run").build_model(split)
    assert urls == [tvm.ResNet152_Weights.DEFAULT.url]
    body = model.experts[0].body
    torch.testing.assert_close(body[0][0].weight, published["conv1.weight"])
    torch.testing.assert_close(body[4][2].conv3.weight, published["layer4.2.conv3.weight"])
    with pytest.raises(ConfigError, match="pretrained_backbone must be"):
        load_recipe("placeslt_resnet152_ncl", ["pretrained_backbone=imagenet21k"])


@needs_fmnist
def test_the_progress_bar_follows_tqdm_mininterval_in_logs(tmp_path):
    """Background runs log to a file: TQDM_MININTERVAL=30 must mean a line per 30 s, not per step."""
    cmd = _train_cmd(tmp_path / "run", 1)
    cmd.insert(cmd.index("--out"), "run.max_steps_per_epoch=12")
    env = {**os.environ, "TQDM_MININTERVAL": "1000"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    redraws = done.stderr.count("epoch 1/1:")
    assert 1 <= redraws <= 3, done.stderr[-2000:]  # 12 steps: 12+ redraws without throttling


_RANK_WORKER = '''
import json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from ltzoo.training.config import load_recipe
from ltzoo.training.distributed import cleanup, shuffle_across_ranks
from ltzoo.training.engine import Trainer
from ltzoo.training.methods import METHODS
from ltzoo.zoo import Ensemble
from ltzoo.zoo.registry import get_entry

out = sys.argv[1]
trainer = Trainer(load_recipe("fmnistlt_ncl"), out)  # joins torchrun's gloo group
rank = trainer.dist.rank
counts = [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
cfg = load_recipe("fmnistlt_ncl")
torch.manual_seed(0)  # the same initial queues, as the engine's broadcast at the start makes them
ncl = METHODS["ncl"](
    Ensemble(get_entry(cfg.model).build_config(class_counts=counts)),
    counts,
    METHODS["ncl"].Params.from_dict(
        {**cfg.method_params, "contrastive_weight": 1.0, "moco_queue": 8}
    ),
)
moco = ncl.moco
dim = moco.queues.shape[2]
# three keys per expert, valued (rank + 1) * 10 + expert so the test can tell whose they are
moco.pending_keys = [torch.full((3, dim), (rank + 1) * 10.0 + e) for e in range(len(moco.heads))]
moco.after_step(ncl.model)


class Lonely(torch.nn.Module):
    """Its loss at step s0 is non-finite on rank 1 only."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.after_steps = 0

    def forward(self, x, y):
        bad = float("nan") if rank == 1 and y == "s0" else 1.0  # y: the step's name
        return (self.w * x).sum() * bad, {}

    def after_step(self):
        self.after_steps += 1


lonely = Lonely()
ddp = DistributedDataParallel(lonely)
opt = torch.optim.SGD(lonely.parameters(), lr=0.1)
scaler = trainer.grad_scaler()
steps = [trainer.train_step(ddp, lonely, opt, scaler, torch.ones(1), s, s) for s in ("s0", "s1")]
ecl_cfg = load_recipe("fmnistlt_ecl", ["method_params.contrastive_weight=0"])
ecl = METHODS["ecl"](
    Ensemble(get_entry(ecl_cfg.model).build_config(class_counts=counts)),
    counts,
    METHODS["ecl"].Params.from_dict(ecl_cfg.method_params),
)
# rank 0's batch holds classes 0-1 only, rank 1's classes 8-9: each rank's weights see both
ecl.pending_gap = (torch.full((4,), 0.5 + rank), torch.tensor([0, 1, 0, 1]) + 8 * rank)
ecl.after_step()
torch.manual_seed(rank)  # each rank draws another order: rank 0's must be the one used
own = torch.arange(8.0).view(8, 1) + 100 * rank  # rank 0: 0..7, rank 1: 100..107
share, restore = shuffle_across_ranks(own)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({
        "ecl_class_gap": ecl.class_gap.tolist(),
        "ecl_class_weights": ecl.class_weights.tolist(),
        "shuffled_share": share.flatten().tolist(),
        "restored": restore(share * 2).flatten().tolist(),
        "queue_first_values": moco.queues[:, :, 0].tolist(),
        "queue_ptr": moco.queue_ptr.tolist(),
        "stepped": [s is not None for s in steps],
        "w": lonely.w.item(),
        "after_steps": lonely.after_steps,
    }, f)
dist.barrier()  # neither rank leaves while the other still talks to it
cleanup(trainer.dist)
'''


@pytest.mark.slow
def test_torchrun_ranks_share_moco_keys_and_skip_together(tmp_path):
    """Under torchrun every rank queues every rank's MoCo keys (the official NCL gathers them)
    and runs its key encoder on a batch shuffled across ranks (shuffle BN), ECL's class weights
    follow every rank's batch, and a loss that
    is non-finite on one rank skips the step on all, instead of leaving the other ranks
    waiting in the gradient all-reduce."""
    worker = tmp_path / "worker.py"
    worker.write_text(_RANK_WORKER)
    _torchrun([str(worker), str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["queue_first_values"] == ranks[1]["queue_first_values"]
    for expert, queue in enumerate(ranks[0]["queue_first_values"]):
        # rank 0's 3 keys, then rank 1's, on both ranks
        assert queue[:6] == [10.0 + expert] * 3 + [20.0 + expert] * 3
    assert all(r["queue_ptr"] == [6] * len(r["queue_ptr"]) for r in ranks)
    # step s0 skipped on both ranks (no update, no after_step), then s1 taken on both
    assert [r["stepped"] for r in ranks] == [[False, True]] * 2
    assert [r["after_steps"] for r in ranks] == [1, 1]
    assert ranks[0]["w"] == ranks[1]["w"] == pytest.approx(1.0 - 0.1)
    # ECL's class weights come from every rank's batch, so they stay the same on every rank
    assert ranks[0]["ecl_class_weights"] == ranks[1]["ecl_class_weights"]
    gap = ranks[0]["ecl_class_gap"]
    assert gap[0] > 0 and gap[9] > gap[0] and gap[2:8] == [0.0] * 6
    # shuffle BN: the key encoder's batches mix the ranks' images (one order for all), and
    # each rank gets its own images' outputs back in their order
    shares = [r["shuffled_share"] for r in ranks]
    assert sorted(shares[0] + shares[1]) == [*range(8), *range(100, 108)]
    assert any(v >= 100 for v in shares[0]) and any(v < 100 for v in shares[1])
    assert [r["restored"] for r in ranks] == [[2.0 * v + 200 * r for v in range(8)] for r in (0, 1)]
