"""fastconv's functional API: drop-in replacements for ``torch.nn.functional`` ops."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import backends, ops
from .ops import CONV_OPS

#: Every name ``algo=`` accepts. ``"auto"`` chooses per call (:mod:`fastconv.backends`).
CONV_ALGOS: tuple[str, ...] = ("auto",) + tuple(CONV_OPS)


def check_algo(algo: str) -> None:
    if algo not in CONV_ALGOS:
        raise ValueError(f"fastconv: unknown algo {algo!r}; expected one of {CONV_ALGOS}")


def _conv_call(algo: str, input, weight, bias, stride, padding, dilation, groups):
    """Runs one algorithm's forward op (im2col also takes the workspace limit)."""
    extra = (backends.workspace_limit(),) if algo == "im2col" else ()
    return CONV_OPS[algo].fprop(input, weight, bias, list(stride), list(padding), list(dilation), groups, *extra)


def _pair(value, name: str, op: str = "fastconv.conv2d") -> tuple[int, int]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
        if len(values) == 1:
            values = values * 2
    else:
        values = (value, value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return values


def _same_padding(input: torch.Tensor, weight: torch.Tensor, stride, dilation) -> tuple[torch.Tensor, tuple[int, int]]:
    """padding='same' as torch does it: half the dilated kernel on each side, and when that total is odd
    the extra row/column of zeros goes at the bottom/right (an explicit pad of the input)."""
    if any(s != 1 for s in stride):
        raise ValueError("fastconv.conv2d: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    begin = (total[0] // 2, total[1] // 2)
    extra_h, extra_w = total[0] - 2 * begin[0], total[1] - 2 * begin[1]
    if extra_h or extra_w:
        input = F.pad(input, (0, extra_w, 0, extra_h))
    return input, begin


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    algo: str = "auto",
) -> torch.Tensor:
    """2-D convolution with exactly :func:`torch.nn.functional.conv2d`'s semantics, on fastconv's kernels.

    Args:
        input: ``(N, C, H, W)`` or unbatched ``(C, H, W)``; NCHW, channels_last or any strides.
        weight: ``(K, C / groups, R, S)``.
        bias: optional ``(K,)``.
        stride, dilation: an int or a pair of ints, all positive.
        padding: an int or a pair of non-negative ints (zeros on both sides), ``'valid'`` (none) or
            ``'same'`` (output as large as the input; stride 1 only).
        groups: splits the channels into independent groups (``groups == C`` is depthwise).
        algo: one of :data:`CONV_ALGOS`: ``"direct"``, ``"im2col"`` (im2col + GEMM, the batch chunked to
            the workspace limit of :mod:`fastconv.backends`), or ``"auto"`` (chosen per call, see there).

    The output has torch's memory format (channels_last if the input or the weight is). Supported dtypes
    are float32, float16 and bfloat16, plus float64 on the CPU; fp16/bf16 accumulate in fp32.
    Differentiable in every tensor argument, twice.
    """
    check_algo(algo)
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("fastconv.conv2d: input and weight must be tensors")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"fastconv.conv2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got a {input.dim()}-D "
            f"tensor of shape {list(input.shape)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            f"fastconv.conv2d: expected a 4-D weight (K, C / groups, R, S), got a {weight.dim()}-D tensor of "
            f"shape {list(weight.shape)}"
        )
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            input, padding = _same_padding(input, weight, stride, dilation)
        else:
            raise ValueError(f"fastconv.conv2d: padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    else:
        padding = _pair(padding, "padding")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise ValueError(f"fastconv.conv2d: groups must be an int, got {groups!r}")
    args = (input, weight, bias, stride, padding, dilation, groups)
    if algo == "auto":
        candidates = {name: (lambda name=name: _conv_call(name, *args)) for name in CONV_OPS}
        algo = backends.choose_algo(*args, candidates=candidates)
    output = _conv_call(algo, *args)
    return output.squeeze(0) if unbatched else output


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """2-D max pooling with exactly :func:`torch.nn.functional.max_pool2d`'s semantics.

    ``stride`` defaults to ``kernel_size``; ``padding`` (implicit -inf) is at most half the kernel;
    ``ceil_mode`` lets the last window hang over the end if it starts inside the input or its left
    padding. NaN propagates. With ``return_indices`` also returns the flat ``h * W + w`` position of each
    maximum in its plane (torch's convention, usable by ``max_unpool2d``). ``(N, C, H, W)`` or unbatched
    ``(C, H, W)``, NCHW or channels_last (the output follows the input), float32/float16/bfloat16 (and
    float64 on the CPU).
    """
    op = "fastconv.max_pool2d"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a tensor")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got a {input.dim()}-D tensor of shape "
            f"{list(input.shape)}"
        )
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = kernel_size if stride is None or (isinstance(stride, Sequence) and len(stride) == 0) else _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    dilation = _pair(dilation, "dilation", op)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    output, indices = ops.max_pool2d(input, list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    if unbatched:
        output, indices = output.squeeze(0), indices.squeeze(0)
    return (output, indices) if return_indices else output


def residual_add(residual: torch.Tensor, shortcut: torch.Tensor, *, stride: int = 1, relu: bool = False) -> torch.Tensor:
    """A ResNet block's skip connection in one kernel: ``relu?(residual + shortcut~)``, where
    ``shortcut~[n, j, p, q] = shortcut[n, j, stride * p, stride * q]`` for the shortcut's ``J`` channels and 0
    for the residual's extra channels (the strided, zero-padded identity shortcut of He et al.'s CIFAR
    ResNets). ``stride=1`` with equal channels is a plain add.

    The residual is ``(N, C, P, Q)`` and the shortcut ``(N, J, H, W)`` with ``J <= C``,
    ``P = ceil(H / stride)`` and ``Q = ceil(W / stride)``; unbatched 3-D tensors work too. Equivalent to
    ``residual + F.pad(shortcut[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, C - J))`` (then ``relu``).
    """
    op = "fastconv.residual_add"
    if not isinstance(residual, torch.Tensor) or not isinstance(shortcut, torch.Tensor):
        raise TypeError(f"{op}: residual and shortcut must be tensors")
    if residual.dim() != shortcut.dim() or residual.dim() not in (3, 4):
        raise ValueError(
            f"{op}: expected residual and shortcut both 3-D (C, H, W) or both 4-D (N, C, H, W), got shapes "
            f"{list(residual.shape)} and {list(shortcut.shape)}"
        )
    if not isinstance(stride, int) or isinstance(stride, bool):
        raise ValueError(f"{op}: stride must be an int, got {stride!r}")
    unbatched = residual.dim() == 3
    if unbatched:
        residual, shortcut = residual.unsqueeze(0), shortcut.unsqueeze(0)
    output = ops.residual_add(residual, shortcut, stride, bool(relu))
    return output.squeeze(0) if unbatched else output
