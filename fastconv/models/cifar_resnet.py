"""The CIFAR-10 ResNets of He et al., "Deep Residual Learning for Image Recognition" (2015), section 4.2:
a 3x3 conv with 16 filters, then three stages of n basic blocks with 16, 32 and 64 filters on 32x32,
16x16 and 8x8 maps (the first block of stages 2 and 3 strides by 2), global average pooling and a
fully connected layer: 6n + 2 weighted layers. The shortcuts are the paper's option A, parameter-free:
where a block halves the map and doubles the width, the identity is subsampled by 2 and zero-padded in
channels, which fastconv's residual add does in the same kernel as the add and the ReLU
(``residual_add(stride=2)``). Parameter counts match the paper's table: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
"""
from __future__ import annotations

import torch
from torch import nn

from ..functional import check_algo
from ..nn import Conv2d
from .resnet import BasicBlock, _FusedPairs, init_like_torchvision


class CifarResNet(_FusedPairs):
    """``CifarResNet(depth)`` with depth = 6n + 2 (20, 32, 44, 56, 110, ...). ``in_channels`` lets the same
    network take grayscale images (the digits demo)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, *, algo: str = "auto") -> None:
        super().__init__()
        check_algo(algo)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.algo = algo
        self.conv1 = Conv2d(in_channels, 16, 3, padding=1, bias=False, algo=algo)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_like_torchvision(self, zero_init_residual=False)
        self._make_fold_caches("stem")

    def _stage(self, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(inplanes, planes, stride, shortcut_stride=stride, algo=self.algo)]
        layers += [BasicBlock(planes, planes, algo=self.algo) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_bn("stem", self.conv1, self.bn1, x, relu=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(20, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    return CifarResNet(32, **kwargs)


def resnet44(**kwargs) -> CifarResNet:
    return CifarResNet(44, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    return CifarResNet(110, **kwargs)
