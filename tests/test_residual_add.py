"""fastconv.functional.residual_add against torch's add (+ pad of the strided shortcut) (+ relu)."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fastconv
from conftest import DEVICES
from fastconv.functional import residual_add

OPS = torch.ops.fastconv


def reference(residual, shortcut, stride, relu):
    pad = residual.shape[-3] - shortcut.shape[-3]
    out = residual + F.pad(shortcut[..., ::stride, ::stride], (0, 0, 0, 0, 0, pad))
    return torch.relu(out) if relu else out


# (name, residual shape, shortcut shape, stride)
CASES = [
    ("plain", (2, 8, 7, 9), (2, 8, 7, 9), 1),
    ("plain_vector_tail", (1, 3, 5, 7), (1, 3, 5, 7), 1),  # 105 elements: vectors and a scalar tail
    ("cifar_downsample", (2, 32, 8, 8), (2, 16, 16, 16), 2),
    ("odd_input_ceil", (2, 6, 4, 3), (2, 4, 7, 5), 2),
    ("stride3_pad_channels", (1, 5, 3, 4), (1, 2, 9, 10), 3),
    ("pad_channels_only", (2, 7, 5, 5), (2, 3, 5, 5), 1),
    ("unbatched", (8, 4, 4), (4, 8, 8), 2),
    ("empty_batch", (0, 4, 3, 3), (0, 4, 3, 3), 1),
]


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,rshape,sshape,stride", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(name, rshape, sshape, stride, device, dtype, relu):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    r = torch.randn(rshape, device=device).to(dtype).requires_grad_()
    s = torch.randn(sshape, device=device).to(dtype).requires_grad_()
    out = residual_add(r, s, stride=stride, relu=relu)
    ref = reference(r, s, stride, relu)
    assert out.dtype == dtype and torch.equal(out, ref)  # one rounding, like torch's add
    g = torch.randn_like(ref)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (r, s), g), torch.autograd.grad(ref, (r, s), g)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_mixed_and_non_contiguous(device, stride):
    r = torch.randn(2, 6, 5, 5, device=device)
    s = torch.randn(2, 6 if stride == 1 else 4, 5 * stride, 5 * stride, device=device)
    variants = [
        (r.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)),
        (r.to(memory_format=torch.channels_last), s),
        (r.transpose(2, 3), s.transpose(2, 3)),
        (r[:, :, :, :].contiguous()[:, :, :, :4], s[:, :, :, : 4 * stride - (stride - 1)]),
    ]
    for rr, ss in variants:
        rr, ss = rr.detach().requires_grad_(), ss.detach().requires_grad_()
        out = residual_add(rr, ss, stride=stride, relu=True)
        ref = reference(rr, ss, stride, True)
        assert torch.equal(out, ref)
        g = torch.randn_like(ref).to(memory_format=torch.channels_last)
        for a, b in zip(torch.autograd.grad(out, (rr, ss), g), torch.autograd.grad(ref, (rr, ss), g)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_nan_and_zero_like_torch(device):
    r = torch.tensor([[[[float("nan"), -1.0, 0.5, 0.0]]]], device=device, requires_grad=True)
    s = torch.tensor([[[[1.0, 1.0, -0.5, 0.0]]]], device=device, requires_grad=True)
    out = residual_add(r, s, relu=True)
    ref = reference(r, s, 1, True)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    g = torch.ones_like(ref)
    for a, b in zip(torch.autograd.grad(out, (r, s), g), torch.autograd.grad(ref, (r, s), g)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_take_the_forward_layout(device):
    """Both gradients are laid out as the output whatever grad_output's layout, so eager and compiled runs (where
    AOT may pick grad_output's layout) agree."""
    for fmt, other in ((torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)):
        r = torch.randn(2, 6, 4, 4, device=device).to(memory_format=fmt).requires_grad_()
        s = torch.randn(2, 6, 4, 4, device=device).to(memory_format=fmt).requires_grad_()
        gy = torch.randn(2, 6, 4, 4, device=device).to(memory_format=other)
        for g in torch.autograd.grad(residual_add(r, s, relu=True), (r, s), gy):
            assert g.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_channels_add_a_zero_like_torch(device):
    """torch's r + pad(s) adds +0.0 in the padded channels, so a -0.0 there comes out +0.0 (the sign shows in
    1 / x and copysign, not in ==)."""
    r = torch.full((1, 4, 2, 2), -0.0, device=device)
    s = torch.full((1, 2, 4, 4), -0.0, device=device)
    for relu in (False, True):
        out, ref = residual_add(r, s, stride=2, relu=relu), reference(r, s, 2, relu)
        assert torch.equal(out.signbit(), ref.signbit()) and not out[:, 2:].signbit().any()


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_and_gradgradcheck_float64(relu):
    r = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: residual_add(a, b, stride=2, relu=relu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (r, s))
    assert torch.autograd.gradgradcheck(fn, (r, s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [False, True])
def test_opcheck(device, relu):
    r = torch.randn(2, 5, 3, 4, device=device, requires_grad=True)
    s = torch.randn(2, 3, 6, 7, device=device, requires_grad=True)
    torch.library.opcheck(OPS.residual_add.default, (r, s, 2, relu))
    out = OPS.residual_add(r.detach(), s.detach(), 2, relu)
    g = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(OPS.residual_add_backward.default, (g, out if relu else None, list(s.shape), 2))
    rcl = torch.randn(2, 4, 5, 5, device=device).to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(OPS.residual_add.default, (rcl, rcl.detach().clone().requires_grad_(), 1, relu))


def test_module():
    m = fastconv.ResidualAdd(stride=2, relu=True)
    assert repr(m) == "ResidualAdd(stride=2, relu=True)"
    r, s = torch.randn(1, 4, 3, 3), torch.randn(1, 2, 6, 6)
    assert torch.equal(m(r, s), reference(r, s, 2, True))


BAD = [
    ("rank_mismatch", (1, 2, 3, 3), (2, 3, 3), {}, ValueError, r"both 3-D \(C, H, W\) or both 4-D"),
    ("batch_mismatch", (1, 2, 3, 3), (2, 2, 3, 3), {}, ValueError, r"residual has batch size 1 but shortcut has 2"),
    ("shortcut_wider", (1, 2, 3, 3), (1, 3, 3, 3), {}, ValueError, r"shortcut has 3 channels, more than the residual's 2"),
    ("spatial_mismatch", (1, 2, 4, 4), (1, 2, 9, 9), {"stride": 2}, ValueError, r"residual is 4 x 4 but a shortcut of 9 x 9 subsampled with stride 2 is 5 x 5"),
    ("stride_zero", (1, 2, 3, 3), (1, 2, 3, 3), {"stride": 0}, ValueError, r"stride must be positive"),
]


@pytest.mark.parametrize("name,rshape,sshape,kwargs,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_in_eager_and_fake_mode(name, rshape, sshape, kwargs, exc, pattern):
    r, s = torch.randn(rshape), torch.randn(sshape)
    with pytest.raises(exc, match=pattern):
        residual_add(r, s, **kwargs)
    with FakeTensorMode() as mode:
        with pytest.raises(exc, match=pattern):
            residual_add(mode.from_tensor(r), mode.from_tensor(s), **kwargs)


def test_bad_dtypes_and_devices():
    with pytest.raises(TypeError, match=r"residual \(torch.float32\) and shortcut \(torch.float16\) must have the same dtype"):
        residual_add(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3).half())
    with pytest.raises(TypeError, match=r"supported dtypes"):
        residual_add(torch.ones(1, 2, 3, 3, dtype=torch.int32), torch.ones(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"residual is on cpu but shortcut is on meta"):
        residual_add(torch.randn(1, 2, 3, 3), torch.empty(1, 2, 3, 3, device="meta"))


@pytest.mark.skipif(not fastconv.WITH_CUDA, reason="CPU-only build has no CUDA implementation")
def test_cuda_implementation_rejects_cpu_tensors():
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    r = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"residual is on cpu, but this is the CUDA implementation"):
        OPS.residual_add.default.redispatch(cuda_key, r, r, 1, False)
    with pytest.raises(ValueError, match=r"grad_output is on cpu, but this is the CUDA implementation"):
        OPS.residual_add_backward.default.redispatch(cuda_key, r, None, [1, 2, 3, 3], 1)
