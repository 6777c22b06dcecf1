"""Every registered model builds and runs a forward pass (as timm's tests do for its zoo).

Random weights (``pretrained=False``); two images at the entry's input size, or 64 px for
the ImageNet-style backbones (adaptive pooling makes them size-agnostic): the whole set
takes about 9 s on one core.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltzoo import zoo
from ltzoo.zoo.config import MAX_PARAMETERS

_SIDE = 64


@pytest.mark.parametrize("name", [row["name"] for row in zoo.list_models()])
def test_registered_model_forward(name):
    torch.manual_seed(0)
    model = zoo.load(name, pretrained=False)
    cfg = model.config
    if cfg.logit_prior == "train":  # CE: undoing the training prior needs its class counts
        with pytest.raises(ValueError, match="needs the model's training class counts"):
            model.predict(torch.zeros(1, cfg.preprocess.channels, _SIDE, _SIDE))
        cfg = model.config = dataclasses.replace(cfg, class_counts=[10] * cfg.num_classes)
    assert cfg.name == name and cfg.estimated_parameters() <= MAX_PARAMETERS
    height, width = (min(s, _SIDE) for s in cfg.preprocess.input_size)
    images = torch.randn(2, cfg.preprocess.channels, height, width)
    with torch.inference_mode():
        expert_logits = model.expert_logits(images)
        prediction = model.predict(images, top_k=3)
    assert expert_logits.shape == (cfg.num_experts, 2, cfg.num_classes)
    assert torch.isfinite(expert_logits).all()
    assert prediction.probs.shape == (2, cfg.num_classes)
    torch.testing.assert_close(prediction.probs.sum(1), torch.ones(2))
    assert len(prediction.labels) == 2 and all(len(row) == 3 for row in prediction.labels)
