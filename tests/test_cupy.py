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


# ---- the build-free path (NVRTC), on the GPU --------------------------------------------------------------------

from fastconv import _nvrtc_ops  # noqa: E402

CUPY_DTYPES = [torch.float32, torch.float16]


def nvrtc():
    return fcp._nvrtc_runtime()


@pytest.mark.parametrize("dtype", CUPY_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_build_free_path_equals_the_extension(dtype, channels_last):
    """The NVRTC-compiled kernels, launched by fastconv/_nvrtc.py's plans, give the extension's results bit for
    bit (same kernel, same arithmetic order) on the same inputs."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 13, 11, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(16, 4, 3, 3, device="cuda", dtype=dtype)
    b = torch.randn(16, device="cuda", dtype=dtype)
    for kw in (dict(stride=2, padding=1, groups=2), dict(padding="same", dilation=2, groups=2), dict(groups=2)):
        y = _nvrtc_ops.conv2d(nvrtc(), cupy.from_dlpack(x), cupy.from_dlpack(w), cupy.from_dlpack(b), **kw)
        ref = fastconv.functional.conv2d(x, w, b, **kw, algo="direct")
        assert torch.equal(torch.from_dlpack(y), ref) and torch.from_dlpack(y).stride() == ref.stride()
    p, idx = _nvrtc_ops.max_pool2d(nvrtc(), cupy.from_dlpack(x), 3, 2, 1, ceil_mode=True, return_indices=True)
    rp, ridx = fastconv.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(torch.from_dlpack(p), rp) and torch.equal(torch.from_dlpack(idx), ridx)
    s = torch.randn(2, 4, 13, 11, device="cuda", dtype=dtype)
    for shortcut, stride in ((x, 1), (s, 2)):
        residual = torch.randn(2, 8, -(-13 // stride), -(-11 // stride), device="cuda", dtype=dtype)
        r = _nvrtc_ops.residual_add(nvrtc(), cupy.from_dlpack(residual), cupy.from_dlpack(shortcut), stride=stride,
                                    relu=True)
        ref = fastconv.functional.residual_add(residual, shortcut, stride=stride, relu=True)
        assert torch.equal(torch.from_dlpack(r), ref)


def test_build_free_conv_bn_relu_matches_the_extension():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w, b = torch.randn(16, 8, 3, 3, device="cuda"), torch.randn(16, device="cuda")
    stats = [torch.randn(16, device="cuda").abs() + 0.5 for _ in range(4)]
    z = _nvrtc_ops.conv_bn_relu(nvrtc(), *(cupy.from_dlpack(t) for t in (x, w, b, *stats)), padding=1)
    ref = fastconv.functional.conv_bn_relu(x, w, b, *stats, padding=1, algo="direct")
    torch.testing.assert_close(torch.from_dlpack(z), ref, rtol=1e-5, atol=1e-5)  # the fold rounds on its own


def test_build_free_path_runs_on_the_cupy_stream():
    x = cupy.random.standard_normal((4, 16, 32, 32), dtype=cupy.float32)
    w = cupy.random.standard_normal((32, 16, 3, 3), dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        y = _nvrtc_ops.conv2d(nvrtc(), x, w, None, padding=1)
        p = _nvrtc_ops.max_pool2d(nvrtc(), y, 2)
    stream.synchronize()
    expected = F.max_pool2d(F.conv2d(torch.from_dlpack(x), torch.from_dlpack(w), padding=1), 2)
    torch.testing.assert_close(torch.from_dlpack(p), expected, rtol=1e-4, atol=1e-4)


def test_build_free_path_errors_and_empty_batch():
    x = cupy.zeros((1, 3, 5, 5), dtype=cupy.float32)
    with pytest.raises(ValueError, match=r"groups \(2\) must divide the input channels \(3\)"):
        _nvrtc_ops.conv2d(nvrtc(), x, cupy.zeros((4, 1, 3, 3), dtype=cupy.float32), groups=2)
    with pytest.raises(ValueError, match="is not available without the compiled extension"):
        _nvrtc_ops.conv2d(nvrtc(), x, cupy.zeros((4, 3, 3, 3), dtype=cupy.float32), algo="im2col")
    other = cupy.cuda.runtime.getDeviceCount() > 1
    if other:
        with cupy.cuda.Device(1):
            w1 = cupy.zeros((4, 3, 3, 3), dtype=cupy.float32)
        with pytest.raises(ValueError, match="input is on cuda:0 but weight is on cuda:1"):
            _nvrtc_ops.conv2d(nvrtc(), x, w1)
    empty = _nvrtc_ops.conv2d(nvrtc(), cupy.zeros((0, 3, 5, 5), dtype=cupy.float32),
                              cupy.zeros((4, 3, 3, 3), dtype=cupy.float32))
    assert empty.shape == (0, 4, 3, 3)
