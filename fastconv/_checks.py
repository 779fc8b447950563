"""Argument checks of the conv2d ops, for the fake (meta) implementations.

They mirror csrc/conv2d_args.cpp, which checks the same things for the real CPU and CUDA kernels, with
the same exception types (ValueError for bad sizes and values, TypeError for dtypes) and messages;
tests/test_conv2d_errors.py runs every bad input through both to keep them in step.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pair(value, name: str, op: str = "fastconv.conv2d") -> tuple[int, int]:
    """An int or a pair of ints (a one-element sequence counts as both), as torch's conv and pooling take them."""
    kind = type(value)  # fast paths for what modules pass (an int, a tuple of two ints; not bools, exact types)
    if kind is int:
        return (value, value)
    if kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
        if len(values) == 1:
            values = values * 2
    else:
        values = (value, value)
    if len(values) == 2 and not any(isinstance(v, bool) for v in values):
        try:  # integers of other types too (numpy's, a 0-d integer tensor), as torch takes them
            return tuple(operator.index(v) for v in values)
        except TypeError:
            pass
    raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def same_padding(filter_size, stride, dilation, op: str = "fastconv.conv2d") -> tuple[tuple[int, int], tuple[int, int]]:
    """padding='same' as torch does it: half the dilated kernel on each side, and when that total is odd the
    extra row/column of zeros goes at the bottom/right. Returns ((top, left), (extra bottom, extra right))."""
    if any(s != 1 for s in stride):
        raise ValueError(f"{op}: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, filter_size)]
    begin = (total[0] // 2, total[1] // 2)
    return begin, (total[0] - 2 * begin[0], total[1] - 2 * begin[1])


def check_input_rank(op: str, shape) -> None:
    """conv2d's and max_pool2d's input: 3-D (unbatched) or 4-D."""
    if len(shape) not in (3, 4):
        raise ValueError(
            f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got a {len(shape)}-D tensor of shape "
            f"{list(shape)}"
        )


def conv2d_params(op: str, weight_shape, stride, padding, dilation, groups):
    """conv2d's stride, padding, dilation and groups as torch takes them (ints or pairs; padding also 'valid'
    or 'same'), normalised to pairs after checking the weight's rank. Returns (stride, padding, dilation,
    (extra bottom, extra right)): the zeros an odd 'same' total adds on one side, which the caller pads."""
    if len(weight_shape) != 4:
        raise ValueError(
            f"{op}: expected a 4-D weight (K, C / groups, R, S), got a {len(weight_shape)}-D tensor of shape "
            f"{list(weight_shape)}"
        )
    stride = pair(stride, "stride", op)
    dilation = pair(dilation, "dilation", op)
    extra = (0, 0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding, extra = same_padding(weight_shape[2:], stride, dilation, op)
        else:
            raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    else:
        padding = pair(padding, "padding", op)
    conv_groups(op, groups)
    return stride, padding, dilation, extra


def conv_groups(op: str, groups) -> int:
    """groups as an int: an integer of another type too (numpy's, a 0-d integer tensor), as torch takes it; not a
    bool."""
    if type(groups) is int:
        return groups
    if not isinstance(groups, bool):
        try:
            return operator.index(groups)
        except TypeError:
            pass
    raise ValueError(f"{op}: groups must be an int, got {groups!r}")


def pool2d_params(op: str, kernel_size, stride, padding, dilation):
    """max_pool2d's window arguments as pairs; stride defaults to kernel_size (None or empty)."""
    kernel_size = pair(kernel_size, "kernel_size", op)
    empty_stride = stride is None or (isinstance(stride, Sequence) and len(stride) == 0)
    stride = kernel_size if empty_stride else pair(stride, "stride", op)
    return kernel_size, stride, pair(padding, "padding", op), pair(dilation, "dilation", op)


def check_residual_add_args(op: str, residual_shape, shortcut_shape, stride) -> None:
    if len(residual_shape) != len(shortcut_shape) or len(residual_shape) not in (3, 4):
        raise ValueError(
            f"{op}: expected residual and shortcut both 3-D (C, H, W) or both 4-D (N, C, H, W), got shapes "
            f"{list(residual_shape)} and {list(shortcut_shape)}"
        )
    if not isinstance(stride, int) or isinstance(stride, bool):
        raise ValueError(f"{op}: stride must be an int, got {stride!r}")


def strides_like_channels_last(sizes, strides) -> bool:
    """c10's rule for a 4-D tensor's suggested memory format (is_channels_last_strides_2d_s4): the strides, in
    channels_last's dimension order, grow, with NCHW winning the ambiguous cases."""
    if len(sizes) != 4 or strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:  # N111 and N11W slices: NCHW
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def is_dense_in(sizes, strides, channels_last: bool) -> bool:
    """Tensor.is_contiguous(memory_format=...) for a 4-D tensor: dense in NCHW or NHWC order (size-1 dimensions
    may have any stride; an empty tensor is dense)."""
    if 0 in sizes:
        return True
    expected = 1
    for d in ((1, 3, 2, 0) if channels_last else (3, 2, 1, 0)):
        if sizes[d] != 1:
            if strides[d] != expected:
                return False
            expected *= sizes[d]
    return True


def conv_output_extent(size: int, pad: int, dil: int, taps: int, stride: int) -> int:
    return (size + 2 * pad - dil * (taps - 1) - 1) // stride + 1


def _check_floating(op: str, t: torch.Tensor, name: str) -> None:
    # Fake tensors carry the device they stand for, so this matches the real op's check.
    allowed = _CUDA_DTYPES if t.device.type == "cuda" else _CPU_DTYPES
    if t.dtype not in allowed:
        where = "" if t.device.type == "cuda" else " and float64"
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, float16, bfloat16{where} "
            f"on {t.device.type} (float64 is CPU-only)"
        )


def _check_same_dtype(op: str, a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype")


def _check_rank4(op: str, t: torch.Tensor, name: str, layout: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"{op}: expected {name} to be 4-D {layout}, got a {t.dim()}-D tensor of shape {list(t.shape)}")


def check_devices(op: str, **tensors: torch.Tensor | None) -> None:
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = (name, t)
        elif t.device != first[1].device:
            raise ValueError(
                f"{op}: {first[0]} is on {first[1].device} but {name} is on {t.device}; "
                "every tensor must be on one device"
            )


def _check_params(op: str, stride, padding, dilation, groups: int) -> None:
    if not (len(stride) == 2 and len(padding) == 2 and len(dilation) == 2):
        raise ValueError(
            f"{op}: stride, padding and dilation must have 2 entries each, got {list(stride)}, "
            f"{list(padding)}, {list(dilation)}"
        )
    if any(v <= 0 for v in stride):
        raise ValueError(f"{op}: stride must be positive, got {list(stride)}")
    if any(v < 0 for v in padding):
        raise ValueError(f"{op}: padding must be non-negative, got {list(padding)}")
    if any(v <= 0 for v in dilation):
        raise ValueError(f"{op}: dilation must be positive, got {list(dilation)}")
    if groups <= 0:
        raise ValueError(f"{op}: groups must be positive, got {groups}")


def conv2d_output_shape(op: str, input_size: Sequence[int], weight_size: Sequence[int], stride, padding,
                        dilation, groups: int) -> list[int]:
    """The (N, K, P, Q) output shape, after checking that the sizes describe a valid convolution."""
    _check_params(op, stride, padding, dilation, groups)
    n, c, h, w = input_size
    k, c_per_group, r, s = weight_size
    if c % groups != 0:
        raise ValueError(f"{op}: groups ({groups}) must divide the input channels ({c})")
    if k % groups != 0:
        raise ValueError(f"{op}: groups ({groups}) must divide the output channels ({k})")
    if c_per_group * groups != c:
        raise ValueError(
            f"{op}: weight of shape {list(weight_size)} with groups={groups} expects "
            f"{c_per_group * groups} input channels, but the input has {c}"
        )
    if r <= 0 or s <= 0:
        raise ValueError(f"{op}: the filter must have at least one tap, got shape {list(weight_size)}")
    if k <= 0:  # (as torch's conv2d)
        raise ValueError(f"{op}: the weight must have at least one output channel, got shape {list(weight_size)}")
    eff_r, eff_s = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    if h + 2 * padding[0] < eff_r or w + 2 * padding[1] < eff_s:
        raise ValueError(
            f"{op}: padded input ({h + 2 * padding[0]} x {w + 2 * padding[1]}) is smaller than the dilated "
            f"kernel ({eff_r} x {eff_s})"
        )
    return [
        n,
        k,
        conv_output_extent(h, padding[0], dilation[0], r, stride[0]),
        conv_output_extent(w, padding[1], dilation[1], s, stride[1]),
    ]


def check_conv2d_fprop(op, input, weight, bias, stride, padding, dilation, groups) -> list[int]:
    check_devices(op, input=input, weight=weight, bias=bias)
    _check_rank4(op, input, "input", "(N, C, H, W)")
    _check_rank4(op, weight, "weight", "(K, C / groups, R, S)")
    _check_floating(op, input, "input")
    _check_same_dtype(op, input, "input", weight, "weight")
    shape = conv2d_output_shape(op, input.shape, weight.shape, stride, padding, dilation, groups)
    if bias is not None:
        _check_same_dtype(op, input, "input", bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != shape[1]:
            raise ValueError(
                f"{op}: bias must be 1-D with {shape[1]} elements (one per output channel), got shape "
                f"{list(bias.shape)}"
            )
    return shape


def _check_size4(op: str, size, name: str) -> None:
    if len(size) != 4:
        raise ValueError(f"{op}: {name} must have 4 entries, got {list(size)}")
    if any(v < 0 for v in size):
        raise ValueError(f"{op}: {name} must be non-negative, got {list(size)}")


def _check_grad_output_shape(op: str, grad_output: torch.Tensor, shape: list[int]) -> None:
    if list(grad_output.shape) != shape:
        raise ValueError(
            f"{op}: grad_output has shape {list(grad_output.shape)} but the convolution's output shape is {shape}"
        )


def check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups) -> None:
    check_devices(op, grad_output=grad_output, weight=weight)
    _check_rank4(op, grad_output, "grad_output", "(N, K, P, Q)")
    _check_rank4(op, weight, "weight", "(K, C / groups, R, S)")
    _check_floating(op, grad_output, "grad_output")
    _check_same_dtype(op, grad_output, "grad_output", weight, "weight")
    _check_size4(op, input_size, "input_size")
    shape = conv2d_output_shape(op, input_size, weight.shape, stride, padding, dilation, groups)
    _check_grad_output_shape(op, grad_output, shape)


def check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups) -> None:
    check_devices(op, grad_output=grad_output, input=input)
    _check_rank4(op, grad_output, "grad_output", "(N, K, P, Q)")
    _check_rank4(op, input, "input", "(N, C, H, W)")
    _check_floating(op, grad_output, "grad_output")
    _check_same_dtype(op, grad_output, "grad_output", input, "input")
    _check_size4(op, weight_size, "weight_size")
    shape = conv2d_output_shape(op, input.shape, weight_size, stride, padding, dilation, groups)
    _check_grad_output_shape(op, grad_output, shape)


#: Tile configurations of the implicit-GEMM CUDA kernels (kImplicitGemmTiles in csrc/implicit_gemm_problem.h):
#: 0-5 mma.sync (any pass and dtype, sm_80+), 6 and 7 Hopper's wgmma (fp16/bf16 fprop and dgrad on sm_90a;
#: elsewhere they run as their mma.sync twins, tiles 0 and 3).
IMPLICIT_GEMM_TILES = 8
IMPLICIT_GEMM_MMA_SYNC_TILES = 6
IMPLICIT_GEMM_WGMMA_TILES = (6, 7)


def check_algo_args(op, algo: str, extra, im2col_image=None) -> None:
    """The algorithm-specific arguments after groups: im2col's workspace_bytes, implicit_gemm's tile.
    ``im2col_image`` = (C, R, S, P, Q, stride, padding, dtype) also checks that one image's im2col matrix fits the
    workspace, as csrc/conv2d_args.cpp's check_im2col_workspace does."""
    if algo == "im2col" and extra and extra[0] <= 0:
        raise ValueError(f"{op}: workspace_bytes must be positive, got {extra[0]}")
    if algo == "im2col" and extra and im2col_image is not None:
        c, r, s, p, q, stride, padding, dtype = im2col_image
        pointwise = r == 1 and s == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
        per_image = p * q * c * r * s * (8 if dtype == torch.float64 else 4)
        if not pointwise and per_image > extra[0]:
            raise ValueError(
                f"{op}: one image's im2col matrix needs {per_image} bytes, more than the workspace limit of "
                f"{extra[0]} bytes; raise it (fastconv.backends.set_workspace_limit) or use algo='direct'"
            )
    if algo == "implicit_gemm" and extra:
        check_implicit_gemm_tile(op, extra[0])


def check_implicit_gemm_tile(op, tile: int) -> None:
    if not -1 <= tile < IMPLICIT_GEMM_TILES:
        raise ValueError(
            f"{op}: tile must be -1 (chosen by size) or a configuration index below {IMPLICIT_GEMM_TILES}, got {tile}"
        )


def check_conv2d_epilogue(op, input, shape, scale, shift, residual) -> None:
    """The fused epilogue's operands: scale and shift (K,), residual of the output's shape (N, K, P, Q)."""
    check_devices(op, input=input, scale=scale, shift=shift, residual=residual)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        _check_same_dtype(op, input, "input", t, name)
        if t.dim() != 1 or t.shape[0] != shape[1]:
            raise ValueError(
                f"{op}: {name} must be 1-D with {shape[1]} elements (one per output channel), got shape "
                f"{list(t.shape)}"
            )
    if residual is not None:
        _check_same_dtype(op, input, "input", residual, "residual")
        if list(residual.shape) != list(shape):
            raise ValueError(f"{op}: residual must have the output's shape {list(shape)}, got {list(residual.shape)}")


def check_bias_grad(op, grad_output) -> None:
    _check_rank4(op, grad_output, "grad_output", "(N, K, P, Q)")
    _check_floating(op, grad_output, "grad_output")


# ---- max_pool2d ---------------------------------------------------------------------------------------


def _pool_output_extent(size, pad, dil, taps, stride, ceil_mode):
    out = (size + 2 * pad - dil * (taps - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pool_output_shape(op, input_size, kernel_size, stride, padding, dilation, ceil_mode, check_output=True) -> list:
    if not (len(kernel_size) == 2 and len(stride) == 2 and len(padding) == 2 and len(dilation) == 2):
        raise ValueError(
            f"{op}: kernel_size, stride, padding and dilation must have 2 entries each, got {list(kernel_size)}, "
            f"{list(stride)}, {list(padding)}, {list(dilation)}"
        )
    if any(v > 0x7FFFFFFF for v in (*kernel_size, *stride, *padding, *dilation)):  # torch's 32-bit ints
        raise ValueError(
            f"{op}: kernel_size, stride, padding and dilation must fit in 32 bits, got {list(kernel_size)}, "
            f"{list(stride)}, {list(padding)}, {list(dilation)}"
        )
    if any(v <= 0 for v in kernel_size):
        raise ValueError(f"{op}: kernel_size must be positive, got {list(kernel_size)}")
    if any(v <= 0 for v in stride):
        raise ValueError(f"{op}: stride must be positive, got {list(stride)}")
    if any(v <= 0 for v in dilation):
        raise ValueError(f"{op}: dilation must be positive, got {list(dilation)}")
    if any(v < 0 for v in padding):
        raise ValueError(f"{op}: padding must be non-negative, got {list(padding)}")
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise ValueError(
            f"{op}: padding must be at most half the kernel size, got padding {list(padding)} for kernel_size "
            f"{list(kernel_size)}"
        )
    n, c, h, w = input_size
    if not (c > 0 and h > 0 and w > 0):
        raise ValueError(
            f"{op}: input must have non-zero channels, height and width (only the batch may be empty), got "
            f"{list(input_size)}"
        )
    p = _pool_output_extent(h, padding[0], dilation[0], kernel_size[0], stride[0], ceil_mode)
    q = _pool_output_extent(w, padding[1], dilation[1], kernel_size[1], stride[1], ceil_mode)
    if check_output and (p <= 0 or q <= 0):
        raise ValueError(f"{op}: output size is too small: input {h} x {w} gives {p} x {q} windows")
    return [n, c, p, q]


def check_max_pool2d(op, input, kernel_size, stride, padding, dilation, ceil_mode) -> list:
    _check_rank4(op, input, "input", "(N, C, H, W)")
    _check_floating(op, input, "input")
    return _pool_output_shape(op, input.shape, kernel_size, stride, padding, dilation, ceil_mode)


def check_max_pool2d_backward(op, grad_output, indices, input_size, kernel_size, stride, padding, dilation) -> None:
    check_devices(op, grad_output=grad_output, indices=indices)
    _check_rank4(op, grad_output, "grad_output", "(N, C, P, Q)")
    _check_floating(op, grad_output, "grad_output")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be torch.int64, got {indices.dtype}")
    if indices.shape != grad_output.shape:
        raise ValueError(f"{op}: indices has shape {list(indices.shape)} but grad_output has shape {list(grad_output.shape)}")
    _check_size4(op, input_size, "input_size")
    # the forward's ceil_mode is not known: the floor or the ceil mode's extents (the floor's may be 0)
    n, c, p, q = _pool_output_shape(op, input_size, kernel_size, stride, padding, dilation, False, False)
    _, _, p_ceil, q_ceil = _pool_output_shape(op, input_size, kernel_size, stride, padding, dilation, True, False)
    go = list(grad_output.shape)
    if not (go[0] == n and go[1] == c and go[2] > 0 and go[3] > 0 and go[2] in (p, p_ceil) and go[3] in (q, q_ceil)):
        raise ValueError(f"{op}: grad_output of shape {go} does not fit input_size {list(input_size)}")


# ---- residual_add -------------------------------------------------------------------------------------


def _residual_shape(op, residual_size, shortcut_size, stride) -> list:
    if stride <= 0:
        raise ValueError(f"{op}: stride must be positive, got {stride}")
    if residual_size[0] != shortcut_size[0]:
        raise ValueError(f"{op}: residual has batch size {residual_size[0]} but shortcut has {shortcut_size[0]}")
    if shortcut_size[1] > residual_size[1]:
        raise ValueError(
            f"{op}: shortcut has {shortcut_size[1]} channels, more than the residual's {residual_size[1]} "
            "(the shortcut is zero-padded, never cut)"
        )
    p, q = -(-shortcut_size[2] // stride), -(-shortcut_size[3] // stride)
    if residual_size[2] != p or residual_size[3] != q:
        raise ValueError(
            f"{op}: residual is {residual_size[2]} x {residual_size[3]} but a shortcut of {shortcut_size[2]} x "
            f"{shortcut_size[3]} subsampled with stride {stride} is {p} x {q}"
        )
    return list(residual_size)


def check_residual_add(op, residual, shortcut, stride) -> list:
    check_devices(op, residual=residual, shortcut=shortcut)
    _check_rank4(op, residual, "residual", "(N, C, P, Q)")
    _check_rank4(op, shortcut, "shortcut", "(N, J, H, W)")
    _check_floating(op, residual, "residual")
    _check_same_dtype(op, residual, "residual", shortcut, "shortcut")
    return _residual_shape(op, residual.shape, shortcut.shape, stride)


def check_residual_add_backward(op, grad_output, output, shortcut_size, stride) -> None:
    check_devices(op, grad_output=grad_output, output=output)
    _check_rank4(op, grad_output, "grad_output", "(N, C, P, Q)")
    _check_floating(op, grad_output, "grad_output")
    if output is not None:
        _check_same_dtype(op, grad_output, "grad_output", output, "output")
        if output.shape != grad_output.shape:
            raise ValueError(f"{op}: output has shape {list(output.shape)} but grad_output has shape {list(grad_output.shape)}")
    _check_size4(op, shortcut_size, "shortcut_size")
    _residual_shape(op, grad_output.shape, shortcut_size, stride)


# ---- batch_norm_relu ----------------------------------------------------------------------------------


def batch_norm_stats_type(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-channel statistics and affine gradients: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_channel_vector(op, input, t, name, stats) -> None:
    c = input.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{op}: {name} must be 1-D with {c} elements (one per channel), got shape {list(t.shape)}")
    want = batch_norm_stats_type(input.dtype)
    if not (t.dtype == want or (not stats and t.dtype == input.dtype)):
        alt = "" if stats else " or the input's dtype"
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {want}{alt} for a {input.dtype} input")


def _check_eps(op, eps) -> None:
    if not eps >= 0:  # (NaN too, as the C++ check)
        raise ValueError(f"{op}: eps must be non-negative, got {eps:g}")  # (:g prints as the C++ check does)


def check_batch_norm_relu(op, input, weight, bias, eps) -> None:
    check_devices(op, input=input, weight=weight, bias=bias)
    _check_rank4(op, input, "input", "(N, C, H, W)")
    _check_floating(op, input, "input")
    n, c, h, w = input.shape
    if n * h * w == 1 and c != 0:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got input of shape {list(input.shape)}"
        )
    _check_eps(op, eps)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_channel_vector(op, input, t, name, False)


def check_batch_norm_relu_backward(op, grad_output, input, mean, var, weight, bias, eps) -> None:
    check_devices(op, grad_output=grad_output, input=input, mean=mean, var=var, weight=weight, bias=bias)
    _check_rank4(op, input, "input", "(N, C, H, W)")
    _check_floating(op, input, "input")
    _check_same_dtype(op, grad_output, "grad_output", input, "input")
    if grad_output.shape != input.shape:
        raise ValueError(f"{op}: grad_output has shape {list(grad_output.shape)} but input has shape {list(input.shape)}")
    _check_channel_vector(op, input, mean, "mean", True)
    _check_channel_vector(op, input, var, "var", True)
    _check_eps(op, eps)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_channel_vector(op, input, t, name, False)
