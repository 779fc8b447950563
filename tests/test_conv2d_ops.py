"""The registered fastconv:: ops themselves: opcheck (schema, fake, autograd registration, AOT dispatch)."""
import pytest
import torch
import torch.nn.functional as F

import fastconv  # noqa: F401
from conftest import DEVICES
from conv_cases import CASES

OPS = torch.ops.fastconv
OPCHECK_CASES = [c for c in CASES if isinstance(c.padding, (int, tuple)) and len(c.input_shape) == 4 and
                 c.name in {"3x3_pad1", "everything_asymmetric", "depthwise_stride2", "pointwise_stride2",
                            "empty_batch", "alexnet_11x11_stride4"}]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def op_args(case, x, w, b):
    return (_pair(case.stride), _pair(case.padding), _pair(case.dilation), case.groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_fprop_dgrad_wgrad_bias_grad(case, device):
    x, w, b = case.make(device=device, requires_grad=True)
    conv_args = op_args(case, x, w, b)
    y = OPS.conv2d_direct(x, w, b, *conv_args)
    gy = torch.randn_like(y).requires_grad_()
    checks = [
        (OPS.conv2d_direct.default, (x, w, b) + conv_args),
        (OPS.conv2d_direct_dgrad.default, (gy, w, list(x.shape)) + conv_args),
        (OPS.conv2d_direct_wgrad.default, (gy, x, list(w.shape)) + conv_args),
        (OPS.conv2d_bias_grad.default, (gy,)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_opcheck_channels_last():
    x = torch.randn(2, 4, 7, 6).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 2, 3, 3).requires_grad_()
    torch.library.opcheck(OPS.conv2d_direct.default, (x, w, None, [1, 2], [1, 1], [1, 1], 2))
    gy = torch.randn(2, 6, 7, 3).to(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.conv2d_direct_dgrad.default, (gy, w, [2, 4, 7, 6], [1, 2], [1, 1], [1, 1], 2))
    torch.library.opcheck(OPS.conv2d_direct_wgrad.default, (gy, x, [6, 2, 3, 3], [1, 2], [1, 1], [1, 1], 2))


def test_backward_ops_match_autograd():
    """dgrad and wgrad called directly give the gradients autograd gives (explicit shape arguments)."""
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    args = ([2, 1], [1, 0], [1, 2], 2)
    y = torch.nn.functional.conv2d(x, w, None, *args)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    torch.testing.assert_close(OPS.conv2d_direct_dgrad(gy, w, list(x.shape), *args), gx)
    torch.testing.assert_close(OPS.conv2d_direct_wgrad(gy, x, list(w.shape), *args), gw)
    torch.testing.assert_close(OPS.conv2d_bias_grad(gy), gy.sum((0, 2, 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_call_bypasses_autograd_only_when_nothing_needs_it(device):
    # fastconv.ops.call (the forward paths' op call) skips the Python autograd kernel when autograd has
    # nothing to record; whenever a gradient is needed the op must still be recorded.
    from fastconv import ops
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6, device=device)
    w = torch.randn(4, 5, 3, 3, device=device)
    op = ops.CONV_OPS["direct"].fprop
    args = ([1, 1], [1, 1], [1, 1], 1)
    expected = op(x, w, None, *args)
    # grad mode, nothing requires grad; no_grad; inference_mode: no graph, the same result
    for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with context():
            y = ops.call(op, x, w, None, *args)
        assert y.grad_fn is None and not y.requires_grad
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # a leaf that requires grad: recorded, and its gradient is the op's
    w_leaf = w.clone().requires_grad_()
    y = ops.call(op, x, w_leaf, None, *args)
    assert y.grad_fn is not None
    gy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w_leaf, gy)
    (gw_ref,) = torch.autograd.grad(op(x, w_leaf, None, *args), w_leaf, gy)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=0)
    # requires grad but grad mode off: not recorded
    with torch.no_grad():
        assert ops.call(op, x, w_leaf, None, *args).grad_fn is None


@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit_gemm"])
def test_torch_func_transforms_like_torch(algo):
    """torch.func's reverse-mode transforms (grad, vjp, jacrev, and vmap of grad: per-sample gradients) through
    fastconv's ops, against torch's. register_autograd's generated Function lacks setup_context, which they need;
    fastconv.ops.call routes the ops through a twin that has it, with the same rules."""
    from fastconv.functional import conv2d, max_pool2d, residual_add
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)

    def loss(f, **kw):
        return lambda xx, ww: max_pool2d_of(f)(f(xx, ww, None, stride=2, padding=1, groups=2, **kw)).square().sum()

    def max_pool2d_of(f):
        return (lambda t: max_pool2d(t, 2, ceil_mode=True)) if f is conv2d else (
            lambda t: F.max_pool2d(t, 2, ceil_mode=True))

    ours, ref = loss(conv2d, algo=algo), loss(F.conv2d)
    for a, b in zip(torch.func.grad(ours, argnums=(0, 1))(x, w), torch.func.grad(ref, argnums=(0, 1))(x, w)):
        torch.testing.assert_close(a, b)
    per_sample = [torch.func.vmap(torch.func.grad(lambda ww, xx, f=f: f(xx[None], ww)), in_dims=(None, 0))(w, x)
                  for f in (ours, ref)]
    torch.testing.assert_close(*per_sample)
    small = x[:1, :, :3, :3]
    jac = [torch.func.jacrev(lambda ww, f=f: f(small, ww, groups=2))(w) for f in (lambda *a, **k: conv2d(*a, **k,
                                                                                                       algo=algo),
                                                                              F.conv2d)]
    torch.testing.assert_close(*jac)
    # second order by reverse over reverse (fastconv has no forward mode)
    hess = [torch.func.jacrev(torch.func.jacrev(lambda t, f=f: f(t, w[:, :, :1, :1], groups=2).pow(3).sum()))(
        x[:1, :, :2, :2]) for f in (lambda *a, **k: conv2d(*a, **k, algo=algo), F.conv2d)]
    torch.testing.assert_close(*hess)
    out, vjp = torch.func.vjp(lambda r, s: residual_add(r, s, stride=2, relu=True), x[:, :, ::2, ::2],
                              x[:, :2])
    ref_out, ref_vjp = torch.func.vjp(lambda r, s: torch.relu(r + F.pad(s[..., ::2, ::2], (0, 0, 0, 0, 0, 2))),
                                      x[:, :, ::2, ::2], x[:, :2])
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(vjp(torch.ones_like(out)), ref_vjp(torch.ones_like(out))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit_gemm"])
def test_gradients_take_the_forward_layout_like_torch(algo):
    """torch lays the input's and weight's gradients out as the forward's output (channels_last when the input or
    the weight is), whatever layout grad_output arrives in; the backward kernels follow grad_output's."""
    from fastconv.functional import conv2d
    cl, nchw = torch.channels_last, torch.contiguous_format
    torch.manual_seed(0)
    for x_fmt, w_fmt, gy_fmt in ((cl, nchw, nchw), (nchw, cl, nchw), (nchw, nchw, cl), (cl, cl, nchw)):
        x = torch.randn(2, 3, 6, 6).to(memory_format=x_fmt).requires_grad_()
        w = torch.randn(4, 3, 3, 3).to(memory_format=w_fmt).requires_grad_()
        gy = torch.randn(2, 4, 4, 4).to(memory_format=gy_fmt)
        for ours, ref in zip(torch.autograd.grad(conv2d(x, w, algo=algo), (x, w), gy),
                             torch.autograd.grad(F.conv2d(x, w), (x, w), gy)):
            for fmt in (cl, nchw):
                assert ours.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt), (x_fmt, w_fmt,
                                                                                                       gy_fmt)
            torch.testing.assert_close(ours, ref)
