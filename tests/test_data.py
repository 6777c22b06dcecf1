"""Tests of training.data: LT profiles, dataset builders, samplers and augmentations."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ltzoo.training.data import (
    AUGMENTATIONS,
    LTSplit,
    build_lt_dataset,
    build_sampler,
    build_transforms,
    lt_counts,
    read_idx,
)
from ltzoo.zoo.config import PreprocessConfig
from ltzoo.zoo.datasets_meta import CIFAR10_CLASSES, DATASETS, FASHION_MNIST_CLASSES
from ltzoo.zoo.preprocess import Preprocess

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
FMNIST_COUNTS = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]


# ----------------------------------------------------------------------------- profile


def test_lt_counts_formula():
    assert lt_counts(1000, 10, 100) == FMNIST_COUNTS
    assert lt_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert lt_counts(500, 100, 100)[0] == 500 and lt_counts(500, 100, 100)[-1] == 5
    assert lt_counts(500, 100, 50)[-1] == 10
    assert lt_counts(7, 4, 1) == [7, 7, 7, 7]
    with pytest.raises(ValueError):
        lt_counts(100, 10, 0.5)


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_lt_counts_and_info():
    split = build_lt_dataset("fashion_mnist_lt")
    assert isinstance(split, LTSplit)
    assert split.class_counts == FMNIST_COUNTS
    assert len(split.train) == sum(FMNIST_COUNTS) == 2478
    assert np.bincount(split.train_labels).tolist() == FMNIST_COUNTS
    assert split.train.labels == split.train_labels
    assert split.class_names == FASHION_MNIST_CLASSES
    assert len(split.val) == 200 and np.bincount(split.val.labels).tolist() == [20] * 10
    assert len(split.test) == 10_000 and np.bincount(split.test.labels).tolist() == [1000] * 10
    info = split.info
    assert info["name"] == "fashion_mnist_lt" and info["rho"] == 100 and info["n_max"] == 1000
    assert info["seed"] == 0 and info["class_order"] == list(range(10))
    assert info["class_counts"] == FMNIST_COUNTS
    assert info["sizes"] == {"train": 2478, "val": 200, "test": 10_000}
    json.dumps(info)  # goes into the model's config.json
    x, y = split.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 0
    # transform=None -> exactly the eval Preprocess of the dataset.
    img = Image.fromarray(split.train.images[0].numpy(), mode="L")
    assert torch.equal(x, Preprocess(DATASETS["fashion_mnist_lt"].preprocess_config())(img))


@needs_fmnist
def test_fashion_mnist_class_order_permutation():
    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    split = build_lt_dataset("fashion_mnist_lt", class_order=order, seed=1)
    orig_train = read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    orig_test = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert split.class_names == [FASHION_MNIST_CLASSES[o] for o in order]
    assert split.class_counts == FMNIST_COUNTS
    got = orig_train[np.asarray(split.train.indices)]
    assert got.tolist() == [order[y] for y in split.train_labels]
    # New class 0 (the head, 1000 images) is original class 3.
    assert set(orig_train[np.asarray(split.train.indices)[:1000]].tolist()) == {3}
    assert split.info["class_order"] == order
    # Test labels remapped the same way: the test image's original label is order[new label].
    test_imgs = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
    for i in (0, 1, 2, 500):
        assert orig_test[i] == order[split.test.labels[i]]
        assert np.array_equal(split.test.images[i].numpy(), test_imgs[i])
    with pytest.raises(ValueError, match="permutation"):
        build_lt_dataset("fashion_mnist_lt", class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])


@needs_fmnist
def test_fashion_mnist_seeded_selection_and_val_disjoint():
    a = build_lt_dataset("fashion_mnist_lt", seed=0)
    b = build_lt_dataset("fashion_mnist_lt", seed=0)
    c = build_lt_dataset("fashion_mnist_lt", seed=1)
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert torch.equal(a.train.images, b.train.images)
    assert a.train.indices != c.train.indices
    for s in (a, c):
        assert not set(s.train.indices) & set(s.val.indices)
        assert len(set(s.train.indices)) == len(s.train)
    small = build_lt_dataset("fashion_mnist_lt", rho=10, n_max=200, val_per_class=5)
    assert small.class_counts == lt_counts(200, 10, 10)
    assert len(small.val) == 50 and small.info["rho"] == 10


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        build_lt_dataset("fashion_mnist_lt", root=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(e.value)


@needs_fmnist
def test_fashion_mnist_epoch_is_fast():
    split = build_lt_dataset(
        "fashion_mnist_lt",
        train_transform=build_transforms(
            DATASETS["fashion_mnist_lt"].preprocess_config(), ["crop_flip"]
        ),
    )
    loader = torch.utils.data.DataLoader(
        split.train, batch_size=128, sampler=build_sampler("instance", split.train_labels)
    )
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    elapsed = time.perf_counter() - t0
    assert n == 2478
    assert elapsed < 3.0, f"one Fashion-MNIST-LT epoch of data took {elapsed:.2f}s"


# ----------------------------------------------------------------------------- CIFAR


def _write_cifar10(root: Path, per_class: int = 30, test_per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    for i, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
        batch = {b"batch_label": b"x", b"labels": labels[chunk].tolist(), b"data": data[chunk]}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    tl = np.repeat(np.arange(10), test_per_class)
    test = {b"labels": tl.tolist(), b"data": rng.integers(0, 256, (len(tl), 3072), dtype=np.uint8)}
    (d / "test_batch").write_bytes(pickle.dumps(test))
    (d / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_CLASSES]})
    )
    return d


def test_cifar10_lt_fake_archive(tmp_path):
    _write_cifar10(tmp_path)
    split = build_lt_dataset(
        "cifar10_lt",
        root=str(tmp_path),
        rho=10,
        n_max=20,
        val_per_class=5,
        class_order=[9, *range(9)],
    )
    assert split.class_counts == lt_counts(20, 10, 10)
    assert split.class_names == ["truck", *CIFAR10_CLASSES[:9]]
    assert len(split.val) == 50 and len(split.test) == 40
    assert not set(split.train.indices) & set(split.val.indices)
    x, y = split.train[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert split.info["sizes"]["train"] == sum(split.class_counts)
    # Head uses every image of its class: the balanced val split cannot be drawn.
    with pytest.warns(UserWarning, match="validation"):
        full = build_lt_dataset("cifar10_lt", root=str(tmp_path), rho=10, n_max=30)
    assert full.val is None and full.info["sizes"]["val"] == 0


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar_archive_that_would_run_code_is_refused(tmp_path, monkeypatch):
    d = _write_cifar10(tmp_path)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"labels": [0], b"data": _RunsCode()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
        build_lt_dataset("cifar10_lt", root=str(tmp_path), rho=10, n_max=20)
    assert not (tmp_path / "pwned.txt").exists()


def test_cifar100_lt_fake_archive(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for part, per in (("train", 8), ("test", 2)):
        lab = np.repeat(np.arange(100), per)
        blob = {
            b"fine_labels": lab.tolist(),
            b"coarse_labels": (lab // 5).tolist(),
            b"data": rng.integers(0, 256, (len(lab), 3072), dtype=np.uint8),
        }
        (d / part).write_bytes(pickle.dumps(blob))
    split = build_lt_dataset("cifar100_lt", root=str(tmp_path), rho=5, n_max=5, val_per_class=2)
    assert split.class_counts == lt_counts(5, 100, 5)
    assert len(split.val) == 200 and len(split.test) == 200 and len(split.class_names) == 100
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_lt_dataset("cifar10_lt", root=str(tmp_path))


# ----------------------------------------------------------------------------- samplers

LABELS = np.repeat(np.arange(5), [400, 200, 100, 50, 25]).tolist()


def _freq(idx, labels=LABELS):
    return np.bincount(np.asarray(labels)[np.asarray(idx)], minlength=5) / len(idx)


def test_sampler_class_frequencies():
    counts = np.bincount(LABELS)
    inst = list(build_sampler("instance", LABELS))
    assert sorted(inst) == list(range(len(LABELS)))
    np.testing.assert_allclose(_freq(inst), counts / counts.sum())
    cb = list(build_sampler("class_balanced", LABELS, num_samples=20_000))
    assert len(cb) == 20_000
    np.testing.assert_allclose(_freq(cb), np.full(5, 0.2), atol=0.015)
    sq = list(build_sampler("sqrt", LABELS, num_samples=20_000))
    np.testing.assert_allclose(_freq(sq), np.sqrt(counts) / np.sqrt(counts).sum(), atol=0.015)
    # Within a class, images are drawn uniformly: the 25 tail images all appear.
    assert {i for i in cb if LABELS[i] == 4} == set(range(750, 775))


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt"])
def test_sampler_determinism_and_epochs(kind):
    a = build_sampler(kind, LABELS, seed=3)
    b = build_sampler(kind, LABELS, seed=3)
    assert list(a) == list(b) and list(a) == list(a)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(build_sampler(kind, LABELS, seed=4)) != list(build_sampler(kind, LABELS, seed=3))
    assert len(a) == len(LABELS)


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt"])
def test_sampler_two_rank_sharding(kind):
    labels = LABELS[:-1]  # 774: odd, so padding is needed
    full = build_sampler(kind, labels, seed=5)
    full.set_epoch(2)
    glob = list(full)
    shards = []
    for r in range(2):
        s = build_sampler(kind, labels, seed=5, num_replicas=2, rank=r)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(shards[-1]) == 387
    # Interleaving the shards rebuilds the global sequence (+1 wrap-around pad).
    merged = [shards[i % 2][i // 2] for i in range(774)]
    assert merged == glob
    if kind == "instance":
        assert set(shards[0]).isdisjoint(shards[1])
        assert set(shards[0]) | set(shards[1]) == set(range(774))
    three = build_sampler(kind, labels, seed=5, num_replicas=3, rank=2, num_samples=10)
    assert len(three) == len(list(three)) == 4


def test_sampler_unknown_kind():
    with pytest.raises(ValueError, match="class_balanced"):
        build_sampler("progressive", LABELS)


# ----------------------------------------------------------------------------- transforms

GRAY = PreprocessConfig()  # 28x28, 1 channel
CIFAR = DATASETS["cifar10_lt"].preprocess_config()
BIG = PreprocessConfig(input_size=(64, 64), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)


def _img(mode: str, size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("aug", [*AUGMENTATIONS, "randaugment:1:5", "autoaugment:imagenet"])
@pytest.mark.parametrize("cfg", [GRAY, CIFAR, BIG], ids=["gray28", "rgb32", "rgb64"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_each_augmentation_shapes(aug, cfg, mode):
    tf = build_transforms(cfg, [aug], train=True)
    for size in (cfg.input_size[0], 40):
        out = tf(_img(mode, size))
        assert out.shape == (cfg.channels, *cfg.input_size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_all_augmentations_together_and_eval():
    img = _img("RGB", 32)
    tf = build_transforms(CIFAR, list(AUGMENTATIONS))
    assert tf(img).shape == (3, 32, 32)
    ev = build_transforms(CIFAR, ["crop_flip"], train=False)
    assert isinstance(ev, Preprocess)
    assert torch.equal(ev(img), Preprocess(CIFAR)(img))
    assert torch.equal(
        build_transforms(GRAY, [], train=True)(_img("L", 28)), Preprocess(GRAY)(_img("L", 28))
    )
    # The train pipeline's final normalisation equals Preprocess on an input-size image.
    for cfg, mode in ((CIFAR, "RGB"), (GRAY, "L")):
        im = _img(mode, cfg.input_size[0])
        assert torch.equal(build_transforms(cfg, ["cutout"])._finish(im), Preprocess(cfg)(im))
    # Cutout zeroes a 16x16 square of the normalised 32x32 tensor.
    cut = build_transforms(CIFAR, ["cutout"])(Image.new("RGB", (32, 32), (250, 10, 120)))
    assert 8 * 8 * 3 <= int((cut == 0).sum()) <= 16 * 16 * 3


def test_unknown_augmentation():
    with pytest.raises(ValueError, match="crop_flip") as e:
        build_transforms(GRAY, ["mixup"])
    assert "simclr_jitter" in str(e.value)
    with pytest.raises(ValueError):
        build_transforms(GRAY, ["randaugment:x:y"])
    for bad in ("simclr_jitter:0", "simclr_jitter:2.6", "simclr_jitter:x", "simclr_jitter:1:2"):
        with pytest.raises(ValueError, match="simclr_jitter"):
            build_transforms(CIFAR, [bad])


@pytest.mark.parametrize(
    ("augment", "strength"), [("simclr_jitter", 0.5), ("simclr_jitter:1.0", 1.0)]
)
def test_simclr_jitter_strength_scales_as_simclr(augment, strength):
    """SimCLR's ``color_jitter(strength=s)``: brightness, contrast, saturation 0.8 s, hue 0.2 s,
    applied with p = 0.8, then grayscale with p = 0.2; one channel keeps brightness/contrast."""
    *_, apply, grayscale = build_transforms(CIFAR, [augment]).pil_steps
    jitter = apply.transforms[0]
    assert apply.p == 0.8 and grayscale.p == 0.2 and "Grayscale" in repr(grayscale)
    for got, amount in (
        (jitter.brightness, 0.8),
        (jitter.contrast, 0.8),
        (jitter.saturation, 0.8),
    ):
        assert got == pytest.approx((1 - amount * strength, 1 + amount * strength))
    assert jitter.hue == pytest.approx((-0.2 * strength, 0.2 * strength))
    (grey,) = [s for s in build_transforms(GRAY, [augment]).pil_steps if "Jitter" in repr(s)]
    assert grey.transforms[0].saturation is None and grey.transforms[0].hue is None


# ----------------------------------------------------------------------------- split files


def _png(path: Path, value: int, size: int = 12, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 60)
    Image.new(mode, (size, size), color).save(path)


def test_split_file_missing_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_lt_dataset("imagenet_lt", root=str(tmp_path))
    msg = str(e.value)
    assert "ImageNet_LT_train.txt" in msg and "relative/path.jpg" in msg and "label" in msg
    with pytest.raises(FileNotFoundError, match=r"iNaturalist18_train\.txt"):
        build_lt_dataset("inat2018", root=str(tmp_path))


def test_split_file_dataset(tmp_path):
    counts = [6, 3, 1]
    names = ["a/abbey", "b/bedroom", "c/canyon"]
    lines = {"train": [], "val": [], "test": []}
    for c, (n, name) in enumerate(zip(counts, names, strict=True)):
        for split, k in (("train", n), ("val", 2), ("test", 2)):
            for i in range(k):
                rel = f"data_256/{name}/{split}_{i}.jpg"
                _png(tmp_path / rel, 40 * c + i)
                lines[split].append(f"{rel} {c}")
    for split in lines:
        (tmp_path / f"Places_LT_{split}.txt").write_text("\n".join(lines[split]) + "\n")
    split = build_lt_dataset("places_lt", root=str(tmp_path), class_order=[2, 0, 1])
    assert split.class_counts == [1, 6, 3]
    assert split.class_names == ["canyon", "abbey", "bedroom"]
    assert split.info["rho"] is None and split.info["n_max"] is None and "rho" in split.info["note"]
    assert split.info["sizes"] == {"train": 10, "val": 6, "test": 6}
    json.dumps(split.info)
    assert np.bincount(split.train_labels).tolist() == [1, 6, 3]
    x, y = split.train[0]
    assert x.shape == (3, 224, 224) and y == 1
    assert split.test.samples[0][0].endswith("abbey/test_0.jpg") and split.test.labels[0] == 1


# ----------------------------------------------------------------------------- ImageFolder-LT


def _folder(root: Path, per_class: dict[str, int], split: str = "train") -> None:
    for c, (name, n) in enumerate(per_class.items()):
        for i in range(n):
            _png(root / split / name / f"{i}.png", 20 * c + i, mode="L" if c % 2 else "RGB")


def test_imagefolder_lt_as_is(tmp_path):
    _folder(tmp_path, {"cat": 5, "dog": 3, "eel": 1})
    _folder(tmp_path, {"cat": 2, "dog": 2, "eel": 2}, "test")
    split = build_lt_dataset("imagefolder_lt", root=str(tmp_path))
    assert split.class_names == ["cat", "dog", "eel"] and split.class_counts == [5, 3, 1]
    assert split.val is None and len(split.test) == 6
    assert split.info["lt_profile_applied"] is False
    # An already imbalanced folder ignores the (default) rho the training engine passes.
    assert build_lt_dataset("imagefolder_lt", root=str(tmp_path), rho=100).class_counts == [5, 3, 1]
    json.dumps(split.info)
    tf = build_transforms(CIFAR, ["crop_flip", "simclr_jitter"])
    split = build_lt_dataset(
        "imagefolder_lt", root=str(tmp_path), class_order=[2, 1, 0], train_transform=tf
    )
    assert split.class_names == ["eel", "dog", "cat"] and split.class_counts == [1, 3, 5]
    x, y = split.train[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_imagefolder_lt_with_rho(tmp_path):
    _folder(tmp_path, dict.fromkeys(["c0", "c1", "c2", "c3"], 12))
    _folder(tmp_path, dict.fromkeys(["c0", "c1", "c2", "c3"], 2), "test")
    split = build_lt_dataset("imagefolder_lt", root=str(tmp_path), rho=8, val_per_class=2, seed=3)
    assert split.class_counts == lt_counts(10, 4, 8) == [10, 5, 2, 1]
    assert len(split.val) == 8 and split.info["n_max"] == 10 and split.info["rho"] == 8
    train_paths = {p for p, _ in split.train.samples}
    assert train_paths.isdisjoint(p for p, _ in split.val.samples)
    again = build_lt_dataset("imagefolder_lt", root=str(tmp_path), rho=8, val_per_class=2, seed=3)
    assert again.train.samples == split.train.samples
    with pytest.raises(FileNotFoundError, match="train"):
        build_lt_dataset("imagefolder_lt", root=str(tmp_path / "nope"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="fashion_mnist_lt"):
        build_lt_dataset("mnist")
