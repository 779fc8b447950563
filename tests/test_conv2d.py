"""fastconv.functional.conv2d against torch.nn.functional.conv2d: forward, gradients, dtypes, layouts."""
import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import DEVICES, cuda
from conv_cases import CASES, GRADCHECK_CASES
from helpers import EPS, assert_close_to, rel_err
from fastconv.functional import conv2d

ALGOS = list(fastconv.CONV_ALGOS)
KERNELS = [a for a in ALGOS if a != "auto"]  # the algorithms themselves


def run_both(case, x, w, b, algo, grad_output=None):
    """Output and (input, weight, bias) gradients from fastconv and from torch, on the same leaves."""
    leaves = [t for t in (x, w, b) if t is not None]
    y = conv2d(x, w, b, **case.conv_kwargs(), algo=algo)
    ref = F.conv2d(x, w, b, **case.conv_kwargs())
    if grad_output is None:
        grad_output = torch.randn_like(ref)
    grads = torch.autograd.grad(y, leaves, grad_output) if x.requires_grad else ()
    ref_grads = torch.autograd.grad(ref, leaves, grad_output) if x.requires_grad else ()
    return y, ref, grads, ref_grads


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_float64_cpu(case, algo):
    x, w, b = case.make(dtype=torch.float64, requires_grad=True)
    y, ref, grads, ref_grads = run_both(case, x, w, b, algo)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert_close_to(y, ref, 1e-12, "output")
    for name, g, rg in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close_to(g, rg, 1e-12, f"grad {name}")


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_float32(case, device, algo):
    """fp32 against torch's fp64 result on the same inputs (the fp32 kernels accumulate in fp32)."""
    x, w, b = case.make(device=device, requires_grad=True)
    y = conv2d(x, w, b, **case.conv_kwargs(), algo=algo)
    gy = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, gy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[:2]
    b64 = leaves64[2] if b is not None else None
    ref = F.conv2d(x64, w64, b64, **case.conv_kwargs())
    ref_grads = torch.autograd.grad(ref, leaves64, gy.double())
    assert_close_to(y, ref.float(), 1e-5, "output")
    for name, g, rg in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close_to(g, rg.float(), 1e-5, f"grad {name}")


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_low_precision_error_bounded_by_torchs(case, device, dtype, algo):
    """fp16/bf16: our error against an fp64 reference is at most twice torch's own at that dtype."""
    x, w, b = case.make(device=device, dtype=dtype, requires_grad=True)
    leaves = [t for t in (x, w, b) if t is not None]
    y = conv2d(x, w, b, **case.conv_kwargs(), algo=algo)
    ref = F.conv2d(x, w, b, **case.conv_kwargs())
    assert y.dtype == dtype
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    ref_grads = torch.autograd.grad(ref, leaves, gy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    b64 = leaves64[2] if b is not None else None
    exact = F.conv2d(leaves64[0], leaves64[1], b64, **case.conv_kwargs())
    exact_grads = torch.autograd.grad(exact, leaves64, gy.double())
    pairs = [("output", y, ref, exact)] + [
        (f"grad {n}", g, rg, eg) for n, g, rg, eg in zip(("input", "weight", "bias"), grads, ref_grads, exact_grads)
    ]
    for what, ours, torchs, truth in pairs:
        ours_err, torch_err = rel_err(ours, truth), rel_err(torchs, truth)
        bound = max(2 * torch_err, 4 * EPS[dtype])
        assert ours_err <= bound, f"{what}: error {ours_err:.3g} > bound {bound:.3g} (torch's error {torch_err:.3g})"


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_and_gradgradcheck_float64(case, algo):
    x, w, b = case.make(dtype=torch.float64, requires_grad=True)
    inputs = (x, w, b) if b is not None else (x, w)

    def fn(*args):
        return conv2d(*args, **case.conv_kwargs(), algo=algo)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_cl", [False, True], ids=["x_nchw", "x_cl"])
@pytest.mark.parametrize("weight_cl", [False, True], ids=["w_nchw", "w_cl"])
def test_channels_last_values_and_output_format(device, input_cl, weight_cl, algo):
    case = next(c for c in CASES if c.name == "groups2")
    x, w, b = case.make(device=device)
    if input_cl:
        x = x.to(memory_format=torch.channels_last)
    if weight_cl:
        w = w.to(memory_format=torch.channels_last)
    for t in (x, w, b):
        t.requires_grad_()
    y, ref, grads, ref_grads = run_both(case, x, w, b, algo)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt)
    assert_close_to(y, ref, 1e-4, "output")
    for name, g, rg in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close_to(g, rg, 1e-4, f"grad {name}")


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, algo):
    """Transposed and sliced views, read through their strides (or copied) but never misread."""
    x_big = torch.randn(2, 8, 11, 9, device=device)
    x = x_big[:, ::2].transpose(2, 3).requires_grad_(False)  # (2, 4, 9, 11), non-contiguous
    w = torch.randn(6, 2, 3, 5, device=device).transpose(2, 3)  # (6, 2, 5, 3), non-contiguous
    b = torch.randn(12, device=device)[::2]  # strided bias
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    kwargs = dict(stride=(1, 2), padding=(2, 1), groups=2, algo=algo)
    y = conv2d(x, w, b, **kwargs)
    ref = F.conv2d(x, w, b, **{k: v for k, v in kwargs.items() if k != "algo"})
    gy = torch.randn_like(ref).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous grad too
    grads = torch.autograd.grad(y, (x, w, b), gy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    assert_close_to(y, ref, 1e-4, "output")
    for name, g, rg in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close_to(g, rg, 1e-4, f"grad {name}")


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_output(device, algo):
    """grad_output of y.sum() is an expanded tensor with zero strides."""
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    conv2d(x, w, b, padding=1, algo=algo).sum().backward()
    grads = [t.grad for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.conv2d(x, w, b, padding=1).sum().backward()
    for g, t in zip(grads, (x, w, b)):
        assert_close_to(g, t.grad, 1e-5)


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gradients_are_zero(device, algo):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    y = conv2d(x, w, b, padding=1, algo=algo)
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_deterministic_cpu():
    case = next(c for c in CASES if c.name == "many_c_steps")
    x, w, b = case.make()
    first = conv2d(x, w, b, **case.conv_kwargs())
    assert all(torch.equal(first, conv2d(x, w, b, **case.conv_kwargs())) for _ in range(3))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("algo", KERNELS)
def test_cuda_bitwise_reproducible(algo):
    case = next(c for c in CASES if c.name == "many_c_steps")
    x, w, b = case.make(device="cuda", requires_grad=True)
    runs = []
    for _ in range(3):
        y = conv2d(x, w, b, **case.conv_kwargs(), algo=algo)
        leaves = [t for t in (x, w, b) if t is not None]  # (this case has no bias)
        runs.append((y,) + torch.autograd.grad(y, leaves, torch.ones_like(y)))
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("shape", [(32, 64, 56, 56, 64, 3, 1), (8, 256, 14, 14, 512, 3, 2), (4, 3, 224, 224, 64, 7, 2),
                                   (16, 256, 14, 14, 1024, 1, 1)])
def test_cuda_resnet_layer_shapes(shape, algo):
    """Realistic layers: many blocks, the grid-stride loops and full tiles; forward and both gradients."""
    n, c, hw, _, k, r, stride = shape
    x = torch.randn(n, c, hw, hw, device="cuda", requires_grad=True)
    w = (torch.randn(k, c, r, r, device="cuda") / (c * r * r) ** 0.5).requires_grad_()
    y = conv2d(x, w, None, stride=stride, padding=r // 2, algo=algo)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, None, stride=stride, padding=r // 2)
    rgx, rgw = torch.autograd.grad(ref, (x64, w64), gy.double())
    assert_close_to(y, ref.float(), 1e-5, "output")
    assert_close_to(gx, rgx.float(), 1e-5, "grad input")
    assert_close_to(gw, rgw.float(), 1e-4, "grad weight")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16_cl"])
@pytest.mark.parametrize("r,stride", [(3, 1), (5, 2)])
def test_cuda_depthwise_layer_shapes(r, stride, dtype, channels_last):
    """A MobileNet-sized depthwise layer on the direct kernels (auto's choice): many rows per block step, and the wgrad
    kernel's positions in many splits (5x5: taps in 3 chunks). Forward and both gradients against torch in float64,
    and the run repeated bit for bit."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(8, 96, 56, 56, device="cuda").to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(96, 1, r, r, device="cuda") / r).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    runs, gy = [], None
    for _ in range(2):
        y = conv2d(x, w, None, stride=stride, padding=r // 2, groups=96)
        gy = torch.randn_like(y) if gy is None else gy
        runs.append((y, *torch.autograd.grad(y, (x, w), gy)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    y, gx, gw = runs[0]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, None, stride=stride, padding=r // 2, groups=96)
    rgx, rgw = torch.autograd.grad(ref, (x64, w64), gy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_to(y.float(), ref.float(), tol, "output")
    assert_close_to(gx.float(), rgx.float(), tol, "grad input")
    assert_close_to(gw.float(), rgw.float(), tol * 10, "grad weight")


@cuda
@pytest.mark.cuda
def test_cuda_uses_current_stream_and_device():
    s = torch.cuda.Stream()
    x = torch.randn(4, 8, 32, 32, device="cuda")
    w = torch.randn(16, 8, 3, 3, device="cuda")
    s.wait_stream(torch.cuda.current_stream())  # x and w are written on the default stream
    with torch.cuda.stream(s):
        y = conv2d(x, w, padding=1)
    s.synchronize()
    assert_close_to(y, F.conv2d(x.double(), w.double(), padding=1).float(), 1e-5)


@cuda
@pytest.mark.cuda
def test_cuda_more_than_2_31_elements():
    """Offsets past 2^31 (64-bit index math): a 46341 x 46341 fp16 image, checked on its last rows."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    side = 46341  # side * side > 2**31
    x = torch.randn(1, 1, side, side, device="cuda", dtype=torch.float16)
    w = torch.randn(2, 1, 3, 3, device="cuda", dtype=torch.float16)
    y = conv2d(x, w, padding=1)
    tail = F.conv2d(x[:, :, -4:].float(), w.float(), padding=(0, 1))  # output rows side-3 and side-2
    assert_close_to(y[:, :, -3:-1].float(), tail, 2e-3, "last rows")
    gx = torch.ops.fastconv.conv2d_direct_dgrad(y, w, list(x.shape), [1, 1], [1, 1], [1, 1], 1)
    gx_tail = torch.ops.fastconv.conv2d_direct_dgrad(y[:, :, -6:].contiguous(), w, [1, 1, 6, side], [1, 1], [1, 1], [1, 1], 1)
    assert_close_to(gx[:, :, -5:-1].float(), gx_tail[:, :, 1:5].float(), 1e-3, "dgrad last rows")


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [(3, 1), (1, 1)], ids=["3x1", "1x1"])
def test_width_one_views(device, algo, kernel):
    """1-D signals as (N, C, L, 1) transposed views: torch calls them contiguous although stride(3) is
    arbitrary, and the output's gradient arrives with the same kind of strides."""
    x = torch.randn(2, 4, 1, 9, device=device).transpose(2, 3).requires_grad_()  # sizes (2, 4, 9, 1)
    w = torch.randn(6, 4, *kernel, device=device, requires_grad=True)
    pad = (kernel[0] // 2, 0)
    y = conv2d(x, w, padding=pad, algo=algo)
    ref = F.conv2d(x, w, padding=pad)
    gy = torch.randn(2, 6, 1, 9, device=device).transpose(2, 3)  # (2, 6, 9, 1) with stride(3) == 9
    grads = torch.autograd.grad(y, (x, w), gy)
    ref_grads = torch.autograd.grad(ref, (x, w), gy)
    assert_close_to(y, ref, 1e-5, "output")
    for name, g, rg in zip(("input", "weight"), grads, ref_grads):
        assert_close_to(g, rg, 1e-5, f"grad {name}")
