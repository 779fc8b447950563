"""fastconv.cupy: the same results as the torch path on the same inputs, zero-copy, on CuPy's stream.
Needs CuPy and a GPU (skipped otherwise)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA

cupy = pytest.importorskip("cupy")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA build")]

import fastconv  # noqa: E402
import fastconv.cupy as fcp  # noqa: E402


def as_cupy(t):
    return cupy.from_dlpack(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.shape[1] > 1 else t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_equal_the_torch_path(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13, 11, device="cuda", dtype=dtype)
    w = torch.randn(16, 4, 3, 3, device="cuda", dtype=dtype)
    b = torch.randn(16, device="cuda", dtype=dtype)
    kw = dict(stride=2, padding=1, groups=2)
    y = fcp.conv2d(as_cupy(x), cupy.from_dlpack(w), cupy.from_dlpack(b), **kw)
    assert isinstance(y, cupy.ndarray)
    assert torch.equal(torch.from_dlpack(y), fastconv.functional.conv2d(x.to(memory_format=torch.channels_last), w, b, **kw))
    stats = [torch.randn(16, device="cuda").abs() + 0.5 for _ in range(4)]
    z = fcp.conv_bn_relu(cupy.from_dlpack(x), cupy.from_dlpack(w), None, *(cupy.from_dlpack(s) for s in stats), **kw)
    ref = fastconv.functional.conv_bn_relu(x, w, None, *stats, **kw)
    assert torch.equal(torch.from_dlpack(z), ref)
    p, idx = fcp.max_pool2d(cupy.from_dlpack(x), 3, 2, 1, return_indices=True)
    rp, ridx = fastconv.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(torch.from_dlpack(p), rp) and torch.equal(torch.from_dlpack(idx), ridx)
    r = fcp.residual_add(cupy.from_dlpack(rp), cupy.from_dlpack(x), stride=2, relu=True)
    assert torch.equal(torch.from_dlpack(r), fastconv.functional.residual_add(rp, x, stride=2, relu=True))


def test_zero_copy_and_cupy_stream():
    x = cupy.random.standard_normal((2, 4, 8, 8), dtype=cupy.float32)
    w = cupy.random.standard_normal((4, 4, 1, 1), dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    before = torch.cuda.current_stream()
    with stream:
        y = fcp.conv2d(x, w)
    assert torch.cuda.current_stream() == before  # torch's stream is only borrowed for the call
    stream.synchronize()
    expected = F.conv2d(torch.from_dlpack(x), torch.from_dlpack(w))
    assert torch.allclose(torch.from_dlpack(y), expected, rtol=1e-5, atol=1e-5)
    assert torch.from_dlpack(x).data_ptr() == x.data.ptr  # inputs cross without a copy


def test_same_errors_as_functional():
    x = cupy.zeros((1, 3, 5, 5), dtype=cupy.float32)
    with pytest.raises(TypeError, match="weight must be a cupy.ndarray"):
        fcp.conv2d(x, torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"groups \(2\) must divide the input channels \(3\)"):
        fcp.conv2d(x, cupy.zeros((4, 1, 3, 3), dtype=cupy.float32), groups=2)
    with pytest.raises(TypeError, match="must have the same dtype"):
        fcp.conv2d(x, cupy.zeros((4, 3, 3, 3), dtype=cupy.float16))
