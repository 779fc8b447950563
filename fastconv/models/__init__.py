"""Networks assembled from fastconv's kernels, with torchvision's parameter names (state dicts load both
ways with ``strict=True``) and torchvision's initialisation:

* ImageNet ResNets (:mod:`.resnet`): ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
  ``resnet152``, ``wide_resnet50_2``, ``resnext50_32x4d``;
* the CIFAR ResNets of He et al. (2015) (:mod:`.cifar_resnet`): ``resnet20``, ``resnet32``, ``resnet44``,
  ``resnet56``, ``resnet110``, with the strided, zero-padded identity shortcut;
* AlexNet (:mod:`.alexnet`), torchvision's variant or the original one.

Every convolution runs on fastconv's kernels: conv + BatchNorm (+ ReLU) fused (``ConvBNReLU``'s path),
the block's last conv + BatchNorm then fastconv's residual add with its ReLU, fastconv's max pooling; only
the global average pooling and the fully connected classifier are torch's. ``algo=`` picks the
convolution algorithm for every layer.
"""
from .alexnet import AlexNet, alexnet
from .cifar_resnet import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152,
                     resnext50_32x4d, wide_resnet50_2)

__all__ = [
    "AlexNet", "BasicBlock", "Bottleneck", "CifarResNet", "ResNet", "alexnet", "resnet18", "resnet20", "resnet32",
    "resnet34", "resnet44", "resnet50", "resnet56", "resnet101", "resnet110", "resnet152", "resnext50_32x4d",
    "wide_resnet50_2",
]
