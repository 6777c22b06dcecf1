"""CBD (Class-Balanced Distillation): teacher features, loss, samplers, frozen teachers, stages."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ltzoo.training.config import ConfigError, load_recipe
from ltzoo.training.data import build_sampler, build_transforms
from ltzoo.training.methods import METHODS
from ltzoo.training.methods.cbd import (
    CBD,
    CBDParams,
    TeacherSpec,
    cbd_loss,
    teacher_feature,
    teacher_run_config,
)
from ltzoo.zoo import Ensemble
from ltzoo.zoo.cards import render_card
from ltzoo.zoo.registry import get_entry

FMNIST = Path("/usr/share/datasets/fashion-mnist")
COUNTS = [50, 30, 20, 10, 8, 6, 5, 4, 3, 2]
ENTRY = "cbd-resnet32-fmnistlt"
TWO = CBDParams(teachers=[{"seed": 0, "jitter": False}, {"seed": 1, "jitter": True}])


def _student(**overrides) -> Ensemble:
    return Ensemble(get_entry(ENTRY).build_config(class_counts=COUNTS, **overrides))


def _teacher(index: int = 0, seed: int = 0) -> Ensemble:
    torch.manual_seed(100 + seed)
    tcfg = teacher_run_config(load_recipe("fmnistlt_cbd"), index, TeacherSpec(seed, False))
    return Ensemble(
        get_entry(ENTRY).build_config(class_counts=COUNTS, **tcfg.model_overrides)
    ).eval()


def _method(teachers: int = 2) -> CBD:
    torch.manual_seed(0)
    method = CBD(_student(), COUNTS, TWO)
    method.set_teachers([_teacher(i, seed=i) for i in range(teachers)])
    return method


def test_registered_with_class_balanced_sampler_and_uniform_prior():
    assert METHODS["cbd"] is CBD
    assert CBD.sampler == "class_balanced" and CBD.logit_prior == "uniform"
    cfg = load_recipe("fmnistlt_cbd")
    assert cfg.method == "cbd" and cfg.model == ENTRY
    # 0.5: the strength the shipped Fashion-MNIST-LT teachers trained with (recipe comment)
    assert CBDParams.from_dict(cfg.method_params).specs() == [
        TeacherSpec(0, False, 0.5),
        TeacherSpec(1, True, 0.5),
    ]


def test_cifar10lt_jitter_teacher_trains_with_the_official_strength():
    """The official code jitters with SimCLR's ``color_jitter(strength=1.0)``: brightness,
    contrast and saturation 0.8, hue 0.2 (twice what ``simclr_jitter`` alone gives)."""
    cfg = load_recipe("cifar10lt_r100_cbd")
    t0, t1 = (
        teacher_run_config(cfg, i, spec)
        for i, spec in enumerate(CBDParams.from_dict(cfg.method_params).specs())
    )
    assert t0.data.augment == ["crop_flip"] and t1.data.augment == ["crop_flip", "simclr_jitter:1"]
    pre = get_entry(cfg.model).build_config().preprocess
    (jitter,) = [s for s in build_transforms(pre, t1.data.augment).pil_steps if "Jitter" in repr(s)]
    assert (jitter.p, jitter.transforms[0].brightness, jitter.transforms[0].hue) == (
        0.8,
        pytest.approx((0.2, 1.8)),
        pytest.approx((-0.2, 0.2)),
    )


@pytest.mark.parametrize(
    "recipe", ["fmnistlt_cbd", "imagenetlt_resnet50_cbd", "inat18_resnet50_cbd"]
)
def test_recipes_load_and_neck_matches_teachers(recipe):
    cfg = load_recipe(recipe)
    specs = CBDParams.from_dict(cfg.method_params).specs()
    entry = get_entry(cfg.model).build_config()
    width = 64 if entry.backbone == "resnet32" else 2048
    assert entry.neck_dim == len(specs) * width
    if recipe != "fmnistlt_cbd":
        assert len(specs) == 4 and {s.jitter for s in specs} == {False, True}
        assert cfg.optim.batch_size == 128 and cfg.optim.scale_lr_with_batch
        assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_epochs == 0
        assert (cfg.optim.epochs, cfg.optim.weight_decay) == (
            (90, 5e-4) if "imagenet" in recipe else (200, 2e-4)
        )


def test_fmnist_budget_is_three_network_epochs():
    cfg, ncl = load_recipe("fmnistlt_cbd"), load_recipe("fmnistlt_ncl")
    params = CBDParams.from_dict(cfg.method_params)
    teacher_epochs = params.teacher_epochs or cfg.optim.epochs
    assert len(params.specs()) * teacher_epochs + cfg.optim.epochs == 3 * ncl.optim.epochs
    for section in ("data", "optim", "run"):
        assert getattr(cfg, section) == getattr(load_recipe("fmnistlt_ce"), section)


def test_params_validation():
    assert CBDParams(num_teachers=2, teacher_jitter=[False, True]).specs() == [
        TeacherSpec(0, False),
        TeacherSpec(1, True),
    ]
    assert CBDParams(num_teachers=3).specs() == [TeacherSpec(i, False) for i in range(3)]
    with pytest.raises(ConfigError, match="at least one teacher"):
        CBDParams()
    with pytest.raises(ConfigError, match="teacher_jitter"):
        CBDParams(num_teachers=2, teacher_jitter=[True])
    with pytest.raises(ConfigError, match="keys seed, jitter"):
        CBDParams(teachers=[{"seed": 0, "color": True}])
    for strength in (0.0, 3.0):
        with pytest.raises(ConfigError, match="jitter_strength"):
            CBDParams(num_teachers=1, jitter_strength=strength)
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe("fmnistlt_cbd", ["method_params.gamma=1"])


def test_teacher_feature_blocks_norms_and_order():
    teachers = [_teacher(0, seed=0), _teacher(1, seed=1)]
    x = torch.randn(4, 1, 28, 28)
    feat = teacher_feature(teachers, x)
    assert feat.shape == (4, 128) and not feat.requires_grad
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(4))
    with torch.no_grad():
        pooled = [t.experts[0].body(x) for t in teachers]
    for i, p in enumerate(pooled):
        block = feat[:, 64 * i : 64 * (i + 1)]
        torch.testing.assert_close(block.norm(dim=1), torch.full((4,), 1 / math.sqrt(2)))
        # concatenation order: block i is teacher i's normalised feature / sqrt(T)
        torch.testing.assert_close(block, F.normalize(p, dim=1) / math.sqrt(2))
    # four teachers: each block has norm 1/2
    feat4 = teacher_feature([*teachers, *teachers], x)
    torch.testing.assert_close(feat4[:, :64].norm(dim=1), torch.full((4,), 0.5))


def test_loss_matches_hand_computation():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    fs, ft = F.normalize(torch.randn(3, 6), dim=1), F.normalize(torch.randn(3, 6), dim=1)
    loss, ce, dist = cbd_loss(logits, labels, fs, ft, alpha=0.4, beta=100.0)
    p = logits.softmax(1)
    hand_ce = -sum(math.log(p[i, labels[i]]) for i in range(3)) / 3
    hand_cos = sum(float((fs[i] * ft[i]).sum()) for i in range(3)) / 3
    assert ce.item() == pytest.approx(hand_ce, rel=1e-5)
    assert dist.item() == pytest.approx(1 - hand_cos, rel=1e-5)
    assert loss.item() == pytest.approx(0.6 * hand_ce + 40 * (1 - hand_cos), rel=1e-5)


def test_forward_uses_projected_student_feature():
    method = _method()
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 9])
    method.eval()  # BN in eval so the hand computation sees the same statistics
    loss, logs = method(x, y)
    expert = method.model.experts[0]
    f = expert.neck(expert.body(x))
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2))  # Dense + ReLU + L2
    ref, _, _ = cbd_loss(
        expert.classifier(f), y, f, teacher_feature(method.teachers, x), 0.4, 100.0
    )
    torch.testing.assert_close(loss, ref)
    assert set(logs) == {"ce", "feat_distill"}


def test_teachers_get_no_gradient_and_stay_out_of_optimiser_and_state_dict():
    method = _method()
    method.train()
    assert all(not t.training for t in method.teachers)
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in method.teachers]
    params = [p for p in method.parameters() if p.requires_grad]  # as the engine builds it
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 9])
    loss, _ = method(x, y)
    loss.backward()
    opt.step()
    teacher_ids = {id(p) for t in method.teachers for p in t.parameters()}
    assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    for t, b in zip(method.teachers, before, strict=True):
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():  # weights and BN running stats unchanged
            torch.testing.assert_close(v, b[k])
    assert method.model.experts[0].neck.fc.weight.grad is not None
    # the student's weights and the digest that pins its teachers; no teacher tensor
    assert set(method.state_dict()) == {
        "teacher_digest",
        *(f"model.{k}" for k in method.model.state_dict()),
    }


def test_a_student_checkpoint_resumes_only_with_the_teachers_it_distilled():
    method = _method()
    state = method.state_dict()
    assert state["teacher_digest"].any()  # set from the teachers' weights
    resumed = _method()  # the same teachers (same seeds): the checkpoint loads
    resumed.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "teacher_digest"}
    resumed.load_state_dict(older)  # a checkpoint from before the digest still loads
    retrained = _method()
    with torch.no_grad():
        retrained.teachers[1].experts[0].classifier.weight.add_(1e-3)
    retrained.set_teachers(retrained.teachers)
    with pytest.raises(ValueError, match="other teacher weights"):
        retrained.load_state_dict(state)


def test_teachers_follow_to():
    method = _method()
    method.to(torch.float64)
    assert all(p.dtype == torch.float64 for t in method.teachers for p in t.parameters())


def test_neck_dim_mismatch_fails_before_training():
    with pytest.raises(ValueError, match=r"neck_dim \(128\).*4 teachers x 64-d.*= 256"):
        CBD(_student(), COUNTS, CBDParams(num_teachers=4))
    with pytest.raises(ValueError, match="neck_dim"):
        CBD(_student(neck_dim=None), COUNTS, TWO)
    method = CBD(_student(), COUNTS, TWO)
    with pytest.raises(ValueError, match="expects 2 teachers"):
        method.set_teachers([_teacher()])
    with pytest.raises(RuntimeError, match="no teachers"):
        method(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))


def test_teacher_config_instance_sampling_cosine_no_neck():
    cfg = load_recipe("fmnistlt_cbd")
    t1 = teacher_run_config(cfg, 1, CBDParams.from_dict(cfg.method_params).specs()[1])
    assert t1.method == "ce" and METHODS[t1.method].sampler == "instance"
    assert t1.run.seed == 1 and t1.data.augment == ["crop_flip", "simclr_jitter:0.5"]
    assert t1.data == cfg.data.__class__(**{**cfg.data.__dict__, "augment": t1.data.augment})
    assert t1.optim == cfg.optim
    teacher = Ensemble(get_entry(t1.model).build_config(class_counts=COUNTS, **t1.model_overrides))
    expert = teacher.experts[0]
    assert isinstance(expert.neck, torch.nn.Identity) and teacher.config.neck_dim is None
    assert expert.classifier.bias is None and float(expert.classifier.scale) == 20.0
    assert teacher.config.method == "ce" and teacher.config.name.endswith("teacher1")
    # the student config is untouched and keeps the class-balanced method
    assert cfg.method == "cbd" and cfg.data.augment == ["crop_flip"]
    # the samplers the engine builds: instance for teachers, class-balanced for the student
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    teacher_sampler = build_sampler(METHODS[t1.method].sampler, labels, seed=0)
    student_sampler = build_sampler(METHODS[cfg.method].sampler, labels, seed=0)
    assert (teacher_sampler.kind, student_sampler.kind) == ("instance", "class_balanced")
    # teacher epochs other than the student's rescale the schedule
    t = teacher_run_config(cfg, 0, TeacherSpec(0, False), epochs=20)
    assert (t.optim.epochs, t.optim.milestones, t.optim.warmup_epochs) == (20, [16, 18], 2.5)


def _fake_trainer(tmp_path, cfg):
    return SimpleNamespace(
        cfg=cfg, run_dir=tmp_path, device=torch.device("cpu"), dist=SimpleNamespace(is_main=True)
    )


def _finished_teacher(tdir: Path, tcfg, top1: float, seed: int) -> None:
    """What an engine run leaves in ``tdir``: run.json, results.json, model/."""
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "run.json").write_text(json.dumps({"config": tcfg.to_dict()}, default=str))
    (tdir / "results.json").write_text(
        json.dumps({"accuracy": {"top1": top1}, "accuracy_balanced_prior": {"top1": top1 + 8}})
    )
    _teacher(seed, seed=seed).save_pretrained(tdir / "model")


def test_teachers_stage_resumes_run_by_run(tmp_path, monkeypatch):
    """The engine runs the "teachers" stage: t0 finished (kept, not retrained), t1
    interrupted (resumed: train(..., resume=True)); stages=["teachers"] trains no student."""
    import ltzoo.training.engine as engine

    cfg = load_recipe("fmnistlt_cbd", ['stages=["teachers"]', "run.device=cpu"])
    calls = []

    def fake_train(tcfg, run_dir, resume=False):
        calls.append(
            (Path(run_dir).name, resume, tcfg.method, tcfg.run.seed, list(tcfg.data.augment))
        )
        _finished_teacher(Path(run_dir), tcfg, 61.5, seed=1)
        return run_dir

    monkeypatch.setattr(engine, "train", fake_train)
    _finished_teacher(
        tmp_path / "teachers" / "t0", teacher_run_config(cfg, 0, TeacherSpec()), 60, 0
    )
    (tmp_path / "teachers" / "t1").mkdir()
    assert engine.Trainer(cfg, tmp_path).fit() == tmp_path
    assert calls == [("t1", True, "ce", 1, ["crop_flip", "simclr_jitter:0.5"])]
    assert not (tmp_path / "model").exists()  # the student stage was not asked for
    calls.clear()
    engine.Trainer(cfg, tmp_path, resume=True).fit()  # everything trained: nothing runs
    assert calls == []


def test_prepare_loads_trained_teachers_and_keeps_the_rng_stream(tmp_path):
    from ltzoo.training.engine import Trainer

    cfg = load_recipe("fmnistlt_cbd")
    params = CBDParams.from_dict(cfg.method_params)
    for i, (spec, top1) in enumerate(zip(params.specs(), (60.0, 61.5), strict=True)):
        _finished_teacher(
            tmp_path / "teachers" / f"t{i}", teacher_run_config(cfg, i, spec), top1, seed=i
        )
    method = CBD(_student(), COUNTS, params)
    split = SimpleNamespace(
        test=TensorDataset(torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])),
        class_counts=COUNTS,
    )
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    Trainer.prepare(_fake_trainer(tmp_path, cfg), method, split)  # the engine's call
    torch.testing.assert_close(torch.rand(1), expected_next)  # evaluation drew, restored

    assert len(method.teachers) == 2 and all(
        not p.requires_grad for t in method.teachers for p in t.parameters()
    )
    extra = method.model.config.extra
    assert len(extra["teachers"]) == 2
    assert "seed 0, no colour jitter" in extra["teachers"][0] and "60.00%" in extra["teachers"][0]
    assert (
        "seed 1, with colour jitter" in extra["teachers"][1]
        and "teachers/t1/model" in extra["teachers"][1]
    )
    res = extra["teacher_results"]
    assert [t["top1"] for t in res["teachers"]] == [60.0, 61.5]
    assert res["ensemble"]["num_teachers"] == 2 and res["ensemble"]["num_test_images"] == 6
    assert (tmp_path / "teachers" / "ensemble_results.json").is_file()
    card = render_card(method.model.config)
    assert "Teachers (CBD stage 1)" in card and "seed 1, with colour jitter" in card
    json.dumps(method.model.config.to_dict())  # the extra entries are JSON-serialisable


def test_student_without_trained_teachers_says_which_stage_to_run(tmp_path):
    cfg = load_recipe("fmnistlt_cbd", ['stages=["student"]'])
    method = CBD(_student(), COUNTS, CBDParams.from_dict(cfg.method_params))
    with pytest.raises(FileNotFoundError, match=r'teacher t0 is not trained.*"teachers" stage'):
        method.prepare({"trainer": _fake_trainer(tmp_path, cfg), "split": None})


def test_student_refuses_a_teacher_without_its_run_json(tmp_path):
    """A model copied into teachers/t0 by hand: nothing says what it was trained with."""
    cfg = load_recipe("fmnistlt_cbd", ['stages=["student"]'])
    _finished_teacher(
        tmp_path / "teachers" / "t0", teacher_run_config(cfg, 0, TeacherSpec(0, False)), 60, 0
    )
    (tmp_path / "teachers" / "t0" / "run.json").unlink()
    method = CBD(_student(), COUNTS, CBDParams.from_dict(cfg.method_params))
    with pytest.raises(
        FileNotFoundError,
        match=r"teacher t0 .* has no run.json.*delete .* and run the \"teachers\" stage again",
    ):
        method.prepare({"trainer": _fake_trainer(tmp_path, cfg), "split": None})


@pytest.mark.parametrize("stages", ['["student", "teachers"]', '["teachers", "teachers"]', '["x"]'])
def test_stages_must_be_the_methods_in_order(stages):
    with pytest.raises(ConfigError, match=r"stages .* must be distinct stages of method 'cbd'"):
        load_recipe("fmnistlt_cbd", [f"stages={stages}"])
    with pytest.raises(ConfigError, match="stages"):
        load_recipe("fmnistlt_ce", ['stages=["teachers"]'])


def test_cli_resumes_a_run_killed_while_training_teachers(tmp_path, capsys):
    """No student checkpoint yet, only a teacher's: ``--resume`` continues the run."""
    from ltzoo.cli import main
    from ltzoo.training.engine import Trainer

    cfg = load_recipe("fmnistlt_cbd")
    Trainer(cfg, tmp_path)._write_run_json({})  # what fit() writes before the stages
    (tmp_path / "teachers" / "t0").mkdir(parents=True)
    (tmp_path / "teachers" / "t0" / "checkpoint.pt").write_bytes(b"")
    assert main(["train", "fmnistlt_cbd", "--out", str(tmp_path), "--resume", "--dry-run"]) == 0
    assert "resuming" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("index", "spec", "overrides"),
    [(0, TeacherSpec(0, False), ["optim.lr=0.5"]), (1, TeacherSpec(1, True, 1.0), [])],
    ids=["other lr", "other jitter strength"],
)
def test_prepare_rejects_teacher_from_other_config(tmp_path, index, spec, overrides):
    cfg = load_recipe("fmnistlt_cbd")  # its jitter teacher's strength is 0.5
    for i, ok in enumerate(CBDParams.from_dict(cfg.method_params).specs()[:index]):
        _finished_teacher(tmp_path / "teachers" / f"t{i}", teacher_run_config(cfg, i, ok), 60, i)
    tdir = tmp_path / "teachers" / f"t{index}"
    tdir.mkdir(parents=True)
    other = teacher_run_config(load_recipe("fmnistlt_cbd", overrides), index, spec)
    (tdir / "run.json").write_text(json.dumps({"config": other.to_dict()}, default=str))
    method = CBD(_student(), COUNTS, CBDParams.from_dict(cfg.method_params))
    with pytest.raises(ValueError, match="different configuration"):
        method.prepare({"trainer": _fake_trainer(tmp_path, cfg), "split": None})


def test_run_json_from_an_older_version_is_the_same_run(tmp_path):
    """A run.json written before a config field existed lacks it; with the field at its default
    that is the same run (a teacher finished by an older ltzoo is reused, not refused)."""
    from ltzoo.training.config import check_same_run

    cfg = teacher_run_config(load_recipe("fmnistlt_cbd"), 0, TeacherSpec(0, False))
    old = cfg.to_dict()
    del old["data"]["val_max_per_class"]  # added after the CIFAR-10-LT teachers had finished
    old["run"]["amp"] = True  # a run setting since removed: settings do not define the run
    (tmp_path / "run.json").write_text(json.dumps({"config": old}, default=str))
    check_same_run(tmp_path, cfg)
    old["optim"]["lr"] = cfg.optim.lr * 2
    (tmp_path / "run.json").write_text(json.dumps({"config": old}, default=str))
    with pytest.raises(ValueError, match="different configuration"):
        check_same_run(tmp_path, cfg)


def test_a_method_parameter_added_since_counts_at_its_default(tmp_path):
    """A recipe that now names a method parameter at its default (one an older run.json lacks)
    still resumes that run; at another value it does not."""
    from ltzoo.training.config import check_same_run

    old = load_recipe("fmnistlt_ncl").to_dict()
    assert "moco_queue" not in old["method_params"]
    (tmp_path / "run.json").write_text(json.dumps({"config": old}, default=str))
    check_same_run(tmp_path, load_recipe("fmnistlt_ncl", ["method_params.moco_queue=1024"]))
    with pytest.raises(ValueError, match="different configuration"):
        check_same_run(tmp_path, load_recipe("fmnistlt_ncl", ["method_params.moco_queue=512"]))


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_two_stage_smoke(tmp_path):
    """Both stages through the engine. Evaluation runs on 500 test images: a full 10k-image
    pass takes minutes on a busy CPU and the flow has five of them (2 teachers, the teacher
    ensemble (2 passes), the student)."""
    from ltzoo.training.engine import train

    cfg = load_recipe(
        "fmnistlt_cbd",
        [
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "optim.milestones=[]",
            "run.max_steps_per_epoch=2",
            "data.val_per_class=2",
            "run.eval_subset=500",
        ],
    )
    train(cfg, tmp_path)
    for i in (0, 1):
        assert (tmp_path / "teachers" / f"t{i}" / "model" / "config.json").is_file()
        assert (tmp_path / "teachers" / f"t{i}" / "results.json").is_file()
    assert (tmp_path / "model" / "config.json").is_file()
    student = Ensemble.from_pretrained(tmp_path / "model")
    assert student.config.method == "cbd" and student.config.neck_dim == 128
    assert len(student.config.extra["teachers"]) == 2
    assert student.config.extra["teacher_results"]["ensemble"]["num_test_images"] == 500
    assert "Teachers (CBD stage 1)" in (tmp_path / "model" / "README.md").read_text()
    t1 = Ensemble.from_pretrained(tmp_path / "teachers" / "t1" / "model")
    assert t1.config.neck_dim is None and t1.config.logit_prior == "train"
    run = json.loads((tmp_path / "teachers" / "t1" / "run.json").read_text())["config"]
    assert run["method"] == "ce" and "simclr_jitter:0.5" in run["data"]["augment"]
    # resuming the whole run reuses both teachers and the finished student checkpoint
    mtime = (tmp_path / "teachers" / "t0" / "model" / "model.safetensors").stat().st_mtime
    train(cfg, tmp_path, resume=True)
    assert (tmp_path / "teachers" / "t0" / "model" / "model.safetensors").stat().st_mtime == mtime
