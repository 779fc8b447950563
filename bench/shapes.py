"""Conv layer shapes the benchmarks run, in one place.

Each layer is (name, N, C, H, W, K, R, S, stride, padding, groups). The GPU set is a slice of ResNet-50
and AlexNet (batch 32) plus a depthwise layer; the CPU set is small so that the default CPU run of
`pytest bench/` takes a couple of minutes with fastconv's plain-loop CPU twin.
"""
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


GPU_LAYERS = [
    ConvLayer("resnet50_conv1", 32, 3, 224, 224, 64, 7, 7, 2, 3),
    ConvLayer("resnet50_l1_3x3", 32, 64, 56, 56, 64, 3, 3, 1, 1),
    ConvLayer("resnet50_l1_1x1", 32, 64, 56, 56, 256, 1, 1),
    ConvLayer("resnet50_l2_3x3s2", 32, 128, 56, 56, 128, 3, 3, 2, 1),
    ConvLayer("resnet50_l3_3x3", 32, 256, 14, 14, 256, 3, 3, 1, 1),
    ConvLayer("resnet50_l4_3x3", 32, 512, 7, 7, 512, 3, 3, 1, 1),
    ConvLayer("alexnet_conv1", 32, 3, 224, 224, 64, 11, 11, 4, 2),
    ConvLayer("alexnet_conv2", 32, 64, 27, 27, 192, 5, 5, 1, 2),
    ConvLayer("alexnet_conv3", 32, 192, 13, 13, 384, 3, 3, 1, 1),
    ConvLayer("depthwise_3x3", 32, 128, 56, 56, 128, 3, 3, 1, 1, groups=128),
]

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
    PoolShape("resnet50_maxpool", 32, 64, 112, 112, 3, 2, 1),
    PoolShape("alexnet_pool1", 32, 64, 55, 55, 3, 2),
    PoolShape("big_k2", 32, 256, 112, 112, 2, 2),
]
CPU_POOLS = [PoolShape("small_k3s2", 2, 16, 56, 56, 3, 2, 1)]

GPU_RESIDUALS = [
    ResidualShape("resnet50_l1_add", 32, 256, 56, 56, 256, 56, 56),
    ResidualShape("resnet50_l4_add", 32, 2048, 7, 7, 2048, 7, 7),
    ResidualShape("cifar_downsample", 128, 32, 16, 16, 16, 32, 32, 2),
]
CPU_RESIDUALS = [
    ResidualShape("small_add", 2, 32, 28, 28, 32, 28, 28),
    ResidualShape("small_downsample", 2, 32, 14, 14, 16, 28, 28, 2),
]
