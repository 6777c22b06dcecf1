"""ImageNet-style ResNets from torchvision builders, split into stages.

Pretrained initialisation, only when asked for (``pretrained=``): ``"imagenet"`` loads
torchvision's own ImageNet weights for the architecture through torchvision's weights API
(downloaded once from download.pytorch.org into the torch hub cache, ``$TORCH_HOME``, and
checked against the hash in the file name), a path loads a local torchvision state dict
(safetensors or a trusted ``.pth``). The classifier ``fc`` is never used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

#: ``pretrained=IMAGENET``: torchvision's default ImageNet weights of the architecture
IMAGENET = "imagenet"

BUILDERS: dict[str, Callable[..., tvm.ResNet]] = {
    "resnet50": tvm.resnet50,
    "resnext50_32x4d": tvm.resnext50_32x4d,
    "resnet101": tvm.resnet101,
    "resnet152": tvm.resnet152,
}


def _load_local_weights(net: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:  # a local torchvision checkpoint the user chose; never a downloaded file
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def torchvision_stages(
    name: str, in_channels: int = 3, pretrained: str | Path | None = None
) -> tuple[list[nn.Module], int]:
    """A torchvision ResNet as stages (stem, layer1..4, pool) and its feature width,
    initialised from ``pretrained`` (:data:`IMAGENET` or a local file) when given."""
    if name not in BUILDERS:
        raise ValueError(f"unknown torchvision backbone {name!r}; choose from {sorted(BUILDERS)}")
    imagenet = pretrained == IMAGENET
    net = BUILDERS[name](weights=tvm.get_model_weights(name).DEFAULT if imagenet else None)
    if pretrained is not None and not imagenet:
        _load_local_weights(net, pretrained)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    pool = nn.Sequential(net.avgpool, nn.Flatten())
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4, pool], net.fc.in_features
