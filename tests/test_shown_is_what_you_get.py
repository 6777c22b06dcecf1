"""Issue #27: what a user is shown (`ltzoo list` / `info`, the cards, README, `ltzoo eval`)
is what the shipped model gives, and the method's mean over seeds is labelled as such."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(json.loads((ROOT / "zoo" / "weights" / "manifest.json").read_text())["models"])


def _ltzoo(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "ltzoo", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done


def _bundled_metrics(name: str) -> dict:
    return json.loads((ROOT / "zoo" / "weights" / name / "config.json").read_text())["metrics"]


def test_list_shows_the_shipped_model_and_the_mean_apart():
    """One-seed zoos (CIFAR-10-LT) show their shipped figures and no mean."""
    out = _ltzoo("list").stdout
    measured = json.loads((ROOT / "zoo/data/measured.json").read_text())
    assert "shipped" in out and "predict" in out and "mean ± std" in out
    for name in SHIPPED:
        m = _bundled_metrics(name)
        run = json.loads((ROOT / measured[name]["source"]).read_text())[
            measured[name]["benchmark_tag"]
        ]
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        mean = (
            f"{run['top1']['mean']:.2f} ± {run['top1']['std']:.2f} ({run['seeds']})"
            if run["seeds"] > 1
            else "-"
        )
        shown = f" {m['accuracy']['top1']:.2f} {m['accuracy_calibrated']:.2f} {mean} "
        assert re.sub(r"\s+", " ", shown) in re.sub(r"\s+", " ", row), (name, row)


@pytest.mark.parametrize("name", SHIPPED)
def test_info_and_card_show_the_shipped_models_own_figures(name):
    m = _bundled_metrics(name)
    info = json.loads(_ltzoo("info", name).stdout)
    shipped = info["measured"]["shipped"]
    assert shipped["accuracy"] == m["accuracy"]
    assert shipped["top1_calibrated"] == m["accuracy_calibrated"]
    for key in ("ece_before", "ece_after", "temperature"):
        assert shipped["calibration"][key] == m["calibration"][key]
    assert "mean ± std" in info["measured_note"]
    acc, cal = m["accuracy"], m["calibration"]
    card = (ROOT / "model_cards" / f"{name}.md").read_text()
    cells = [acc["top1"], m["accuracy_calibrated"], acc["top5"], acc["many"], acc["medium"]]
    cells += [acc["few"], cal["ece_before"], cal["ece_after"]]  # few: None on CIFAR-10-LT
    row = "| " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |"
    assert row in card
    if "over_seeds" in info["measured"]:
        assert "top1" in info["measured"]["over_seeds"]
        assert "for comparison, not the figures of these weights" in card
    else:  # a one-seed zoo says so and where its budget is
        assert "the only training seed" in card and "Budget:" in card
    if name.startswith("ce-"):
        assert "post-hoc logit adjustment" in card


def test_readme_says_which_weights_ship():
    readme = (ROOT / "README.md").read_text()
    assert "These are the weights that ship in the package." not in readme
    m = _bundled_metrics("ce-resnet32-fmnistlt")
    assert (
        f"CE {m['accuracy']['top1']:.2f} raw / {m['accuracy_calibrated']:.2f} calibrated" in readme
    )
    assert "post-hoc logit adjustment" in readme


def _data_root_args(name: str) -> list[str]:
    """``--data-root`` for a CIFAR-10-LT model (the JPEG copy; skip without it)."""
    if "cifar10lt" not in name:
        return []
    from test_cifar10lt import _shared_cifar  # the one place that finds the JPEG copy

    if name not in SHIPPED:
        pytest.skip(f"{name} does not ship yet")
    return ["--data-root", _shared_cifar()]


@pytest.mark.parametrize("name", ["ce-resnet32-fmnistlt", "bs-resnet32-cifar10lt-r100"])
def test_eval_reproduces_what_info_and_the_card_show(name):
    """A shipped model through `ltzoo eval` on the full test set (about 1.5 min on 2 cores for
    Fashion-MNIST-LT, 1 min for the 10,000 CIFAR-10 test images, whose "few" group is empty)."""
    info = json.loads(_ltzoo("info", name).stdout)["measured"]["shipped"]
    out = _ltzoo("eval", name, *_data_root_args(name), timeout=900).stdout
    acc = info["accuracy"]
    keys = ("top1", "top5", "many", "medium", "few")
    cells = {k: "-" if acc[k] is None else f"{acc[k]:.2f}" for k in keys}
    assert (
        f"top-1 {cells['top1']}  top-5 {cells['top5']}  many {cells['many']}  "
        f"medium {cells['medium']}  few {cells['few']}"
    ) in out
    assert f"calibrated top-1 {info['top1_calibrated']:.2f} " in out
    cal = info["calibration"]
    assert f"ECE {cal['ece_before']:.2f}% -> {cal['ece_after']:.2f}%" in out
    assert "experts top-1: " + " / ".join(f"{t:.2f}" for t in info["experts_top1"]) in out


# --- `ltzoo eval` prints what README promises ---------------------------------------------------
def _run_dir(tmp_path: Path) -> Path:
    """A finished run (run.json + model/) of a small untrained model on imagefolder_lt."""
    import torch

    from ltzoo import zoo

    torch.manual_seed(0)
    config = zoo.EnsembleConfig(
        num_classes=10,
        num_experts=2,
        layout="independent",
        class_counts=[40 // (i + 1) + 2 for i in range(10)],
        class_names=[f"c{c}" for c in range(10)],
        name="eval-test",
    )
    config.extra.update(data={"name": "imagefolder_lt", "rho": None})
    run = tmp_path / "run"
    zoo.Ensemble(config).eval().save_pretrained(run / "model")
    (run / "run.json").write_text("{}")
    return run


def test_eval_prints_every_promised_figure_and_shifted_with_out(tmp_path, image_folder):
    run, images = _run_dir(tmp_path), image_folder
    out_json = tmp_path / "eval.json"
    done = _ltzoo(
        "eval",
        str(run),
        "--data",
        "imagefolder_lt",
        "--data-root",
        str(images),
        "--shifted",
        "--out",
        str(out_json),
        "--plots",
        str(tmp_path / "plots"),
    )
    out, results = done.stdout, json.loads(out_json.read_text())
    assert re.search(r"^backward\s+50\s", out, re.M)  # the shifted table, although --out
    acc = results["accuracy"]
    assert f"top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}  many " in out
    assert "experts top-1: " + " / ".join(f"{t:.2f}" for t in results["experts"]) in out
    assert f"calibrated top-1 {results['accuracy_calibrated']['top1']:.2f} " in out
    cal = results["calibration"]
    assert f"ECE {cal['ece_before']:.2f}% -> {cal['ece_after']:.2f}%" in out
    assert (tmp_path / "plots" / "per_class_accuracy.png").is_file()


def test_per_class_plot_names_its_classes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ltzoo.training.evaluate import plot_per_class

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    names = ["T-shirt/top", "Trouser", "Bag"]
    plot_per_class([90.0, 80.0, 10.0], [10, 1000, 100], tmp_path / "p.png", class_names=names)
    labels = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert labels == ["Trouser (1000)", "Bag (100)", "T-shirt/top (10)"]


# --- where a model came from, and what it is called ---------------------------------------------
def test_push_of_a_bundled_model_does_not_carry_its_source(hub_server, tmp_path):
    from ltzoo import zoo
    from ltzoo.zoo.hub_io import download

    name, repo = "ce-resnet32-fmnistlt", "test-org/pushed-bundled"
    done = _ltzoo("push", name, repo, "--tag", "v1")
    assert f"pushed {name} to {repo}" in done.stdout
    pushed = json.loads((download(repo, "v1") / "config.json").read_text())
    assert "source" not in pushed["extra"]
    assert zoo.load(f"{repo}@v1").config.extra["source"] == {"repo_id": repo, "revision": "v1"}
    # a local directory always says so; the model pushed from keeps its own source
    model = zoo.load(name)
    assert "bundled" in model.config.extra["source"]
    model.save_pretrained(tmp_path / "copy")
    local = zoo.load(str(tmp_path / "copy"))
    assert local.config.extra["source"] == {"local": str((tmp_path / "copy").resolve())}


def test_a_users_run_has_its_own_name(tmp_path):
    from ltzoo import zoo
    from ltzoo.training.config import ConfigError

    run = tmp_path / "tiny"
    _ltzoo(
        "train",
        "fmnistlt_ce",
        "optim.epochs=1",
        "run.max_steps_per_epoch=1",
        "run.eval_subset=50",
        "data.val_per_class=2",
        "--out",
        str(run),
        timeout=600,
    )
    assert zoo.load(str(run)).config.name == "tiny"
    from ltzoo.training.config import RunSettings

    assert RunSettings(name="mine").model_name(run) == "mine"
    assert RunSettings().model_name(tmp_path / "ce-resnet32-fmnistlt") == "ce-resnet32-fmnistlt-run"
    with pytest.raises(ConfigError, match="registered model"):
        RunSettings(name="ncl-resnet32-fmnistlt").validate()


# --- export --int8 --check: a verdict on real images ----------------------------------------------
def test_int8_check_gives_a_verdict_on_real_images(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ce.int8.onnx"
    argv = ["export", "ce-resnet32-fmnistlt", "--int8", "--int8-form", "qdq-u8s8-channel"]
    done = _ltzoo(*argv, "--check", "--calib-size", "128", "--out", str(out), timeout=600)
    line = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"check passed \(int8 vs the fp32 model on 128 fashion_mnist_lt test images\): top-1 "
        r"agreement \d+\.\d% \(>= 98%\), max \|dp\| \d\.\d{3} \(<= 0\.25\), mean max \|dp\| .*",
        line,
    ), line
    assert "tolerance applies to fp32 only" not in done.stdout
    # the same graph against a bar it cannot reach: FAILED, and the command exits 1
    import ltzoo.export.cli as export_cli
    from ltzoo import zoo

    model = zoo.load("ce-resnet32-fmnistlt")
    images = export_cli.load_calibration_images("fashion_mnist_lt", model, 64, test=True)
    monkeypatch.setattr(export_cli, "INT8_MIN_AGREEMENT", 1.01)
    assert export_cli._check_int8(model, out, images, "test images") is False
    assert capsys.readouterr().out.startswith("check FAILED")


# --- prior="estimate" on a small batch --------------------------------------------------------
def _balanced_fmnist_batch(per_class: int, skip: int = 0):
    """``per_class`` Fashion-MNIST test images of each class (the first ones after ``skip``)."""
    import numpy as np
    import torch

    from ltzoo.training.data import read_idx

    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found under {root}")
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz").astype("int64")
    # rank-major (one image of each class, then the next of each): any prefix stays balanced
    pick = np.stack(
        [np.flatnonzero(labels == c)[skip : skip + per_class] for c in range(10)], axis=1
    ).ravel()
    x = torch.from_numpy(images[pick].copy()).float().div(255).unsqueeze(1)
    return x, torch.from_numpy(labels[pick])


def test_em_estimate_on_a_small_balanced_batch_does_not_collapse_a_class():
    import torch

    from ltzoo import zoo
    from ltzoo.zoo import calibration as cal

    model = zoo.load("ce-resnet32-fmnistlt")
    pre = model.config.preprocess
    worst_plain, worst_map, drops = 1.0, 1.0, []
    for skip in range(0, 40, 4):  # 10 batches of 32: 3 or 4 images of each class
        x, y = _balanced_fmnist_batch(4, skip)
        x, y = x[:32], y[:32]
        x = (x - pre.mean[0]) / pre.std[0]
        balanced = model.predict(x, prior="balanced").probs
        plain = cal.estimate_prior_em(balanced, strength=0)
        shrunk = cal.estimate_prior_em(balanced)
        assert torch.isclose(shrunk.sum(), torch.tensor(1.0, dtype=torch.float64))
        worst_plain, worst_map = (
            min(worst_plain, float(plain.min())),
            min(worst_map, float(shrunk.min())),
        )
        estimated = model.predict(x, prior="estimate").probs
        drops.append(
            float(
                (balanced.argmax(1) == y).float().mean() - (estimated.argmax(1) == y).float().mean()
            )
        )
    assert worst_plain < 0.01  # plain EM drives a class to ~0 on some batch of 32
    assert worst_map > 0.1 * 100 / (32 + 100) * 0.99  # the Dirichlet floor: no class near 0
    assert sum(drops) / len(drops) < 0.03  # and prior="estimate" costs little top-1 on them


# --- item 7: `ltzoo calibrate` runs the validation split only -----------------------------------
#: runs `ltzoo calibrate` in this process, counting the images that pass through the model
_COUNTING_CLI = """
import sys
from ltzoo import zoo
from ltzoo.cli import main

seen = []
expert_logits = zoo.Ensemble.expert_logits
def counting(self, x):
    seen.append(len(x))
    return expert_logits(self, x)
zoo.Ensemble.expert_logits = counting
code = main(sys.argv[1:])
print("IMAGES", sum(seen))
sys.exit(code)
"""


def test_calibrate_runs_only_the_validation_split(tmp_path, image_folder):
    run = _run_dir(tmp_path)
    argv = ["calibrate", str(run), "--data", "imagefolder_lt", "--data-root", str(image_folder)]
    done = subprocess.run(
        [sys.executable, "-c", _COUNTING_CLI, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "IMAGES 30"  # image_folder: 3 validation images per class, 6 test
    assert "fitted on 30 validation images" in lines[0] and "ltzoo eval" in lines[0]
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["temperature"] != 1.0 and len(config["class_bias"]) == 10
    assert "accuracy_calibrated" not in config["metrics"]  # a test figure of the old calibration


# --- item 9c: `ltzoo info --cost` shows its progress ---------------------------------------------
def test_info_cost_shows_progress_on_stderr(tmp_path):
    from ltzoo import zoo

    model_dir = tmp_path / "model"
    config = zoo.EnsembleConfig(num_classes=10, num_experts=2, layout="independent")
    zoo.Ensemble(config).eval().save_pretrained(model_dir)
    done = _ltzoo("info", str(model_dir), "--cost", timeout=600)
    assert re.search(r"measuring cost.*\d+/6", done.stderr), done.stderr  # 2 x (1 + 2 batch sizes)
    out = done.stdout
    assert [r["experts"] for r in json.loads(out[out.index("{") :])["cost"]["rows"]] == [1, 2]


# --- item 10: `ltzoo serve` stops in one line; a taken port is a user error ----------------------
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_serve_stops_cleanly_in_one_line(tmp_path, stop):
    import signal

    from serving import Server

    server = Server(["ncl-resnet32-fmnistlt", "--threads", "1"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        if stop == "ctrl-c":  # a terminal sends SIGINT to the whole process group
            os.killpg(server.proc.pid, signal.SIGINT)
        else:
            os.kill(server.proc.pid, signal.SIGTERM)
        code = server.proc.wait(60)
    finally:
        server.stop()
    log = server.log.read_text()
    after_start = log.splitlines()[1:]
    assert code == 0, log
    assert after_start == [
        f"ltzoo serve: stopped ({'SIGINT' if stop == 'ctrl-c' else 'SIGTERM'})"
    ], log


def test_serve_on_a_taken_port_is_one_line_and_no_url():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "ltzoo", "serve", "ncl-resnet32-fmnistlt", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.splitlines() == [
        f"ltzoo serve: error: cannot listen on http://127.0.0.1:{port}: already in use; "
        "choose another --port"
    ]
