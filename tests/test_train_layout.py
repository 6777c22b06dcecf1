"""The fast training layout computes exactly what the old one did.

* channels-last model and batches: same loss and gradients (1e-5 relative) as the
  contiguous (NCHW) layout on the same weights and batch, for NCL, ECL, CE and CBD's student;
  the same state-dict keys and values, so saved weights and the ONNX export are unchanged;
* batched uint8 augmentation: pixel-for-pixel the per-sample transforms for given draws,
  and only used where it can reproduce the requested augmentations.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ltzoo.training.config import load_recipe
from ltzoo.training.data import ArrayImageDataset, build_transforms
from ltzoo.training.data.batched import BatchAugment, UInt8Batches, batched_augment_for
from ltzoo.training.data.transforms import cutout_size
from ltzoo.training.methods import METHODS
from ltzoo.zoo import Ensemble
from ltzoo.zoo.config import PreprocessConfig
from ltzoo.zoo.registry import get_entry

COUNTS = [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
FMNIST_PRE = PreprocessConfig()


def _method(recipe: str):
    cfg = load_recipe(recipe)
    config = get_entry(cfg.model).build_config(class_counts=COUNTS)
    cls = METHODS[cfg.method]
    return cls(Ensemble(config), COUNTS, cls.Params.from_dict(cfg.method_params))


def _loss_and_grads(method, images, labels):
    torch.manual_seed(1)  # same random key views / draws inside the methods
    loss, _ = method(images, labels)
    method.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", ["fmnistlt_ncl", "fmnistlt_ecl", "fmnistlt_ce"])
def test_channels_last_gives_the_same_loss_and_gradients(recipe):
    """Identical mathematics, checked in float64 (rounding cannot hide a difference there).

    In float32 the loss agrees to 1e-5 too, but the gradients of an untrained 31-layer net
    differ by float32 rounding amplified through 31 BatchNorms (PyTorch's channels-last BN
    reduction rounds differently): up to ~1e-2 relative on some BN weights, against ~1e-3
    between the contiguous float32 layout and float64 itself.
    """
    torch.manual_seed(0)
    old = _method(recipe).double()
    new = copy.deepcopy(old).to(memory_format=torch.channels_last)
    images = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    labels = torch.arange(16) % 10
    loss_old, grads_old = _loss_and_grads(old, images, labels)
    loss_new, grads_new = _loss_and_grads(
        new, images.contiguous(memory_format=torch.channels_last), labels
    )
    torch.testing.assert_close(loss_new, loss_old, rtol=1e-10, atol=0)
    assert grads_new.keys() == grads_old.keys() and len(grads_old) > 10
    for name, g in grads_old.items():
        torch.testing.assert_close(grads_new[name], g, rtol=1e-8, atol=1e-12, msg=name)


def test_channels_last_float32_loss_matches():
    torch.manual_seed(0)
    old = _method("fmnistlt_ncl")
    new = copy.deepcopy(old).to(memory_format=torch.channels_last)
    images, labels = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    loss_old, _ = _loss_and_grads(old, images, labels)
    loss_new, _ = _loss_and_grads(new, images.contiguous(memory_format=torch.channels_last), labels)
    torch.testing.assert_close(loss_new, loss_old, rtol=1e-5, atol=0)


def test_channels_last_keeps_the_published_weights():
    torch.manual_seed(0)
    model = Ensemble(get_entry("ncl-resnet32-fmnistlt").build_config(class_counts=COUNTS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(memory_format=torch.channels_last).to(memory_format=torch.contiguous_format)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].is_contiguous() and torch.equal(after[k], v), k


def _per_sample(image: np.ndarray, top: int, left: int, flip: bool, centre, size: int):
    """The per-sample pipeline's result for given draws (PadRandomCrop, flip, normalise, cutout)."""
    pil = Image.fromarray(image)
    h, w = image.shape[:2]
    pil = pil.crop((left, top, left + w, top + h))
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    mean = torch.tensor(FMNIST_PRE.mean).view(-1, 1, 1)
    std = torch.tensor(FMNIST_PRE.std).view(-1, 1, 1)
    t = (t - mean) / std
    if size:
        cy, cx = centre
        y0, x0 = max(0, cy - size // 2), max(0, cx - size // 2)
        t[..., y0 : cy - size // 2 + size, x0 : cx - size // 2 + size] = 0.0
    return t


@pytest.mark.parametrize("cutout", [False, True])
def test_batched_augmentation_matches_the_per_sample_transforms(cutout):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    size = cutout_size(28, 28) if cutout else 0
    aug = BatchAugment(FMNIST_PRE, crop_flip=True, cutout=size)
    torch.manual_seed(3)
    draws = aug.draw(12, 28, 28, torch.device("cpu"))
    out = aug.augment(images, draws)
    assert out.shape == (12, 1, 28, 28) and out.dtype == torch.float32
    for i in range(12):
        top, left = draws["offsets"][i].tolist()
        centre = draws["centres"][i].tolist() if cutout else None
        want = _per_sample(images[i].numpy(), top, left, bool(draws["flip"][i]), centre, size)
        torch.testing.assert_close(out[i], want, rtol=0, atol=1e-6)


def test_batched_draws_cover_the_same_ranges_as_the_per_sample_crop():
    aug = BatchAugment(FMNIST_PRE, crop_flip=True)
    torch.manual_seed(0)
    draws = aug.draw(4000, 28, 28, torch.device("cpu"))
    assert set(draws["offsets"].unique().tolist()) == set(range(-4, 5))
    assert 0.45 < draws["flip"].float().mean() < 0.55


def test_batched_path_only_where_it_reproduces_the_augmentations():
    images = torch.zeros(8, 28, 28, dtype=torch.uint8)
    ds = ArrayImageDataset(images, [0] * 8, build_transforms(FMNIST_PRE, ["crop_flip"]))
    assert batched_augment_for(ds, FMNIST_PRE, ["crop_flip"]) is not None
    assert batched_augment_for(ds, FMNIST_PRE, ["crop_flip", "cutout"]).cutout == cutout_size(
        28, 28
    )
    assert batched_augment_for(ds, FMNIST_PRE, ["crop_flip", "autoaugment"]) is None
    cifar = PreprocessConfig(input_size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert batched_augment_for(ds, cifar, ["crop_flip"]) is None  # wrong size and mode
    assert batched_augment_for(object(), FMNIST_PRE, ["crop_flip"]) is None  # not in memory


def test_uint8_batches_fetch_a_batch_at_once():
    images = torch.arange(5 * 4, dtype=torch.uint8).view(5, 2, 2)
    batch, labels = UInt8Batches(images, [0, 1, 2, 3, 4]).__getitems__([4, 1])
    assert torch.equal(batch, images[[4, 1]]) and labels.tolist() == [4, 1]


def test_compiled_forward_gives_the_same_loss_and_gradients():
    """``run.compile``: the method's forward under torch.compile (inductor, the CPU's C++
    backend) computes what eager does, in float64; weights and their names are untouched.
    CE only: compiling a 3-expert graph takes a minute on 2 cores."""
    torch.manual_seed(0)
    eager = _method("fmnistlt_ce").double().to(memory_format=torch.channels_last)
    compiled_method = copy.deepcopy(eager)
    compiled = torch.compile(compiled_method, dynamic=False)
    images = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16) % 10
    loss_eager, grads_eager = _loss_and_grads(eager, images, labels)
    torch.manual_seed(1)
    loss, _ = compiled(images, labels)
    compiled_method.zero_grad(set_to_none=True)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_eager, rtol=1e-10, atol=0)
    grads = {n: p.grad for n, p in compiled_method.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_eager.keys()
    for name, g in grads_eager.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-8, atol=1e-12, msg=name)
    assert compiled_method.state_dict().keys() == eager.state_dict().keys()
