"""End-to-end images/s: fastconv.models against torchvision's models on native torch, same weights, dtype,
memory format and batch, same run.

- inference: forward in eval mode without gradients;
- train: one training step (forward, backward of a mean-square loss on the logits, SGD step).
GPU: ResNet-50 and AlexNet, batch 64, bf16 and channels_last (what mixed-precision training runs) and fp32
NCHW. CPU: ResNet-18 at 64x64 and AlexNet at 96x96, batch 4, fp32.
"""
import pytest
import torch

import fastconv
from conftest import DEVICE

tv = pytest.importorskip("torchvision")

if DEVICE == "cuda":
    CASES = [("resnet50", 64, 224), ("alexnet", 64, 224)]
    CONFIGS = [(torch.bfloat16, "channels_last"), (torch.float32, "nchw")]
else:
    CASES = [("resnet18", 4, 64), ("alexnet", 4, 96)]
    CONFIGS = [(torch.float32, "nchw")]


def make_model(impl, name):
    torch.manual_seed(0)
    return getattr(fastconv.models if impl == "fastconv" else tv.models, name)(num_classes=1000)


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
@pytest.mark.parametrize("dtype,layout", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("pas", ["inference", "train"])
@pytest.mark.parametrize("name,batch,size", CASES, ids=[c[0] for c in CASES])
def test_model(measure, name, batch, size, pas, dtype, layout, impl):
    model = make_model(impl, name)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(device=DEVICE, dtype=dtype, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=DEVICE, dtype=dtype).to(memory_format=memory_format)
    if pas == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                return model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()

    label = f"{name} b{batch} {size}x{size}" + (" (channels_last)" if layout == "channels_last" else "")
    # measure's rate is work / ms / 1e6: images * 1e9 as the work gives images per second
    measure(step, label, pas, dtype, impl if impl == "torch" else "fastconv", batch * 1e9, "images/s")
