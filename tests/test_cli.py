"""The `ltzoo` command line: one model resolver, one-line user errors, lazy imports, eval output."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import needs_fmnist

from ltzoo import zoo
from ltzoo.cli import main
from ltzoo.zoo import calibration as cal
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
    assert main(["list", "nonexistent"]) == 2  # a user error, like every other one
    assert "no registered model matches 'nonexistent'" in _one_line_error(capsys, "list")


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
    summary = next(line for line in out.splitlines() if line.startswith("top-1 "))
    assert "top-5" in summary and not re.search(r"\d\.\d{3,}", summary)
    assert re.search(r"^calibrated top-1 \d+\.\d\d ", out, re.M) and "ECE " in out


@needs_fmnist
def test_calibrate_on_a_larger_validation_split_records_it(tmp_path, capsys):
    """--val-max-per-class: the fit sees up to N images of each class that can spare them
    (the head of this profile has 10), and the model records it, so that eval and calibrate
    rebuild the same split; 0 goes back to the balanced split."""
    from ltzoo.training.data import split_for_model

    data = {"name": "fashion_mnist_lt", "rho": 10, "n_max": 5990, "seed": 0, "val_per_class": 5}
    model_dir = tmp_path / "model"
    _small_model(data={**data, "sizes": {"val": 50}}).save_pretrained(model_dir)
    quick = ["--temperature-only"]  # the split is under test, not the choice of calibrator
    assert main(["calibrate", str(model_dir), *quick, "--val-max-per-class", "30"]) == 0
    assert "fitted on 280 validation images" in capsys.readouterr().out  # 10 + 9 x 30
    config = zoo.load(str(model_dir)).config
    assert config.extra["data"]["val_max_per_class"] == 30
    assert config.extra["data"]["sizes"]["val"] == 280
    assert len(split_for_model(config).val) == 280
    assert main(["calibrate", str(model_dir), *quick, "--val-max-per-class", "0"]) == 0
    config = zoo.load(str(model_dir)).config
    assert "val_max_per_class" not in config.extra["data"]
    assert config.extra["data"]["sizes"]["val"] == len(split_for_model(config).val) == 50
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["calibrate", str(model_dir), "--val-max-per-class", "-1"])
    assert "must be >= 0, got -1" in capsys.readouterr().err


@pytest.fixture
def recal(monkeypatch):
    """benchmarks/recalibrate.py, its splits with a 500-image test set: the refit is under
    test, not a 10k-image pass."""
    import dataclasses

    from torch.utils.data import Subset

    import benchmarks.recalibrate as recal
    from ltzoo.training.data import split_for_model

    def with_a_short_test_set(*args, **kwargs):
        split = split_for_model(*args, **kwargs)
        return dataclasses.replace(split, test=Subset(split.test, range(0, 10_000, 20)))

    monkeypatch.setattr(recal, "split_for_model", with_a_short_test_set)
    return recal


FMNIST_DATA = {"name": "fashion_mnist_lt", "rho": 10, "n_max": 5990, "seed": 0, "val_per_class": 5}


@needs_fmnist
def test_recalibrate_a_run_refits_on_the_larger_split_and_keeps_its_results(tmp_path, recal):
    """benchmarks/recalibrate.py (what train_cifar10lt.py recalibrate runs on a finished run):
    the model is refitted and saved with the split it used, results.json gets the new
    calibration entries, and its other entries stay."""
    run = tmp_path / "run"
    _small_model(data={**FMNIST_DATA, "sizes": {"val": 50}}).save_pretrained(run / "model")
    (run / "results.json").write_text(json.dumps({"accuracy": {"top1": 12.5}, "wall_s": 7}))
    c = recal.recalibrate(run, class_bias=False, val_max=30, name="shipped-name")
    model = zoo.load(str(run / "model"))
    assert model.config.name == "shipped-name" and model.config.temperature == c["temperature"]
    assert model.config.extra["data"]["val_max_per_class"] == 30
    assert model.config.extra["data"]["sizes"]["val"] == 280
    stored = json.loads((run / "results.json").read_text())
    assert stored["calibration"] == json.loads(json.dumps(c))
    assert stored["val"]["calibrator"] == "temperature" and "top1" in stored["accuracy_calibrated"]
    assert stored["accuracy"] == {"top1": 12.5} and stored["wall_s"] == 7
    assert (run / "plots" / "reliability.png").is_file()


@needs_fmnist
def test_recalibrate_a_bundled_copy_rebundles_it_and_updates_its_entry(
    tmp_path, monkeypatch, recal
):
    """train_cifar10lt.py's path for a shipped run whose directory is gone: the refitted model
    is bundled again under its name and run, and its results-JSON entry is summarised anew
    from the new evaluation; other entries, and the entry's budget, stay."""
    import functools

    import benchmarks.train_cifar10lt as plan
    import ltzoo.zoo.bundle as bundle

    results = tmp_path / "cifar10lt.json"
    results.write_text(json.dumps({"ce": {"budget": {"epochs": 200}}, "bs": {"kept": 1}}))
    monkeypatch.setattr(plan, "RESULTS", results)
    monkeypatch.setattr(plan, "DATA", None)  # Fashion-MNIST from its Debian folder
    bundled: dict = {}

    def add_to_bundle(model_dir, root=None, name=None, run=None):
        config = json.loads((Path(model_dir) / "config.json").read_text())
        bundled.update(config=config, name=name, run=run)
        return name, {}

    monkeypatch.setattr(bundle, "add_to_bundle", add_to_bundle)
    # the temperature alone: the bookkeeping is under test, not the choice of calibrator
    monkeypatch.setattr(recal, "refit", functools.partial(recal.refit, class_bias=False))
    model = _small_model(data={**FMNIST_DATA, "sizes": {"val": 50}})
    plan._recalibrate_bundled("ce", model, 10, run="ce-s0")
    summary = json.loads(results.read_text())
    assert summary["bs"] == {"kept": 1} and summary["ce"]["budget"] == {"epochs": 200}
    assert bundled["name"] == "cli-test" and bundled["run"] == "ce-s0"
    assert bundled["config"]["extra"]["data"]["val_max_per_class"] == 10
    assert summary["ce"]["temperature"]["mean"] == bundled["config"]["temperature"]
    assert summary["ce"]["seeds"] == 1 and summary["ce"]["top1"]["mean"] is not None
    with pytest.raises(RuntimeError, match="ncl ships but has no entry"):
        plan._recalibrate_bundled("ncl", model, 10, run=None)


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


# --- issue 27: what a user is shown is what a user gets ----------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _ltzoo(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ltzoo", *argv], capture_output=True, text=True, timeout=120
    )


def test_eval_shifted_runs_the_test_set_once(run_dir, image_folder, monkeypatch, capsys):
    import ltzoo.training.evaluate as evaluate
    import ltzoo.training.shifted as shifted

    real, seen = evaluate.collect_logits, []

    def spy(model, dataset, *args, **kwargs):
        seen.append(dataset)
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(evaluate, "collect_logits", spy)
    monkeypatch.setattr(shifted, "collect_logits", spy)
    argv = ["--data", "imagefolder_lt", "--data-root", str(image_folder), "--shifted"]
    assert main(["eval", str(run_dir), *argv]) == 0
    assert re.search(r"^backward\s+50\s", capsys.readouterr().out, re.M)
    assert len(seen) == 2 and seen[0] is not seen[1]  # the test set once, the val set once


@pytest.mark.parametrize("bound", [100.0, 0.05])
def test_calibration_fit_at_a_bound_warns(bound, caplog):
    g = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(300, 10, generator=g)
    # the label is always the least likely class (the NLL falls as T grows without end)
    # or always the most likely one by a wide margin (it falls as T shrinks to 0)
    labels = logits.argmin(1) if bound == 100.0 else logits.argmax(1)
    with caplog.at_level(logging.WARNING, logger="zoo"):
        assert cal.fit_temperature(logits, labels) == bound
    warned = [r.getMessage() for r in caplog.records if r.name == "zoo"]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert f"stopped at its bound T={bound:g}" in warned[0] and "unreliable" in warned[0]


def test_calibration_fit_that_helps_says_nothing(caplog):
    g = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(1000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(logits / 3, 1), 1, generator=g).flatten()
    with caplog.at_level(logging.WARNING, logger="zoo"):
        temperature, _ = cal.fit_temperature_and_bias(logits, labels)
    assert 2 < temperature < 4  # overconfident by 3: the fit finds it and lowers the ECE
    assert not [r for r in caplog.records if r.name == "zoo"]


def test_ece_sampling_noise_is_the_ece_of_a_calibrated_model_by_chance():
    """Labels drawn from the model's own probabilities (calibrated by construction): the mean
    ECE over draws is what ece_sampling_noise predicts, unweighted and class-weighted."""
    g = torch.Generator().manual_seed(0)
    for weighted in (False, True):
        eces, noises = [], []
        for _ in range(60):
            probs = torch.softmax(3 * torch.randn(2000, 10, generator=g), 1)
            labels = torch.multinomial(probs, 1, generator=g).flatten()
            keep = (
                labels != 0
                if not weighted
                else (labels != 0) | (torch.rand(2000, generator=g) < 0.05)
            )
            probs, labels = (probs, labels) if not weighted else (probs[keep], labels[keep])
            w = cal.class_balanced_weights(labels) if weighted else None
            eces.append(cal.expected_calibration_error(probs, labels, weights=w))
            noises.append(cal.ece_sampling_noise(probs, weights=w))
        assert 0.85 < sum(eces) / sum(noises) < 1.15, (weighted, sum(eces), sum(noises))


def test_calibration_fit_of_a_calibrated_model_says_nothing(caplog):
    """Its ECE moves by chance (the fit lowers the NLL, not the ECE): the old rule, "the ECE
    must fall", warned on such fits; a rise within the sampling noise is no warning."""
    rose = 0
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        logits = 3 * torch.randn(300, 10, generator=g)
        labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).flatten()
        with caplog.at_level(logging.WARNING, logger="zoo"):
            temperature = cal.fit_temperature(logits, labels)
        ece = [
            cal.expected_calibration_error(torch.softmax(logits / t, 1), labels)
            for t in (1, temperature)
        ]
        rose += ece[1] > ece[0]
    assert rose >= 2  # the case the old rule warned on did occur
    assert not [r for r in caplog.records if r.name == "zoo"]


def test_calibration_that_raises_the_ece_beyond_noise_warns(caplog):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(1000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).flatten()
    with caplog.at_level(logging.WARNING, logger="zoo"):  # T = 0.3: far overconfident
        cal._warn_if_unreliable(logits, labels, fitted=0.3, temperature=0.3, bias=None)
    warned = [r.getMessage() for r in caplog.records if r.name == "zoo"]
    assert len(warned) == 1 and "rose beyond its sampling noise" in warned[0], warned


def test_list_into_a_closed_pipe_is_quiet():
    proc = subprocess.Popen(
        [sys.executable, "-m", "ltzoo", "list", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # `| head -1` that has exited before ltzoo writes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_list_user_errors_and_field_filter():
    done = _ltzoo("list", "nosuch")
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith("ltzoo list: error: no registered model matches 'nosuch'")
    assert len(done.stderr.splitlines()) == 1
    done = _ltzoo("list", "ce", "--json")
    rows = json.loads(done.stdout)
    assert rows and all(r["method"] == "ce" for r in rows)  # not ncl-resnet152-placeslt
    names = {r["name"] for r in zoo.list_models("ncl-cifar100lt-r100")}
    assert names == {"ncl-resnet32-cifar100lt-r100"}  # not -r50: every part must match
    assert {r["backbone"] for r in zoo.list_models("resnet32")} == {"resnet32"}
    assert [r["name"] for r in zoo.list_models("ecl-resnet32-fmnistlt")] == [
        "ecl-resnet32-fmnistlt"
    ]


def test_info_prints_the_registry_config_as_json():
    done = _ltzoo("info", "ncl-resnet32-fmnistlt")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["backbone"] == "resnet32"
    assert '\n  "config": {\n    "backbone": "resnet32"\n  },\n' in done.stdout  # not a repr


def test_unknown_prior_lists_estimate():
    with pytest.raises(ValueError, match="'balanced', 'train', 'estimate'"):
        cal.resolve_prior("nosuch", None, 3)
    with pytest.raises(ValueError, match=r"Ensemble\.predict"):
        _small_model().calibrated_probs(torch.zeros(2, 10), "estimate")


def test_zoo_load_takes_a_run_directory(run_dir):
    assert zoo.load(str(run_dir)).config.name == "cli-test"
    assert zoo.load(str(run_dir / "model")).config.name == "cli-test"


def test_report_help_writes_nothing():
    outputs = [ROOT / "zoo" / "data" / "measured.json", *(ROOT / "model_cards").rglob("*")]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    done = subprocess.run(
        [sys.executable, "benchmarks/report.py", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: report.py") and "model cards" in done.stdout
    assert "updated" not in done.stdout
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
