"""The build-free path's ops: ``fastconv.cupy``'s functions when the compiled extension is absent.

Each op does what its extension twin does (csrc/cuda/conv2d_direct.cpp, max_pool2d.cpp, residual_add.cpp):
normalise and check the arguments with the same rules and messages (fastconv/_checks.py, through
:class:`ArraySpec`), allocate the output in torch's memory format, return early when it is empty, and launch
the kernel that the plans of :mod:`fastconv._nvrtc` configure.

The ops are written over a :class:`Runtime`: an array module and a launcher. ``fastconv.cupy`` passes CuPy and
NVRTC-compiled kernels on CuPy's current stream; tests/test_nvrtc_path.py passes NumPy and a CPU emulation of
the same kernels, which runs everything here (checks, layouts, launch plans, argument packing) without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _checks
from . import _nvrtc as kernels

CONV_ALGOS = ("auto", "direct")  # the build-free path compiles the direct kernels


@dataclass
class Runtime:
    """What the ops need from an array library: ``xp`` (numpy-like: empty, zeros, pad, asarray, ...),
    ``launch(Launch)``, and each array's device index and data address."""

    xp: Any
    launch: Callable[[kernels.Launch], None]
    device: Callable[[Any], int]
    address: Callable[[Any], int]


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


class ArraySpec:
    """What fastconv/_checks.py reads of a tensor (shape, dtype, device, dim()), for an array, and its element
    strides."""

    def __init__(self, rt: Runtime, a):
        self.array = a
        self.shape = torch.Size(a.shape)
        name = str(a.dtype)
        self.dtype = _TORCH_DTYPES.get(name) or getattr(torch, name, None) or name
        self.device = torch.device("cuda", rt.device(a))
        self.strides = tuple(s // a.itemsize for s in a.strides)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def channels_last(self) -> bool:
        """torch's suggested memory format is channels_last (c10's rule)."""
        return _checks.strides_like_channels_last(self.shape, self.strides)

    def dense_in(self, channels_last: bool) -> bool:
        return _checks.is_dense_in(self.shape, self.strides, channels_last)

    def strides4(self) -> kernels.Strides4:
        return kernels.Strides4(*self.strides)


def _spec(rt: Runtime, a) -> ArraySpec | None:
    if a is None:
        return None
    if any(s < 0 or s % a.itemsize for s in a.strides):  # reversed views: the kernels' strides are forward
        a = rt.xp.ascontiguousarray(a)
    return ArraySpec(rt, a)


def _empty(rt: Runtime, shape, dtype, channels_last: bool):
    """An (N, C, H, W) array, NCHW or channels_last in memory."""
    if channels_last:
        n, c, h, w = shape
        return rt.xp.empty((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
    return rt.xp.empty(tuple(shape), dtype=dtype)


def _pad_bottom_right(rt: Runtime, x: ArraySpec, extra_h: int, extra_w: int) -> ArraySpec:
    """padding='same' with an odd total: the extra zeros (as functional's F.pad), keeping the memory format."""
    n, c, h, w = x.shape
    padded = _empty(rt, (n, c, h + extra_h, w + extra_w), x.array.dtype, x.channels_last)
    padded[...] = 0
    padded[:, :, :h, :w] = x.array
    return ArraySpec(rt, padded)


def check_algo(op: str, algo: str) -> None:
    if algo not in CONV_ALGOS:
        raise ValueError(
            f"{op}: algo {algo!r} is not available without the compiled extension: the build-free path (NVRTC) "
            f"runs {CONV_ALGOS}"
        )


# ---- conv2d ---------------------------------------------------------------------------------------------------


def conv2d(rt: Runtime, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algo="auto",
           relu=False, op="fastconv.cupy.conv2d"):
    """functional.conv2d (plus a fused ReLU) on the direct fprop kernel."""
    check_algo(op, algo)
    x, w, b = _spec(rt, input), _spec(rt, weight), _spec(rt, bias)
    _checks.check_input_rank(op, x.shape)
    if x.dim() == 3:
        out = conv2d(rt, x.array[None], weight, bias, stride, padding, dilation, groups, algo=algo, relu=relu, op=op)
        return out[0]
    stride, padding, dilation, (extra_h, extra_w) = _checks.conv2d_params(op, w.shape, stride, padding, dilation,
                                                                          groups)
    groups = _checks.conv_groups(op, groups)
    if extra_h or extra_w:
        _checks.check_devices(op, input=x, weight=w, bias=b)
        x = _pad_bottom_right(rt, x, extra_h, extra_w)
    n, k, p, q = _checks.check_conv2d_fprop(op, x, w, b, stride, padding, dilation, groups)
    _, c, h, wd = x.shape
    _, _, r, s = w.shape
    if r * s > kernels.MAX_DIRECT_FILTER_TAPS:
        raise ValueError(f"{op}: a {r}x{s} filter has more taps than the direct CUDA kernels stage in shared memory "
                         f"({kernels.MAX_DIRECT_FILTER_TAPS})")
    y = ArraySpec(rt, _empty(rt, (n, k, p, q), x.array.dtype, x.channels_last or w.channels_last))
    if y.array.size == 0:
        return y.array
    if b is not None and b.strides[0] != 1:
        b = ArraySpec(rt, rt.xp.ascontiguousarray(b.array))  # the kernel reads bias[k] unstrided
    pb = kernels.Conv2dProblem(n, c, h, wd, k, r, s, p, q, padding[0], padding[1], stride[0], stride[1],
                               dilation[0], dilation[1], groups)
    rt.launch(kernels.plan_conv2d_direct_fprop(
        pb, str(x.array.dtype), rt.address(x.array), x.strides4(), rt.address(w.array), w.strides4(),
        rt.address(b.array) if b is not None else None, relu, rt.address(y.array), y.strides4()))
    return y.array


def fold_batch_norm(rt: Runtime, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps: float):
    """functional.fold_batch_norm on arrays: w * gamma / sqrt(var + eps) and (b - mean) * gamma / sqrt(var + eps)
    + beta, in float32 and rounded once to the weight's dtype."""
    xp, f32 = rt.xp, "float32"
    scale = 1 / xp.sqrt(xp.asarray(running_var, dtype=f32) + xp.float32(eps))
    if bn_weight is not None:
        scale = scale * xp.asarray(bn_weight, dtype=f32)
    folded_weight = xp.asarray(weight, dtype=f32) * scale.reshape(-1, 1, 1, 1)
    mean = xp.asarray(running_mean, dtype=f32)
    folded_bias = (-mean if bias is None else xp.asarray(bias, dtype=f32) - mean) * scale
    if bn_bias is not None:
        folded_bias = folded_bias + xp.asarray(bn_bias, dtype=f32)
    return folded_weight.astype(weight.dtype), folded_bias.astype(weight.dtype)


def conv_bn_relu(rt: Runtime, input, weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, *,
                 stride=1, padding=0, dilation=1, groups=1, eps: float = 1e-5, relu: bool = True, algo="auto"):
    """functional.conv_bn_relu with training=False: BatchNorm folded into the convolution, conv + bias + ReLU in
    one launch."""
    op = "fastconv.cupy.conv_bn_relu"
    check_algo(op, algo)
    if running_mean is None or running_var is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    vectors = dict(bias=bias, running_mean=running_mean, running_var=running_var, bn_weight=bn_weight,
                   bn_bias=bn_bias)
    _checks.check_devices(op, input=_spec(rt, input), weight=_spec(rt, weight),
                          **{name: _spec(rt, t) for name, t in vectors.items()})
    if input.ndim != 4:
        raise ValueError(f"{op}: expected a 4-D (N, C, H, W) input (BatchNorm2d's), got a {input.ndim}-D tensor "
                         f"of shape {list(input.shape)}")
    _checks.conv2d_params(op, weight.shape, stride, padding, dilation, groups)  # (the weight's rank first)
    k = weight.shape[0]
    for name, t in vectors.items():
        if t is not None and (t.ndim != 1 or t.shape[0] != k):
            raise ValueError(f"{op}: {name} must be 1-D with {k} elements (one per output channel), got shape "
                             f"{list(t.shape)}")
    folded_weight, folded_bias = fold_batch_norm(rt, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return conv2d(rt, input, folded_weight, folded_bias, stride, padding, dilation, groups, algo=algo, relu=relu,
                  op=op)


# ---- max_pool2d -------------------------------------------------------------------------------------------------


def max_pool2d(rt: Runtime, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """functional.max_pool2d on the max-pooling forward kernel (indices as int64, torch's h * W + w)."""
    op = "fastconv.cupy.max_pool2d"
    x = _spec(rt, input)
    _checks.check_input_rank(op, x.shape)
    kernel_size, stride, padding, dilation = _checks.pool2d_params(op, kernel_size, stride, padding, dilation)
    unbatched = x.dim() == 3
    if unbatched:
        x = ArraySpec(rt, x.array[None])
    n, c, p, q = _checks.check_max_pool2d(op, x, kernel_size, stride, padding, dilation, bool(ceil_mode))
    cl = x.channels_last
    y = ArraySpec(rt, _empty(rt, (n, c, p, q), x.array.dtype, cl))
    indices = ArraySpec(rt, _empty(rt, (n, c, p, q), "int64", cl))
    if y.array.size:
        _, _, h, w = x.shape
        pb = kernels.Conv2dProblem(n, c, h, w, c, kernel_size[0], kernel_size[1], p, q, padding[0], padding[1],
                                   stride[0], stride[1], dilation[0], dilation[1], c)
        channels_fastest = y.strides[1] == 1 and c > 1
        rt.launch(kernels.plan_max_pool2d_forward(pb, str(x.array.dtype), rt.address(x.array), x.strides4(),
                                                  rt.address(y.array), y.strides4(), rt.address(indices.array),
                                                  indices.strides4(), channels_fastest))
    out, idx = (y.array[0], indices.array[0]) if unbatched else (y.array, indices.array)
    return (out, idx) if return_indices else out


# ---- residual_add -----------------------------------------------------------------------------------------------


def residual_add(rt: Runtime, residual, shortcut, *, stride: int = 1, relu: bool = False):
    """functional.residual_add: the flat kernel for a plain add of dense tensors, the strided one otherwise."""
    op = "fastconv.cupy.residual_add"
    r, s = _spec(rt, residual), _spec(rt, shortcut)
    _checks.check_residual_add_args(op, r.shape, s.shape, stride)
    unbatched = r.dim() == 3
    if unbatched:
        r, s = ArraySpec(rt, r.array[None]), ArraySpec(rt, s.array[None])
    n, c, p, q = _checks.check_residual_add(op, r, s, stride)
    cl = r.channels_last
    out = ArraySpec(rt, _empty(rt, (n, c, p, q), r.array.dtype, cl))
    if out.array.size:
        _, j, h, w = s.shape
        dtype = str(r.array.dtype)
        flat = stride == 1 and j == c and r.dense_in(cl) and s.dense_in(cl)
        if flat:
            launch = kernels.plan_residual_add_flat(dtype, rt.address(r.array), rt.address(s.array),
                                                    rt.address(out.array), out.array.size, bool(relu))
        else:
            shape = kernels.ResidualAddShape(n, c, p, q, j, h, w, stride)
            launch = kernels.plan_residual_add_strided(shape, dtype, rt.address(r.array), r.strides4(),
                                                       rt.address(s.array), s.strides4(), rt.address(out.array),
                                                       out.strides4(), bool(relu))
        rt.launch(launch)
    return out.array[0] if unbatched else out.array
