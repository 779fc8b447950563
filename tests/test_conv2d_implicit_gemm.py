"""What is particular to the implicit-GEMM algorithm: its tile argument, the fused epilogue (scale, shift,
residual, ReLU) and its autograd, the residual wired through conv_bn_relu and the ResNet blocks, the
autotuner's choices and their save/load, and on a GPU the tensor-core kernels against torch (every tile
configuration, channel counts that need padding, TF32, split-K wgrad). The generic conv tests (every mode,
gradients, gradcheck, errors) run this algorithm too, through fastconv.CONV_ALGOS."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import backends, functional, ops
from fastconv._checks import IMPLICIT_GEMM_TILES, IMPLICIT_GEMM_WGMMA_TILES
from fastconv.ops import CONV_OPS

from conftest import DEVICES, HAS_CUDA, cuda
from helpers import EPS, assert_close_to, rel_err

IG = CONV_OPS["implicit_gemm"]
FUSED = ops.implicit_gemm_fused


def reference_fused(x, w, scale, shift, residual, stride, padding, dilation, groups, relu):
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


# (input, weight, stride, padding, dilation, groups)
FUSED_CASES = [
    ((2, 6, 7, 9), (5, 6, 3, 3), [1, 1], [1, 1], [1, 1], 1),
    ((1, 4, 9, 8), (6, 2, 3, 2), [2, 1], [0, 1], [1, 2], 2),
    ((3, 8, 5, 5), (8, 8, 1, 1), [1, 1], [0, 0], [1, 1], 1),
]


def make_fused_args(case, device, dtype, scale, shift, residual, requires_grad=False):
    in_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(in_shape, device=device, dtype=dtype)
    w = torch.randn(w_shape, device=device, dtype=dtype)
    out_shape = F.conv2d(x, w, None, stride, padding, dilation, groups).shape
    k = w_shape[0]
    sc = torch.rand(k, device=device, dtype=dtype) + 0.5 if scale else None
    sh = torch.randn(k, device=device, dtype=dtype) if shift else None
    res = torch.randn(out_shape, device=device, dtype=dtype) if residual else None
    tensors = [x, w, sc, sh, res]
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    return tensors, (stride, padding, dilation, groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("terms", [(1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 1), (0, 0, 0)],
                         ids=lambda t: "scale%d-shift%d-residual%d" % t)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_epilogue_matches_torch(case, relu, terms, device):
    dtype = torch.float64 if device == "cpu" else torch.float16
    (x, w, sc, sh, res), conv = make_fused_args(case, device, dtype, *terms)
    y = FUSED(x, w, sc, sh, res, *conv, -1, relu)
    ref = reference_fused(*(t.double() if t is not None else None for t in (x, w, sc, sh, res)), *conv, relu)
    tol = 1e-12 if dtype == torch.float64 else 5e-3
    assert_close_to(y, ref, tol, "fused output")
    if relu:
        assert (y >= 0).all()


@pytest.mark.parametrize("terms", [(1, 1, 1), (0, 1, 1), (1, 0, 0)], ids=lambda t: "scale%d-shift%d-residual%d" % t)
@pytest.mark.parametrize("case", FUSED_CASES[:2], ids=str)
def test_fused_epilogue_gradcheck(case, terms):
    tensors, conv = make_fused_args(case, "cpu", torch.float64, *terms, requires_grad=True)
    # keep pre-ReLU values away from 0, where the ReLU is not differentiable
    present = [t for t in tensors if t is not None]

    def f(*args):
        it = iter(args)
        full = [next(it) if t is not None else None for t in tensors]
        return FUSED(*full, *conv, -1, True)

    assert torch.autograd.gradcheck(f, present)
    assert torch.autograd.gradgradcheck(f, present)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused_and_tile_argument(device):
    (x, w, sc, sh, res), conv = make_fused_args(FUSED_CASES[1], device, torch.float32, 1, 1, 1, requires_grad=True)
    torch.library.opcheck(FUSED, (x, w, sc, sh, res, *conv, -1, True))
    torch.library.opcheck(FUSED, (x, w, None, sh, None, *conv, 2, False))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(IG.fprop, (x_cl, w, sh, *conv, 1, True))
    gy = torch.randn(res.shape, device=device)
    torch.library.opcheck(IG.dgrad, (gy, w, list(x.shape), *conv, 0))
    torch.library.opcheck(IG.wgrad, (gy, x, list(w.shape), *conv, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_outputs_are_not_views(device, layout):
    """The kernels compute NHWC and return the (N, C, H, W) tensor on the same memory: as a tensor of its own, so
    that in-place updates work in eager mode as under torch.compile (a view output refused them). Also where
    .contiguous() is a no-op: one filter, one pixel."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for x_shape, w_shape in (((2, 4, 5, 5), (4, 4, 3, 3)), ((2, 4, 5, 5), (1, 4, 3, 3)), ((2, 4, 3, 3), (6, 4, 3, 3))):
        x = torch.randn(x_shape, device=device).to(memory_format=fmt).requires_grad_()
        w = torch.randn(w_shape, device=device, requires_grad=True)
        outs = [IG.fprop(x, w, None, [1, 1], [1, 1], [1, 1], 1),
                FUSED(x, w, None, torch.randn(w_shape[0], device=device), None, [1, 1], [1, 1], [1, 1], 1)]
        for y in outs:
            assert not y._is_view()
            y.relu_()
            y.sum().backward()
        gy = torch.randn(outs[0].shape, device=device)
        for g in (IG.dgrad(gy, w, list(x.shape), [1, 1], [1, 1], [1, 1], 1),
                  IG.wgrad(gy, x, list(w.shape), [1, 1], [1, 1], [1, 1], 1)):
            assert not g._is_view()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_wgrad_of_padded_channels_is_dense(device, layout, kernel):
    """3 channels per group are padded to 8 for the GEMM and cut back: the filter gradient must be a dense tensor
    laid out as its fake says (a 1 x 1 filter's cut had been a strided view, which broke compiled training)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 6, 5, device=device).to(memory_format=fmt)
    w = torch.randn(4, 3, kernel, kernel, device=device)
    gy = torch.randn(2, 4, 7 - kernel, 6 - kernel, device=device).to(memory_format=fmt)
    args = (gy, x, list(w.shape), [1, 1], [0, 0], [1, 1], 1, -1)
    gw = IG.wgrad(*args)
    assert gw.is_contiguous(memory_format=fmt) and gw._is_view() is False
    assert torch._prims_common.is_non_overlapping_and_dense_or_false(gw)
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(x, w.shape, gy))
    torch.library.opcheck(IG.wgrad, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [-2, IMPLICIT_GEMM_TILES])
def test_bad_tile_raises_on_real_and_fake_tensors(device, tile):
    x, w = torch.randn(1, 8, 5, 5, device=device), torch.randn(8, 8, 3, 3, device=device)
    gy = torch.randn(1, 8, 3, 3, device=device)
    calls = [lambda: IG.fprop(x, w, None, [1, 1], [0, 0], [1, 1], 1, tile, False),
             lambda: IG.dgrad(gy, w, list(x.shape), [1, 1], [0, 0], [1, 1], 1, tile),
             lambda: IG.wgrad(gy, x, list(w.shape), [1, 1], [0, 0], [1, 1], 1, tile),
             lambda: FUSED(x, w, None, None, None, [1, 1], [0, 0], [1, 1], 1, tile, False)]
    for call in calls:
        with pytest.raises(ValueError, match="tile must be -1"):
            call()
    with torch._subclasses.FakeTensorMode() as mode:
        x, w, gy = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(gy)
        for call in calls:
            with pytest.raises(ValueError, match="tile must be -1"):
                call()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_bad_epilogue_operands_raise(device):
    x, w = torch.randn(2, 4, 6, 6, device=device), torch.randn(5, 4, 3, 3, device=device)
    conv = ([1, 1], [0, 0], [1, 1], 1, -1, True)
    good = torch.randn(2, 5, 4, 4, device=device)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        FUSED(x, w, None, None, torch.randn(2, 4, 4, 4, device=device), *conv)
    with pytest.raises(ValueError, match="scale must be 1-D with 5"):
        FUSED(x, w, torch.randn(4, device=device), None, good, *conv)
    with pytest.raises(ValueError, match="shift must be 1-D with 5"):
        FUSED(x, w, None, torch.randn(5, 1, device=device), good, *conv)
    with pytest.raises(TypeError, match="residual"):
        FUSED(x, w, None, None, good.double(), *conv)
    if device == "cpu" and HAS_CUDA:
        with pytest.raises(ValueError, match="cuda"):
            FUSED(x, w, None, None, good.cuda(), *conv)


def test_empty_batch_and_output_format():
    x, w = torch.randn(0, 8, 5, 5), torch.randn(4, 8, 3, 3)
    assert IG.fprop(x, w, None, [1, 1], [0, 0], [1, 1], 1, -1, False).shape == (0, 4, 3, 3)
    dw = IG.wgrad(torch.randn(0, 4, 3, 3), x, [4, 8, 3, 3], [1, 1], [0, 0], [1, 1], 1, -1)
    assert dw.shape == (4, 8, 3, 3) and (dw == 0).all()
    x = torch.randn(2, 8, 5, 5)
    assert IG.fprop(x, w, None, [1, 1], [0, 0], [1, 1], 1, -1, False).is_contiguous()
    y = IG.fprop(x.contiguous(memory_format=torch.channels_last), w, None, [1, 1], [0, 0], [1, 1], 1, -1, False)
    assert y.is_contiguous(memory_format=torch.channels_last)


# ---- conv_bn_relu with a residual, and the ResNet blocks ------------------------------------------------


def bn_params(k, dtype=torch.float64):
    return (torch.randn(k, dtype=dtype) * 0.5, torch.rand(k, dtype=dtype) + 0.5, torch.rand(k, dtype=dtype) + 0.5,
            torch.randn(k, dtype=dtype) * 0.3)


@pytest.mark.parametrize("algo", ["implicit_gemm", "im2col", "direct", "auto"])
@pytest.mark.parametrize("training", [False, True])
def test_conv_bn_relu_with_residual_matches_torch(algo, training):
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    mean, var, gamma, beta = bn_params(6)
    gamma.requires_grad_()
    rm, rv = mean.clone(), var.clone()
    y = functional.conv_bn_relu(x, w, None, rm, rv, gamma, beta, padding=1, training=training, algo=algo,
                                residual=res)
    ref_rm, ref_rv = mean.clone(), var.clone()
    ref = F.relu(F.batch_norm(F.conv2d(x, w, None, padding=1), ref_rm, ref_rv, gamma, beta, training) + res)
    assert_close_to(y, ref, 1e-12, "output")
    assert_close_to(rm, ref_rm, 1e-12, "running_mean")
    gy = torch.randn_like(ref)
    for g, rg in zip(torch.autograd.grad(y, (x, w, res, gamma), gy), torch.autograd.grad(ref, (x, w, res, gamma), gy)):
        assert_close_to(g, rg, 1e-10, "gradient")


@pytest.mark.parametrize("training", [False, True])
def test_conv_bn_relu_module_takes_a_residual(training):
    torch.manual_seed(3)
    module = fastconv.ConvBNReLU(8, 8, 3, padding=1, algo="implicit_gemm").double()
    ref = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)).double()
    ref.load_state_dict({"0.weight": module.conv.weight, **{f"1.{k}": v for k, v in module.bn.state_dict().items()}})
    module.train(training), ref.train(training)
    x, res = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert_close_to(module(x, residual=res), F.relu(ref(x) + res), 1e-12, "ConvBNReLU with a residual")
    assert_close_to(module(x), F.relu(ref(x)), 1e-12, "ConvBNReLU without")


def test_conv_bn_relu_residual_shape_is_checked():
    x, w = torch.randn(2, 6, 7, 7), torch.randn(6, 6, 3, 3)
    mean, var, gamma, beta = bn_params(6, torch.float32)
    for algo in ("implicit_gemm", "im2col"):
        for training in (False, True):
            with pytest.raises(ValueError, match="residual must have the output's shape"):
                functional.conv_bn_relu(x, w, None, mean, var, gamma, beta, padding=1, training=training, algo=algo,
                                        residual=torch.randn(2, 3, 7, 7))


def run_recording_ops(model, x):
    """model(x) without gradients, and the names of the ops it dispatched."""
    seen = []

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder():
        return model(x), seen


def test_resnet_block_end_runs_as_one_fused_kernel_in_eval():
    """With algo='implicit_gemm' in eval mode, a block's last conv + BN + add + ReLU is the fused op (no
    separate residual add), and the model still matches torchvision."""
    torchvision = pytest.importorskip("torchvision")
    from helpers import nontrivial_batch_norms

    ref = torchvision.models.resnet18(num_classes=10).double().eval()
    nontrivial_batch_norms(ref)
    model = fastconv.models.resnet18(num_classes=10, algo="implicit_gemm").double().eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, seen = run_recording_ops(model, x)
    assert_close_to(out, ref(x), 1e-10, "logits")
    assert sum("conv2d_implicit_gemm_fused" in f for f in seen) == 8  # one per BasicBlock
    assert not any("residual_add" in f for f in seen)


def test_fuse_takes_torchvision_block_ends_into_the_conv_epilogue():
    """fuse(torchvision resnet18, algo='implicit_gemm'): each block's bn2 -> add(shortcut) -> relu becomes the
    fused op in eval mode (no add left in the graph), matching the original."""
    torchvision = pytest.importorskip("torchvision")
    from helpers import nontrivial_batch_norms

    model = torchvision.models.resnet18(num_classes=10).double()
    nontrivial_batch_norms(model)
    fused = fastconv.fuse(model, algo="implicit_gemm").eval()
    model.eval()
    assert not [n for n in fused.graph.nodes if "add" in str(n.target)]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, seen = run_recording_ops(fused, x)
    with torch.no_grad():
        assert_close_to(out, model(x), 1e-10, "logits")
    assert sum("conv2d_implicit_gemm_fused" in f for f in seen) == 8


def test_fused_shortcut_that_only_broadcasts_falls_back_to_torchs_add():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6)
            self.shift = torch.nn.Parameter(torch.randn(1, 6, 1, 1))

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + self.shift)  # a per-channel shift, not a shortcut

    model = Block().double().eval()
    from helpers import randomize_bn
    randomize_bn(model.bn)
    fused = fastconv.fuse(model, algo="implicit_gemm").eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close_to(fused(x), model(x), 1e-12, "broadcast shortcut")


# ---- the autotuner's choices ---------------------------------------------------------------------------


def test_choices_parse_and_carry_their_arguments():
    assert backends.parse_choice("implicit_gemm/2") == ("implicit_gemm", 2)
    assert backends.parse_choice("im2col") == ("im2col", -1)
    assert backends.algo_args("implicit_gemm", 1) == (1,)
    assert backends.algo_args("im2col") == (backends.workspace_limit(),)
    assert backends.algo_args("direct") == ()
    cpu = backends.candidate_choices(torch.randn(1, 8, 4, 4))
    assert cpu == ["direct", "im2col"]  # the tensor-core tiles are timed on CUDA only
    assert backends.heuristic_algo(torch.randn(1, 8, 4, 4, dtype=torch.bfloat16), torch.randn(8, 8, 3, 3),
                                   (1, 1), (1, 1), (1, 1), 1) == "im2col"


def test_wgmma_rule_takes_the_hopper_tiles_only_where_their_grid_fills_the_gpu(monkeypatch):
    """backends.wgmma_tiles' shape rule (a pure function of the shapes and the SM count; on a GPU the heuristic
    asks it on compute capability 9.0 only), the kernels' size rule over the twins' shapes: tile 6 (128 x 128)
    where more than 64 filters per group still fill the GPU, else 7 (128 x 64) where that does, else none (the
    kernels' 64 x 64 tile and split-K)."""
    monkeypatch.setattr(backends, "_multiprocessors", lambda device: 132)

    def rule(x_shape, w_shape, stride=(1, 1), padding=(1, 1), groups=1):
        return backends._wgmma_tile(torch.empty(x_shape), torch.empty(w_shape), stride, padding, (1, 1), groups)

    assert rule((64, 64, 56, 56), (64, 64, 3, 3)) == 7            # ResNet-50 layer1 3x3: 1568 x 1 blocks
    assert rule((64, 64, 56, 56), (256, 64, 1, 1), padding=(0, 0)) == 6
    assert rule((64, 256, 14, 14), (256, 256, 3, 3)) == 6         # layer3: 98 x 2 blocks
    assert rule((64, 512, 7, 7), (512, 512, 3, 3)) == 7           # layer4: 25 x 4 blocks of 128 x 128, 25 x 8 of 128 x 64
    assert rule((8, 512, 7, 7), (512, 512, 3, 3)) is None        # batch 8: 4 x 8 blocks for 132 SMs
    assert rule((16, 128, 28, 28), (128, 64, 3, 3), groups=2) == 7  # 64 filters per group: 98 x 1 x 2 blocks
    assert rule((4, 128, 28, 28), (128, 64, 3, 3), groups=2) is None  # 25 x 1 x 2
    assert rule((0, 64, 8, 8), (64, 64, 3, 3)) is None            # an empty batch
    cpu = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(backends, "wgmma_tiles", True)
    assert backends.heuristic_algo(cpu, torch.randn(8, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1) == "im2col"


def test_benchmark_cache_save_and_load_round_trip(tmp_path):
    key = ((64, 256, 56, 56), (64, 256, 1, 1), False, (1, 1), (0, 0), (1, 1), 1, "torch.bfloat16", True, True,
           "NVIDIA H100 80GB HBM3")
    backends.clear_benchmark_cache()
    try:
        with backends._benchmark_lock:
            backends._benchmark_cache[key] = "implicit_gemm/1"
        path = tmp_path / "tuned.json"
        backends.save_benchmark_cache(path)
        backends.clear_benchmark_cache()
        assert backends.load_benchmark_cache(path) == 1
        assert backends._benchmark_cache == {key: "implicit_gemm/1"}
        data = json.loads(path.read_text())
        data["entries"][0]["choice"] = "implicit_gemm/9"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="unknown choice"):
            backends.load_benchmark_cache(path)
        path.write_text("[]")
        with pytest.raises(ValueError, match="not a fastconv-benchmark-cache"):
            backends.load_benchmark_cache(path)
    finally:
        backends.clear_benchmark_cache()


# ---- strided dgrad, one stride-1 fprop per stride phase (csrc/conv2d_dgrad_phases.h) -------------------------

# (H, W, R, S, stride, padding, groups): strides 2 to 5, unequal ones, stride larger than the filter (phases that
# no tap reaches), paddings that shift and crop dy's window, groups
PHASE_CASES = [
    (9, 7, 3, 3, 2, 1, 1), (8, 8, 1, 1, 2, 0, 1), (11, 13, 7, 7, 2, 3, 1), (23, 19, 11, 11, 4, 2, 1),
    (10, 9, 3, 2, (3, 2), (2, 0), 2), (7, 7, 3, 3, (2, 1), (0, 1), 1), (5, 5, 1, 1, 3, 0, 4),
    (12, 12, 5, 5, 3, 2, 1), (6, 6, 2, 2, 2, 1, 1), (9, 9, 2, 3, (5, 2), 1, 1),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", PHASE_CASES, ids=str)
def test_strided_dgrad_by_phases_matches_torch(case, channels_last):
    """The CPU twin runs strided dgrad as the CUDA wrapper does (a stride-1 fprop per phase, the phase's taps
    flipped, K and C swapped): every input pixel written once, equal to torch's input gradient in float64."""
    h, w, r, s, stride, padding, groups = case
    torch.manual_seed(0)
    x = torch.randn(2, 4 * groups, h, w, dtype=torch.float64)
    weight = torch.randn(6 * groups, 4, r, s, dtype=torch.float64)
    conv = (_pair(stride), _pair(padding), [1, 1], groups)
    gy = torch.randn(F.conv2d(x, weight, None, *conv).shape, dtype=torch.float64)
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    dx = IG.dgrad(gy, weight, list(x.shape), *conv, -1)
    ref = torch.nn.grad.conv2d_input(x.shape, weight, gy, stride=conv[0], padding=conv[1], groups=groups)
    torch.testing.assert_close(dx, ref, rtol=1e-12, atol=1e-12)
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---- the tensor-core kernels (GPU) --------------------------------------------------------------------

# (input NCHW, weight, stride, padding, dilation, groups): ResNet-like layers, channel counts needing
# padding (3, 4, 12), groups, strides, dilation, and sizes that leave partial tiles.
GPU_CASES = [
    ((4, 64, 14, 14), (64, 64, 3, 3), 1, 1, 1, 1),
    ((2, 256, 9, 9), (128, 256, 1, 1), 1, 0, 1, 1),
    ((3, 64, 15, 13), (96, 64, 3, 3), 2, 1, 1, 1),
    ((2, 3, 33, 31), (64, 3, 7, 7), 2, 3, 1, 1),
    ((2, 12, 10, 11), (20, 12, 3, 3), 1, 2, 2, 1),
    ((2, 32, 12, 12), (40, 8, 3, 3), (2, 1), 1, 1, 4),
    ((1, 16, 8, 8), (12, 4, 3, 3), 1, (0, 1), (1, 2), 4),
    ((5, 24, 7, 6), (33, 24, 1, 3), 1, (0, 1), 1, 1),
    # strided dgrad by phases: AlexNet's stride-4 11x11 stem, a 1x1 stride 2 (phases no tap reaches), a strided
    # depthwise conv (its phases are depthwise 2x1 and 1x2 fprops)
    ((2, 3, 39, 37), (16, 3, 11, 11), 4, 2, 1, 1),
    ((2, 32, 9, 10), (48, 32, 1, 1), 2, 0, 1, 1),
    ((2, 8, 9, 9), (8, 1, 3, 3), 2, 1, 1, 8),
    # depthwise 2x1: its fprop was wrong on the H100 (2026-11-28): the padded filter's copy was not dense
    # (implicit_gemm_operands.cpp, pad_channel_groups); 1x2 and 2x2 were right
    ((2, 6, 6, 5), (6, 1, 2, 1), 1, 0, 1, 6),
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def low_precision_bound(ours, torch_out, ref, dtype):
    """fastconv's error against the fp64 reference may not exceed 4x torch's own in the same dtype (and a
    floor of a few roundings)."""
    return max(4 * rel_err(torch_out, ref), 8 * EPS[dtype]), rel_err(ours, ref)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("tile", [-1] + [pytest.param(t, marks=pytest.mark.wgmma) if t in IMPLICIT_GEMM_WGMMA_TILES else t
                                         for t in range(IMPLICIT_GEMM_TILES)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_fprop_dgrad_wgrad_match_torch(case, dtype, tile):
    in_shape, w_shape, stride, padding, dilation, groups = case
    conv = (_pair(stride), _pair(padding), _pair(dilation), groups)
    x = torch.randn(in_shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(w_shape[0], device="cuda", dtype=dtype)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.conv2d(xr, wr, b.double(), *conv)
    gy = torch.randn(ref.shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    ref.backward(gy.double())
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch_out = F.conv2d(xt, wt, b, *conv)
    torch_out.backward(gy)

    y = IG.fprop(x, w, b, *conv, tile, False)
    assert y.is_contiguous(memory_format=torch.channels_last)
    bound, err = low_precision_bound(y, torch_out, ref, dtype)
    assert err <= bound, f"fprop: {err:.3g} > {bound:.3g}"
    dx = IG.dgrad(gy, w, list(x.shape), *conv, tile)
    bound, err = low_precision_bound(dx, xt.grad, xr.grad, dtype)
    assert err <= bound, f"dgrad: {err:.3g} > {bound:.3g}"
    if tile in IMPLICIT_GEMM_WGMMA_TILES:
        return  # (wgrad runs a wgmma tile as its mma.sync twin, tested above)
    dw = IG.wgrad(gy, x, list(w.shape), *conv, tile)
    bound, err = low_precision_bound(dw, wt.grad, wr.grad, dtype)
    assert err <= bound, f"wgrad: {err:.3g} > {bound:.3g}"


@cuda
@pytest.mark.cuda
def test_gpu_nchw_inputs_and_outputs():
    x, w = torch.randn(2, 16, 9, 9, device="cuda", dtype=torch.bfloat16), torch.randn(24, 16, 3, 3, device="cuda",
                                                                                      dtype=torch.bfloat16)
    y = IG.fprop(x, w, None, [1, 1], [1, 1], [1, 1], 1, -1, False)
    assert y.is_contiguous()
    ref = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert rel_err(y, ref) < 2e-2


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("terms", [(1, 1, 1), (0, 1, 1), (1, 0, 0)], ids=lambda t: "scale%d-shift%d-residual%d" % t)
def test_gpu_fused_epilogue_and_its_backward(terms):
    case = ((4, 64, 14, 14), (64, 64, 3, 3), [1, 1], [1, 1], [1, 1], 1)
    (x, w, sc, sh, res), conv = make_fused_args(case, "cuda", torch.bfloat16, *terms, requires_grad=True)
    y = FUSED(x, w, sc, sh, res, *conv, -1, True)
    leaves = [t for t in (x, w, sc, sh, res) if t is not None]
    ref = reference_fused(*(t.double() if t is not None else None for t in (x, w, sc, sh, res)), *conv, True)
    assert rel_err(y, ref) < 2e-2
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    # the same masked gradients as torch's own ops on the same values
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    full = [next(it) if t is not None else None for t in (x, w, sc, sh, res)]
    mask_ref = reference_fused(*full, *conv, True)
    mask_ref = torch.where(y.double() <= 0, torch.zeros_like(mask_ref), mask_ref)  # fastconv's mask
    ref_grads = torch.autograd.grad(mask_ref, ref_leaves, gy.double())
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 3e-2


@cuda
@pytest.mark.cuda
def test_gpu_float32_runs_as_tf32_only_when_allowed():
    x = torch.randn(2, 32, 12, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 32, 3, 3, device="cuda")
    ref = F.conv2d(x.double(), w.double(), None, 1, 1)
    gy = torch.randn(ref.shape, device="cuda")
    ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), padding=1)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), gy.double(), padding=1)
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # TF32: a 10-bit mantissa
        assert rel_err(IG.fprop(x, w, None, [1, 1], [1, 1], [1, 1], 1, -1, False), ref) < 4e-3
        assert rel_err(IG.wgrad(gy, x, list(w.shape), [1, 1], [1, 1], [1, 1], 1, -1), ref_dw) < 4e-3
        assert rel_err(IG.dgrad(gy, w, list(x.shape), [1, 1], [1, 1], [1, 1], 1, -1), ref_dx) < 4e-3
        assert "implicit_gemm/0" in backends.candidate_choices(x)
        torch.backends.cudnn.allow_tf32 = False  # full fp32 precision, as torch's own convs then
        assert rel_err(IG.fprop(x, w, None, [1, 1], [1, 1], [1, 1], 1, -1, False), ref) < 1e-5
        assert rel_err(IG.wgrad(gy, x, list(w.shape), [1, 1], [1, 1], [1, 1], 1, -1), ref_dw) < 1e-5
        assert rel_err(IG.dgrad(gy, w, list(x.shape), [1, 1], [1, 1], [1, 1], 1, -1), ref_dx) < 1e-5
        sc, sh, res = torch.rand(48, device="cuda"), torch.randn(48, device="cuda"), torch.randn(ref.shape, device="cuda")
        fused = FUSED(x, w, sc, sh, res, [1, 1], [1, 1], [1, 1], 1, -1, True)
        assert rel_err(fused, reference_fused(x.double(), w.double(), sc.double(), sh.double(), res.double(),
                                              [1, 1], [1, 1], [1, 1], 1, True)) < 1e-5
        assert "implicit_gemm/0" not in backends.candidate_choices(x)
    finally:
        torch.backends.cudnn.allow_tf32 = before


@cuda
@pytest.mark.cuda
def test_gpu_split_k_wgrad_is_deterministic_and_exact_in_its_sum():
    # a long reduction (N*P*Q = 16384) over a small filter: the wgrad splits it across many blocks
    x = torch.randn(64, 64, 16, 16, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(64, 64, 16, 16, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    runs = [IG.wgrad(gy, x, [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], 1, -1) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ref = torch.nn.grad.conv2d_weight(x.double(), (64, 64, 3, 3), gy.double(), padding=1)
    assert rel_err(runs[0], ref) < 1e-2


@cuda
@pytest.mark.cuda
def test_gpu_auto_picks_implicit_gemm_and_the_benchmark_times_every_tile():
    x = torch.randn(8, 64, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability()[0] >= 8:
        assert backends.heuristic_algo(x, w, (1, 1), (1, 1), (1, 1), 1) == "implicit_gemm"
        # the RGB stem too (channels padded to 8), but not a depthwise convolution
        stem = torch.randn(64, 3, 7, 7, device="cuda", dtype=torch.bfloat16)
        assert backends.heuristic_algo(x[:, :3], stem, (2, 2), (3, 3), (1, 1), 1) == "implicit_gemm"
        depthwise = torch.randn(64, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
        assert backends.heuristic_algo(x, depthwise, (1, 1), (1, 1), (1, 1), 64) == "direct"
    before = backends.benchmark
    backends.clear_benchmark_cache()
    try:
        backends.benchmark = True
        y = fastconv.functional.conv2d(x, w, padding=1)
        (choice,) = backends._benchmark_cache.values()
        assert backends.parse_choice(choice)[0] in CONV_OPS
        assert rel_err(y, F.conv2d(x.double(), w.double(), None, 1, 1)) < 2e-2
    finally:
        backends.benchmark = before
        backends.clear_benchmark_cache()


@cuda
@pytest.mark.cuda
@pytest.mark.wgmma
@pytest.mark.parametrize("tile", IMPLICIT_GEMM_WGMMA_TILES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_wgmma_tiles_run_warpgroup_mmas_on_hopper(dtype, tile):
    """On a compute capability 9.0 GPU, tiles 6 and 7 run the wgmma kernels (csrc/cuda/wgmma.cuh): fprop with the
    whole fused epilogue and stride-1 dgrad, deterministically, within torch's own error; long reductions (fprop
    R*S*C = 1152, dgrad R*S*K = 1728: every stage refilled many times) and several blocks along M and N. Elsewhere
    they are their mma.sync twins."""
    case = ((4, 128, 14, 14), (192, 128, 3, 3), [1, 1], [1, 1], [1, 1], 1)
    (x, w, sc, sh, res), conv = make_fused_args(case, "cuda", dtype, 1, 1, 1)
    gy = torch.randn(res.shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runs = [FUSED(x, w, sc, sh, res, *conv, tile, True) for _ in range(3)]
        dxs = [IG.dgrad(gy, w, list(x.shape), *conv, tile) for _ in range(2)]
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages()]
    hopper = torch.cuda.get_device_capability() == (9, 0) and bool(fastconv._C.WITH_SM90A)
    assert any("fprop_wgmma_kernel" in k for k in kernels) == hopper, kernels
    assert any("dgrad_wgmma_kernel" in k for k in kernels) == hopper, kernels
    assert all(torch.equal(runs[0], r) for r in runs[1:]) and torch.equal(dxs[0], dxs[1])
    ref = reference_fused(*(t.double() for t in (x, w, sc, sh, res)), *conv, True)
    torch_out = reference_fused(*(t for t in (x, w, sc, sh, res)), *conv, True)
    bound, err = low_precision_bound(runs[0], torch_out, ref, dtype)
    assert err <= bound, f"fprop: {err:.3g} > {bound:.3g}"
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), gy.double(), padding=1)
    torch_dx = torch.nn.grad.conv2d_input(x.shape, w, gy, padding=1)
    bound, err = low_precision_bound(dxs[0], torch_dx, ref_dx, dtype)
    assert err <= bound, f"dgrad: {err:.3g} > {bound:.3g}"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_split_k_fprop_on_a_grid_smaller_than_the_gpu(dtype):
    # one image of a 7x7 layer with a long reduction (R*S*C = 2304) and 64 filters: a single 64 x 64 tile, so
    # fprop splits the reduction and a second kernel sums the fp32 partials and applies the epilogue
    case = ((1, 256, 7, 7), (64, 256, 3, 3), [1, 1], [1, 1], [1, 1], 1)
    (x, w, sc, sh, res), conv = make_fused_args(case, "cuda", dtype, 1, 1, 1)
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # fp32 on the implicit GEMM (TF32)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runs = [FUSED(x, w, sc, sh, res, *conv, -1, True) for _ in range(3)]
            torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.allow_tf32 = before
    kernels = [e.key for e in prof.key_averages()]
    assert any("conv2d_implicit_gemm_fprop_reduce_kernel" in k for k in kernels), kernels
    assert all(torch.equal(runs[0], r) for r in runs[1:])  # the partials are summed in a fixed order
    ref = reference_fused(*(t.double() for t in (x, w, sc, sh, res)), *conv, True)
    assert rel_err(runs[0], ref) < (2e-2 if dtype == torch.bfloat16 else 4e-3)
