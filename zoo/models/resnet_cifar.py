"""CIFAR ResNet-32 (He et al. 2016, Sec. 4.2), as used by NCL/ECL on CIFAR-LT.

3 stages of 5 basic blocks (16/32/64 channels), parameter-free "option A"
shortcuts (stride-2 subsampling + zero channel padding), Kaiming-normal init:
0.46M parameters for 10 classes. Any number of input channels (1 for Fashion-MNIST).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ShortcutA(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_shortcut = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = _ShortcutA(planes) if needs_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU/add on BatchNorm outputs is safe for autograd (BN's backward needs
        # its input, not its output) and saves two allocations per block (as torchvision).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet32_stages(in_channels: int = 3) -> tuple[list[nn.Module], int]:
    """ResNet-32 as a list of stages (stem, stage1..3, pool) and its feature width (64)."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
    )
    stages: list[nn.Module] = [
        stem,
        _stage(16, 16, 5, 1),
        _stage(16, 32, 5, 2),
        _stage(32, 64, 5, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ]
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
    return stages, 64
