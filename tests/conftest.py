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


@pytest.fixture(autouse=True, scope="session")
def _exact_float32():
    """float32 tests compare full fp32 precision (1e-5): no TF32 tensor cores, in torch's reference convs or in
    fastconv's implicit GEMM (which then runs its exact fp32 fallback). The TF32 path has tests of its own
    that switch it on."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
