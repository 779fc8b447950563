"""What is particular to the im2col algorithm: workspace chunking, the limit, algorithm choice, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import DEVICES
from fastconv import backends
from fastconv.functional import conv2d
from helpers import assert_close_to

OPS = torch.ops.fastconv


@pytest.fixture
def workspace_limit():
    """Sets a workspace limit for one test and restores the previous one."""
    before = backends.workspace_limit()
    yield backends.set_workspace_limit
    backends.set_workspace_limit(before)


def col_bytes_per_image(x, w, stride=1, padding=0):
    """Workspace one image needs, counted at the accumulation width (4 bytes, 8 for float64)."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    p, q = (h + 2 * padding - r) // stride + 1, (wd + 2 * padding - s) // stride + 1
    return p * q * c * r * s * max(x.element_size(), 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("images_per_chunk", [1, 2, 3])
def test_results_do_not_depend_on_chunking(device, images_per_chunk, workspace_limit):
    x = torch.randn(5, 4, 9, 8, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    kwargs = dict(stride=2, padding=1, groups=2, algo="im2col")
    y = conv2d(x, w, b, **kwargs)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    # A limit of 1.5 images' worth rounds down to one image per chunk, 2.5 to two, ...
    workspace_limit(int((images_per_chunk + 0.5) * col_bytes_per_image(x, w, 2, 1)))
    y_chunked = conv2d(x, w, b, **kwargs)
    grads_chunked = torch.autograd.grad(y_chunked, (x, w, b), gy)
    assert torch.equal(y_chunked, y)  # forward and dgrad compute each image alike: bitwise equal
    assert torch.equal(grads_chunked[0], grads[0])
    assert_close_to(grads_chunked[1], grads[1], 1e-6, "wgrad (chunks summed in another grouping)")
    assert torch.equal(grads_chunked[2], grads[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pointwise", [False, True], ids=["3x3", "1x1"])
@pytest.mark.parametrize("images_per_chunk", [None, 2], ids=["one_chunk", "chunks_of_2"])
def test_wgrad_long_reduction(device, dtype, pointwise, images_per_chunk, workspace_limit):
    """A few output tiles over many pixels: on CUDA the reduction is split into slices summed apart (split-K),
    here 3 x 61 x 59 = 10,797 rows in two slices of unequal length, or per chunk of 2 images, with groups."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the CPU twin is exact in float32; bfloat16 adds nothing there")
    r = 1 if pointwise else 3
    x = torch.randn(3, 6, 61, 59, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(3, 10, 61, 59, device=device, dtype=dtype)
    kwargs = dict(stride=[1, 1], padding=[r // 2] * 2, dilation=[1, 1], groups=2)
    if images_per_chunk is not None and not pointwise:
        workspace_limit(int((images_per_chunk + 0.5) * col_bytes_per_image(x, torch.empty(10, 3, r, r), 1, r // 2)))
    dw = OPS.conv2d_im2col_wgrad(gy, x, [10, 3, r, r], *kwargs.values(), backends.workspace_limit())
    ref = torch.nn.grad.conv2d_weight(x.cpu().double(), (10, 3, r, r), gy.cpu().double(), **kwargs)
    assert dw.dtype == dtype
    assert_close_to(dw.cpu(), ref, 1e-5 if dtype == torch.float32 else 1e-2, "wgrad")


def test_limit_below_one_image(workspace_limit):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    workspace_limit(col_bytes_per_image(x, w) - 1)
    with pytest.raises(ValueError, match=rf"one image's im2col matrix needs {col_bytes_per_image(x, w)} bytes, more than the workspace limit"):
        conv2d(x, w, algo="im2col")
    # "auto" knows and takes the direct path instead.
    assert backends.heuristic_algo(x, w, (1, 1), (0, 0), (1, 1), 1) == "direct"
    assert_close_to(conv2d(x, w), F.conv2d(x, w), 1e-5)
    # 1x1 stride-1 convolutions need no workspace at all.
    workspace_limit(1)
    x1, w1 = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 1, 1)
    assert_close_to(conv2d(x1, w1, algo="im2col"), F.conv2d(x1, w1), 1e-5)


def test_low_precision_limit_counts_fp32_workspace(workspace_limit):
    """bf16 col data would fit in half the bytes, but dgrad's dcol (and the CPU twin's col) are fp32: every
    op of the family counts 4-byte elements, so "auto" does not pick an im2col forward whose backward
    would then refuse the same limit."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    workspace_limit(col_bytes_per_image(x, w) - 1)  # enough for one image at 2 bytes, not at 4
    with pytest.raises(ValueError, match=rf"needs {col_bytes_per_image(x, w)} bytes"):
        conv2d(x, w, algo="im2col")
    assert backends.heuristic_algo(x, w, (1, 1), (0, 0), (1, 1), 1) == "direct"
    conv2d(x, w).sum().backward()  # auto: forward and backward both run
    workspace_limit(col_bytes_per_image(x, w))
    y = conv2d(x, w, algo="im2col")
    torch.autograd.grad(y, (x, w), torch.ones_like(y))  # exactly one image per chunk, all three ops


def test_set_workspace_limit_rejects_bad_values():
    for bad in (0, -5, 1.5, "1"):
        with pytest.raises(ValueError, match="expected a positive int"):
            backends.set_workspace_limit(bad)
    with pytest.raises(ValueError, match="workspace_bytes must be positive"):
        OPS.conv2d_im2col(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 1, 0)


def test_heuristic():
    x = torch.randn(1, 8, 16, 16)
    assert backends.heuristic_algo(x, torch.randn(8, 1, 3, 3), (1, 1), (1, 1), (1, 1), 8) == "direct"  # depthwise
    assert backends.heuristic_algo(x, torch.randn(16, 8, 1, 1), (1, 1), (0, 0), (1, 1), 1) == "im2col"
    assert backends.heuristic_algo(x, torch.randn(16, 4, 3, 3), (2, 2), (1, 1), (1, 1), 2) == "im2col"


def test_benchmark_mode_is_a_no_op_on_cpu():
    backends.benchmark = True
    try:
        x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        assert_close_to(conv2d(x, w, padding=1), F.conv2d(x, w, padding=1), 1e-5)
        assert not backends._benchmark_cache
    finally:
        backends.benchmark = False


@pytest.mark.skipif(not torch.cuda.is_available() or not fastconv.WITH_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_benchmark_mode_caches_a_choice_on_cuda():
    backends.benchmark = True
    backends.clear_benchmark_cache()
    try:
        x, w = torch.randn(4, 16, 32, 32, device="cuda"), torch.randn(32, 16, 3, 3, device="cuda")
        y = conv2d(x, w, padding=1)
        assert len(backends._benchmark_cache) == 1
        assert list(backends._benchmark_cache.values())[0] in ("direct", "im2col")
        assert_close_to(y, F.conv2d(x.double(), w.double(), padding=1).float(), 1e-5)
    finally:
        backends.benchmark = False
        backends.clear_benchmark_cache()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pointwise", [False, True], ids=["3x3", "1x1"])
def test_opcheck(device, pointwise):
    r = 1 if pointwise else 3
    x = torch.randn(3, 4, 7, 6, device=device, requires_grad=True)
    w = torch.randn(6, 2, r, r, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    conv = ([1, 1], [0, 0], [1, 1], 2) if pointwise else ([2, 1], [1, 1], [1, 2], 2)
    ws = 2 * col_bytes_per_image(x, w)  # two images per chunk: chunking is exercised too
    y = OPS.conv2d_im2col(x, w, b, *conv, ws)
    gy = torch.randn_like(y).requires_grad_()
    for op, args in [
        (OPS.conv2d_im2col.default, (x, w, b) + conv + (ws,)),
        (OPS.conv2d_im2col_dgrad.default, (gy, w, list(x.shape)) + conv + (ws,)),
        (OPS.conv2d_im2col_wgrad.default, (gy, x, list(w.shape)) + conv + (ws,)),
    ]:
        torch.library.opcheck(op, args)
