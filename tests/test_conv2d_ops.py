"""The registered fastconv:: ops themselves: opcheck (schema, fake, autograd registration, AOT dispatch)."""
import pytest
import torch

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
