"""Fused conv-BatchNorm-ReLU (fastconv.ConvBNReLU) against torch's eager nn.Conv2d -> nn.BatchNorm2d ->
nn.ReLU, same inputs, same run.

- eval: forward without gradients. fastconv folds BatchNorm into the conv and runs conv + bias + ReLU as
  one kernel; torch runs three (cuDNN conv, BatchNorm, ReLU).
- eval+residual: a ResNet block's end, relu(bn(conv(x)) + shortcut). With implicit_gemm fastconv adds the
  shortcut in the conv's epilogue (one kernel); the other algorithms add it with the residual-add kernel;
  torch runs four (conv, BatchNorm, add, ReLU).
- train: forward + backward of a training step (batch statistics, running-statistics update, gradients
  of the input and of every parameter).
Rates are the convolution's GFLOP/s (forward FLOPs for eval, three times that for train); the BatchNorm
and ReLU work is memory traffic on top, which is exactly what fusing saves. GPU: fp32 NCHW and bf16
channels_last; CPU: the small fp32 NCHW set.
"""
import pytest
import torch

import fastconv
from conftest import DEVICE
from shapes import CPU_LAYERS, GPU_LAYERS

LAYERS = [layer for layer in GPU_LAYERS if layer.name.startswith("resnet50")] if DEVICE == "cuda" else CPU_LAYERS
# GPU: fp32 NCHW (the classic layout) and bf16 channels_last (what mixed-precision training runs).
CONFIGS = [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")] if DEVICE == "cuda" else [(torch.float32, "nchw")]
IMPLS = ["fastconv-direct", "fastconv-im2col", "fastconv-implicit_gemm", "torch"]


def make_module(impl, layer, dtype, layout):
    torch.manual_seed(0)
    fused = fastconv.ConvBNReLU(layer.C, layer.K, layer.R, layer.stride, layer.padding, groups=layer.groups,
                                algo=impl.removeprefix("fastconv-") if impl != "torch" else "auto")
    if impl == "torch":
        module = torch.nn.Sequential(torch.nn.Conv2d(layer.C, layer.K, layer.R, layer.stride, layer.padding,
                                                     groups=layer.groups, bias=False),
                                     torch.nn.BatchNorm2d(layer.K), torch.nn.ReLU())
        module[0].weight.data.copy_(fused.conv.weight.data)
    else:
        module = fused
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return module.to(device=DEVICE, dtype=dtype, memory_format=memory_format)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,layout", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("pas", ["eval", "eval+residual", "train"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_conv_bn_relu(measure, layer, pas, dtype, layout, impl):
    module = make_module(impl, layer, dtype, layout)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(layer.N, layer.C, layer.H, layer.W, device=DEVICE, dtype=dtype).to(memory_format=memory_format)
    if pas == "eval":
        module.eval()

        def step():
            with torch.no_grad():
                return module(x)
    elif pas == "eval+residual":
        module.eval()
        with torch.no_grad():
            shortcut = torch.randn_like(module(x))
        if impl == "torch":
            conv, bn, relu = module

            def step():
                with torch.no_grad():
                    return relu(bn(conv(x)) + shortcut)
        else:

            def step():
                with torch.no_grad():
                    return module(x, residual=shortcut)
    else:
        module.train()
        x.requires_grad_()
        leaves = [x] + list(module.parameters())
        gy = torch.randn_like(module(x))

        def step():
            return torch.autograd.grad(module(x), leaves, gy)

    name = f"{layer.name}+bn+relu" + ("" if layout == "nchw" else " (channels_last)")
    measure(step, name, pas, dtype, impl, layer.flops() * (3 if pas == "train" else 1), "GFLOP/s")
