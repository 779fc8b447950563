"""Drop-in modules."""
from __future__ import annotations

import torch

from . import functional
from .functional import check_algo, conv2d


class Conv2d(torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by fastconv's kernels.

    Takes exactly ``torch.nn.Conv2d``'s arguments (including ``padding_mode`` ``'zeros'``, ``'reflect'``,
    ``'replicate'`` and ``'circular'``, ``device`` and ``dtype``) plus the keyword ``algo`` (one of
    :data:`fastconv.CONV_ALGOS`). Parameters, initialisation and ``state_dict`` are ``nn.Conv2d``'s, so
    state dicts load in both directions, and ``isinstance(m, torch.nn.Conv2d)`` holds.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        algo: str = "auto",
    ) -> None:
        check_algo(algo)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.algo = algo

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            # As nn.Conv2d does: pad explicitly with the mode, then convolve without padding.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups, algo=self.algo)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, algo=self.algo)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, algo={self.algo!r}"


class MaxPool2d(torch.nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` computed by fastconv's kernels (same constructor and attributes)."""

    def forward(self, input: torch.Tensor):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                     ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class ResidualAdd(torch.nn.Module):
    """``forward(residual, shortcut)`` = :func:`fastconv.functional.residual_add` with this module's
    ``stride`` and ``relu``: the skip connection of a ResNet block, as a module."""

    def __init__(self, stride: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.relu = relu

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return functional.residual_add(residual, shortcut, stride=self.stride, relu=self.relu)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, relu={self.relu}"
