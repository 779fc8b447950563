import pytest
import torch

import fastconv

HAS_CUDA = torch.cuda.is_available() and fastconv.WITH_CUDA

cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA build of fastconv")

# Every test that takes `device` runs on the CPU and, when a GPU is present, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
