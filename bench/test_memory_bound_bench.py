"""Max pooling and residual add, fastconv against native torch, in GB/s.

Bytes are the fewest a kernel must move: every input read once, every output written once (indices
included for max pooling). torch's residual baseline is what a model would otherwise run: a separate add
and ReLU (plus the subsample-and-pad of the shortcut when stride > 1).
"""
import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import DEVICE
from shapes import CPU_POOLS, CPU_RESIDUALS, GPU_POOLS, GPU_RESIDUALS

DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
POOLS = GPU_POOLS if DEVICE == "cuda" else CPU_POOLS
RESIDUALS = GPU_RESIDUALS if DEVICE == "cuda" else CPU_RESIDUALS
DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pas", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p.name)
def test_max_pool2d(measure, pool, pas, dtype, impl):
    x = torch.randn(pool.N, pool.C, pool.H, pool.W, device=DEVICE, dtype=dtype, requires_grad=pas != "fwd")
    fn = fastconv.functional.max_pool2d if impl == "fastconv" else F.max_pool2d
    kwargs = dict(kernel_size=pool.kernel, stride=pool.stride, padding=pool.padding, ceil_mode=pool.ceil_mode)
    y = fn(x, **kwargs)
    e = x.element_size()
    fwd_bytes = x.numel() * e + y.numel() * (e + 8)  # input; output and int64 indices
    if pas == "fwd":
        def step():
            with torch.no_grad():
                fn(x, **kwargs)
        work = fwd_bytes
    else:
        gy = torch.randn_like(y)

        def step():
            torch.autograd.grad(fn(x, **kwargs), x, gy)
        work = fwd_bytes + y.numel() * (e + 8) + x.numel() * e  # + grad_output and indices read, grad_input written
    measure(step, pool.name, pas, dtype, impl, work, "GB/s")


def torch_residual(r, s, stride, relu):
    if stride == 1 and r.shape == s.shape:
        out = r + s
    else:
        out = r + F.pad(s[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, r.shape[1] - s.shape[1]))
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pas", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("res", RESIDUALS, ids=lambda r: r.name)
def test_residual_add(measure, res, pas, dtype, impl):
    grad = pas != "fwd"
    r = torch.randn(res.N, res.C, res.P, res.Q, device=DEVICE, dtype=dtype, requires_grad=grad)
    s = torch.randn(res.N, res.J, res.H, res.W, device=DEVICE, dtype=dtype, requires_grad=grad)
    if impl == "fastconv":
        fn = lambda: fastconv.functional.residual_add(r, s, stride=res.stride, relu=True)  # noqa: E731
    else:
        fn = lambda: torch_residual(r, s, res.stride, True)  # noqa: E731
    e = r.element_size()
    fwd_bytes = (2 * r.numel() + s.numel()) * e  # residual, shortcut read; output written (strided reads count whole)
    if pas == "fwd":
        def step():
            with torch.no_grad():
                fn()
        work = fwd_bytes
    else:
        g = torch.randn(res.N, res.C, res.P, res.Q, device=DEVICE, dtype=dtype)

        def step():
            torch.autograd.grad(fn(), (r, s), g)
        work = fwd_bytes + (3 * r.numel() + s.numel()) * e  # grad and output (mask) read; both grads written
    measure(step, res.name, pas, dtype, impl, work, "GB/s")
