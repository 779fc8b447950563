"""Bad input raises a clear Python exception naming the problem: in eager mode (the C++ checks), under
FakeTensor (the Python fakes torch.compile uses) and, where it makes sense, from the CUDA implementation."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastconv
from conftest import cuda
from fastconv.functional import conv2d

OPS = torch.ops.fastconv


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (id, input, weight, bias, kwargs, exception, message pattern)
BAD_CONV2D = [
    ("input_5d", t(1, 2, 3, 4, 5), t(2, 2, 1, 1), None, {}, ValueError, r"3-D \(C, H, W\) or 4-D"),
    ("input_2d", t(4, 4), t(2, 1, 1, 1), None, {}, ValueError, r"3-D \(C, H, W\) or 4-D"),
    ("weight_3d", t(1, 2, 5, 5), t(2, 2, 3), None, {}, ValueError, r"4-D weight"),
    ("channel_mismatch", t(1, 4, 5, 5), t(2, 3, 3, 3), None, {}, ValueError, r"expects 3 input channels, but the input has 4"),
    ("groups_not_dividing_input", t(1, 5, 5, 5), t(2, 2, 3, 3), None, {"groups": 2}, ValueError, r"groups \(2\) must divide the input channels \(5\)"),
    ("groups_not_dividing_output", t(1, 4, 5, 5), t(3, 2, 3, 3), None, {"groups": 2}, ValueError, r"groups \(2\) must divide the output channels \(3\)"),
    ("groups_zero", t(1, 4, 5, 5), t(2, 4, 3, 3), None, {"groups": 0}, ValueError, r"groups must be positive"),
    ("negative_padding", t(1, 2, 5, 5), t(2, 2, 3, 3), None, {"padding": -1}, ValueError, r"padding must be non-negative"),
    ("zero_stride", t(1, 2, 5, 5), t(2, 2, 3, 3), None, {"stride": (1, 0)}, ValueError, r"stride must be positive"),
    ("negative_stride", t(1, 2, 5, 5), t(2, 2, 3, 3), None, {"stride": -2}, ValueError, r"stride must be positive"),
    ("zero_dilation", t(1, 2, 5, 5), t(2, 2, 3, 3), None, {"dilation": 0}, ValueError, r"dilation must be positive"),
    ("kernel_larger_than_input", t(1, 3, 2, 2), t(4, 3, 3, 3), None, {}, ValueError, r"padded input \(2 x 2\) is smaller than the dilated kernel \(3 x 3\)"),
    ("dilated_kernel_larger", t(1, 3, 5, 5), t(4, 3, 3, 3), None, {"dilation": 3}, ValueError, r"smaller than the dilated kernel \(7 x 7\)"),
    ("bias_wrong_length", t(1, 2, 5, 5), t(4, 2, 3, 3), t(5), {}, ValueError, r"bias must be 1-D with 4 elements"),
    ("bias_2d", t(1, 2, 5, 5), t(4, 2, 3, 3), t(4, 1), {}, ValueError, r"bias must be 1-D with 4 elements"),
    ("mixed_dtypes", t(1, 2, 5, 5), t(4, 2, 3, 3, dtype=torch.float64), None, {}, TypeError, r"input \(torch.float32\) and weight \(torch.float64\) must have the same dtype"),
    ("bias_dtype", t(1, 2, 5, 5), t(4, 2, 3, 3), t(4, dtype=torch.float16), {}, TypeError, r"input \(torch.float32\) and bias \(torch.float16\) must have the same dtype"),
    ("integer_dtype", torch.ones(1, 2, 5, 5, dtype=torch.int64), torch.ones(4, 2, 3, 3, dtype=torch.int64), None, {}, TypeError, r"input has dtype torch.int64; supported dtypes are float32, float16, bfloat16"),
    ("complex_dtype", t(1, 2, 5, 5, dtype=torch.complex64), t(4, 2, 3, 3, dtype=torch.complex64), None, {}, TypeError, r"supported dtypes"),
    ("same_with_stride", t(1, 2, 5, 5), t(4, 2, 3, 3), None, {"padding": "same", "stride": 2}, ValueError, r"padding='same' is not supported for strided"),
    ("unknown_padding_string", t(1, 2, 5, 5), t(4, 2, 3, 3), None, {"padding": "full"}, ValueError, r"padding must be 'same', 'valid', an int or a pair of ints, got 'full'"),
    ("padding_three_entries", t(1, 2, 5, 5), t(4, 2, 3, 3), None, {"padding": (1, 1, 1)}, ValueError, r"padding must be an int or a pair of ints"),
    ("padding_float", t(1, 2, 5, 5), t(4, 2, 3, 3), None, {"padding": 1.5}, ValueError, r"padding must be an int or a pair of ints"),
    ("unknown_algo", t(1, 2, 5, 5), t(4, 2, 3, 3), None, {"algo": "winograd"}, ValueError, r"unknown algo 'winograd'"),
    ("no_output_channels", t(1, 2, 5, 5), t(0, 2, 3, 3), None, {}, ValueError, r"the weight must have at least one output channel"),
    ("numpy_float_groups", t(1, 2, 5, 5), t(4, 2, 3, 3), None, {"groups": 1.0}, ValueError, r"groups must be an int"),
    ("devices_differ", t(1, 2, 5, 5), torch.empty(4, 2, 3, 3, device="meta"), None, {}, ValueError, r"input is on cpu but weight is on meta"),
]


ALGOS = list(fastconv.CONV_ALGOS)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name,x,w,b,kwargs,exc,pattern", BAD_CONV2D, ids=[c[0] for c in BAD_CONV2D])
def test_bad_conv2d_input_raises(name, x, w, b, kwargs, exc, pattern, algo):
    with pytest.raises(exc, match=pattern):
        conv2d(x, w, b, **{"algo": algo, **kwargs})


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name,x,w,b,kwargs,exc,pattern", BAD_CONV2D, ids=[c[0] for c in BAD_CONV2D])
def test_bad_conv2d_input_raises_under_fake_tensors(name, x, w, b, kwargs, exc, pattern, algo):
    """The fake implementations (torch.compile's view of the ops) reject exactly what the kernels reject."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fb = mode.from_tensor(b) if b is not None else None
        with pytest.raises(exc, match=pattern):
            conv2d(fx, fw, fb, **{"algo": algo, **kwargs})


def test_valid_input_under_fake_tensors_matches_eager():
    x, w, b = t(2, 4, 9, 8).to(memory_format=torch.channels_last), t(6, 2, 3, 3), t(6)
    kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    y = conv2d(x, w, b, **kwargs)
    with FakeTensorMode() as mode:
        fy = conv2d(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), **kwargs)
    assert fy.shape == y.shape and fy.stride() == y.stride() and fy.dtype == y.dtype


BAD_BACKWARD = [
    ("dgrad_wrong_grad_shape", lambda: OPS.conv2d_direct_dgrad(t(1, 4, 3, 3), t(4, 2, 3, 3), [1, 2, 6, 6], [1, 1], [0, 0], [1, 1], 1), r"grad_output has shape \[1, 4, 3, 3\] but the convolution's output shape is \[1, 4, 4, 4\]"),
    ("dgrad_input_size_3", lambda: OPS.conv2d_direct_dgrad(t(1, 4, 4, 4), t(4, 2, 3, 3), [1, 2, 6], [1, 1], [0, 0], [1, 1], 1), r"input_size must have 4 entries, got \[1, 2, 6\]"),
    # one image's im2col matrix larger than the workspace: the fakes (torch.compile) refuse it as the kernels do
    ("im2col_workspace_fprop", lambda: OPS.conv2d_im2col(t(1, 8, 8, 8), t(8, 8, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, 64), r"one image's im2col matrix needs 18432 bytes, more than the workspace limit of 64 bytes"),
    ("im2col_workspace_dgrad", lambda: OPS.conv2d_im2col_dgrad(t(1, 8, 8, 8), t(8, 8, 3, 3), [1, 8, 8, 8], [1, 1], [1, 1], [1, 1], 1, 64), r"one image's im2col matrix needs 18432 bytes"),
    ("im2col_workspace_wgrad", lambda: OPS.conv2d_im2col_wgrad(t(1, 8, 8, 8), t(1, 8, 8, 8), [8, 8, 3, 3], [1, 1], [1, 1], [1, 1], 1, 64), r"one image's im2col matrix needs 18432 bytes"),
    ("wgrad_weight_size_negative", lambda: OPS.conv2d_direct_wgrad(t(1, 4, 4, 4), t(1, 2, 6, 6), [4, 2, -3, 3], [1, 1], [0, 0], [1, 1], 1), r"weight_size must be non-negative"),
    ("wgrad_wrong_grad_channels", lambda: OPS.conv2d_direct_wgrad(t(1, 5, 4, 4), t(1, 2, 6, 6), [4, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1), r"grad_output has shape"),
    ("bias_grad_3d", lambda: OPS.conv2d_bias_grad(t(4, 3, 3)), r"expected grad_output to be 4-D"),
    ("bias_grad_int", lambda: OPS.conv2d_bias_grad(torch.ones(1, 2, 3, 3, dtype=torch.int32)), r"supported dtypes"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("name,call,pattern", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_bad_backward_op_input_raises(name, call, pattern, fake):
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            call()


@pytest.mark.skipif(not fastconv.WITH_CUDA, reason="CPU-only build has no CUDA implementation")
def test_cuda_implementation_rejects_cpu_tensors_before_launch():
    """Reaching the CUDA kernel with CPU tensors (runs without a GPU: we dispatch to the CUDA key directly)."""
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x, w, gy = t(1, 2, 5, 5), t(4, 2, 3, 3), t(1, 4, 3, 3)
    conv = ([1, 1], [0, 0], [1, 1], 1)
    ws = (2**20,)
    calls = [
        (OPS.conv2d_direct.default, (x, w, None) + conv),
        (OPS.conv2d_direct_dgrad.default, (gy, w, [1, 2, 5, 5]) + conv),
        (OPS.conv2d_direct_wgrad.default, (gy, x, [4, 2, 3, 3]) + conv),
        (OPS.conv2d_im2col.default, (x, w, None) + conv + ws),
        (OPS.conv2d_im2col_dgrad.default, (gy, w, [1, 2, 5, 5]) + conv + ws),
        (OPS.conv2d_im2col_wgrad.default, (gy, x, [4, 2, 3, 3]) + conv + ws),
        (OPS.conv2d_bias_grad.default, (gy,)),
    ]
    for op, args in calls:
        with pytest.raises(ValueError, match=r"is on cpu, but this is the CUDA implementation"):
            op.redispatch(cuda_key, *args)


@cuda
@pytest.mark.cuda
def test_cuda_mixed_devices_and_float64():
    x = torch.randn(1, 2, 5, 5, device="cuda")
    with pytest.raises(ValueError, match=r"weight is on cpu"):
        conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"bias is on cpu"):
        conv2d(x, torch.randn(4, 2, 3, 3, device="cuda"), torch.randn(4))
    with pytest.raises(TypeError, match=r"float64 is CPU-only"):
        conv2d(x.double(), torch.randn(4, 2, 3, 3, device="cuda", dtype=torch.float64))
