"""CIFAR-10-LT from JPEG class folders, the CIFAR-10-LT recipes, the prepared GPU check.

The shared JPEG copy of CIFAR-10 is found through ``LTZOO_CIFAR10_JPEG`` (scripts/test.sh
extracts ``../shared/data/cifar10-jpeg.tar.gz`` into a temporary directory and sets it), else
read straight from that tar; tests that need it skip when neither exists.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import TINY

from ltzoo.training.config import load_recipe
from ltzoo.training.data import build_lt_dataset, lt_counts
from ltzoo.training.data import datasets as ds
from ltzoo.training.data.datasets import CIFAR10_JPEG_VARIANT, read_jpeg_tree
from ltzoo.training.engine import train
from ltzoo.zoo.datasets_meta import CIFAR10_CLASSES

ROOT = Path(__file__).resolve().parents[1]
SHARED_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PAPER_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
RECIPES = [f"cifar10lt_r100_{m}" for m in ("ce", "bs", "ncl", "ecl", "cbd")] + ["cifar10lt_r50_ncl"]


def _shared_cifar() -> str:
    path = os.environ.get("LTZOO_CIFAR10_JPEG") or (str(SHARED_TAR) if SHARED_TAR.is_file() else "")
    if not path:
        pytest.skip(
            "CIFAR-10 JPEG copy not found: set LTZOO_CIFAR10_JPEG to ../shared/data/"
            "cifar10-jpeg.tar.gz extracted (scripts/test.sh does)"
        )
    return path


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Decoded-array cache in a per-session directory (never the user's ~/.cache)."""
    monkeypatch.setenv("LTZOO_CACHE", str(tmp_path_factory.getbasetemp() / "ltzoo-cache"))


def _fake_tree(root: Path, train_per_class: int = 12, test_per_class: int = 3) -> Path:
    """A CIFAR-10-shaped JPEG tree (32x32 RGB, the 10 class folders) with random pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in CIFAR10_CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / cls / f"{i:04d}.jpg", quality=90)
    return root


def test_paper_profile_rounding():
    assert lt_counts(5000, 10, 100) == PAPER_R100
    assert lt_counts(5000, 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


def test_jpeg_dir_and_tar_decode_identically_to_pil(tmp_path):
    tree = _fake_tree(tmp_path / "tree")
    tar_path = tmp_path / "copy.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tree, arcname="cifar10")  # one top-level folder, as many tarballs have
    a = read_jpeg_tree(tree, CIFAR10_CLASSES)
    b = read_jpeg_tree(tar_path, CIFAR10_CLASSES)
    for split, n in (("train", 120), ("test", 30)):
        assert a[split][0].shape == (n, 32, 32, 3) and a[split][0].dtype == np.uint8
        assert np.array_equal(a[split][0], b[split][0])
        assert np.array_equal(a[split][1], b[split][1])
    # sorted by (label, file name); pixels are PIL's decoding of the file
    assert a["train"][1].tolist() == np.repeat(np.arange(10), 12).tolist()
    with Image.open(tree / "train" / "bird" / "0005.jpg") as im:
        assert np.array_equal(a["train"][0][2 * 12 + 5], np.asarray(im.convert("RGB")))


def test_decoded_arrays_come_from_the_disk_cache_the_second_time(tmp_path, monkeypatch):
    tree = _fake_tree(tmp_path / "tree", 2, 1)
    read_jpeg_tree(tree, CIFAR10_CLASSES)
    assert list((Path(os.environ["LTZOO_CACHE"]) / "datasets").glob("jpeg-tree-*.npz"))
    ds._read_jpeg_tree_cached.cache_clear()

    def no_decode(*a):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(ds, "_decode_tree", no_decode)
    assert read_jpeg_tree(tree, CIFAR10_CLASSES)["test"][0].shape == (10, 32, 32, 3)


def test_unknown_class_folder_is_a_clear_error(tmp_path):
    tree = _fake_tree(tmp_path / "tree", 1, 1)
    (tree / "train" / "dragon").mkdir()
    Image.new("RGB", (32, 32)).save(tree / "train" / "dragon" / "0.jpg")
    with pytest.raises(ValueError, match="unknown class folder train/dragon"):
        read_jpeg_tree(tree, CIFAR10_CLASSES)


def test_lt_split_from_jpeg_tree_seeded_balanced_val_full_test(tmp_path):
    tree = _fake_tree(tmp_path / "tree")
    split = build_lt_dataset("cifar10_lt", root=str(tree), rho=5, n_max=10, val_per_class=2)
    assert split.class_counts == lt_counts(10, 10, 5)
    assert np.bincount(split.val.labels).tolist() == [2] * 10
    assert len(split.test) == 30 and np.bincount(split.test.labels).tolist() == [3] * 10
    assert not set(split.train.indices) & set(split.val.indices)
    assert split.info["variant"] == CIFAR10_JPEG_VARIANT
    again = build_lt_dataset("cifar10_lt", root=str(tree), rho=5, n_max=10, val_per_class=2)
    other = build_lt_dataset("cifar10_lt", root=str(tree), rho=5, n_max=10, seed=1)
    assert again.train.indices == split.train.indices != other.train.indices


def _first_jpeg(root: str) -> bytes:
    if Path(root).is_dir():
        return next(Path(root).rglob("*.jpg")).read_bytes()
    with tarfile.open(root) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


def test_shared_jpeg_copy_is_quality_75_with_420_chroma_as_readme_says():
    """What "lossy" means for the JPEG copy: libjpeg's standard tables at 50 % (quality 75) and
    4:2:0 chroma, i.e. colour kept at 16x16 on 32x32 images."""
    from PIL import JpegImagePlugin

    image = Image.open(io.BytesIO(_first_jpeg(_shared_cifar())))
    standard_luma = [16, 11, 10, 16, 24, 40, 51, 61]  # the first row of JPEG Annex K's table
    assert list(image.quantization[0])[:8] == [(q * 50 + 50) // 100 for q in standard_luma]
    assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0
    assert "quality 75, 4:2:0 chroma" in (ROOT / "README.md").read_text()


def test_shared_jpeg_copy_gives_the_papers_profile():
    root = _shared_cifar()
    with pytest.warns(UserWarning, match="0 per class instead of 20"):
        split = build_lt_dataset("cifar10_lt", root=root, rho=100)  # head keeps all 5,000
    assert split.class_counts == PAPER_R100
    assert np.bincount(split.train_labels).tolist() == PAPER_R100
    assert split.val is None and np.bincount(split.test.labels).tolist() == [1000] * 10
    assert split.info["variant"] == CIFAR10_JPEG_VARIANT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r50 = build_lt_dataset("cifar10_lt", root=root, rho=50, n_max=4980, val_per_class=20)
    assert r50.class_counts[0] == 4980 and np.bincount(r50.val.labels).tolist() == [20] * 10
    assert not set(r50.train.indices) & set(r50.val.indices)


def test_val_from_train_keeps_the_papers_profile_but_the_heads_20():
    """The recipes' validation split: 20 images per class; only the head, which has no unused
    image, gives them from its training images (5,000 -> 4,980)."""
    root = _shared_cifar()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = build_lt_dataset(
            "cifar10_lt", root=root, rho=100, val_per_class=20, val_from_train=True
        )
    assert split.class_counts == [4980, *PAPER_R100[1:]]
    assert np.bincount(split.train_labels).tolist() == split.class_counts
    assert np.bincount(split.val.labels).tolist() == [20] * 10
    assert not set(split.train.indices) & set(split.val.indices)
    assert split.info["val_from_train"] is True and split.info["class_counts"][0] == 4980


def test_recipes_validation_split_grows_to_1000_where_a_class_can_spare_them():
    """data.val_max_per_class: the head still gives its 20 (from training), every other class
    up to 1,000 unused images; the training images and the 20-per-class images stay."""
    root = _shared_cifar()
    kw = {"root": root, "rho": 100, "val_per_class": 20, "val_from_train": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "smaller validation split" warning
        small = build_lt_dataset("cifar10_lt", **kw)
        split = build_lt_dataset("cifar10_lt", **kw, val_max_per_class=1000)
    assert split.train.indices == small.train.indices and split.class_counts == small.class_counts
    assert np.bincount(split.val.labels).tolist() == [20] + [1000] * 9
    assert set(small.val.indices) < set(split.val.indices)
    assert not set(split.train.indices) & set(split.val.indices)
    assert split.info["val_max_per_class"] == 1000 and "val_max_per_class" not in small.info
    assert split.info["sizes"]["val"] == 9020


def test_val_from_train_refuses_to_empty_a_class(tmp_path):
    tree = _fake_tree(tmp_path / "tree", 3, 1)
    with pytest.raises(ValueError, match="leaves a class no training image"):
        build_lt_dataset(
            "cifar10_lt", root=str(tree), rho=1, n_max=3, val_per_class=3, val_from_train=True
        )


@pytest.mark.parametrize("recipe", RECIPES)
def test_cifar10lt_recipes_validate(recipe):
    cfg = load_recipe(recipe)
    assert cfg.data.name == "cifar10_lt" and cfg.data.n_max == 5000
    assert cfg.data.rho == (50 if "_r50_" in recipe else 100)
    assert (cfg.data.val_per_class, cfg.data.val_max_per_class) == (20, 1000)


def test_ecl_mirrors_ncl_so_the_two_compare():
    """ECL's part 1 is NCL's collaborative learning: the same three independent experts
    (the shared stem is what the Fashion-MNIST-LT diversity study dropped), data and optimiser."""
    from ltzoo.zoo.registry import get_entry

    ncl, ecl = (get_entry(f"{m}-resnet32-cifar10lt-r100").build_config() for m in ("ncl", "ecl"))
    for key in ("backbone", "num_experts", "layout", "shared_stages", "head"):
        assert getattr(ecl, key) == getattr(ncl, key), key
    assert ecl.layout == "independent"
    ncl_cfg, ecl_cfg = load_recipe("cifar10lt_r100_ncl"), load_recipe("cifar10lt_r100_ecl")
    assert (ecl_cfg.data, ecl_cfg.optim) == (ncl_cfg.data, ncl_cfg.optim)


def test_registry_labels_paper_and_jpeg_copy_numbers():
    from ltzoo.zoo.registry import get_entry

    assert get_entry("ncl-resnet32-cifar10lt-r100").paper == {"top1": 84.7}
    assert get_entry("ncl-resnet32-cifar10lt-r50").paper == {"top1": 86.8}
    # the baselines' like-for-like numbers: one published source, our exact recipe
    ce, bs = (get_entry(f"{m}-resnet32-cifar10lt-r100") for m in ("ce", "bs"))
    assert (ce.paper, bs.paper) == ({"top1": 69.88}, {"top1": 76.37})
    assert ce.paper_ref == bs.paper_ref and "best on the test set" in ce.paper_ref
    for m in ("ce", "bs", "ncl", "ecl", "cbd"):
        entry = get_entry(f"{m}-resnet32-cifar10lt-r100")
        assert entry.recipe == f"cifar10lt_r100_{m}" and CIFAR10_JPEG_VARIANT in entry.notes


def test_summary_keeps_an_empty_shot_group_as_none():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_fmnistlt import summarise

    run = {
        "accuracy": {"top1": 70.0, "many": 80.0, "medium": 60.0, "few": None},
        "calibration": {"ece_before": 3.0, "ece_after": 2.0, "temperature": 1.0},
        "experts": [70.0],
    }
    out = summarise([run, run])
    assert out["few"]["mean"] is None and out["top1"]["mean"] == 70.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "ncl", "cbd", "ecl"])
def test_smoke_train_a_few_batches_on_the_shared_copy(tmp_path, method):
    """Every kind of run the plan trains gets to a model on the real copy: a run that would
    fail at its end (CBD's stages, ECL's heads) fails here, not after 15 hours."""
    cfg = load_recipe(
        f"cifar10lt_r100_{method}",
        [
            *TINY,
            "optim.epochs=1",
            "data.workers=0",
            f"data.root={_shared_cifar()}",
            "run.device=cpu",
            "data.val_max_per_class=50",  # the recipes' 1,000: 9,000 images to calibrate on
        ],
    )
    run = train(cfg, tmp_path / method)
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["accuracy"]["top1"] <= 100
    data = json.loads((run / "run.json").read_text())["data"]
    # the papers' profile but the head, which gives its 2 validation images (TINY)
    assert data["counts"] == [4998, *PAPER_R100[1:]]
    assert data["variant"] == CIFAR10_JPEG_VARIANT and data["val_from_train"] is True
    assert data["sizes"]["val"] == 2 + 9 * 50  # the head's 2, 50 of every other class


@pytest.mark.gpu
def test_cuda_amp_training_step_and_device_agnostic_eval(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ltzoo import zoo

    tree = _fake_tree(tmp_path / "tree", 20, 4)
    over = [*TINY, "optim.epochs=2", f"data.root={tree}", "data.n_max=16", "data.rho=4"]
    cfg = load_recipe("cifar10lt_r100_ncl", [*over, "run.device=cuda", "run.precision=auto"])
    run = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    model = zoo.load(str(run / "model"), pretrained=True)
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        cpu = model.cpu().eval()(x)
        gpu = model.cuda().eval()(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_device_check_plan_passes_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "device_check.sh"),
            "--plan",
            "--work",
            str(tmp_path / "w"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert report["plan_total_s"] < 8 * 60
    status = {k: v["status"] for k, v in report["parts"].items()}
    assert status.pop("setup") in ("ok", "partial")  # partial: no CIFAR-10 copy here
    assert status == dict.fromkeys(("train", "infer_eager", "infer_compile", "serve"), "ok")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and "device_check.log" in files and "infer.json" in files
    assert "time plan on the GPU machine" in out.stdout


def test_the_run_queue_keeps_two_streams_resumes_and_gives_up(monkeypatch, capsys):
    """A fake clock of polls: ``ce`` is already training, ``bs`` crashes every time."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    live = {"ce"}  # training now, started outside the queue
    done: set[str] = set()
    started: list[str] = []

    def fake_start(tag, threads=1):
        started.append(tag)
        live.add(tag)
        return type("Proc", (), {"pid": 1000 + len(started)})()

    def fake_sleep(_):  # one poll: every live run ends; all but bs end finished
        for tag in list(live):
            live.discard(tag)
            if tag != "bs":
                done.add(tag)

    monkeypatch.setattr(plan, "start", fake_start)
    monkeypatch.setattr(plan, "training_pid", lambda tag: 1 if tag in live else None)
    monkeypatch.setattr(plan, "finished", lambda tag: tag in done)
    monkeypatch.setattr(plan.time, "sleep", fake_sleep)
    plan.queue(["ce", "bs", "ncl", "cbd"], streams=2, max_starts=2)
    assert started == ["bs", "bs", "ncl", "cbd"]  # never a second ce; bs given up after 2
    assert "given up after 2 starts: ['bs']" in capsys.readouterr().out


def test_a_run_left_alone_gets_every_core_once_it_has_checkpointed(monkeypatch, capsys):
    """Two runs share the cores; once ``cbd`` ends, ``ecl`` (one thread) is restarted on all
    of them, but only right after a checkpoint, and only once."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    threads = {"cbd": 1, "ecl": 1}  # the runs training now, and on how many threads
    polls, calls = [], []
    ages = iter([500.0, 30.0, 30.0, 30.0])  # seconds since ecl's checkpoint, once it is alone

    def fake_sleep(_):
        polls.append(1)
        if len(polls) == 1:
            del threads["cbd"]  # cbd finishes after the first poll
        if len(polls) == 5:
            threads.clear()  # ecl finishes

    monkeypatch.setattr(plan, "CORES", 2)
    monkeypatch.setattr(plan, "training_pid", lambda tag: 1 if tag in threads else None)
    monkeypatch.setattr(plan, "running_threads", lambda tag: threads.get(tag))
    monkeypatch.setattr(plan, "finished", lambda tag: tag not in threads)
    monkeypatch.setattr(plan, "checkpoint_age_s", lambda tag: next(ages))
    stage = {"epoch": 100, "epochs": 200}
    monkeypatch.setattr(plan, "progress", lambda tag: {"stages": [stage]})
    monkeypatch.setattr(plan.time, "sleep", fake_sleep)

    def fake_restart(tag, n):
        calls.append((tag, n, len(polls) + 1))
        threads[tag] = n
        return type("Proc", (), {"pid": 7})()

    monkeypatch.setattr(plan, "restart", fake_restart)
    monkeypatch.setattr(plan, "start", lambda tag, n=1: pytest.fail(f"started {tag}"))
    plan.queue(["cbd", "ecl"], streams=2, poll_s=60.0)
    # poll 1: two runs, no restart; poll 2: alone but its checkpoint is 500 s old (mid-epoch);
    # poll 3: a checkpoint 30 s old: restarted on 2 threads; polls 4-5: already on 2
    assert calls == [("ecl", 2, 3)]
    assert "ecl trains alone: on 2 threads" in capsys.readouterr().out


def test_a_restart_waits_for_a_fresh_checkpoint_in_the_stage_in_progress(tmp_path, monkeypatch):
    """CBD's student (the run directory's own metrics) trains after its finished teachers."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    monkeypatch.setattr(plan, "RUNS", tmp_path)
    monkeypatch.setattr(plan, "running_threads", lambda tag: 1)
    out = plan.run_dir("cbd")

    def stage(path: Path, epochs_done: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "run.json").write_text(json.dumps({"config": {"optim": {"epochs": 200}}}))
        rows = [json.dumps({"epoch": e, "epoch_s": 60.0}) for e in range(epochs_done)]
        (path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
        (path / "checkpoint.pt").write_bytes(b"")

    stage(out / "teachers" / "t0", 200)
    stage(out / "teachers" / "t1", 200)
    stage(out, 50)
    assert plan.worth_restarting("cbd", 2, poll_s=60)
    assert not plan.worth_restarting("cbd", 1, poll_s=60)  # on every core already
    for ckpt in out.rglob("checkpoint.pt"):
        os.utime(ckpt, (time.time() - 120,) * 2)
    assert not plan.worth_restarting("cbd", 2, poll_s=60)  # mid-epoch: wait for the next
    stage(out, 199)
    assert not plan.worth_restarting("cbd", 2, poll_s=60)  # only the final epoch to go


def test_budget_and_eta_tell_epochs_on_more_threads_apart(tmp_path, monkeypatch):
    """A run restarted alone on 2 threads: its budget's median epoch stays the one-thread
    figure the README names, and its ETA follows the 2-thread pace it trains at now."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    monkeypatch.setattr(plan, "RUNS", tmp_path)
    out = plan.run_dir("ecl")
    out.mkdir(parents=True)
    config = {"optim": {"epochs": 10}, "data": {"augment": ["crop_flip"]}, "method_params": {}}
    (out / "run.json").write_text(json.dumps({"config": config}))
    rows = [{"epoch_s": 100.0}] * 3 + [{"epoch_s": 60.0, "threads": 2}] * 2  # older rows: 1
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    budget = plan.budget("ecl")
    assert budget["median_epoch_s"] == 100.0 and budget["epochs_by_threads"] == {"1": 3, "2": 2}
    assert budget["wall_h"] == round(420 / 3600, 2)
    import report  # README's run-time table says so

    assert report._alone_epochs(budget) == " (2 epochs alone on 2 threads)"
    assert report._alone_epochs({"epochs_by_threads": {"1": 5}}) == ""
    (stage,) = plan.progress("ecl")["stages"]
    assert stage["s_per_epoch"] == 60.0 and stage["eta_h"] == round(5 * 60 / 3600, 2)


def test_restart_stops_the_training_and_resumes_it_on_more_threads(tmp_path, monkeypatch):
    """A real process that looks like a run's training (its argv names ltzoo, train and the
    run directory) is stopped, and told on how many threads to go on."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    monkeypatch.setattr(plan, "RUNS", tmp_path)
    sleeper = "import time; time.sleep(120)"
    argv = [sys.executable, "-c", sleeper, "ltzoo", "train", "run.threads=1"]
    proc = subprocess.Popen([*argv, str(plan.run_dir("ecl"))], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while plan.running_threads("ecl") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plan.running_threads("ecl") == 1
        resumed = []
        monkeypatch.setattr(plan, "start", lambda tag, n: resumed.append((tag, n)) or proc)
        plan.restart("ecl", 2)
        assert proc.wait(timeout=10) == -signal.SIGTERM and resumed == [("ecl", 2)]
        assert plan.training_pid("ecl") is None
    finally:
        proc.kill()


def test_runs_started_together_share_the_cores(monkeypatch):
    """One poll each: the runs start, the clock ticks, they have finished."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    started: dict[str, int] = {}  # tag -> threads
    seen: list[dict[str, int]] = []  # what was training at each poll

    def fake_start(tag, n=1):
        started[tag] = n
        return type("Proc", (), {"pid": 1})()

    monkeypatch.setattr(plan, "CORES", 2)
    monkeypatch.setattr(plan, "start", fake_start)
    monkeypatch.setattr(plan, "training_pid", lambda tag: None)
    monkeypatch.setattr(plan, "finished", lambda tag: bool(seen))
    monkeypatch.setattr(plan.time, "sleep", lambda _: seen.append(dict(started)))
    plan.queue(["cbd", "ecl"], streams=2)
    assert seen == [{"cbd": 1, "ecl": 1}]
    started.clear()
    seen.clear()
    plan.queue(["ecl_e100"], streams=2)  # the last run left: every core from the start
    assert seen == [{"ecl_e100": 2}]
    started.clear()
    seen.clear()
    monkeypatch.setattr(plan, "training_pid", lambda tag: 1 if tag == "ecl" and not seen else None)
    monkeypatch.setattr(plan, "running_threads", lambda tag: 2)
    plan.queue(["ecl", "ecl_e100"], streams=2)  # ecl trains on every core already
    assert seen == [{"ecl_e100": 1}]


def test_the_queue_never_retrains_a_run_whose_numbers_landed(tmp_path, monkeypatch, capsys):
    """A new machine has no run directories: ``queue`` with no tags queues only the runs the
    results JSON lacks (CE and BS landed here), and with every run landed it trains nothing."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    results = tmp_path / "cifar10lt.json"
    monkeypatch.setattr(plan, "RESULTS", results)
    queued: list[list[str]] = []
    monkeypatch.setattr(plan, "queue", lambda tags, streams: queued.append(tags))
    monkeypatch.setattr(sys, "argv", ["train_cifar10lt.py", "queue", "--foreground"])
    results.write_text(json.dumps({"ce": {}, "bs": {}}))
    plan.main()
    assert queued == [[t for t in plan.PLAN if t not in ("ce", "bs")]]
    results.write_text(json.dumps({tag: {} for tag in plan.PLAN}))
    plan.main()
    assert len(queued) == 1 and "nothing to train" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["train_cifar10lt.py", "queue", "ce", "--foreground"])
    plan.main()  # named runs are what the user asked for: trained again
    assert queued[-1] == ["ce"]


def test_ship_bundles_each_new_finished_model_once_and_never_a_half_budget_run(
    tmp_path, monkeypatch
):
    """``ship``: ncl and ncl_e100 have finished, ce is bundled already; only ncl is bundled,
    under its registry name, and the report is re-rendered once."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_cifar10lt as plan

    from ltzoo.zoo import bundle
    from ltzoo.zoo.ensemble import Ensemble
    from ltzoo.zoo.registry import get_entry

    root = tmp_path / "weights"
    monkeypatch.setenv(bundle.BUNDLE_ENV, str(root))
    runs = {t: tmp_path / f"{t}-s0" for t in ("ce", "ncl", "ncl_e100")}
    for tag, run in runs.items():
        name = f"{tag.split('_')[0]}-resnet32-cifar10lt-r100"
        Ensemble(get_entry(name).build_config()).save_pretrained(run / "model")
    bundle.add_to_bundle(runs["ce"], root, name="ce-resnet32-cifar10lt-r100")
    reports: list[list[str]] = []
    monkeypatch.setattr(plan, "collect_results", dict)
    monkeypatch.setattr(plan, "finished", lambda tag: tag in runs)
    monkeypatch.setattr(plan, "run_dir", lambda tag: runs[tag])
    monkeypatch.setattr(plan.subprocess, "run", lambda argv, check: reports.append(argv))
    assert plan.ship() == ["ncl-resnet32-cifar10lt-r100"]
    assert sorted(bundle.read_manifest(root)) == [
        "ce-resnet32-cifar10lt-r100",
        "ncl-resnet32-cifar10lt-r100",
    ]
    assert len(reports) == 1 and reports[0][-1].endswith("report.py")
    assert plan.ship() == []  # nothing new the second time


def _shipped_cifar10lt() -> list[str]:
    from ltzoo.zoo import bundle
    from ltzoo.zoo.registry import list_models

    manifest = bundle.read_manifest()
    return [
        r["name"] for r in list_models() if r["dataset"] == "cifar10_lt" and r["name"] in manifest
    ]


def test_every_shipped_cifar10lt_model_loads_offline_and_predicts_as_measured(
    tmp_path, monkeypatch
):
    """Each CIFAR-10-LT model that ships loads offline from an empty cache, `predict` on 1,000
    test JPEGs (every 10th) reaches its measured calibrated top-1 (+-3 points), and an RGB
    image of another size is resized as the config says; its fused ONNX export agrees."""
    from huggingface_hub import constants

    from ltzoo import zoo
    from ltzoo.export.onnx import export_onnx, graph_feed, make_session
    from ltzoo.zoo import bundle
    from ltzoo.zoo.preprocess import Preprocess

    names = _shipped_cifar10lt()
    if not names:
        pytest.skip("no CIFAR-10-LT weights bundled yet")
    monkeypatch.delenv(bundle.BUNDLE_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    test = build_lt_dataset("cifar10_lt", root=_shared_cifar(), rho=100, val_per_class=0).test
    picked = range(0, len(test.labels), 10)
    images = [Image.fromarray(test.images[i].numpy()) for i in picked]
    labels = torch.tensor([test.labels[i] for i in picked])
    odd = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 41, 3), np.uint8))
    manifest = bundle.read_manifest()
    for name in names:
        model = zoo.load(name)
        assert model.config.extra["source"]["bundled"] == name
        assert manifest[name]["files"]["model.safetensors"]["sha256"]
        probs = torch.cat([model.predict(images[i : i + 250]).probs for i in range(0, 1000, 250)])
        top1 = (probs.argmax(1) == labels).float().mean().item() * 100
        expected = model.config.metrics["accuracy_calibrated"]
        assert abs(top1 - expected) <= 3.0, f"{name}: top-1 {top1:.1f} vs {expected:.1f}"
        assert model.predict(odd).probs.shape == (1, 10)
        # the fused ONNX export (experts + combination + calibration) returns the same
        onnx_path = export_onnx(model, tmp_path / f"{name}.onnx")
        pixels = torch.stack([Preprocess(model.config.preprocess)(im) for im in images[:8]])
        session = make_session(onnx_path)
        (graph,) = session.run(["probs"], graph_feed(session, pixels.numpy()))
        np.testing.assert_allclose(graph, probs[:8].numpy(), atol=1e-4)


def test_a_shipped_cifar10lt_model_serves_real_jpegs_over_http(tmp_path):
    """`ltzoo serve NAME` on a shipped CIFAR-10-LT model, offline from an empty cache: a test
    JPEG as uploaded and an RGB PNG of another size come back with the CIFAR-10 class names and
    the calibrated probabilities `predict` gives for the same decoded images."""
    import httpx
    from serving import Server, running

    from ltzoo import zoo

    names = _shipped_cifar10lt()
    if not names:
        pytest.skip("no CIFAR-10-LT weights bundled yet")
    name, root = names[0], _shared_cifar()
    jpeg = _first_jpeg(root)
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 57, 3), np.uint8)).save(
        png, "PNG"
    )
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    server = Server([name, "--threads", "1"], tmp_path / "serve.log", env=offline)
    with running({"cifar": server}), httpx.Client(base_url=server.url, timeout=60) as client:
        replies = [
            client.post(
                "/predict",
                files={"file": (f"x.{kind}", data, f"image/{kind}")},
                data={"top_k": "10"},
            )
            for kind, data in (("jpeg", jpeg), ("png", png.getvalue()))
        ]
    model = zoo.load(name)
    for reply, data in zip(replies, (jpeg, png.getvalue()), strict=True):
        assert reply.status_code == 200, reply.text
        got = {p["label"]: p["probability"] for p in reply.json()["predictions"]}
        assert sorted(got) == sorted(CIFAR10_CLASSES)
        probs = model.predict(Image.open(io.BytesIO(data))).probs[0]
        want = {CIFAR10_CLASSES[i]: float(p) for i, p in enumerate(probs)}
        assert got == pytest.approx(want, abs=1e-5)
