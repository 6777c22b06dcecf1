"""Architectures, layouts, Ensemble, preprocessing, registry, cards, CLI."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ltzoo import zoo
from ltzoo.zoo.models import BACKBONES, CosineClassifier, backbone_stages
from ltzoo.zoo.registry import get_entry, list_models


def test_resnet32_is_the_cifar_resnet():
    stages, dim = backbone_stages("resnet32", 3)
    net = torch.nn.Sequential(*stages)
    assert dim == 64
    n_params = sum(p.numel() for p in net.parameters()) + 64 * 10 + 10
    assert 0.45e6 < n_params < 0.48e6  # 0.46M with a 10-class linear head
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    one_channel = torch.nn.Sequential(*backbone_stages("resnet32", 1)[0])
    assert one_channel(torch.randn(2, 1, 28, 28)).shape == (2, 64)


@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "resnet32"])
def test_torchvision_backbones_build_as_stages(name):
    stages, dim = backbone_stages(name, 3)
    assert len(stages) == 6 and dim == 2048


def test_cosine_classifier_scale_and_bias():
    head = CosineClassifier(8, 3, scale=20.0, bias=False)
    out = head(torch.randn(5, 8))
    assert out.abs().max() <= 20.0 + 1e-4
    assert head.bias is None and not any(n == "scale" for n, _ in head.named_parameters())
    learn = CosineClassifier(8, 3, learn_scale=True)
    assert "scale" in dict(learn.named_parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layout="independent", num_experts=3),
        dict(layout="shared", shared_stages=2, num_experts=3),
        dict(layout="single", num_experts=1, head="cosine", head_bias=False, neck_dim=16),
    ],
)
def test_layouts_forward_shapes_and_sharing(kwargs):
    model = zoo.Ensemble(zoo.EnsembleConfig(**kwargs)).eval()
    x = torch.randn(2, 1, 28, 28)
    logits = model.expert_logits(x)
    assert logits.shape == (kwargs["num_experts"], 2, 10)
    assert torch.allclose(model(x), logits.mean(0))
    if kwargs["layout"] == "shared":
        assert len(list(model.stem.parameters())) > 0
    else:
        assert len(list(model.stem.parameters())) == 0
    if kwargs.get("neck_dim"):
        feats = model.expert_features(x)[0]
        assert feats.shape == (2, 16) and torch.allclose(
            feats.norm(dim=1), torch.ones(2), atol=1e-5
        )


def test_independent_experts_start_different():
    model = zoo.Ensemble(zoo.EnsembleConfig(num_experts=2))
    a, b = (next(e.parameters()) for e in model.experts)
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layout="single", num_experts=2), "num_experts=1"),
        (dict(layout="shared", shared_stages=0), "shared_stages"),
        (dict(head="mlp"), "unknown head"),
        (dict(num_classes=3, class_names=["a"]), "class names"),
        (dict(temperature=0), "temperature"),
        (dict(backbone="vgg"), "unknown backbone"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zoo.Ensemble(zoo.EnsembleConfig(**kwargs))


def test_config_json_round_trip_rejects_unknown_keys(tmp_path):
    cfg = zoo.EnsembleConfig(num_classes=3, class_counts=[5, 3, 1], temperature=1.3)
    cfg.save(tmp_path / "c.json")
    assert zoo.EnsembleConfig.load(tmp_path / "c.json") == cfg
    data = json.loads((tmp_path / "c.json").read_text())
    data["surprise"] = 1
    with pytest.raises(ValueError, match="unknown config keys"):
        zoo.EnsembleConfig.from_dict(data)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "LA", "1", "CMYK"])
def test_predict_accepts_any_pil_mode_and_size(mode):
    model = zoo.Ensemble(zoo.EnsembleConfig()).eval()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (47, 31, 3), dtype=np.uint8))
    image = (
        rgb.convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.full((40, 20), 40000, dtype=np.uint16))
    )
    pred = model.predict(image, top_k=2)
    assert pred.probs.shape == (1, 10)


def test_exif_rotation_is_applied():
    from ltzoo.zoo.preprocess import to_model_mode

    img = Image.new("L", (40, 20), 0)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert to_model_mode(Image.open(io.BytesIO(buf.getvalue())), 1).size == (20, 40)


def test_transparent_pixels_become_white():
    from ltzoo.zoo.preprocess import to_model_mode

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_model_mode(rgba, 1)).min() == 255


def test_select_experts_keeps_chosen_experts():
    model = zoo.Ensemble(zoo.EnsembleConfig(num_experts=3)).eval()
    sub = model.select_experts([0, 2])
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(sub.expert_logits(x), model.expert_logits(x)[[0, 2]])
    with pytest.raises(ValueError):
        model.select_experts([5])
    with pytest.raises(ValueError, match="distinct"):
        model.select_experts([0, 0])


def test_registry_covers_paper_settings_and_builds_configs():
    names = {r["name"] for r in list_models()}
    for required in [
        "ncl-resnet32-cifar100lt-r100",
        "ncl-resnet32-cifar100lt-r50",
        "ncl-resnet32-cifar10lt-r100",
        "ncl-resnet32-cifar10lt-r50",
        "ncl-resnet50-imagenetlt",
        "ncl-resnext50-imagenetlt",
        "ncl-resnet152-placeslt",
        "cbd-resnet50-imagenetlt",
        "cbd-resnet50-inat18",
        "ecl-resnet32-cifar100lt-r100",
        "ecl-resnext50-imagenetlt",
        "ce-resnet32-fmnistlt",
        "bs-resnet32-fmnistlt",
        "ncl-resnet32-fmnistlt",
        "cbd-resnet32-fmnistlt",
        "ecl-resnet32-fmnistlt",
    ]:
        assert required in names
    for row in list_models():
        cfg = get_entry(row["name"]).build_config()
        assert cfg.num_classes == len(cfg.class_names)
        assert row["provenance"]
    assert "reconstruction" in get_entry("ecl-resnext50-imagenetlt").provenance
    assert get_entry("ncl-resnet32-cifar100lt-r100").paper["top1"] == 53.3


def test_registry_hub_org_is_configurable(monkeypatch):
    monkeypatch.setenv("LTZOO_HUB_ORG", "my-lab")
    assert get_entry("ncl-resnet32-fmnistlt").resolved_hub_id() == "my-lab/ncl-resnet32-fmnistlt"


def test_unknown_name_suggests_close_match():
    with pytest.raises(KeyError, match="ncl-resnet32-fmnistlt"):
        get_entry("ncl-resnet32-fmnist")


def test_model_card_has_hub_metadata_and_provenance():
    from ltzoo.zoo.cards import render_card

    metrics = {
        "accuracy": {"top1": 80.0, "many": 90.0, "medium": 75.0, "few": 60.0},
        "calibration": {"ece_before": 5.0, "ece_after": 1.0},
    }
    cfg = get_entry("ecl-resnet32-fmnistlt").build_config(metrics=metrics)
    card = render_card(cfg)
    assert card.startswith("---\nlibrary_name: ltzoo")
    assert "reconstruction from the paper's abstract" in card
    assert (
        "value: 80.00" in card and "| 80.00 | - | - | 90.00 | 75.00 | 60.00 | 5.00 | 1.00 |" in card
    )


def test_cli_list_and_info(capsys):
    from ltzoo.cli import main

    assert main(["list", "ncl", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all("ncl" in r["name"] for r in rows)
    assert main(["info", "ncl-resnet32-fmnistlt"]) == 0
    assert '"recipe": "fmnistlt_ncl"' in capsys.readouterr().out


def test_cli_help_lists_every_subcommand(capsys):
    from ltzoo.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("list", "info", "push", "download", "train", "eval", "calibrate"):
        assert cmd in out


def test_registry_measured_metrics_match_benchmark_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    measured = json.loads((root / "zoo/data/measured.json").read_text())
    assert measured, "no measured metrics: run benchmarks/report.py"
    for name, entry in measured.items():
        results = json.loads((root / entry["source"]).read_text())
        run = results[entry["benchmark_tag"]]  # the results row this entry was read from
        shipped = entry["shipped"]
        seed = run["seed_list"].index(shipped["seed"])
        for key in ("top1", "many", "medium", "few"):
            ran = run[key]["runs"][seed]
            assert (ran is None) == (shipped["accuracy"][key] is None)  # CIFAR-10-LT: no few
            if ran is not None:
                assert abs(shipped["accuracy"][key] - ran) < 1e-3
        if run["seeds"] > 1:
            over = entry["over_seeds"]
            assert over["seeds"] == run["seeds"]
            for key in ("top1", "many", "medium", "few"):
                assert over[key] == {"mean": run[key]["mean"], "std": run[key]["std"]}
        else:  # one seed: no mean to show, the run's budget instead
            assert "over_seeds" not in entry and entry["budget"] == run["budget"]
        assert get_entry(name).measured == measured[name]


def test_save_pretrained_killed_mid_write_leaves_the_saved_model_whole(tmp_path, monkeypatch):
    """Every file goes through a temp file and a rename, config.json after the weights: a
    run killed while saving (a session's hard stop) leaves the previous model loadable and
    no half-written file that a resume would take for a saved model."""
    import ltzoo.zoo.files as files

    directory = tmp_path / "model"
    first = zoo.Ensemble(zoo.EnsembleConfig(name="first", num_experts=1, layout="single"))
    first.save_pretrained(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_replace = files.os.replace

    def killed_at_config(src, dst):
        if str(dst).endswith("config.json"):
            raise KeyboardInterrupt  # the signal arrives between the weights and the config
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_at_config)
    second = zoo.Ensemble(zoo.EnsembleConfig(name="second", num_experts=1, layout="single"))
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(before)  # no temp file left
    assert (directory / "config.json").read_bytes() == before["config.json"]
    # the new weights with the old config: loadable here because both share an architecture
    reloaded = zoo.Ensemble.from_pretrained(directory)
    assert reloaded.config.name == "first"


def test_weights_digest_is_the_weights_not_where_they_live():
    """Equal weights digest equally on any memory format; one changed value changes it."""
    torch.manual_seed(0)
    model = zoo.Ensemble(zoo.EnsembleConfig(num_experts=2))
    digest = model.weights_digest().hexdigest()
    assert model.to(memory_format=torch.channels_last).weights_digest().hexdigest() == digest
    with torch.no_grad():
        model.experts[1].classifier.weight[0, 0] += 1e-6
    assert model.weights_digest().hexdigest() != digest


def test_atomic_write_clears_what_killed_writers_left_and_nothing_else(tmp_path):
    """A SIGKILL mid-write leaves the writer's temp file; the next write of that path removes
    it, but never the temp file of a writer that is still alive."""
    import os

    from ltzoo.zoo.files import _temp_for, atomic_write

    target = tmp_path / "checkpoint.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid belongs to no process now
    killed = tmp_path / f".checkpoint.pt.{dead.pid}.tmp"
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"
    other = tmp_path / f".other.pt.{dead.pid}.tmp"
    for p in (killed, alive, other):
        p.write_bytes(b"half")
    killed_folder = tmp_path / f".checkpoint.pt.{dead.pid}-7.tmp"  # a staging_dir, per thread
    killed_folder.mkdir()
    (killed_folder / "part").write_bytes(b"half")
    _temp_for(target).mkdir()  # a dead process with this pid left a folder where ours goes
    atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not killed.exists() and alive.exists() and other.exists()
    assert not killed_folder.exists() and not _temp_for(target).exists()
