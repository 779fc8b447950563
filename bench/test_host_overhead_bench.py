"""Host time per call: module calls per second when the device work is trivial.

One 16-channel 8x8 image through a 3x3 convolution is a few microseconds of kernel time, so the rate
measures the host's path per call (Python, the op dispatcher, argument checks, the kernel launch):

- conv+bn+relu: fastconv.ConvBNReLU (eval, no gradients, ``algo="auto"``) against torch's
  nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU;
- conv: fastconv.Conv2d against nn.Conv2d.

This is what bounds small layers at small batches, and whole-model inference on a slow host. Each timed
step is 100 calls; the rate is calls per second. Same dtypes and layouts as the layer benchmarks. On the
CPU the batch is empty: a CPU kernel's run is the work itself, so only an empty batch leaves the host path.
"""
import pytest
import torch

import fastconv
from conftest import DEVICE

CALLS = 100
BATCH = 1 if DEVICE == "cuda" else 0
CONFIGS = [(torch.bfloat16, "channels_last"), (torch.float32, "nchw")] if DEVICE == "cuda" else [(torch.float32, "nchw")]


def make_module(impl, kind):
    torch.manual_seed(0)
    if kind == "conv":
        return (torch.nn.Conv2d if impl == "torch" else fastconv.Conv2d)(16, 16, 3, padding=1, bias=False)
    if impl == "torch":
        return torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
                                   torch.nn.ReLU())
    return fastconv.ConvBNReLU(16, 16, 3, padding=1)


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
@pytest.mark.parametrize("dtype,layout", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["conv+bn+relu", "conv"])
def test_host_overhead(measure, kind, dtype, layout, impl):
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    module = make_module(impl, kind).to(device=DEVICE, dtype=dtype, memory_format=memory_format).eval()
    x = torch.randn(BATCH, 16, 8, 8, device=DEVICE, dtype=dtype).to(memory_format=memory_format)

    def step():
        with torch.no_grad():
            for _ in range(CALLS):
                y = module(x)
        return y

    with torch.no_grad():
        expected = module(x)
    assert torch.isfinite(expected).all()
    label = f"host: {BATCH}x16x8x8, 3x3" + (" (channels_last)" if layout == "channels_last" else "")
    # measure's rate is work / ms / 1e6: calls * 1e9 as the work gives calls per second
    measure(step, label, kind, dtype, impl, CALLS * 1e9, "calls/s")
