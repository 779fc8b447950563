"""fastconv's kernels on CuPy arrays.

    import cupy as cp
    import fastconv.cupy as fcp

    y = fcp.conv2d(x, w, b, stride=2, padding=1)              # x, w, b: cupy.ndarray on one GPU
    z = fcp.conv_bn_relu(x, w, None, mean, var, gamma, beta)   # inference: BatchNorm folded into the conv
    p = fcp.max_pool2d(z, 3, 2, 1)
    r = fcp.residual_add(p, shortcut, stride=2, relu=True)

The functions take the arguments of their :mod:`fastconv.functional` namesakes and raise the same errors (plus
``TypeError`` for anything that is not a ``cupy.ndarray``), run on CuPy's current stream and return CuPy arrays
in torch's memory format (channels_last stays channels_last). No autograd: these are inference entry points.
Importable only when CuPy is installed. Two backends, named by :data:`BACKEND`:

* ``"extension"``, when the compiled extension (fastconv._C, with CUDA) is there: arrays cross to torch and
  back through DLPack, zero-copy, torch's current stream is set to CuPy's for the call, and every
  ``algo`` of :mod:`fastconv.functional` is available.
* ``"nvrtc"``, the build-free path, when it is not (a pip install without a compiler): the kernels are
  compiled at first use by NVRTC (``cupy.RawModule``) from the same ``csrc/cuda/*.cu`` files and launched
  directly on the CuPy arrays (:mod:`fastconv._nvrtc`, :mod:`fastconv._nvrtc_ops`). It runs the direct
  convolution (``algo="auto"`` or ``"direct"``), max pooling and the residual add; torch is used only for
  the argument checks.

``FASTCONV_CUPY_BACKEND=nvrtc`` (or ``extension``) forces one.
"""
from __future__ import annotations

import contextlib
import os

try:
    import cupy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastconv.cupy needs CuPy (for CUDA 13: pip install cupy-cuda13x)") from e

import torch


def _extension_has_cuda() -> bool:
    try:
        from ._extension import _C
    except ImportError:
        return False
    return bool(_C.WITH_CUDA)


#: "extension" (the compiled extension through DLPack) or "nvrtc" (the build-free path).
BACKEND: str = os.environ.get("FASTCONV_CUPY_BACKEND") or ("extension" if _extension_has_cuda() else "nvrtc")
if BACKEND not in ("extension", "nvrtc"):
    raise ImportError(f"fastconv.cupy: FASTCONV_CUPY_BACKEND must be 'extension' or 'nvrtc', got {BACKEND!r}")

__all__ = ["BACKEND", "conv2d", "conv_bn_relu", "max_pool2d", "residual_add"]

if BACKEND == "extension":
    from . import functional
from . import _nvrtc, _nvrtc_ops  # noqa: E402  (torch-only imports: they work without the extension)

_runtime = None


def _nvrtc_runtime() -> _nvrtc_ops.Runtime:
    """The build-free path's runtime: CuPy arrays, kernels compiled by NVRTC, launched on CuPy's current stream."""
    global _runtime
    if _runtime is None:
        launcher = _nvrtc.CupyLauncher()
        _runtime = _nvrtc_ops.Runtime(xp=cupy, launch=lambda launch: launcher(launch, cupy.cuda.get_current_stream().ptr),
                                      device=lambda a: a.device.id, address=lambda a: a.data.ptr)
    return _runtime


def _check_arrays(op: str, optional=(), **arrays) -> None:
    """Every argument a cupy.ndarray; those named in `optional` may also be None."""
    for name, a in arrays.items():
        if not isinstance(a, cupy.ndarray) and not (a is None and name in optional):
            raise TypeError(f"{op}: {name} must be a cupy.ndarray{' or None' if name in optional else ''}, got "
                            f"{type(a).__name__}")


@contextlib.contextmanager
def _on_device_of(a):
    """CuPy's current device := the input's, for allocation and launch (the nvrtc backend)."""
    with cupy.cuda.Device(a.device.id):
        yield


def _tensor(a):
    return None if a is None else torch.from_dlpack(a)  # zero-copy; the array stays alive through the capsule's owner


@contextlib.contextmanager
def _cupy_stream(a):
    """torch's current stream := CuPy's current stream on the device of `a`, and that device current, for one
    call (the extension backend)."""
    device = torch.device("cuda", a.device.id)
    with cupy.cuda.Device(a.device.id):
        ptr = cupy.cuda.get_current_stream().ptr
    stream = torch.cuda.default_stream(device) if ptr == 0 else torch.cuda.ExternalStream(ptr, device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad():
        yield


def _array(t: torch.Tensor):
    return cupy.from_dlpack(t)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algo: str = "auto"):
    """:func:`fastconv.functional.conv2d` on CuPy arrays."""
    op = "fastconv.cupy.conv2d"
    _check_arrays(op, ("bias",), input=input, weight=weight, bias=bias)
    if BACKEND == "nvrtc":
        with _on_device_of(input):
            return _nvrtc_ops.conv2d(_nvrtc_runtime(), input, weight, bias, stride, padding, dilation, groups, algo=algo)
    with _cupy_stream(input):
        x, w, b = _tensor(input), _tensor(weight), _tensor(bias)
        return _array(functional.conv2d(x, w, b, stride, padding, dilation, groups, algo=algo))


def conv_bn_relu(input, weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, *, stride=1,
                 padding=0, dilation=1, groups=1, eps: float = 1e-5, relu: bool = True, algo: str = "auto"):
    """Inference conv + BatchNorm (+ ReLU): BatchNorm's running statistics folded into the convolution and the
    ReLU in its epilogue, one kernel (:func:`fastconv.functional.conv_bn_relu` with ``training=False``)."""
    op = "fastconv.cupy.conv_bn_relu"
    arrays = dict(input=input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                  bn_weight=bn_weight, bn_bias=bn_bias)
    _check_arrays(op, ("bias", "running_mean", "running_var", "bn_weight", "bn_bias"), **arrays)
    if BACKEND == "nvrtc":
        with _on_device_of(input):
            return _nvrtc_ops.conv_bn_relu(_nvrtc_runtime(), *arrays.values(), stride=stride, padding=padding,
                                           dilation=dilation, groups=groups, eps=eps, relu=relu, algo=algo)
    with _cupy_stream(input):
        out = functional.conv_bn_relu(*(_tensor(a) for a in arrays.values()), stride=stride, padding=padding,
                                      dilation=dilation, groups=groups, training=False, eps=eps, relu=relu, algo=algo)
        return _array(out)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """:func:`fastconv.functional.max_pool2d` on CuPy arrays (indices as an int64 CuPy array)."""
    _check_arrays("fastconv.cupy.max_pool2d", input=input)
    if BACKEND == "nvrtc":
        with _on_device_of(input):
            return _nvrtc_ops.max_pool2d(_nvrtc_runtime(), input, kernel_size, stride, padding, dilation, ceil_mode,
                                         return_indices)
    with _cupy_stream(input):
        out = functional.max_pool2d(_tensor(input), kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        return (_array(out[0]), _array(out[1])) if return_indices else _array(out)


def residual_add(residual, shortcut, *, stride: int = 1, relu: bool = False):
    """:func:`fastconv.functional.residual_add` on CuPy arrays."""
    _check_arrays("fastconv.cupy.residual_add", residual=residual, shortcut=shortcut)
    if BACKEND == "nvrtc":
        with _on_device_of(residual):
            return _nvrtc_ops.residual_add(_nvrtc_runtime(), residual, shortcut, stride=stride, relu=relu)
    with _cupy_stream(residual):
        return _array(functional.residual_add(_tensor(residual), _tensor(shortcut), stride=stride, relu=relu))
