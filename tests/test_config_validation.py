"""Every EnsembleConfig field is checked (type and range) before anything is built (issue 19.3)."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from ltzoo import zoo
from ltzoo.zoo.config import EnsembleConfig
from ltzoo.zoo.ensemble import CONFIG_NAME, WEIGHTS_NAME

BAD_FIELDS = [
    ({"num_classes": "10"}, "num_classes must be an integer"),
    ({"num_classes": 10**9}, "num_classes must be in"),
    ({"num_classes": 1}, "num_classes must be in"),
    ({"num_classes": True}, "num_classes must be an integer"),
    ({"num_experts": 10**6}, "num_experts must be in"),
    ({"num_experts": 2.5}, "num_experts must be an integer"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"temperature": 1e-320}, "temperature must be finite and in"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"temperature": 1e300}, "temperature must be finite and in"),
    ({"class_counts": [-1] + [5] * 9}, r"class_counts\[\] must be in"),
    ({"class_counts": [5] * 3}, "3 class counts for 10 classes"),
    ({"class_counts": ["5"] * 10}, r"class_counts\[\] must be an integer"),
    ({"class_names": ["a"] * 3}, "3 class names for 10 classes"),
    ({"class_names": [1] * 10}, r"class_names\[\] must be a string"),
    ({"class_names": "abc"}, "class_names must be a list"),
    ({"preprocess": {"input_size": [0, 0]}}, r"preprocess.input_size must be in \[1,"),
    ({"preprocess": {"input_size": [28]}}, r"preprocess.input_size must be \[height, width\]"),
    ({"preprocess": {"input_size": [10**6, 10**6]}}, "preprocess.input_size must be in"),
    ({"preprocess": {"std": [0.0]}}, "preprocess.std must be finite and in"),
    ({"preprocess": {"mean": ["x"]}}, "preprocess.mean must be a number"),
    ({"preprocess": {"channels": "3"}}, "preprocess.channels must be an integer"),
    ({"preprocess": {"crop_pct": 0}}, "preprocess.crop_pct"),
    ({"preprocess": {"bogus": 1}}, "unknown preprocess keys"),
    ({"preprocess": [1, 2]}, "preprocess must be an object"),
    ({"head_bias": "yes"}, "head_bias must be true or false"),
    ({"neck_dim": -3}, "neck_dim must be in"),
    ({"cosine_scale": float("inf")}, "cosine_scale must be finite"),
    ({"shared_stages": 10**9}, "shared_stages must be in"),
    ({"logit_prior": "weird"}, "logit_prior must be"),
    ({"name": ["not", "text"]}, "name must be a string"),
    ({"metrics": []}, "metrics must be an object"),
    ({"num_experts": 64, "backbone": "resnet152", "neck_dim": 65536}, "parameters"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS)
def test_bad_field_gives_value_error_naming_it(fields, message):
    with pytest.raises(ValueError, match=message):
        EnsembleConfig.from_dict(fields)


def test_numpy_integers_from_training_are_accepted():
    np = pytest.importorskip("numpy")
    cfg = EnsembleConfig(class_counts=list(np.arange(1, 11)), temperature=np.float32(1.5))
    assert cfg.class_counts == list(range(1, 11)) and type(cfg.class_counts[0]) is int
    assert cfg.temperature == 1.5


def _write_model_dir(directory, config: dict) -> None:
    directory.mkdir()
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    (directory / WEIGHTS_NAME).write_bytes(b"\0" * 16)


HOSTILE_CONFIGS = [
    {"num_classes": 10**9},
    {"num_experts": 10**6},
    {"num_classes": 100_000, "num_experts": 64, "backbone": "resnet152"},
    {"class_counts": [1] * 10**3, "num_classes": 10},
    {"preprocess": {"input_size": [10**9, 10**9]}},
]


@pytest.mark.parametrize("config", HOSTILE_CONFIGS)
def test_hostile_1kb_config_fails_fast_without_allocating(tmp_path, config):
    _write_model_dir(tmp_path / "m", config)
    assert (tmp_path / "m" / CONFIG_NAME).stat().st_size < 8 * 1024
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="invalid config"):
            zoo.load(str(tmp_path / "m"))
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < 5 * 1024 * 1024, peak


def test_config_from_a_hub_repo_is_checked_before_building(hub_server):
    repo = "test-org/hostile-config"
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.create_commit(
        repo,
        [
            CommitOperationAdd(CONFIG_NAME, json.dumps({"temperature": "hot"}).encode()),
            CommitOperationAdd(WEIGHTS_NAME, b"\0" * 16),
        ],
        commit_message="hostile config",
    )
    with pytest.raises(ValueError, match="temperature must be a number"):
        zoo.load(repo)


def test_config_json_that_is_not_an_object_is_rejected(tmp_path):
    (tmp_path / "c.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="invalid config"):
        EnsembleConfig.load(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        EnsembleConfig.load(tmp_path / "c.json")


# --- issue 17: the config is frozen, entries are partial configs, overrides checked at load ---
def test_config_is_frozen_and_changed_by_replace():
    import dataclasses

    cfg = zoo.get_entry("ncl-resnet32-fmnistlt").build_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.preprocess.channels = 3  # type: ignore[misc]
    hot = dataclasses.replace(cfg, temperature=2.0)
    assert (hot.temperature, cfg.temperature) == (2.0, 1.0)
    with pytest.raises(ValueError, match="temperature must be finite"):
        dataclasses.replace(cfg, temperature=-1.0)  # replace checks again


def test_logit_prior_follows_the_method_once():
    from ltzoo.training.methods import METHODS

    for name, method in METHODS.items():
        assert method.logit_prior == ("train" if name == "ce" else "uniform")
    entry = zoo.get_entry("ncl-resnet32-fmnistlt")
    assert entry.build_config().logit_prior == "uniform"
    assert entry.build_config(method="ce").logit_prior == "train"  # e.g. CBD's teachers
    assert "logit_prior" not in entry.config  # an entry holds only its own fields


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model_overrides.num_expert=2", r"model_overrides for .*unknown config keys.*num_expert"),
        ("model_overrides.num_experts=0", r"model_overrides for .*num_experts must be in"),
        ('model_overrides.head="conv"', r"model_overrides for .*unknown head"),
        ('model_overrides.layout="single"', r"model_overrides for .*'single' needs num_experts=1"),
    ],
)
def test_bad_model_override_fails_when_the_recipe_loads(override, message, capsys):
    from ltzoo.cli import main
    from ltzoo.training.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe("fmnistlt_ncl", [override])
    assert main(["train", "fmnistlt_ncl", override, "--dry-run"]) == 2  # before any training
    assert "model_overrides" in capsys.readouterr().err
