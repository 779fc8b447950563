"""Fused conv-BatchNorm-ReLU: the ops (conv + ReLU epilogue, training-mode batch_norm_relu and its backward),
fastconv.functional.conv_bn_relu, fastconv.ConvBNReLU and fastconv.fuse, against torch's
Conv2d -> BatchNorm2d -> ReLU sequence."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (fuse() must leave pruned modules alone)
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import FakeTensorMode

import fastconv
from conftest import DEVICES, HAS_CUDA, cuda
from conv_cases import CASES
from fastconv import ConvBNReLU, backends
from fastconv.functional import conv_bn_relu
from fastconv.ops import CONV_OPS
from helpers import EPS, assert_close_to, nontrivial_batch_norms, randomize_bn, rel_err

OPS = torch.ops.fastconv
KERNELS = list(CONV_OPS)


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def fprop_with_relu(algo, x, w, b, case):
    return CONV_OPS[algo].fprop(x, w, b, _pair(case.stride), _pair(case.padding), _pair(case.dilation), case.groups,
                                *backends.algo_args(algo), True)


OP_CASES = [c for c in CASES if isinstance(c.padding, (int, tuple)) and len(c.input_shape) == 4]


# ---- the conv kernels' ReLU epilogue --------------------------------------------------------------------


@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_conv_relu_epilogue_matches_torch(case, device, algo):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w, b = case.make(device=device, dtype=dtype, requires_grad=True)
    y = fprop_with_relu(algo, x, w, b, case)
    ref = F.relu(F.conv2d(x, w, b, **case.conv_kwargs()))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_to(y, ref, tol, "output")
    assert (y >= 0).all()
    if y.numel():
        leaves = [t for t in (x, w, b) if t is not None]
        gy = torch.randn_like(ref)
        for g, rg in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
            assert_close_to(g, rg, tol, "gradient")


def test_conv_relu_epilogue_passes_nan_like_torch():
    x = torch.randn(1, 2, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    w = torch.randn(3, 2, 3, 3)
    ref = F.relu(F.conv2d(x, w, None, padding=1))  # the NaN spreads to every output that reads it
    assert ref.isnan().any()
    for algo in KERNELS:
        y = CONV_OPS[algo].fprop(x, w, None, [1, 1], [1, 1], [1, 1], 1, *backends.algo_args(algo), True)
        torch.testing.assert_close(y, ref, equal_nan=True)


# ---- batch_norm_relu and its backward -------------------------------------------------------------------


def reference_bn_relu(x, weight, bias, eps, relu):
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return F.relu(y) if relu else y


BN_SHAPES = [(4, 6, 5, 7), (2, 3, 1, 1), (1, 5, 9, 3), (3, 40, 2, 2), (8, 1, 3, 3), (2, 70, 17, 1)]
LAYOUTS = ["nchw", "channels_last", "non_contiguous"]


def make_activation(shape, layout, device, dtype, scale=2.0, shift=0.5):
    x = torch.randn(shape, device=device, dtype=torch.float64) * scale + shift
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], device=device, dtype=torch.float64)[..., ::2] * scale + shift
    return x.to(dtype)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_relu_matches_torch(shape, device, layout, affine, relu):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = make_activation(shape, layout, device, dtype).requires_grad_()
    c = shape[1]
    w = (torch.randn(c, device=device, dtype=dtype) if affine else None)
    b = (torch.randn(c, device=device, dtype=dtype) if affine else None)
    leaves = [x] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])
    y, mean, var = OPS.batch_norm_relu(x, w, b, 1e-5, relu)
    ref = reference_bn_relu(x, w, b, 1e-5, relu)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close_to(y, ref, tol, "output")
    assert y.is_contiguous(memory_format=suggest_memory_format(x))  # the output keeps the input's layout
    xd = x.detach().double()
    assert_close_to(mean, xd.mean((0, 2, 3)), tol, "mean")
    assert_close_to(var, xd.var((0, 2, 3), unbiased=False), tol, "var")
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gy = torch.randn_like(ref)
    # Against float64 truth. With two values per channel (2x3x1x1) the normalised values are +-1 up to eps and
    # the input gradient, (w / sigma) * (gy - mean(gy) - xhat * mean(gy * xhat)), cancels to about 1e-6 of its
    # terms: float32 then gets only a few digits of it, torch as well as fastconv (the H200 run of b5fddeb saw
    # 3.5e-3 against torch's 7e-4 on the same draw). So the input gradient may also be off by a few float32
    # roundings of the terms it cancels (x - mean loses |x| / sigma of them); a wrong formula is off by the terms
    # themselves. On CPU in float32, over 200 draws of 2x3x1x1, torch's and fastconv's errors stay below 1 unit.
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    w64, b64 = (leaves64[1], leaves64[2]) if affine else (None, None)
    exact = reference_bn_relu(leaves64[0], w64, b64, 1e-5, relu)
    truth = torch.autograd.grad(exact, leaves64, gy.double())
    grads = torch.autograd.grad(y, leaves, gy)
    terms = bn_input_gradient_terms(x, w, gy, 1e-5)
    err, scale = (grads[0].double() - truth[0]).norm().item(), truth[0].norm().item()
    assert err <= max(50 * tol * scale, 32 * EPS[dtype] * terms), f"input gradient: error {err:.3g} (norm {scale:.3g}, terms {terms:.3g})"
    for g, tg in zip(grads[1:], truth[1:]):
        assert_close_to(g, tg, 50 * tol, "parameter gradient")


def bn_input_gradient_terms(x, w, gy, eps):
    """The size of the terms the BatchNorm input gradient sums (and may cancel), each with the condition of
    x - mean: || |gy| * |w| / sigma * (1 + max|x| / sigma) ||, per channel."""
    xd = x.detach().double()
    sigma = (xd.var((0, 2, 3), unbiased=False) + eps).sqrt()
    scale = (w.detach().double().abs() if w is not None else 1.0) / sigma * (1 + xd.abs().amax((0, 2, 3)) / sigma)
    return (gy.double().abs() * scale.view(1, -1, 1, 1)).norm().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_relu_low_precision_error_bounded_by_torchs(device, dtype, layout):
    x = make_activation((4, 12, 9, 7), layout, device, dtype).requires_grad_()
    w = torch.randn(12, device=device).requires_grad_()  # float32 affine parameters with a low-precision input
    b = torch.randn(12, device=device).requires_grad_()
    y, _, _ = OPS.batch_norm_relu(x, w, b, 1e-5, True)
    ref = reference_bn_relu(x, w.to(dtype) if device == "cpu" else w, b.to(dtype) if device == "cpu" else b, 1e-5, True)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    exact = reference_bn_relu(x64, w64, b64, 1e-5, True)
    gy = torch.randn_like(y)
    ours = [y] + list(torch.autograd.grad(y, (x, w, b), gy))
    torchs = [ref] + list(torch.autograd.grad(ref, (x,), gy))
    truth = [exact] + list(torch.autograd.grad(exact, (x64, w64, b64), gy.double()))
    assert y.dtype == dtype and ours[2].dtype == torch.float32
    for i, what in enumerate(("output", "grad input")):
        bound = max(2 * rel_err(torchs[i], truth[i]), 4 * EPS[dtype])
        assert rel_err(ours[i], truth[i]) <= bound, what
    for i, what in ((2, "grad weight"), (3, "grad bias")):
        assert rel_err(ours[i], truth[i]) <= 8 * EPS[dtype], what


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_relu_nan_like_torch(device):
    """A NaN poisons its channel's statistics; the ReLU passes NaN forward and its gradient backward, as
    torch's relu (threshold_backward blocks only where the output is <= 0)."""
    x = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
    x[1, 0, 2, 3] = float("nan")
    x.requires_grad_()
    w = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    if device == "cuda":
        x, w, b = (t.detach().float().requires_grad_() for t in (x, w, b))
    y, _, _ = OPS.batch_norm_relu(x, w, b, 1e-5, True)
    ref = reference_bn_relu(x, w, b, 1e-5, True)
    torch.testing.assert_close(y, ref, equal_nan=True)
    gy = torch.randn_like(ref)
    for g, rg in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
        torch.testing.assert_close(g, rg, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_are_numerically_safe_for_a_large_mean(device):
    """Welford in fp32: a channel with mean 1000 and spread 0.01 keeps its variance (sum-of-squares would not)."""
    x = (1000 + 0.01 * torch.randn(16, 3, 32, 32, device=device, dtype=torch.float64)).float()
    _, mean, var = OPS.batch_norm_relu(x, None, None, 1e-5, False)
    exact = x.double().var((0, 2, 3), unbiased=False)
    assert rel_err(var, exact) < 1e-3
    assert rel_err(mean, x.double().mean((0, 2, 3))) < 1e-6


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_relu_gradcheck_and_gradgradcheck_float64(affine, relu):
    x = torch.randn(3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = (torch.randn(2, dtype=torch.float64, requires_grad=True),
              torch.randn(2, dtype=torch.float64, requires_grad=True)) if affine else ()

    def f(x, *p):
        w, b = p if p else (None, None)
        return OPS.batch_norm_relu(x, w, b, 1e-3, relu)[0]

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_relu_empty_batch(device):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    y, mean, var = OPS.batch_norm_relu(x, torch.ones(3, device=device), None, 1e-5, True)
    assert y.shape == x.shape and mean.shape == var.shape == (3,)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)], ids=["no_images", "no_channels"])
def test_batch_norm_relu_double_backward_of_empty_input(shape):
    """Empty inputs have zero derivatives of every order (the reference backward's statistics would divide by
    zero elements)."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    out, _, _ = OPS.batch_norm_relu(x, w, b, 1e-5, True)
    gy = torch.randn_like(out, requires_grad=True)
    grads = torch.autograd.grad(out, (x, w, b), gy, create_graph=True)
    second = torch.autograd.grad([g.sum() for g in grads], (x, w, b, gy), allow_unused=True)
    for g in second:
        assert g is None or (torch.isfinite(g).all() and not g.any())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_new_ops(device):
    x = make_activation((3, 4, 5, 6), "channels_last", device, torch.float32).requires_grad_()
    w = torch.randn(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    for relu in (True, False):
        torch.library.opcheck(OPS.batch_norm_relu.default, (x, w, b, 1e-5, relu))
        torch.library.opcheck(OPS.batch_norm_relu.default, (x, None, None, 1e-3, relu))
        _, mean, var = OPS.batch_norm_relu(x, w, b, 1e-5, relu)
        gy = torch.randn_like(x).requires_grad_()
        torch.library.opcheck(OPS.batch_norm_relu_backward.default, (gy, x, mean, var, w, b, 1e-5, relu))
    xc = torch.randn(2, 4, 7, 6, device=device, requires_grad=True)
    wc = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    bc = torch.randn(6, device=device, requires_grad=True)
    conv = ([1, 2], [1, 1], [1, 1], 2)
    torch.library.opcheck(OPS.conv2d_direct.default, (xc, wc, bc, *conv, True))
    torch.library.opcheck(OPS.conv2d_im2col.default, (xc, wc, bc, *conv, 2**20, True))


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_BN = [
    ("one_value_per_channel", lambda: OPS.batch_norm_relu(t(1, 3, 1, 1), None, None, 1e-5, True), ValueError, r"expected more than 1 value per channel when training, got input of shape \[1, 3, 1, 1\]"),
    ("input_3d", lambda: OPS.batch_norm_relu(t(3, 4, 4), None, None, 1e-5, True), ValueError, r"expected input to be 4-D \(N, C, H, W\)"),
    ("int_input", lambda: OPS.batch_norm_relu(torch.ones(2, 3, 2, 2, dtype=torch.int32), None, None, 1e-5, True), TypeError, r"input has dtype torch.int32"),
    ("weight_length", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), t(4), None, 1e-5, True), ValueError, r"weight must be 1-D with 3 elements"),
    ("bias_2d", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), None, t(3, 1), 1e-5, True), ValueError, r"bias must be 1-D with 3 elements"),
    ("weight_dtype", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), t(3, dtype=torch.float16), None, 1e-5, True), TypeError, r"weight has dtype torch.float16; expected torch.float32 or the input's dtype"),
    ("negative_eps", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), None, None, -1.0, True), ValueError, r"eps must be non-negative, got -1$"),
    ("large_negative_eps", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), None, None, -1e6, True), ValueError, r"eps must be non-negative, got -1e\+06$"),
    ("nan_eps", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), None, None, float("nan"), True), ValueError, r"eps must be non-negative, got nan$"),
    ("devices_differ", lambda: OPS.batch_norm_relu(t(2, 3, 2, 2), torch.empty(3, device="meta"), None, 1e-5, True), ValueError, r"input is on cpu but weight is on meta"),
    ("backward_grad_shape", lambda: OPS.batch_norm_relu_backward(t(2, 3, 2, 3), t(2, 3, 2, 2), t(3), t(3), None, None, 1e-5, True), ValueError, r"grad_output has shape \[2, 3, 2, 3\] but input has shape \[2, 3, 2, 2\]"),
    ("backward_mean_dtype", lambda: OPS.batch_norm_relu_backward(t(2, 3, 2, 2), t(2, 3, 2, 2), t(3, dtype=torch.float64), t(3), None, None, 1e-5, True), TypeError, r"mean has dtype torch.float64; expected torch.float32 for a torch.float32 input"),
    ("backward_var_length", lambda: OPS.batch_norm_relu_backward(t(2, 3, 2, 2), t(2, 3, 2, 2), t(3), t(2), None, None, 1e-5, True), ValueError, r"var must be 1-D with 3 elements"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("name,call,exc,pattern", BAD_BN, ids=[c[0] for c in BAD_BN])
def test_bad_batch_norm_relu_input_raises(name, call, exc, pattern, fake):
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True):
            with pytest.raises(exc, match=pattern):
                call()
    else:
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.skipif(not fastconv.WITH_CUDA, reason="CPU-only build has no CUDA implementation")
def test_cuda_batch_norm_relu_rejects_cpu_tensors_before_launch():
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x = t(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"input is on cpu, but this is the CUDA implementation"):
        OPS.batch_norm_relu.default.redispatch(cuda_key, x, None, None, 1e-5, True)
    with pytest.raises(ValueError, match=r"grad_output is on cpu, but this is the CUDA implementation"):
        OPS.batch_norm_relu_backward.default.redispatch(cuda_key, x, x, t(3), t(3), None, None, 1e-5, True)


# ---- ConvBNReLU against torch's sequence --------------------------------------------------------------


def torch_sequence(fused: ConvBNReLU) -> torch.nn.Sequential:
    """nn.Conv2d -> nn.BatchNorm2d (-> nn.ReLU) with fused's configuration and a copy of its state."""
    conv, bn = fused.conv, fused.bn
    ref_conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                               dtype=conv.weight.dtype, device=conv.weight.device)
    ref_bn = torch.nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                  dtype=conv.weight.dtype, device=conv.weight.device)
    layers = [("conv", ref_conv), ("bn", ref_bn)] + ([("relu", torch.nn.ReLU())] if fused.relu else [])
    seq = torch.nn.Sequential(OrderedDict(layers))
    seq.load_state_dict(fused.state_dict())
    return seq.train(fused.training)


# (id, ConvBNReLU args, kwargs, input shape)
MODULE_CONFIGS = [
    ("3x3", (3, 8, 3), dict(padding=1), (4, 3, 9, 8)),
    ("strided_bias_no_relu", (4, 6, 3), dict(stride=2, padding=1, bias=True, relu=False), (3, 4, 11, 10)),
    ("groups_dilation", (4, 8, 3), dict(padding=2, dilation=2, groups=2), (2, 4, 9, 9)),
    ("depthwise", (6, 6, 3), dict(padding=1, groups=6), (3, 6, 7, 7)),
    ("pointwise", (8, 16, 1), dict(), (2, 8, 5, 5)),
    ("cumulative_momentum", (3, 5, 3), dict(padding=1, momentum=None), (3, 3, 6, 6)),
    ("eps_1e-3_momentum_0.3", (3, 5, 3), dict(padding="same", eps=1e-3, momentum=0.3), (2, 3, 7, 6)),
]


def sgd_steps(model, x, steps, seed):
    """Forward/backward/step `steps` times; returns outputs, input and parameter gradients per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    record = []
    for i in range(steps):
        torch.manual_seed(seed + i)
        xi = (x + 0.1 * i).detach().requires_grad_()
        out = model(xi)
        # drawn on the CPU: the same numbers whatever device the model runs on (CUDA's generator differs)
        gy = torch.randn(out.shape, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
        opt.zero_grad()
        out.backward(gy)
        record.append((out.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


def assert_grads_close(grads, ref_grads, what: str) -> None:
    # Elementwise with an absolute floor: a conv bias followed by training-mode BatchNorm has a gradient
    # that is exactly zero in exact arithmetic, so only rounding noise is left to compare.
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9, msg=what)


def assert_states_equal(a: torch.nn.Module, b: torch.nn.Module, tol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            assert_close_to(sa[k], sb[k], tol, k)
        else:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", KERNELS)
@pytest.mark.parametrize("name,args,kwargs,shape", MODULE_CONFIGS, ids=[c[0] for c in MODULE_CONFIGS])
def test_module_trains_and_evaluates_like_torch_float64(name, args, kwargs, shape, algo, layout):
    fused = ConvBNReLU(*args, **kwargs, algo=algo, dtype=torch.float64)
    randomize_bn(fused.bn)
    ref = torch_sequence(fused)
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    for (out, gx, gps), (rout, rgx, rgps) in zip(sgd_steps(fused, x, 3, 0), sgd_steps(ref, x, 3, 0)):
        assert_close_to(out, rout, 1e-12, "training output")
        assert_grads_close([gx] + gps, [rgx] + rgps, "gradients")
    assert_states_equal(fused, ref, 1e-12)  # parameters, running statistics, num_batches_tracked
    assert int(fused.bn.num_batches_tracked) == 3
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_close_to(fused(x), ref(x), 1e-12, "eval output")
    # eval mode with gradients (fine-tuning with frozen statistics): the fold is differentiated
    for (out, gx, gps), (rout, rgx, rgps) in zip(sgd_steps(fused, x, 2, 7), sgd_steps(ref, x, 2, 7)):
        assert_close_to(out, rout, 1e-12, "eval-mode output")
        assert_grads_close([gx] + gps, [rgx] + rgps, "eval-mode gradients")


@pytest.mark.parametrize("construct", ["from_modules", "constructor"])
@pytest.mark.parametrize("bn_kwargs", [dict(affine=False), dict(track_running_stats=False),
                                       dict(affine=False, track_running_stats=False)], ids=str)
def test_every_batch_norm_option(bn_kwargs, construct):
    """affine and track_running_stats, through from_modules and through ConvBNReLU's own keywords (with the conv's
    padding_mode too)."""
    padding_mode = "zeros" if construct == "from_modules" else "reflect"
    if construct == "from_modules":
        conv = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        bn = torch.nn.BatchNorm2d(4, dtype=torch.float64, **bn_kwargs)
        fused = ConvBNReLU.from_modules(conv, bn)
    else:
        fused = ConvBNReLU(3, 4, 3, padding=1, bias=True, padding_mode=padding_mode, dtype=torch.float64, **bn_kwargs)
    ref = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(3, 4, 3, padding=1,
                                                               padding_mode=padding_mode, dtype=torch.float64),
                                          bn=torch.nn.BatchNorm2d(4, dtype=torch.float64, **bn_kwargs),
                                          relu=torch.nn.ReLU()))
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(3, 3, 6, 5, dtype=torch.float64)
    for mode in ("train", "eval", "train"):
        fused.train(mode == "train"), ref.train(mode == "train")
        for (out, gx, gps), (rout, rgx, rgps) in zip(sgd_steps(fused, x, 2, 3), sgd_steps(ref, x, 2, 3)):
            assert_close_to(out, rout, 1e-12, f"{mode} output")
            assert_grads_close([gx] + gps, [rgx] + rgps, f"{mode} gradients")
        assert_states_equal(fused, ref, 1e-12)


def test_state_dict_keys_and_round_trip_with_torch_sequence():
    fused = ConvBNReLU(3, 4, 3, bias=True)
    assert list(fused.state_dict()) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                        "bn.running_var", "bn.num_batches_tracked"]
    assert isinstance(fused.conv, fastconv.Conv2d) and type(fused.bn) is torch.nn.BatchNorm2d
    randomize_bn(fused.bn)
    ref = torch_sequence(fused)
    other = ConvBNReLU(3, 4, 3, bias=True)
    other.load_state_dict(ref.state_dict())
    assert_states_equal(other, fused, 0)
    assert "relu=True" in repr(fused) and "algo='auto'" in repr(fused)


def test_eval_cache_is_reused_and_invalidated():
    fused = ConvBNReLU(3, 6, 3, padding=1, dtype=torch.float64).eval()
    randomize_bn(fused.bn)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)

    def check():
        ref = torch_sequence(fused).eval()
        with torch.no_grad():
            assert_close_to(fused(x), ref(x), 1e-12, "eval output")

    with torch.no_grad():
        fused(x)
        first = fused._fold_cache.value[0]
        fused(x)
        assert fused._fold_cache.value[0] is first  # nothing changed: the folded weight is reused
    check()
    with torch.no_grad():
        fused.bn.running_var.mul_(3)  # in-place buffer change
    check()
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    state["bn.running_mean"] += 1.0
    state["conv.weight"] *= -1
    fused.load_state_dict(state)  # load_state_dict copies in place
    check()
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(x).sum().backward()  # eval mode with gradients: the fold is differentiated
    opt.step()  # an optimizer step changes the weights in place
    check()
    fused.train()
    fused(x)  # training updates the running statistics
    fused.eval()
    check()
    fused.float()  # new tensors of another dtype
    x = x.float()
    ref = torch_sequence(fused).eval()
    with torch.no_grad():
        assert_close_to(fused(x), ref(x), 1e-5, "eval output after .float()")


def test_functional_conv_bn_relu_matches_torch_and_updates_running_stats():
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    w, b = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    conv = dict(stride=(2, 1), padding=1, dilation=1, groups=2)
    out = conv_bn_relu(x, w, b, rm, rv, gamma, beta, **conv, training=True, momentum=0.2, eps=1e-4)
    ref = F.relu(F.batch_norm(F.conv2d(x, w, b, **conv), rm2, rv2, gamma, beta, True, 0.2, 1e-4))
    assert_close_to(out, ref, 1e-12, "training output")
    assert_close_to(rm, rm2, 1e-12, "running_mean")
    assert_close_to(rv, rv2, 1e-12, "running_var")
    out = conv_bn_relu(x, w, b, rm, rv, gamma, beta, **conv, training=False, eps=1e-4, relu=False)
    ref = F.batch_norm(F.conv2d(x, w, b, **conv), rm2, rv2, gamma, beta, False, 0.2, 1e-4)
    assert_close_to(out, ref, 1e-12, "eval output")
    with pytest.raises(ValueError, match=r"running_mean and running_var are required when training=False"):
        conv_bn_relu(x, w, b, None, None, gamma, beta, **conv)
    with pytest.raises(ValueError, match=r"expected a 4-D \(N, C, H, W\) input"):
        conv_bn_relu(x[0], w, b, rm, rv, gamma, beta, **conv)


def test_module_errors_and_from_modules_checks():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        ConvBNReLU(3, 4, 3)(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training"):
        ConvBNReLU(3, 4, 1)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"unknown algo"):
        ConvBNReLU(3, 4, 3, algo="fft")
    with pytest.raises(ValueError, match=r"bn has 5 features but conv has 4 output channels"):
        ConvBNReLU.from_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match=r"bn must be a torch.nn.BatchNorm2d"):
        ConvBNReLU.from_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm1d(4))


def test_failed_call_leaves_the_batch_count_alone():
    """torch's conv raises before its BatchNorm counts the batch; with momentum=None the count is the running
    average's weight, so a failed call must not bump it."""
    fused = ConvBNReLU(3, 4, 3, momentum=None)
    for bad in (torch.randn(2, 5, 8, 8), torch.randn(2, 3, 8, 8, dtype=torch.float64)):
        with pytest.raises((ValueError, TypeError)):
            fused(bad)
    assert fused.bn.num_batches_tracked.item() == 0
    fused(torch.randn(2, 3, 8, 8))
    assert fused.bn.num_batches_tracked.item() == 1


def test_batch_norm_argument_rules_like_torch():
    """torch's batch_norm rules: eps positive in training (a zero eps divides a constant channel by zero) and
    non-negative in eval, and the running statistics both given or both None."""
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"eps must be positive during training, got 0.0"):
        conv_bn_relu(x, w, None, mean, var, training=True, eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be positive during training"):
        ConvBNReLU(3, 4, 3, eps=0.0)(x)
    with pytest.raises(ValueError, match=r"eps must be non-negative, got -1.0"):
        conv_bn_relu(x, w, None, mean, var, training=False, eps=-1.0)
    torch.testing.assert_close(conv_bn_relu(x, w, None, mean, var, training=False, eps=0.0),
                               F.relu(F.conv2d(x, w)))  # eval with eps 0 is allowed, as in torch
    with pytest.raises(ValueError, match=r"running_mean and running_var must either both be None or neither"):
        conv_bn_relu(x, w, None, mean, None, training=True)


def test_from_modules_shares_parameters_and_padding_modes():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    fused = ConvBNReLU.from_modules(conv, bn, relu=False, algo="direct")
    assert fused.conv is conv and fused.bn is bn and fused.algo == "direct" and not fused.relu
    ref = torch.nn.Sequential(conv, bn)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    out = fused(x)
    after_fused = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.load_state_dict(state)
    assert_close_to(out, ref(x), 1e-12, "reflect-padded output")
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, after_fused[k], rtol=1e-12, atol=1e-12, msg=k)


def test_empty_batch_leaves_running_stats_like_torch():
    fused = ConvBNReLU(3, 4, 3, padding=1)
    ref = torch_sequence(fused)
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    out, rout = fused(x), ref(x)
    assert out.shape == rout.shape
    out.sum().backward()
    assert_states_equal(fused, ref, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_module_low_precision_training_error_bounded_by_torchs(device, dtype):
    fused = ConvBNReLU(8, 16, 3, padding=1, device=device)
    ref = torch_sequence(fused)
    exact = torch_sequence(fused).double()
    fused.to(dtype), ref.to(dtype)
    x = torch.randn(4, 8, 10, 10, device=device)
    out, rout, eout = fused(x.to(dtype)), ref(x.to(dtype)), exact(x.double())
    assert out.dtype == dtype
    assert rel_err(out, eout) <= max(2 * rel_err(rout, eout), 8 * EPS[dtype])
    fused.eval(), ref.eval(), exact.eval()
    with torch.no_grad():
        out, rout, eout = fused(x.to(dtype)), ref(x.to(dtype)), exact(x.double())
    assert rel_err(out, eout) <= max(2 * rel_err(rout, eout), 8 * EPS[dtype])


def test_torch_compile_fullgraph_train_and_eval():
    fused = ConvBNReLU(3, 4, 3, padding=1)
    ref = torch_sequence(fused)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    assert_close_to(compiled(x), ref(x), 1e-5, "compiled training output")
    assert_states_equal(fused, ref, 1e-6)
    fused.eval(), ref.eval()
    assert_close_to(compiled(x), ref(x), 1e-5, "compiled eval output")


def test_torch_compile_cumulative_momentum_does_not_recompile_every_step():
    # momentum=None: the running statistics' weight is 1 / steps, a new float each step; an op taking it as a
    # Scalar argument (lerp_'s weight) would make dynamo recompile per step until its recompile limit
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    fused = ConvBNReLU(3, 4, 3, padding=1, momentum=None)
    ref = torch_sequence(fused)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=counter)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(12):
        compiled(x), ref(x)
    assert_states_equal(fused, ref, 1e-6)
    assert counter.frame_count <= 4, counter.frame_count


# ---- fuse() -------------------------------------------------------------------------------------------


def _torchvision():
    return pytest.importorskip("torchvision")


# (model, chains fused, of which with a ReLU, BatchNorms left standing: DenseNet's pre-activation norms
# follow concatenations, not convs). ResNet-18's ReLUs: the stem's, each block's first pair's, and each
# block's end (bn -> add(shortcut) -> relu, fused with the shortcut as the residual).
@pytest.mark.parametrize("arch,fused_count,relu_count,bn_standing", [("resnet18", 20, 17, 0), ("mobilenet_v2", 52, 0, 0),
                                                                     ("densenet121", 59, 59, 62)])
def test_fuse_torchvision_models_train_and_eval_identically(arch, fused_count, relu_count, bn_standing):
    tv = _torchvision()
    model = getattr(tv.models, arch)(num_classes=10).double()
    nontrivial_batch_norms(model)
    fused = fastconv.fuse(model)
    fused_modules = [m for m in fused.modules() if isinstance(m, ConvBNReLU)]
    assert len(fused_modules) == fused_count and sum(m.relu for m in fused_modules) == relu_count
    inside = {id(m.bn) for m in fused_modules}
    standing = [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d) and id(m) not in inside]
    assert len(standing) == bn_standing  # no BatchNorm that follows a conv is left
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is unchanged
    keys = list(fused.state_dict())
    assert len(keys) == len({t.data_ptr() for t in fused.state_dict().values()})  # one name per tensor
    # DenseNet's last block is 1x1 at 48x48: a BatchNorm over two values per channel amplifies rounding
    # differences without bound, so it gets a larger batch and image.
    x = torch.randn((4, 3, 64, 64) if arch == "densenet121" else (2, 3, 48, 48), dtype=torch.float64)
    model.eval(), fused.eval()
    with torch.no_grad():
        assert_close_to(fused(x), model(x), 1e-10, "eval logits")
    # training: one SGD step of the original, then the same step of the fused model from the same state
    model.train(), fused.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)  # dropout (mobilenet_v2) draws alike
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.zero_grad()
    torch.manual_seed(5)
    fout = fused(x)  # parameters and buffers are shared with `model`
    fout.square().sum().backward()
    assert_close_to(fout, out, 1e-10, "training logits")
    # An absolute floor from the largest gradient: a bias whose output a later BatchNorm re-centres has a
    # gradient that is zero in exact arithmetic, rounding noise on both sides.
    floor = 1e-9 * max(g.abs().max().item() for g in grads)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=floor, msg=name)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert_close_to(v, stats[k], 1e-10, k)


def assert_fused_matches(model, fused, x):
    """fused(x) == model(x) in eval and in training mode; the parameters are shared, so the original's
    training step is undone before the fused model's."""
    for mode in (False, True):
        model.train(mode), fused.train(mode)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ref = model(x)
        model.load_state_dict(state)
        assert_close_to(fused(x), ref, 1e-12, f"train={mode}")


def test_fuse_sequential_functional_relu_and_non_chains():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                            torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
            self.conv = torch.nn.Conv2d(4, 5, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(5)
            self.side = torch.nn.Conv2d(4, 5, 1)
            self.side_bn = torch.nn.BatchNorm2d(5)

        def forward(self, x):
            x = self.body(x)
            y = F.relu(self.bn(self.conv(x)))  # functional relu: fused
            s = self.side(x)
            return y + self.side_bn(s) + s  # the side conv's output has two users: not fused

    model = Net().double()
    nontrivial_batch_norms(model)
    fused = fastconv.fuse(model)
    kinds = {name: type(m).__name__ for name, m in fused.named_children()}
    assert kinds["conv"] == "ConvBNReLU" and fused.conv.relu and kinds["side"] == "Conv2d"
    first, second = getattr(fused.body, "0"), getattr(fused.body, "3")  # fx keeps the names, not the Sequential
    assert isinstance(first, ConvBNReLU) and first.relu and isinstance(second, ConvBNReLU) and not second.relu
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert_fused_matches(model, fused, x)


def test_fuse_untraceable_model_falls_back_to_sequentials():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return self.seq(x)
            return -self.seq(x)

    model = Branchy().double()
    nontrivial_batch_norms(model)
    ref = [m for m in model.seq]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fused = fastconv.fuse(model)
    assert fused is model and isinstance(model.seq[0], ConvBNReLU) and model.seq[0].conv is ref[0]
    assert isinstance(model.seq[1], torch.nn.Identity) and isinstance(model.seq[2], torch.nn.Identity)
    with torch.no_grad():
        assert_close_to(model(x), expected, 1e-12, "eval output")


# ---- CUDA ---------------------------------------------------------------------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", KERNELS)
def test_cuda_module_matches_cpu_float64_reference(algo, layout):
    fused = ConvBNReLU(16, 32, 3, padding=1, algo=algo, dtype=torch.float64)
    randomize_bn(fused.bn)
    ref = torch_sequence(fused)
    fused.float().cuda()
    x = torch.randn(4, 16, 20, 20, dtype=torch.float64)
    xc = x.float().cuda()
    if layout == "channels_last":
        xc = xc.to(memory_format=torch.channels_last)
    for (out, gx, gps), (rout, rgx, rgps) in zip(sgd_steps(fused, xc, 2, 0), sgd_steps(ref, x, 2, 0)):
        assert_close_to(out.cpu(), rout, 2e-5, "output")
        assert_close_to(gx.cpu(), rgx, 2e-4, "input gradient")
        for g, rg in zip(gps, rgps):
            assert_close_to(g.cpu(), rg, 2e-4, "parameter gradient")
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_close_to(fused(xc).cpu(), ref(x), 2e-5, "eval output")


@cuda
@pytest.mark.cuda
def test_cuda_batch_norm_kernels_bitwise_reproducible_and_on_current_stream():
    x = torch.randn(8, 64, 28, 28, device="cuda").to(memory_format=torch.channels_last)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    gy = torch.randn_like(x)
    first = OPS.batch_norm_relu(x, w, b, 1e-5, True)
    back = OPS.batch_norm_relu_backward(gy, x, first[1], first[2], w, b, 1e-5, True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        again = OPS.batch_norm_relu(x, w, b, 1e-5, True)
        back_again = OPS.batch_norm_relu_backward(gy, x, again[1], again[2], w, b, 1e-5, True)
    stream.synchronize()
    for a, c in zip(first + back, again + back_again):
        assert torch.equal(a, c)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_cuda_fuse_torchvision_eval_bf16_channels_last(arch):
    tv = _torchvision()
    model = getattr(tv.models, arch)(num_classes=10)
    nontrivial_batch_norms(model)
    model = model.cuda().eval()
    fused = fastconv.fuse(model)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = model.double()(x.double())
        model.float()
        ours = fused.bfloat16()(x.bfloat16())
        torchs = model.bfloat16()(x.bfloat16())
    assert rel_err(ours, exact) <= max(2 * rel_err(torchs, exact), 8 * EPS[torch.bfloat16])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("algo", KERNELS)
def test_conv_bn_relu_gradcheck_float64(algo, training):
    """Through the whole fused path: conv (+ fold in eval) + batch statistics + affine + ReLU."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5

    def f(x, w, b, gamma, beta):
        return conv_bn_relu(x, w, b, rm.clone(), rv.clone(), gamma, beta, stride=(1, 2), padding=1, groups=2,
                            training=training, algo=algo)

    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta))


def test_fuse_leaves_shared_hooked_and_attribute_read_modules_alone():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn1, self.bn2 = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
            self.conv2, self.bn3 = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            a = F.relu(self.bn1(self.conv(x))) + self.bn2(self.conv(x))  # one conv, two call sites
            return self.bn3(self.conv2(a)) * self.conv2.weight.abs().mean()  # its weight read in forward

    model = Shared().double()
    nontrivial_batch_norms(model)
    fused = fastconv.fuse(model)
    assert not any(isinstance(m, ConvBNReLU) for m in fused.modules())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_fused_matches(model, fused, x)
    # a pruned (hooked) conv keeps running as itself
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double().eval()
    torch.nn.utils.prune.l1_unstructured(seq[0], "weight", amount=0.5)
    fused = fastconv.fuse(seq)
    assert not any(isinstance(m, ConvBNReLU) for m in fused.modules())
    with torch.no_grad():
        seq[0].weight_orig.mul_(2)
        assert_close_to(fused(x), seq(x), 1e-12, "pruned")


def test_hooks_on_a_conv_bn_relu_submodule_fire_and_see_the_modules_run():
    fused = ConvBNReLU(3, 4, 3, padding=1, dtype=torch.float64)
    randomize_bn(fused.bn)
    seen = []
    fused.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = fused(x)
    assert seen == [(2, 4, 5, 5)]
    ref = torch_sequence(fused)
    assert torch.allclose(out, F.relu(F.batch_norm(F.conv2d(x, ref.conv.weight, None, 1, 1), None, None,
                                                   ref.bn.weight, ref.bn.bias, True, 0.1, 1e-5)))


def test_fold_cache_survives_inference_mode_and_can_be_invalidated():
    fused = ConvBNReLU(3, 4, 3, padding=1, dtype=torch.float64).eval()
    randomize_bn(fused.bn)
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.inference_mode():
        fused(x)  # fills the cache inside inference mode
    xr = x.clone().requires_grad_()
    fused(xr).sum().backward()  # the cached fold must be usable by autograd
    assert xr.grad is not None
    fused.conv.weight.data.mul_(2)  # invisible to version counters
    fastconv.nn.invalidate_fold_caches(fused)
    with torch.no_grad():
        assert_close_to(fused(x), torch_sequence(fused).eval()(x), 1e-12, "after invalidate")


def test_convert_sets_algo_on_fused_modules_and_model_blocks():
    model = fastconv.models.resnet18(num_classes=10)
    fastconv.convert(model, algo="direct")
    assert all(m.algo == "direct" for m in model.modules() if hasattr(m, "algo"))
    fused = fastconv.convert(torch.nn.Sequential(ConvBNReLU(3, 4, 3)), algo="direct")
    assert fused[0].algo == "direct"


def test_models_compile_fullgraph():
    model = fastconv.models.resnet20(num_classes=10)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    ref = fastconv.models.resnet20(num_classes=10)
    ref.load_state_dict(model.state_dict())
    assert_close_to(compiled(x), ref(x), 1e-5, "compiled training logits")
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close_to(compiled(x), ref(x), 1e-5, "compiled eval logits")
