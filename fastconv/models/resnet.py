"""torchvision's ImageNet ResNets (He et al., 2015) on fastconv's kernels.

Module names, shapes and initialisation are torchvision's (``conv1``/``bn1``/``relu``/``maxpool``,
``layer1``..``layer4`` of ``BasicBlock`` or ``Bottleneck``, each with ``conv1``/``bn1``/... and an optional
``downsample = Sequential(conv1x1, BatchNorm2d)``, then ``avgpool`` and ``fc``), so
``model.load_state_dict(torchvision_model.state_dict())`` works with ``strict=True`` and gives the same
logits. What differs is the forward: every conv + BatchNorm pair runs fused (``fastconv.ConvBNReLU``'s
path: folded into the conv in eval mode, fastconv's statistics and normalisation kernels in training), with
the ReLU fused where one follows, and a block's last pair takes the shortcut as a residual added before the
ReLU: in the conv's epilogue with ``algo="implicit_gemm"`` in eval mode (conv + BN + add + ReLU in one kernel),
else through fastconv's ``residual_add(relu=True)``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional
from ..functional import check_algo
from ..nn import Conv2d, FoldCache, MaxPool2d, _conv_output_shape, run_conv_bn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, algo: str = "auto") -> Conv2d:
    return Conv2d(in_planes, out_planes, 3, stride, 1, groups=groups, bias=False, algo=algo)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, algo: str = "auto") -> Conv2d:
    return Conv2d(in_planes, out_planes, 1, stride, bias=False, algo=algo)


class _FusedPairs(nn.Module):
    """A module whose (conv, BatchNorm) attribute pairs run through the fused path, each with its own cache of
    folded eval-mode weights (created with the module, so that torch.compile traces no allocation)."""

    def _make_fold_caches(self, *names: str) -> None:
        self._fold_caches = {name: FoldCache() for name in names}

    def _conv_bn(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, relu: bool,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        return run_conv_bn(conv, bn, x, relu=relu, algo=self.algo, cache=self._fold_caches[name], residual=residual)

    def _conv_bn_add(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, shortcut: torch.Tensor,
                     stride: int = 1) -> torch.Tensor:
        """A block's end, ``relu(bn(conv(x)) + shortcut)``: the shortcut goes into the conv's epilogue when it
        has the output's shape (one implicit-GEMM kernel in eval mode),
        else (the CIFAR shortcut, subsampled and zero-padded) through fastconv's residual add."""
        if stride == 1 and tuple(shortcut.shape) == _conv_output_shape(conv, x):
            return self._conv_bn(name, conv, bn, x, relu=True, residual=shortcut)
        out = self._conv_bn(name, conv, bn, x, relu=False)
        return functional.residual_add(out, shortcut, stride=stride, relu=True)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        ds = self.downsample
        if ds is None:
            return x
        if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d) and \
                isinstance(ds[1], nn.BatchNorm2d):
            return self._conv_bn("downsample", ds[0], ds[1], x, relu=False)
        return ds(x)  # a user-supplied shortcut module


class BasicBlock(_FusedPairs):
    """Two 3x3 conv + BatchNorm pairs: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut_stride`` > 1 without a ``downsample`` is the CIFAR ResNets' parameter-free shortcut: ``x``
    subsampled by the stride and zero-padded in channels, inside fastconv's residual add."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, *, shortcut_stride: int = 1, algo: str = "auto") -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64 (as torchvision's)")
        self.conv1 = conv3x3(inplanes, planes, stride, algo=algo)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, algo=algo)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.shortcut_stride = shortcut_stride
        self.algo = algo
        self._make_fold_caches("1", "2", "downsample")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_bn("1", self.conv1, self.bn1, x, relu=True)
        return self._conv_bn_add("2", self.conv2, self.bn2, out, self._shortcut(x), self.shortcut_stride)


class Bottleneck(_FusedPairs):
    """1x1 reduce, 3x3 (strided, grouped for ResNeXt), 1x1 expand (x4), each conv + BatchNorm fused; the
    stride sits on the 3x3 conv (ResNet v1.5, as torchvision's)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, *, algo: str = "auto") -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width, algo=algo)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, algo=algo)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion, algo=algo)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.algo = algo
        self._make_fold_caches("1", "2", "3", "downsample")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_bn("1", self.conv1, self.bn1, x, relu=True)
        out = self._conv_bn("2", self.conv2, self.bn2, out, relu=True)
        return self._conv_bn_add("3", self.conv3, self.bn3, out, self._shortcut(x))


def init_like_torchvision(model: nn.Module, zero_init_residual: bool) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BatchNorm weight 1 and bias 0; optionally the last BatchNorm of
    each block zero so that blocks start as identities (Goyal et al.)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class ResNet(_FusedPairs):
    """torchvision's ``ResNet(block, layers, num_classes, zero_init_residual, groups, width_per_group)`` on
    fastconv's kernels (no ``replace_stride_with_dilation``), plus ``algo``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64, *,
                 algo: str = "auto") -> None:
        super().__init__()
        check_algo(algo)
        self.algo = algo
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False, algo=algo)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_like_torchvision(self, zero_init_residual)
        self._make_fold_caches("stem")

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride, algo=self.algo),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, algo=self.algo)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width, algo=self.algo))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_bn("stem", self.conv1, self.bn1, x, relu=True)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


def wide_resnet50_2(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=64 * 2, **kwargs)
