"""conv2d throughput, fastconv against native torch (cuDNN on GPU), same inputs, same run.

Each (layer, pass, dtype) is one pytest-benchmark group holding a row per fastconv algorithm and one for
torch; the table
printed last uses the median of event-timed calls (bench/timing.py) and GFLOP/s from the layer's forward
FLOPs (fprop) or three times that (fprop + dgrad + wgrad).
"""
import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import DEVICE
from shapes import CPU_LAYERS, GPU_LAYERS

LAYERS = GPU_LAYERS if DEVICE == "cuda" else CPU_LAYERS
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
IMPLS = {
    f"fastconv-{algo}": (lambda algo: lambda x, w, layer: fastconv.functional.conv2d(
        x, w, None, layer.stride, layer.padding, 1, layer.groups, algo=algo))(algo)
    for algo in fastconv.CONV_ALGOS if algo != "auto"
}
IMPLS["torch"] = lambda x, w, layer: F.conv2d(x, w, None, layer.stride, layer.padding, 1, layer.groups)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("pas", ["fprop", "fprop+bwd"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_conv2d(measure, layer, pas, dtype, impl):
    torch.manual_seed(0)
    x = torch.randn(layer.N, layer.C, layer.H, layer.W, device=DEVICE, dtype=dtype, requires_grad=pas != "fprop")
    w = (torch.randn(layer.K, layer.C // layer.groups, layer.R, layer.S, device=DEVICE, dtype=dtype)
         / (layer.C // layer.groups * layer.R * layer.S) ** 0.5).requires_grad_(pas != "fprop")
    conv = IMPLS[impl]
    if pas == "fprop":
        def step():
            with torch.no_grad():
                return conv(x, w, layer)
    else:
        gy = torch.randn_like(conv(x, w, layer))

        def step():
            return torch.autograd.grad(conv(x, w, layer), (x, w), gy)

    measure(step, layer.name, pas, dtype, impl, layer.flops() * (1 if pas == "fprop" else 3), "GFLOP/s")
