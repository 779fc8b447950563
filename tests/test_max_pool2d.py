"""fastconv.functional.max_pool2d / fastconv.MaxPool2d against torch."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fastconv
from conftest import DEVICES
from fastconv.functional import max_pool2d

OPS = torch.ops.fastconv

# (name, input shape, kwargs)
POOL_CASES = [
    ("k2", (2, 3, 8, 8), dict(kernel_size=2)),
    ("k3s2_resnet", (2, 4, 15, 17), dict(kernel_size=3, stride=2, padding=1)),
    ("k3s2_alexnet_ceil", (1, 5, 13, 13), dict(kernel_size=3, stride=2, ceil_mode=True)),
    ("overlapping_k3s1", (1, 2, 7, 9), dict(kernel_size=3, stride=1, padding=1)),
    ("rect_kernel_stride", (2, 3, 11, 10), dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 1))),
    ("dilation2", (1, 3, 12, 11), dict(kernel_size=3, stride=2, dilation=2, padding=1)),
    ("dilation_rect_ceil", (2, 2, 10, 13), dict(kernel_size=(2, 3), stride=(3, 2), dilation=(2, 1), padding=(1, 0), ceil_mode=True)),
    ("ceil_last_window_dropped", (1, 1, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ("window_is_input", (2, 3, 4, 4), dict(kernel_size=4)),
    ("one_pixel", (3, 2, 1, 1), dict(kernel_size=1)),
    ("unbatched", (3, 9, 9), dict(kernel_size=3, stride=2)),
    ("empty_batch", (0, 3, 8, 8), dict(kernel_size=2)),
]


def _run(x, kwargs, fn):
    return fn(x, **kwargs, return_indices=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,shape,kwargs", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_matches_torch_values_indices_and_gradients(name, shape, kwargs, device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    y, idx = _run(x, kwargs, max_pool2d)
    ry, ridx = _run(x, kwargs, F.max_pool2d)
    assert y.dtype == dtype and idx.dtype == torch.int64
    assert torch.equal(y, ry) and torch.equal(idx, ridx)
    gy = torch.randn_like(ry)
    (gx,) = torch.autograd.grad(y, x, gy)
    (rgx,) = torch.autograd.grad(ry, x, gy)
    # Overlapping windows sum several gradients into one input, in another order than torch's scatter.
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(gx, rgx, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_non_contiguous(device):
    base = torch.randn(2, 6, 13, 12, device=device)
    for x in (base.to(memory_format=torch.channels_last), base[:, ::2].transpose(2, 3)):
        x = x.detach().requires_grad_()
        y, idx = max_pool2d(x, 3, 2, 1, return_indices=True)
        ry, ridx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        assert torch.equal(y, ry) and torch.equal(idx, ridx)
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert y.is_contiguous(memory_format=fmt) == ry.is_contiguous(memory_format=fmt)
        gy = torch.randn_like(ry)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ry, x, gy)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_like_torch(device):
    x = torch.randn(2, 3, 6, 6, device=device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2:4, 2:4] = float("-inf")
    x[1, 2, 0, 0] = float("nan")
    x[1, 2, 0, 1] = float("nan")  # two NaNs in one window: torch keeps the last
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1)):
        y, idx = max_pool2d(x, **kwargs, return_indices=True)
        ry, ridx = F.max_pool2d(x, **kwargs, return_indices=True)
        assert torch.equal(y.isnan(), ry.isnan()) and torch.equal(y.nan_to_num(), ry.nan_to_num())
        assert torch.equal(idx, ridx)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_like_torch(device):
    """Values from {-1, 0, 1}: every window has ties, and torch keeps the first maximum. Overlapping windows that
    chose the same element add their gradients there. Windows of up to 9 taps and a larger one (the CUDA kernels'
    unrolled path and their loop)."""
    torch.manual_seed(0)
    x = torch.randint(-1, 2, (2, 3, 9, 10), device=device).float().requires_grad_()
    for kwargs in (dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=2), dict(kernel_size=(4, 3), stride=2)):
        y, idx = max_pool2d(x, **kwargs, return_indices=True)
        ry, ridx = F.max_pool2d(x, **kwargs, return_indices=True)
        assert torch.equal(y, ry) and torch.equal(idx, ridx), kwargs
        gy = torch.randn_like(ry)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ry, x, gy)[0])


# Dilation can put every tap of a window in the padding or past the end: the window's value is -inf and torch
# records the first taps at or after row and column 0 (here past the end of each row, so the index names an element
# of the next row, or lies past the plane). 2 and 10 taps: the CUDA kernels' unrolled path and their loop.
EMPTY_WINDOW_CASES = [
    ("2x2_dilation3", (2, 3, 6, 2), dict(kernel_size=2, stride=1, padding=1, dilation=3)),
    ("5x2_dilation_1x3", (1, 2, 7, 2), dict(kernel_size=(5, 2), stride=1, padding=(2, 1), dilation=(1, 3))),
    ("rows_and_cols_empty", (2, 2, 1, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name,shape,kwargs", EMPTY_WINDOW_CASES, ids=[c[0] for c in EMPTY_WINDOW_CASES])
def test_windows_wholly_in_padding_like_torch(name, shape, kwargs, channels_last, device):
    """Values and indices are torch's. The gradient is torch's for every window with an element inside the input,
    and nothing from the others: their -inf does not depend on the input (torch's backward adds their gradient
    at the recorded index, an unrelated element)."""
    torch.manual_seed(6)
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y, idx = max_pool2d(x, **kwargs, return_indices=True)
    ry, ridx = F.max_pool2d(x, **kwargs, return_indices=True)
    empty = ry == float("-inf")  # (randn inputs: -inf only where a window has no element)
    assert empty.any() and torch.equal(y, ry) and torch.equal(idx, ridx)
    gy = torch.randn_like(ry)
    (gx,) = torch.autograd.grad(y, x, gy)
    (rgx,) = torch.autograd.grad(ry, x, gy.masked_fill(empty, 0))
    torch.testing.assert_close(gx, rgx, rtol=1e-6, atol=1e-6)
    # double backward: the gather of the gradient's gradient, zero at the empty windows
    gy.requires_grad_()
    (gx,) = torch.autograd.grad(max_pool2d(x, **kwargs), x, gy, create_graph=True)
    ggx = torch.randn_like(gx)
    (ggy,) = torch.autograd.grad(gx, gy, ggx)
    expected = ggx.flatten(2).gather(2, ridx.clamp(max=shape[-1] * shape[-2] - 1).flatten(2)).view_as(ry)
    torch.testing.assert_close(ggy, expected.masked_fill(empty, 0))


def test_windows_wholly_in_padding_gradcheck():
    x = torch.randperm(2 * 6 * 2, dtype=torch.float64).view(1, 2, 6, 2).div_(10).requires_grad_()
    fn = lambda t: max_pool2d(t, 2, 1, 1, dilation=3).clamp(min=-1e3)  # noqa: E731  (the -inf windows: constant)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_ceil_mode_backward_where_floor_mode_has_no_window(device):
    """A 3 x 3 window of stride 2 over 2 x 2 has one window in ceil mode and none in floor mode (GoogLeNet-style
    pools on small maps): backward must take grad_output's extents, not the floor mode's."""
    x = torch.randn(2, 3, 2, 2, device=device, requires_grad=True)
    for kwargs in (dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=(3, 1), stride=2, ceil_mode=True)):
        y, ry = max_pool2d(x, **kwargs), F.max_pool2d(x, **kwargs)
        assert torch.equal(y, ry)
        gy = torch.randn_like(ry)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ry, x, gy)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_window_far_larger_than_the_input(device):
    """Windows of 2e7 x 2e7 taps over 4 x 5: the kernels scan only the taps inside the input (and backward only
    those that can reach an element), so this is as quick as torch's."""
    x = torch.randn(1, 2, 4, 5, device=device, requires_grad=True)
    kwargs = dict(kernel_size=2 * 10**7, stride=(1, 3), padding=10**7, return_indices=True)
    (y, idx), (ry, ridx) = max_pool2d(x, **kwargs), F.max_pool2d(x, **kwargs)
    assert torch.equal(y, ry) and torch.equal(idx, ridx)
    gy = torch.randn_like(ry)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ry, x, gy)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_takes_the_input_layout(device):
    """As torch's: the input's gradient is laid out like the input, whatever grad_output's layout (here the
    expanded gradient of a sum, and a channels_last gradient for an NCHW input)."""
    base = torch.randn(2, 8, 6, 6, device=device)
    for fmt, other in ((torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)):
        x = base.to(memory_format=fmt).requires_grad_()
        gy = torch.randn(2, 8, 3, 3, device=device).to(memory_format=other)
        for grad in (lambda f: torch.autograd.grad(f(x, 2).sum(), x)[0],
                     lambda f: torch.autograd.grad(f(x, 2), x, gy)[0]):
            ours, ref = grad(max_pool2d), grad(F.max_pool2d)
            assert ours.is_contiguous(memory_format=fmt) and ref.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(ours, ref)


def test_integer_like_window_arguments():
    """numpy integers and 0-d integer tensors pass as ints, as torch takes them."""
    np = pytest.importorskip("numpy")
    x = torch.randn(1, 2, 7, 7)
    torch.testing.assert_close(max_pool2d(x, np.int64(3), torch.tensor(2), [np.int32(1)]), F.max_pool2d(x, 3, 2, 1))
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair"):
        max_pool2d(x, 2.0)


def test_indices_work_with_max_unpool2d():
    x = torch.randn(2, 3, 8, 8)
    y, idx = max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(F.max_unpool2d(y, idx, 2), F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2))


def test_gradcheck_and_gradgradcheck_float64():
    # Distinct values so that no window has a tie the numerical Jacobian could split.
    x = torch.randperm(2 * 2 * 7 * 6, dtype=torch.float64).view(2, 2, 7, 6).div_(10).requires_grad_()
    fn = lambda t: max_pool2d(t, (3, 2), (2, 1), 1, dilation=(1, 2), ceil_mode=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    args = ([3, 2], [2, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(OPS.max_pool2d.default, (x,) + args)
    y, idx = OPS.max_pool2d(x.detach(), *args)
    gy = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(OPS.max_pool2d_backward.default, (gy, idx, list(x.shape), [3, 2], [2, 2], [1, 1], [1, 1]))
    xcl = torch.randn(2, 4, 7, 7, device=device).to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(OPS.max_pool2d.default, (xcl, [2, 2], [2, 2], [0, 0], [1, 1], False))


def test_module_and_convert():
    ref = torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    ours = fastconv.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    assert repr(ours) == repr(ref)
    x = torch.randn(2, 3, 10, 11)
    for a, b in zip(ours(x), ref(x)):
        assert torch.equal(a, b)
    model = fastconv.convert(torch.nn.Sequential(torch.nn.MaxPool2d(2)))
    assert type(model[0]) is fastconv.MaxPool2d


BAD = [
    ("rank5", (1, 1, 2, 4, 4), dict(kernel_size=2), ValueError, r"3-D \(C, H, W\) or 4-D"),
    ("kernel_zero", (1, 1, 4, 4), dict(kernel_size=0), ValueError, r"kernel_size must be positive"),
    ("stride_zero", (1, 1, 4, 4), dict(kernel_size=2, stride=0), ValueError, r"stride must be positive"),
    ("dilation_zero", (1, 1, 4, 4), dict(kernel_size=2, dilation=0), ValueError, r"dilation must be positive"),
    ("negative_padding", (1, 1, 4, 4), dict(kernel_size=2, padding=-1), ValueError, r"padding must be non-negative"),
    ("padding_over_half", (1, 1, 8, 8), dict(kernel_size=3, padding=2), ValueError, r"padding must be at most half the kernel size"),
    ("window_too_big", (1, 1, 3, 3), dict(kernel_size=4), ValueError, r"output size is too small: input 3 x 3 gives 0 x 0"),
    ("zero_channels", (2, 0, 4, 4), dict(kernel_size=2), ValueError, r"non-zero channels, height and width"),
    ("kernel_three_entries", (1, 1, 4, 4), dict(kernel_size=(2, 2, 2)), ValueError, r"kernel_size must be an int or a pair"),
    # torch takes the window's arguments as 32-bit ints (a larger dilation had wrapped the window's arithmetic)
    ("dilation_over_32_bits", (1, 1, 4, 4), dict(kernel_size=3, dilation=2**63 - 1), ValueError, r"must fit in 32 bits"),
    ("kernel_over_32_bits", (1, 1, 4, 4), dict(kernel_size=2**62, padding=2**61), ValueError, r"must fit in 32 bits"),
    ("stride_over_32_bits", (1, 1, 4, 4), dict(kernel_size=2, stride=2**31), ValueError, r"must fit in 32 bits"),
]


@pytest.mark.parametrize("name,shape,kwargs,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_in_eager_and_fake_mode(name, shape, kwargs, exc, pattern):
    x = torch.randn(shape)
    with pytest.raises(exc, match=pattern):
        max_pool2d(x, **kwargs)
    with FakeTensorMode() as mode:
        with pytest.raises(exc, match=pattern):
            max_pool2d(mode.from_tensor(x), **kwargs)


def test_bad_dtypes_and_backward_inputs():
    with pytest.raises(TypeError, match=r"input has dtype torch.int64; supported dtypes"):
        max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int64), 2)
    gy = torch.randn(1, 2, 2, 2)
    with pytest.raises(TypeError, match=r"indices must be torch.int64"):
        OPS.max_pool2d_backward(gy, torch.zeros(1, 2, 2, 2, dtype=torch.int32), [1, 2, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"does not fit input_size"):
        OPS.max_pool2d_backward(gy, torch.zeros(1, 2, 2, 2, dtype=torch.int64), [1, 2, 9, 9], [2, 2], [2, 2], [0, 0], [1, 1])


@pytest.mark.skipif(not fastconv.WITH_CUDA, reason="CPU-only build has no CUDA implementation")
def test_cuda_implementation_rejects_cpu_tensors():
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(ValueError, match=r"input is on cpu, but this is the CUDA implementation"):
        OPS.max_pool2d.default.redispatch(cuda_key, torch.randn(1, 1, 4, 4), [2, 2], [2, 2], [0, 0], [1, 1], False)
