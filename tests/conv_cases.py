"""The one sample generator for conv2d tests: named cases covering every mode, with random data."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ConvCase:
    name: str
    input_shape: tuple  # (N, C, H, W), or (C, H, W) for unbatched
    weight_shape: tuple  # (K, C / groups, R, S)
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name

    def make(self, device="cpu", dtype=torch.float32, requires_grad=False):
        """Random input, weight and bias (never zeros), as leaf tensors."""
        x = torch.randn(self.input_shape, device=device, dtype=dtype, requires_grad=requires_grad)
        w = torch.randn(self.weight_shape, device=device, dtype=dtype, requires_grad=requires_grad)
        b = torch.randn(self.weight_shape[0], device=device, dtype=dtype, requires_grad=requires_grad) if self.bias else None
        return x, w, b

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


CASES = [
    ConvCase("3x3_pad1", (2, 3, 7, 9), (4, 3, 3, 3), padding=1),
    ConvCase("5x3_stride2x3", (2, 4, 11, 10), (6, 4, 5, 3), stride=(2, 3)),
    ConvCase("dilation2x1", (1, 3, 9, 8), (5, 3, 3, 3), padding=(2, 0), dilation=(2, 1)),
    ConvCase("groups2", (2, 4, 6, 7), (6, 2, 3, 3), padding=1, groups=2),
    ConvCase("depthwise_stride2", (2, 5, 8, 8), (5, 1, 3, 3), stride=2, padding=1, groups=5),
    ConvCase("depthwise_multiplier2", (1, 3, 7, 7), (6, 1, 3, 3), groups=3, bias=False),
    # an R x 1 depthwise filter: its padded KRSC copy was once laid out R-fastest (the GPU read it wrong)
    ConvCase("depthwise_3x1", (2, 6, 6, 5), (6, 1, 3, 1), padding=(1, 0), groups=6),
    # 800 positions and 25 taps: the depthwise wgrad kernel splits the positions over blocks (7 splits in
    # channels_last, 2 in NCHW) and the taps into chunks of 9, 9 and 7; 40 filters fill a block of 32 and part of one
    ConvCase("depthwise_5x5_split_positions", (2, 40, 20, 20), (40, 1, 5, 5), padding=2, groups=40),
    ConvCase("pointwise", (3, 8, 5, 5), (16, 8, 1, 1)),
    ConvCase("pointwise_stride2", (2, 8, 6, 7), (4, 8, 1, 1), stride=2, bias=False),
    ConvCase("stem_7x7_stride2", (1, 3, 17, 19), (8, 3, 7, 7), stride=2, padding=3),
    ConvCase("alexnet_11x11_stride4", (1, 3, 31, 31), (4, 3, 11, 11), stride=4, padding=2),
    ConvCase("pad_beyond_half_kernel", (1, 2, 4, 4), (3, 2, 3, 3), padding=3),
    ConvCase("kernel_fills_padded_input", (1, 2, 3, 3), (2, 2, 5, 5), padding=1),
    ConvCase("one_pixel", (2, 3, 1, 1), (4, 3, 1, 1)),
    ConvCase("everything_asymmetric", (2, 6, 13, 12), (8, 3, 2, 4), stride=(3, 2), padding=(1, 3), dilation=(2, 3), groups=2),
    ConvCase("wide_k_partial_block", (2, 16, 9, 9), (20, 16, 3, 3), padding=1),
    ConvCase("many_c_steps", (1, 40, 6, 6), (24, 40, 3, 3), padding=1, bias=False),
    ConvCase("tile_edges_17x33", (1, 3, 17, 33), (9, 3, 3, 3), padding=1),
    ConvCase("same_even_kernel", (2, 3, 8, 7), (4, 3, 4, 2), padding="same"),
    ConvCase("same_dilated", (1, 4, 9, 9), (4, 2, 3, 2), padding="same", dilation=(2, 3), groups=2),
    ConvCase("valid", (2, 3, 6, 6), (2, 3, 3, 3), padding="valid"),
    ConvCase("unbatched", (3, 8, 8), (5, 3, 3, 3), padding=1),
    ConvCase("empty_batch", (0, 3, 8, 8), (4, 3, 3, 3), padding=1),
    ConvCase("huge_dilation_unstaged", (1, 2, 130, 130), (8, 2, 3, 3), dilation=60, padding=1),
]

# Small enough for gradcheck's numerical Jacobians in float64.
GRADCHECK_CASES = [
    ConvCase("gc_basic", (2, 2, 5, 4), (3, 2, 3, 2), padding=1),
    ConvCase("gc_strided_dilated", (1, 2, 7, 6), (2, 2, 2, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    ConvCase("gc_groups", (1, 4, 5, 5), (4, 2, 3, 3), stride=2, padding=1, groups=2),
    ConvCase("gc_depthwise", (2, 3, 4, 4), (3, 1, 3, 3), padding=1, groups=3, bias=False),
    ConvCase("gc_same_even", (1, 2, 4, 5), (2, 2, 2, 2), padding="same"),
]
