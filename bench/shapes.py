"""Shapes the benchmarks run, in one place.

Full sweep (``FASTCONV_BENCH_FULL=1``): every distinct convolution layer of ResNet-50 and of AlexNet at
224x224 (batch 64, the batch the speed targets are stated at), derived from the architectures below, and the
pooling and residual-add shapes those networks produce (on a CPU: the same conv layers at batch 1). Default: a representative slice on a GPU (so
a device check stays within minutes), and small layers on a CPU (fastconv's CPU twins are plain loops;
the default CPU run finishes in a few minutes). Each conv layer is (name, N, C, H, W, K, R, S, stride, padding, groups).
"""
import os
from typing import NamedTuple


class ConvLayer(NamedTuple):
    name: str
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def output_hw(self):
        p = (self.H + 2 * self.padding - self.R) // self.stride + 1
        q = (self.W + 2 * self.padding - self.S) // self.stride + 1
        return p, q

    def flops(self) -> int:
        """2 * N * K * P * Q * (C / groups) * R * S: forward pass floating-point operations."""
        p, q = self.output_hw()
        return 2 * self.N * self.K * p * q * (self.C // self.groups) * self.R * self.S


FULL = os.environ.get("FASTCONV_BENCH_FULL", "") not in ("", "0")
BATCH = 64  # GPU shapes; the speed targets (issue 8) are stated at batch 64 and above


def resnet50_layers(n: int = BATCH) -> list:
    """The distinct convolutions of torchvision's ResNet-50 (v1.5: the stride on the 3x3) at 224x224."""
    layers, seen = [], set()

    def add(name, c, h, k, r, stride, pad):
        key = (c, h, k, r, stride)
        if key not in seen:
            seen.add(key)
            layers.append(ConvLayer(name, n, c, h, h, k, r, r, stride, pad))

    add("resnet50_conv1", 3, 224, 64, 7, 2, 3)
    inplanes, size = 64, 56
    for stage, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            tag = f"resnet50_l{stage}"
            add(f"{tag}_1x1_reduce{'_first' if b == 0 else ''}", inplanes, size, planes, 1, 1, 0)
            add(f"{tag}_3x3{'s2' if s == 2 else ''}", planes, size, planes, 3, s, 1)
            out = size // s
            add(f"{tag}_1x1_expand", planes, out, planes * 4, 1, 1, 0)
            if b == 0:
                add(f"{tag}_downsample", inplanes, size, planes * 4, 1, s, 0)
            inplanes, size = planes * 4, out
    return layers


def alexnet_layers(n: int = BATCH) -> list:
    """torchvision's AlexNet convolutions at 224x224."""
    return [
        ConvLayer("alexnet_conv1", n, 3, 224, 224, 64, 11, 11, 4, 2),
        ConvLayer("alexnet_conv2", n, 64, 27, 27, 192, 5, 5, 1, 2),
        ConvLayer("alexnet_conv3", n, 192, 13, 13, 384, 3, 3, 1, 1),
        ConvLayer("alexnet_conv4", n, 384, 13, 13, 256, 3, 3, 1, 1),
        ConvLayer("alexnet_conv5", n, 256, 13, 13, 256, 3, 3, 1, 1),
    ]


GPU_SLICE = [
    ConvLayer("resnet50_conv1", BATCH, 3, 224, 224, 64, 7, 7, 2, 3),
    ConvLayer("resnet50_l1_3x3", BATCH, 64, 56, 56, 64, 3, 3, 1, 1),
    ConvLayer("resnet50_l1_1x1", BATCH, 64, 56, 56, 256, 1, 1),
    ConvLayer("resnet50_l2_3x3s2", BATCH, 128, 56, 56, 128, 3, 3, 2, 1),
    ConvLayer("resnet50_l3_3x3", BATCH, 256, 14, 14, 256, 3, 3, 1, 1),
    ConvLayer("resnet50_l4_3x3", BATCH, 512, 7, 7, 512, 3, 3, 1, 1),
    ConvLayer("alexnet_conv1", BATCH, 3, 224, 224, 64, 11, 11, 4, 2),
    ConvLayer("alexnet_conv2", BATCH, 64, 27, 27, 192, 5, 5, 1, 2),
    ConvLayer("alexnet_conv3", BATCH, 192, 13, 13, 384, 3, 3, 1, 1),
    ConvLayer("depthwise_3x3", BATCH, 128, 56, 56, 128, 3, 3, 1, 1, groups=128),
]

GPU_LAYERS = resnet50_layers() + alexnet_layers() + [GPU_SLICE[-1]] if FULL else GPU_SLICE
# The full sweep on a CPU: the same layers at batch 1 (fastconv's CPU twins are plain loops).
CPU_FULL_LAYERS = resnet50_layers(1) + alexnet_layers(1)

CPU_LAYERS = [
    ConvLayer("small_3x3", 2, 16, 28, 28, 16, 3, 3, 1, 1),
    ConvLayer("small_3x3s2", 2, 32, 28, 28, 32, 3, 3, 2, 1),
    ConvLayer("small_1x1", 2, 32, 14, 14, 64, 1, 1),
    ConvLayer("small_stem_7x7s2", 1, 3, 64, 64, 16, 7, 7, 2, 3),
    ConvLayer("small_depthwise", 2, 32, 28, 28, 32, 3, 3, 1, 1, groups=32),
]


class PoolShape(NamedTuple):
    name: str
    N: int
    C: int
    H: int
    W: int
    kernel: int
    stride: int
    padding: int = 0
    ceil_mode: bool = False


class ResidualShape(NamedTuple):
    """residual/output (N, C, P, Q), shortcut (N, J, H, W), subsampled by stride."""

    name: str
    N: int
    C: int
    P: int
    Q: int
    J: int
    H: int
    W: int
    stride: int = 1


GPU_POOLS = [
    PoolShape("resnet50_maxpool", BATCH, 64, 112, 112, 3, 2, 1),
    PoolShape("alexnet_pool1", BATCH, 64, 55, 55, 3, 2),
    PoolShape("big_k2", BATCH, 256, 112, 112, 2, 2),
]
if FULL:
    GPU_POOLS = GPU_POOLS[:2] + [
        PoolShape("alexnet_pool2", BATCH, 192, 27, 27, 3, 2),
        PoolShape("alexnet_pool3", BATCH, 256, 13, 13, 3, 2),
    ]
CPU_POOLS = [PoolShape("small_k3s2", 2, 16, 56, 56, 3, 2, 1)]

GPU_RESIDUALS = [
    ResidualShape("resnet50_l1_add", BATCH, 256, 56, 56, 256, 56, 56),
    ResidualShape("resnet50_l4_add", BATCH, 2048, 7, 7, 2048, 7, 7),
    ResidualShape("cifar_downsample", 128, 32, 16, 16, 16, 32, 32, 2),
]
if FULL:  # one add per ResNet-50 stage, and the CIFAR ResNets' option-A shortcut
    GPU_RESIDUALS = [ResidualShape(f"resnet50_l{i}_add", BATCH, c, h, h, c, h, h)
                     for i, (c, h) in enumerate([(256, 56), (512, 28), (1024, 14), (2048, 7)], 1)] + GPU_RESIDUALS[2:]
CPU_RESIDUALS = [
    ResidualShape("small_add", 2, 32, 28, 28, 32, 28, 28),
    ResidualShape("small_downsample", 2, 32, 14, 14, 16, 28, 28, 2),
]
