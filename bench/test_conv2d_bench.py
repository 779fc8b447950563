"""conv2d throughput, fastconv against native torch (cuDNN on GPU), same inputs, same run.

Each (layer, pass, dtype) is one pytest-benchmark group holding a row per fastconv algorithm and one for
torch. Passes are timed one at a time: fprop (the forward), dgrad (input gradient) and wgrad (filter
gradient), each the layer's 2*N*K*P*Q*C*R*S/groups FLOPs; fastconv's dgrad/wgrad ops are called directly,
torch's through aten.convolution_backward with only that gradient requested. GPU: fp32 NCHW and bf16
channels_last by default; FASTCONV_BENCH_FULL=1 runs every ResNet-50 and AlexNet layer in fp32, fp16 and
bf16, NCHW and channels_last (on a CPU: those layers at batch 1, fp32).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from conv_passes import conv_args, fastconv_pass
from fastconv._checks import IMPLICIT_GEMM_MMA_SYNC_TILES, IMPLICIT_GEMM_TILES
from fastconv.ops import CONV_OPS
from shapes import CPU_FULL_LAYERS, CPU_LAYERS, FULL, GPU_LAYERS

LAYERS = GPU_LAYERS if DEVICE == "cuda" else (CPU_FULL_LAYERS if FULL else CPU_LAYERS)
if DEVICE != "cuda":
    CONFIGS = [(torch.float32, "nchw")]
elif FULL:
    CONFIGS = [(d, layout) for d in (torch.float32, torch.float16, torch.bfloat16) for layout in ("nchw", "channels_last")]
else:
    CONFIGS = [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")]
IMPLS = [f"fastconv-{algo}" for algo in CONV_OPS] + ["torch"]


def pass_fn(impl, pas, x, w, gy, layer):
    """The callable that runs one pass of one implementation."""
    if impl != "torch":
        return fastconv_pass(impl.removeprefix("fastconv-"), pas, x, w, gy, layer)
    if pas == "fprop":
        return lambda: F.conv2d(x, w, None, layer.stride, layer.padding, 1, layer.groups)
    mask = [pas == "dgrad", pas == "wgrad", False]
    args = conv_args(layer)[:3]
    return lambda: torch.ops.aten.convolution_backward(gy, x, w, None, *args, False, [0, 0], layer.groups, mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,layout", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("pas", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_conv2d(measure, layer, pas, dtype, layout, impl):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(layer.N, layer.C, layer.H, layer.W, device=DEVICE, dtype=dtype).to(memory_format=fmt)
    w = (torch.randn(layer.K, layer.C // layer.groups, layer.R, layer.S, device=DEVICE, dtype=dtype)
         / (layer.C // layer.groups * layer.R * layer.S) ** 0.5).to(memory_format=fmt)
    p, q = layer.output_hw()
    gy = torch.randn(layer.N, layer.K, p, q, device=DEVICE, dtype=dtype).to(memory_format=fmt)
    step = pass_fn(impl, pas, x, w, gy, layer)
    with torch.no_grad():
        step()  # fails here, not inside the timing, if the pass cannot run
        # the fewest bytes a pass must move: its two operands read and its result written, once each
        bytes_moved = (x.numel() + w.numel() + gy.numel()) * x.element_size()
        name = layer.name + ("" if layout == "nchw" else " (channels_last)")
        measure(lambda: step(), name, pas, dtype, impl, layer.flops(), "GFLOP/s", bytes_moved)


# Every implicit-GEMM tile configuration on its own, bf16 channels_last fprop of ResNet-50's layers: the rows
# that say which tile each layer wants (the size heuristic's input) and how far autotuning can go.
# (FASTCONV_SKIP_WGMMA=1, which the device check sets when the wgmma tiles failed their tests: tiles 0-5 only)
TILE_IMPLS = [f"fastconv-implicit_gemm/{t}" for t in range(
    IMPLICIT_GEMM_MMA_SYNC_TILES if os.environ.get("FASTCONV_SKIP_WGMMA", "0") not in ("", "0") else IMPLICIT_GEMM_TILES)]


@pytest.mark.skipif(DEVICE != "cuda", reason="times the CUDA kernels' tile configurations")
@pytest.mark.parametrize("impl", TILE_IMPLS)
@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer.name.startswith("resnet50")],
                         ids=lambda layer: layer.name)
def test_implicit_gemm_tiles(measure, layer, impl):
    test_conv2d(measure, layer, "fprop", torch.bfloat16, "channels_last", impl)
