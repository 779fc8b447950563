"""fastconv's kernels on CuPy arrays.

    import cupy as cp
    import fastconv.cupy as fcp

    y = fcp.conv2d(x, w, b, stride=2, padding=1)              # x, w, b: cupy.ndarray on one GPU
    z = fcp.conv_bn_relu(x, w, None, mean, var, gamma, beta)   # inference: BatchNorm folded into the conv
    p = fcp.max_pool2d(z, 3, 2, 1)
    r = fcp.residual_add(p, shortcut, stride=2, relu=True)

Arrays cross to torch and back through DLPack, zero-copy (strides kept, so channels_last layouts stay
channels_last), and the kernels run on CuPy's current stream: torch's current stream is set to it for the
call, so no synchronisation is added in either direction. The functions take the arguments of their
:mod:`fastconv.functional` namesakes and raise the same errors (plus ``TypeError`` for anything that is not a
``cupy.ndarray``). No autograd: these are inference entry points. Importable only when CuPy is installed;
the compiled extension does the work (the kernel sources also compile under NVRTC, see tests/test_nvrtc.py,
the groundwork of a build-free path that is not wired up yet).
"""
from __future__ import annotations

import contextlib

try:
    import cupy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastconv.cupy needs CuPy (for CUDA 13: pip install cupy-cuda13x)") from e

import torch

from . import functional

__all__ = ["conv2d", "conv_bn_relu", "max_pool2d", "residual_add"]


def _tensor(op: str, name: str, a, optional: bool = False):
    if a is None and optional:
        return None
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{op}: {name} must be a cupy.ndarray, got {type(a).__name__}")
    return torch.from_dlpack(a)  # zero-copy; the array stays alive through the capsule's owner


@contextlib.contextmanager
def _cupy_stream():
    """torch's current stream := CuPy's current stream (on CuPy's current device), for one call."""
    device = torch.device("cuda", cupy.cuda.Device().id)
    ptr = cupy.cuda.get_current_stream().ptr
    stream = torch.cuda.default_stream(device) if ptr == 0 else torch.cuda.ExternalStream(ptr, device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad():
        yield


def _array(t: torch.Tensor):
    return cupy.from_dlpack(t)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algo: str = "auto"):
    """:func:`fastconv.functional.conv2d` on CuPy arrays."""
    op = "fastconv.cupy.conv2d"
    with _cupy_stream():
        x, w, b = _tensor(op, "input", input), _tensor(op, "weight", weight), _tensor(op, "bias", bias, True)
        return _array(functional.conv2d(x, w, b, stride, padding, dilation, groups, algo=algo))


def conv_bn_relu(input, weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, *, stride=1,
                 padding=0, dilation=1, groups=1, eps: float = 1e-5, relu: bool = True, algo: str = "auto"):
    """Inference conv + BatchNorm (+ ReLU): BatchNorm's running statistics folded into the convolution and the
    ReLU in its epilogue, one kernel (:func:`fastconv.functional.conv_bn_relu` with ``training=False``)."""
    op = "fastconv.cupy.conv_bn_relu"
    with _cupy_stream():
        args = [_tensor(op, "input", input), _tensor(op, "weight", weight), _tensor(op, "bias", bias, True),
                _tensor(op, "running_mean", running_mean), _tensor(op, "running_var", running_var),
                _tensor(op, "bn_weight", bn_weight, True), _tensor(op, "bn_bias", bn_bias, True)]
        out = functional.conv_bn_relu(*args, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                      training=False, eps=eps, relu=relu, algo=algo)
        return _array(out)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """:func:`fastconv.functional.max_pool2d` on CuPy arrays (indices as an int64 CuPy array)."""
    op = "fastconv.cupy.max_pool2d"
    with _cupy_stream():
        out = functional.max_pool2d(_tensor(op, "input", input), kernel_size, stride, padding, dilation, ceil_mode,
                                    return_indices)
        return (_array(out[0]), _array(out[1])) if return_indices else _array(out)


def residual_add(residual, shortcut, *, stride: int = 1, relu: bool = False):
    """:func:`fastconv.functional.residual_add` on CuPy arrays."""
    op = "fastconv.cupy.residual_add"
    with _cupy_stream():
        r, s = _tensor(op, "residual", residual), _tensor(op, "shortcut", shortcut)
        return _array(functional.residual_add(r, s, stride=stride, relu=relu))
