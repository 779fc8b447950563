"""The build-free path (fastconv.cupy without the compiled extension), checked on a machine without a GPU.

fastconv/_nvrtc_ops.py writes the ops over an array module and a launcher. Here the array module is NumPy and
the launcher runs the launch fastconv/_nvrtc.py planned (kernel instantiation, grid, block, shared memory,
ctypes arguments packed as cuLaunchKernel's kernelParams) on the CPU emulation of tests/kernel_emulation,
built by g++ from the unmodified kernel files (only their host launchers, which NVRTC skips too, and the
`extern __shared__` array are patched out). So the argument checks, output layouts, launch plans and
argument packing all run as on a GPU, and the results must match torch. What this cannot see: NVRTC's own
code generation, CuPy's launch and a real GPU; tests/test_cupy.py checks those where there is one.

The compiled extension is not used by the path itself; the tests use it (fastconv.functional on CPU tensors)
only as the reference for error messages and memory formats.
"""
import ctypes
import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

import fastconv
from fastconv import _checks, _nvrtc, _nvrtc_ops
from test_conv2d_errors import BAD_CONV2D
from test_kernel_emulation import CUDA_INCLUDE, CUDA_SOURCES, CXX, EMULATION, HOST_CODE

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(CXX is None, reason="needs g++"),
    pytest.mark.skipif(CUDA_INCLUDE is None, reason="needs the CUDA headers (cuda_fp16.h, cuda_bf16.h)"),
]

EMULATED_TYPES = ["float", "__half"]  # NumPy has no bfloat16
BOOLS = ("true", "false")
# Every instantiation the plans can name, per kernel file.
INSTANTIATIONS = {
    "conv2d_direct_fprop_kernel.cu": [f"fastconv::conv2d_direct_fprop_kernel<{t}, {k}, {s}>" for t in EMULATED_TYPES
                                      for k in (1, 8) for s in BOOLS]
    + [f"fastconv::conv2d_depthwise_fprop_kernel<{t}>" for t in EMULATED_TYPES],
    # not on the build-free path (which has no dgrad): the extension's depthwise dgrad kernel, launched as
    # launch_conv2d_direct_dgrad launches it (test_depthwise_dgrad_kernel_matches_torch)
    "conv2d_direct_dgrad_kernel.cu": [f"fastconv::conv2d_depthwise_dgrad_kernel<{t}>" for t in EMULATED_TYPES],
    # and its depthwise wgrad kernels (test_depthwise_wgrad_kernels_match_torch)
    "conv2d_direct_wgrad_kernel.cu": [f"fastconv::conv2d_depthwise_wgrad_kernel<{t}, {_nvrtc.DEPTHWISE_WGRAD_TAPS}>"
                                      for t in EMULATED_TYPES]
    + [f"fastconv::conv2d_depthwise_wgrad_reduce_kernel<{t}>" for t in EMULATED_TYPES],
    "max_pool2d_kernel.cu": [f"fastconv::max_pool2d_{d}_kernel<{t}>" for t in EMULATED_TYPES
                             for d in ("forward", "backward")],  # (backward: test_max_pool2d_backward_kernel_...)
    "residual_add_kernel.cu": [f"fastconv::residual_add_flat_kernel<{t}, {v}, {r}>" for t in EMULATED_TYPES
                               for v in (1, 4 if t == "float" else 8) for r in BOOLS]
    + [f"fastconv::residual_add_strided_kernel<{t}, {r}>" for t in EMULATED_TYPES for r in BOOLS],
}


def emulation_source(source: str, out: Path) -> Path:
    """The kernel file without its host launchers, plus emu_launch_by_name over INSTANTIATIONS[source]."""
    text = (CUDA_SOURCES / source).read_text()
    text, count = HOST_CODE.subn("", text)
    assert count >= 1, f"csrc/cuda/{source}: no `#if !defined(__CUDACC_RTC__)  // host code` section to drop"
    if "extern __shared__" in text:
        old = "extern __shared__ float4 smem_f4[];"
        assert text.count(old) == 1, f"csrc/cuda/{source}: update the shared-memory patch in {__file__}"
        text = text.replace(old, "float4* smem_f4 = reinterpret_cast<float4*>(emu_smem);")
    assert not re.search(r"\basm\b|<<<", text), f"csrc/cuda/{source}: PTX or a launch the emulation cannot run"
    (out / source).write_text(text)
    cases = "\n".join(f'  if (!std::strcmp(name, "{k}")) return emu_call(&{k}, grid, block, smem, params, sizes, count);'
                      for k in INSTANTIATIONS[source])
    table = out / (source + ".emu.cpp")
    table.write_text(f'#include "emu_params.h"\n#include "{source}"\n\n'
                     'extern "C" int emu_launch_by_name(const char* name, unsigned grid, int block, size_t smem,\n'
                     '                                  void** params, const size_t* sizes, int count) {\n'
                     f'{cases}\n  return -1;  // not in the table\n}}\n')
    return table


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvrtc_path")
    builds = {}
    for source in INSTANTIATIONS:  # the three builds run in parallel
        table = emulation_source(source, out)
        lib = out / (source + ".so")
        command = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-I", str(out), "-I", str(EMULATION),
                   "-I", str(CUDA_SOURCES), "-isystem", str(CUDA_INCLUDE), str(table), "-o", str(lib)]
        builds[source] = (lib, command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                         text=True))
    libs = {}
    for source, (lib, command, proc) in builds.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"building the emulation of {source} failed:\n{' '.join(command)}\n{log[-6000:]}"
        libs[source] = ctypes.CDLL(str(lib))
        libs[source].emu_launch_by_name.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_int, ctypes.c_size_t,
                                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return libs


class EmulatedLaunches:
    """The Runtime's launcher: each Launch on the emulation, with the checks the CUDA driver would make."""

    def __init__(self, libs):
        self.libs, self.launches = libs, []

    def __call__(self, launch: _nvrtc.Launch) -> None:
        assert 1 <= launch.block <= 1024 and 1 <= launch.grid <= 0x7FFFFFFF
        assert launch.shared_mem <= _nvrtc.SHARED_MEMORY_BUDGET  # no opt-in needed
        params = _nvrtc.kernel_params(launch.args)
        sizes = (ctypes.c_size_t * len(launch.args))(*(ctypes.sizeof(a) for a in launch.args))
        rc = self.libs[launch.source].emu_launch_by_name(launch.kernel.encode(), launch.grid, launch.block,
                                                         launch.shared_mem, ctypes.addressof(params),
                                                         ctypes.addressof(sizes), len(launch.args))
        assert rc != -1, f"{launch.kernel} is not an instantiation the emulation lists (INSTANTIATIONS)"
        assert rc != 1, f"{launch.kernel}: the plan passes {len(launch.args)} arguments, not the kernel's count"
        assert rc == 0, f"{launch.kernel}: argument {rc - 2} has the wrong size for its parameter"
        self.launches.append(launch)


@pytest.fixture
def rt(emulated_kernels):
    return _nvrtc_ops.Runtime(xp=np, launch=EmulatedLaunches(emulated_kernels), device=lambda a: 0,
                              address=lambda a: a.ctypes.data)


def arr(t: torch.Tensor) -> np.ndarray:
    """The tensor's data as a NumPy array with the same strides (channels_last stays channels_last)."""
    return t.numpy()


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def randn(*shape, dtype=torch.float32, channels_last=False):
    t = torch.randn(*shape).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2)}

# (id, N, C, H, W, K, R, S, kwargs)
CONV_CASES = [
    ("3x3_pad1", 2, 4, 9, 7, 8, 3, 3, dict(padding=1)),
    ("stride2_odd", 1, 3, 11, 13, 5, 3, 3, dict(stride=2, padding=1)),
    ("asymmetric", 2, 6, 10, 9, 12, 3, 2, dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2))),
    ("groups", 1, 8, 7, 7, 12, 3, 3, dict(padding=1, groups=4)),
    ("depthwise", 2, 6, 8, 8, 6, 3, 3, dict(padding=1, groups=6)),
    # depthwise with a channel multiplier of 2, stride, dilation and uneven padding; and a 5x5 filter with more
    # outputs in a row (Q x K = 300) than a block has threads
    ("depthwise_multiplier", 1, 4, 9, 11, 8, 3, 3, dict(stride=2, padding=(2, 1), dilation=(2, 1), groups=4)),
    ("depthwise_5x5_long_rows", 1, 20, 6, 17, 20, 5, 5, dict(padding=2, groups=20)),
    ("pointwise_wide", 1, 16, 5, 5, 24, 1, 1, {}),
    ("same_odd_total", 1, 3, 6, 7, 4, 4, 2, dict(padding="same")),
    ("same_dilated", 1, 3, 9, 9, 4, 3, 3, dict(padding="same", dilation=2)),
    ("valid", 1, 3, 6, 6, 4, 3, 3, dict(padding="valid")),
    ("one_output_pixel", 2, 5, 3, 3, 5, 3, 3, {}),  # 1x1 output tile: fewer threads than a warp
    ("unstaged_patch", 1, 2, 130, 9, 3, 3, 1, dict(dilation=(60, 1))),  # the patch outgrows shared memory
]


LARGE = ("unstaged_patch", "same_dilated")  # one layout is enough for the largest emulations
CONV_PARAMS = [pytest.param(*case[1:], layout, id=f"{case[0]}-{layout}") for case in CONV_CASES
               for layout in ("nchw", "channels_last", "strided") if layout == "nchw" or case[0] not in LARGE]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,c,h,w,k,r,s,kwargs,layout", CONV_PARAMS)
def test_conv2d_matches_torch(rt, n, c, h, w, k, r, s, kwargs, layout, dtype):
    torch.manual_seed(0)
    groups = kwargs.get("groups", 1)
    x = randn(n, c, h, w, dtype=dtype, channels_last=layout == "channels_last")
    if layout == "strided":
        x = randn(n, 2 * c, h, w + 3, dtype=dtype)[:, ::2, :, 1:-2]  # every other channel, a column window
    weight, bias = randn(k, c // groups, r, s, dtype=dtype), randn(k, dtype=dtype)
    out = _nvrtc_ops.conv2d(rt, arr(x), arr(weight), arr(bias), **kwargs)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), **kwargs)
    assert out.dtype == arr(x).dtype and out.shape == tuple(ref.shape)
    torch.testing.assert_close(tensor(out).double(), ref, **TOL[dtype])
    # the output's memory format is the compiled path's (torch's rule)
    expected = fastconv.functional.conv2d(x, weight, bias, **kwargs)
    assert tensor(out).is_contiguous(memory_format=suggest_memory_format(expected))
    assert rt.launch.launches  # it ran kernels, not a fallback
    if groups == c:  # depthwise convolutions take their own kernel
        assert "conv2d_depthwise_fprop_kernel" in rt.launch.launches[-1].kernel


DEPTHWISE_DGRAD_CASES = [  # (id, N, C, H, W, channel multiplier, R, S, kwargs)
    ("3x3", 2, 6, 8, 8, 1, 3, 3, dict(padding=1)),
    ("stride2_multiplier2", 1, 4, 9, 11, 2, 3, 3, dict(stride=2, padding=(2, 1), dilation=(2, 1))),
    ("stride3_5x5_long_rows", 1, 20, 7, 17, 1, 5, 5, dict(stride=(3, 2), padding=2)),
]


def depthwise_dgrad_launch(pb, dy: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor) -> _nvrtc.Launch:
    """launch_conv2d_direct_dgrad's launch of the depthwise dgrad kernel (the build-free path has no dgrad plan):
    a block per input row, 256 threads, ordered by dy's layout."""
    t = _nvrtc.CUDA_TYPES[str(dy.dtype).replace("torch.", "")]
    strides = [_nvrtc.Strides4(*a.stride()) for a in (dy, weight, dx)]
    args = (pb, _nvrtc.ptr(dy.data_ptr()), strides[0], _nvrtc.ptr(weight.data_ptr()), strides[1],
            _nvrtc.ptr(dx.data_ptr()), strides[2], ctypes.c_bool(strides[0].c == 1 and pb.K > 1))
    params = (_nvrtc.PROBLEM, f"const {t}*", _nvrtc.STRIDES, f"const {t}*", _nvrtc.STRIDES, f"{t}*", _nvrtc.STRIDES,
              "bool")
    return _nvrtc.Launch("conv2d_direct_dgrad_kernel.cu", f"fastconv::conv2d_depthwise_dgrad_kernel<{t}>",
                         _nvrtc.grid_for(pb.N * pb.H), _nvrtc.THREADS, 0, args, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,mult,r,s,kwargs", [pytest.param(*case[1:], id=case[0]) for case in
                                                      DEPTHWISE_DGRAD_CASES])
def test_depthwise_dgrad_kernel_matches_torch(emulated_kernels, n, c, h, w, mult, r, s, kwargs, layout, dtype):
    """The direct algorithm's depthwise dgrad kernel (csrc/cuda/conv2d_direct_dgrad_kernel.cu), launched as
    launch_conv2d_direct_dgrad does (a block per input row, 256 threads, ordered by dy's layout), against torch's
    input gradient."""
    torch.manual_seed(0)
    stride, padding, dilation = (_checks.pair(kwargs.get(name, default), name)
                                 for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)))
    k = c * mult
    weight = randn(k, 1, r, s, dtype=dtype)
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    dy = randn(n, k, p, q, dtype=dtype, channels_last=layout == "channels_last")
    dx = torch.full((n, c, h, w), float("nan"), dtype=dtype)
    if layout == "channels_last":
        dx = dx.contiguous(memory_format=torch.channels_last)
    pb = _nvrtc.Conv2dProblem(n, c, h, w, k, r, s, p, q, padding[0], padding[1], stride[0], stride[1], dilation[0],
                              dilation[1], c)
    EmulatedLaunches(emulated_kernels)(depthwise_dgrad_launch(pb, dy, weight, dx))
    ref = torch.nn.grad.conv2d_input((n, c, h, w), weight.double(), dy.double(), stride=stride, padding=padding,
                                     dilation=dilation, groups=c)
    torch.testing.assert_close(dx.double(), ref, **TOL[dtype])


def depthwise_wgrad_plan(pb, dy: torch.Tensor, target_blocks=_nvrtc.DEPTHWISE_WGRAD_TARGET_BLOCKS):
    """depthwise_wgrad_plan (conv2d_direct_wgrad_kernel.cu): about target_blocks blocks, at least 16 positions per
    thread."""
    channels_fastest = dy.stride(1) == 1 and pb.K > 1
    k_lanes = _nvrtc.pow2_at_least(pb.K, 32) if channels_fastest else 8
    pixel_lanes = _nvrtc.THREADS // k_lanes
    k_blocks, tap_chunks = _nvrtc.ceil_div(pb.K, k_lanes), _nvrtc.ceil_div(pb.R * pb.S, _nvrtc.DEPTHWISE_WGRAD_TAPS)
    pixels = pb.N * pb.P * pb.Q
    splits = max(1, min(_nvrtc.ceil_div(target_blocks, k_blocks * tap_chunks),
                        _nvrtc.ceil_div(pixels, 16 * pixel_lanes)))
    split_pixels = _nvrtc.ceil_div(pixels, splits) if pixels > splits else 1
    return _nvrtc.DepthwiseWgradPlan(split_pixels, k_lanes, pixel_lanes, k_blocks, tap_chunks,
                                     _nvrtc.ceil_div(pixels, split_pixels) if pixels > 0 else 1, channels_fastest)


def depthwise_wgrad_launches(pb, plan, dy: torch.Tensor, x: torch.Tensor, partial: torch.Tensor, dw: torch.Tensor):
    """launch_conv2d_direct_wgrad's two launches for a depthwise filter: the partial sums per split, then their sum."""
    t = _nvrtc.CUDA_TYPES[str(dy.dtype).replace("torch.", "")]
    taps = _nvrtc.DEPTHWISE_WGRAD_TAPS
    source = "conv2d_direct_wgrad_kernel.cu"
    args = (pb, plan, _nvrtc.ptr(dy.data_ptr()), _nvrtc.Strides4(*dy.stride()), _nvrtc.ptr(x.data_ptr()),
            _nvrtc.Strides4(*x.stride()), _nvrtc.ptr(partial.data_ptr()))
    params = (_nvrtc.PROBLEM, "fastconv::DepthwiseWgradPlan", f"const {t}*", _nvrtc.STRIDES, f"const {t}*",
              _nvrtc.STRIDES, "float*")
    yield _nvrtc.Launch(source, f"fastconv::conv2d_depthwise_wgrad_kernel<{t}, {taps}>",
                        plan.splits * plan.tap_chunks * plan.k_blocks, _nvrtc.THREADS,
                        taps * _nvrtc.DEPTHWISE_WGRAD_LANE_SUMS * 4, args, params)
    args = (pb, ctypes.c_int32(plan.splits), _nvrtc.ptr(partial.data_ptr()), _nvrtc.ptr(dw.data_ptr()),
            _nvrtc.Strides4(*dw.stride()))
    params = (_nvrtc.PROBLEM, "int", "const float*", f"{t}*", _nvrtc.STRIDES)
    yield _nvrtc.Launch(source, f"fastconv::conv2d_depthwise_wgrad_reduce_kernel<{t}>",
                        _nvrtc.ceil_div(pb.K * pb.R * pb.S, _nvrtc.THREADS), _nvrtc.THREADS, 0, args, params)


DEPTHWISE_WGRAD_CASES = [  # (id, N, C, H, W, channel multiplier, R, S, kwargs)
    ("3x3", 2, 6, 20, 20, 1, 3, 3, dict(padding=1)),
    # 40 filters: two filter blocks of 32 in channels_last, five of 8 in NCHW
    ("3x3_40_channels", 1, 40, 9, 7, 1, 3, 3, dict(padding=1)),
    ("stride2_multiplier2", 1, 4, 9, 11, 2, 3, 3, dict(stride=2, padding=(2, 1), dilation=(2, 1))),
    # 25 taps in chunks of 9, 9 and 7; rows of 9 positions against 32 or 256 / 8 position lanes
    ("stride3_5x5", 2, 20, 7, 17, 1, 5, 5, dict(stride=(3, 2), padding=2)),
    ("1x1", 3, 5, 4, 6, 1, 1, 1, {}),
    ("empty_batch", 0, 6, 5, 5, 1, 3, 3, dict(padding=1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,mult,r,s,kwargs", [pytest.param(*case[1:], id=case[0]) for case in
                                                      DEPTHWISE_WGRAD_CASES])
def test_depthwise_wgrad_kernels_match_torch(emulated_kernels, n, c, h, w, mult, r, s, kwargs, layout, dtype):
    """The direct algorithm's depthwise wgrad kernels (csrc/cuda/conv2d_direct_wgrad_kernel.cu), launched as
    launch_conv2d_direct_wgrad does, against torch's weight gradient. Besides the launcher's plan and the same aiming
    at one block (a single split), the kernel takes hand-made ones: splits of 1, 7 and 33 positions (splits ending
    mid-row and mid-image, more splits than position lanes) and, in channels_last, filter blocks narrower than the
    filters."""
    torch.manual_seed(0)
    stride, padding, dilation = (_checks.pair(kwargs.get(name, default), name)
                                 for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)))
    k = c * mult
    channels_last = layout == "channels_last"
    x = randn(n, c, h, w, dtype=dtype, channels_last=channels_last)
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    dy = randn(n, k, p, q, dtype=dtype, channels_last=channels_last)
    pb = _nvrtc.Conv2dProblem(n, c, h, w, k, r, s, p, q, padding[0], padding[1], stride[0], stride[1], dilation[0],
                              dilation[1], c)
    ref = torch.nn.grad.conv2d_weight(x.double(), (k, 1, r, s), dy.double(), stride=stride, padding=padding,
                                      dilation=dilation, groups=c)
    plans = [depthwise_wgrad_plan(pb, dy), depthwise_wgrad_plan(pb, dy, target_blocks=1)]
    pixels = n * p * q
    for split_pixels in (1, 7, 33):
        plans.append(_nvrtc.DepthwiseWgradPlan(split_pixels, plans[0].k_lanes, plans[0].pixel_lanes, plans[0].k_blocks,
                                               plans[0].tap_chunks, max(1, _nvrtc.ceil_div(pixels, split_pixels)),
                                               plans[0].channels_fastest))
    if plans[0].channels_fastest and k > 4:  # 4 filters per block: lanes of one block's filters, then the next's
        plans.append(_nvrtc.DepthwiseWgradPlan(5, 4, _nvrtc.THREADS // 4, _nvrtc.ceil_div(k, 4), plans[0].tap_chunks,
                                               max(1, _nvrtc.ceil_div(pixels, 5)), True))
    for plan in plans:
        partial = torch.full((plan.splits * k * r * s,), float("nan"))
        dw = torch.full((k, 1, r, s), float("nan"), dtype=dtype)
        if channels_last:
            dw = dw.contiguous(memory_format=torch.channels_last)
        launches = EmulatedLaunches(emulated_kernels)
        for launch in depthwise_wgrad_launches(pb, plan, dy, x, partial, dw):
            launches(launch)
        torch.testing.assert_close(dw.double(), ref, **TOL[dtype], msg=lambda m: f"{m}\nplan {plan_text(plan)}")


def plan_text(plan) -> str:
    return ", ".join(f"{name} {getattr(plan, name)}" for name, _ in plan._fields_)


@pytest.mark.parametrize("blocks", [1, 4, 7])
def test_depthwise_kernels_walk_every_row_with_fewer_blocks_than_rows(emulated_kernels, blocks):
    """Both depthwise kernels step their blocks over the rows (n, p) or (n, h) by the grid's size, advancing image
    and row by adds; the launchers give a block per row, so only a smaller grid takes the steps. 3 images of 5 rows:
    strides of 1, 4 and 7 rows cross images at every step, within a step, or skip one."""
    torch.manual_seed(0)
    n, c, h, w, mult = 3, 4, 5, 6, 2
    k = c * mult
    for dtype in (torch.float32, torch.float16):
        x, weight = randn(n, c, h, w, dtype=dtype, channels_last=True), randn(k, 1, 3, 3, dtype=dtype)
        pb = _nvrtc.Conv2dProblem(n, c, h, w, k, 3, 3, h, w, 1, 1, 1, 1, 1, 1, c)
        y = torch.full((n, k, h, w), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
        # the build-free path's own plan (a block per row), on fewer blocks
        plan = _nvrtc.plan_conv2d_direct_fprop(pb, str(dtype).replace("torch.", ""), x.data_ptr(),
                                               _nvrtc.Strides4(*x.stride()), weight.data_ptr(),
                                               _nvrtc.Strides4(*weight.stride()), None, False, y.data_ptr(),
                                               _nvrtc.Strides4(*y.stride()))
        assert "conv2d_depthwise_fprop_kernel" in plan.kernel and plan.grid == n * h
        EmulatedLaunches(emulated_kernels)(dataclasses.replace(plan, grid=blocks))
        ref = F.conv2d(x.double(), weight.double(), padding=1, groups=c)
        torch.testing.assert_close(y.double(), ref, **TOL[dtype])
        dy = randn(n, k, h, w, dtype=dtype, channels_last=True)
        dx = torch.full((n, c, h, w), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
        EmulatedLaunches(emulated_kernels)(dataclasses.replace(depthwise_dgrad_launch(pb, dy, weight, dx),
                                                               grid=blocks))
        ref = torch.nn.grad.conv2d_input((n, c, h, w), weight.double(), dy.double(), padding=1, groups=c)
        torch.testing.assert_close(dx.double(), ref, **TOL[dtype])


def test_conv2d_unbatched_no_bias_relu_and_empty_batch(rt):
    torch.manual_seed(1)
    x, weight = randn(3, 6, 6), randn(4, 3, 3, 3)
    out = _nvrtc_ops.conv2d(rt, arr(x), arr(weight), None, padding=1, relu=True)
    torch.testing.assert_close(tensor(out).double(), F.relu(F.conv2d(x.double(), weight.double(), padding=1)),
                               **TOL[torch.float32])
    launches = len(rt.launch.launches)
    empty = _nvrtc_ops.conv2d(rt, arr(randn(0, 3, 6, 6)), arr(weight), None, padding=1)
    assert empty.shape == (0, 4, 6, 6) and len(rt.launch.launches) == launches  # nothing launched


BAD_ARRAYS = [c for c in BAD_CONV2D if c[0] != "devices_differ"]  # (a meta tensor has no array)


@pytest.mark.parametrize("name,x,w,b,kwargs,exc,pattern", BAD_ARRAYS, ids=[c[0] for c in BAD_ARRAYS])
def test_conv2d_raises_functionals_errors(rt, name, x, w, b, kwargs, exc, pattern):
    if name == "unknown_algo":
        pattern = r"algo 'winograd' is not available without the compiled extension"
    with pytest.raises(exc, match=pattern):
        _nvrtc_ops.conv2d(rt, arr(x), arr(w), None if b is None else arr(b), **kwargs)


def test_conv2d_rejects_float64_as_a_cuda_op_does(rt):
    x, w = randn(1, 2, 5, 5).double(), randn(4, 2, 3, 3).double()
    with pytest.raises(TypeError, match=r"float64 is CPU-only"):
        _nvrtc_ops.conv2d(rt, arr(x), arr(w))
    with pytest.raises(ValueError, match=r"algo 'implicit_gemm' is not available"):
        _nvrtc_ops.conv2d(rt, arr(x.float()), arr(w.float()), algo="implicit_gemm")


@pytest.mark.parametrize("relu", [True, False])
def test_conv_bn_relu_matches_torch_eval(rt, relu):
    torch.manual_seed(2)
    x, weight, bias = randn(2, 4, 8, 8, channels_last=True), randn(6, 4, 3, 3), randn(6)
    mean, var, gamma, beta = randn(6), randn(6).abs() + 0.5, randn(6), randn(6)
    out = _nvrtc_ops.conv_bn_relu(rt, *(arr(t) for t in (x, weight, bias, mean, var, gamma, beta)), stride=2,
                                  padding=1, eps=1e-3, relu=relu)
    ref = F.batch_norm(F.conv2d(x.double(), weight.double(), bias.double(), stride=2, padding=1), mean.double(),
                       var.double(), gamma.double(), beta.double(), eps=1e-3)
    torch.testing.assert_close(tensor(out).double(), F.relu(ref) if relu else ref, rtol=1e-4, atol=1e-4)
    assert tensor(out).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"running_var must be 1-D with 6 elements"):
        _nvrtc_ops.conv_bn_relu(rt, arr(x), arr(weight), None, arr(mean), arr(randn(5)))
    with pytest.raises(ValueError, match=r"running_mean and running_var are required when training=False"):
        _nvrtc_ops.conv_bn_relu(rt, arr(x), arr(weight), None, None, arr(var))  # as functional says it


POOL_CASES = [
    ("3x3_s2_p1", (2, 5, 9, 8), dict(kernel_size=3, stride=2, padding=1)),
    ("ceil_mode", (1, 3, 10, 7), dict(kernel_size=(3, 2), stride=2, ceil_mode=True)),
    ("dilation", (1, 4, 11, 11), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    ("default_stride", (2, 2, 8, 8), dict(kernel_size=2)),
    # more taps than the kernels' unrolled path takes (kSmallWindow = 9): their runtime loop
    ("window_4x3", (1, 3, 11, 10), dict(kernel_size=(4, 3), stride=(2, 1), padding=(2, 1))),
    # windows far larger than the input: the runtime loop scans (and backward visits) only the taps that can matter
    ("window_41x41", (1, 2, 4, 5), dict(kernel_size=41, stride=(1, 3), padding=20)),
    # every window's taps in the padding or past the end (-inf and torch's index), with 2 and 10 taps
    ("empty_windows_2x2", (2, 3, 6, 2), dict(kernel_size=2, stride=1, padding=1, dilation=3)),
    ("empty_windows_5x2", (1, 2, 7, 2), dict(kernel_size=(5, 2), stride=1, padding=(2, 1), dilation=(1, 3))),
]


def ties_and_nans(shape, dtype, channels_last):
    """Values from {-1, 0, 1} (every window has ties) with a few NaNs: the first maximum and the last NaN win."""
    x = torch.randint(-1, 2, shape).to(dtype)
    x[torch.rand(shape) < 0.03] = float("nan")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name,shape,kwargs", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_max_pool2d_matches_torch(rt, name, shape, kwargs, channels_last, dtype):
    torch.manual_seed(3)
    x = randn(*shape, dtype=dtype, channels_last=channels_last)
    out, idx = _nvrtc_ops.max_pool2d(rt, arr(x), return_indices=True, **kwargs)
    ref, ref_idx = F.max_pool2d(x.float(), return_indices=True, **kwargs)
    assert torch.equal(tensor(out), ref.to(dtype)) and torch.equal(tensor(idx), ref_idx)
    assert tensor(out).is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name,shape,kwargs", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_max_pool2d_keeps_the_first_maximum_and_the_last_nan(rt, name, shape, kwargs, channels_last):
    torch.manual_seed(4)
    x = ties_and_nans(shape, torch.float32, channels_last)
    out, idx = _nvrtc_ops.max_pool2d(rt, arr(x), return_indices=True, **kwargs)
    ref, ref_idx = F.max_pool2d(x, return_indices=True, **kwargs)
    assert torch.equal(tensor(idx), ref_idx)
    torch.testing.assert_close(tensor(out), ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name,shape,kwargs", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_max_pool2d_backward_kernel_matches_torch(emulated_kernels, name, shape, kwargs, channels_last, dtype):
    """The extension's max_pool2d backward kernel (the build-free path has no backward), launched as
    launch_max_pool2d_backward does, on torch's indices of inputs with ties (overlapping windows that chose the
    same element add their gradients), against torch's input gradient (but for windows wholly in the padding)."""
    torch.manual_seed(5)
    x = ties_and_nans(shape, dtype, channels_last).nan_to_num(0.5).requires_grad_()
    y, indices = F.max_pool2d(x.double(), return_indices=True, **kwargs)
    dy = randn(*y.shape, dtype=dtype, channels_last=channels_last)
    # (a window with no element inside x passes no gradient; torch adds it at the window's recorded index)
    (ref,) = torch.autograd.grad(y, x, dy.double().masked_fill(y == float("-inf"), 0))
    n, c, h, w = shape
    stride = _checks.pair(kwargs.get("stride", kwargs["kernel_size"]), "stride")
    r, s = _checks.pair(kwargs["kernel_size"], "kernel_size")
    padding, dilation = (_checks.pair(kwargs.get(k, d), k) for k, d in (("padding", 0), ("dilation", 1)))
    pb = _nvrtc.Conv2dProblem(n, c, h, w, c, r, s, y.shape[2], y.shape[3], padding[0], padding[1], stride[0],
                              stride[1], dilation[0], dilation[1], c)
    indices = indices.contiguous(memory_format=torch.channels_last) if channels_last else indices.contiguous()
    dx = torch.full(shape, float("nan"), dtype=dtype)
    if channels_last:
        dx = dx.contiguous(memory_format=torch.channels_last)
    t = _nvrtc.CUDA_TYPES[str(dtype).replace("torch.", "")]
    total = n * c * h * w
    args = (pb, ctypes.c_bool(channels_last), ctypes.c_bool(total <= 0xFFFFFFFF), _nvrtc.ptr(dy.data_ptr()),
            _nvrtc.Strides4(*dy.stride()), _nvrtc.ptr(indices.data_ptr()), _nvrtc.Strides4(*indices.stride()),
            _nvrtc.ptr(dx.data_ptr()), _nvrtc.Strides4(*dx.stride()))
    params = (_nvrtc.PROBLEM, "bool", "bool", f"const {t}*", _nvrtc.STRIDES, "const int64_t*", _nvrtc.STRIDES,
              f"{t}*", _nvrtc.STRIDES)
    kernel = f"fastconv::max_pool2d_backward_kernel<{t}>"
    EmulatedLaunches(emulated_kernels)(_nvrtc.Launch("max_pool2d_kernel.cu", kernel,
                                                     _nvrtc.elementwise_blocks(total, _nvrtc.THREADS), _nvrtc.THREADS,
                                                     0, args, params))
    torch.testing.assert_close(dx.double(), ref.double(), **TOL[dtype])


def test_max_pool2d_unbatched_and_errors(rt):
    x = randn(3, 7, 7)
    torch.testing.assert_close(tensor(_nvrtc_ops.max_pool2d(rt, arr(x), 3, 2)), F.max_pool2d(x, 3, 2))
    with pytest.raises(ValueError, match=r"padding must be at most half the kernel size"):
        _nvrtc_ops.max_pool2d(rt, arr(x), 3, 1, 2)
    with pytest.raises(ValueError, match=r"3-D \(C, H, W\) or 4-D"):
        _nvrtc_ops.max_pool2d(rt, arr(randn(7, 7)), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", ["flat", "flat_unaligned", "channels_last", "strided_padded", "mixed_layouts"])
def test_residual_add_matches_torch(rt, case, relu, dtype):
    torch.manual_seed(4)
    stride, cl = 1, case == "channels_last"
    r = randn(2, 6, 5, 7, dtype=dtype, channels_last=cl)
    s = randn(2, 6, 5, 7, dtype=dtype, channels_last=cl)
    if case == "flat_unaligned":  # one element in: not 16-byte aligned, so scalar loads
        r = randn(2 * 6 * 5 * 7 + 1, dtype=dtype)[1:].view(2, 6, 5, 7)
    if case == "strided_padded":  # the CIFAR shortcut: half the channels, every other pixel
        stride, s = 2, randn(2, 3, 9, 13, dtype=dtype)
    if case == "mixed_layouts":
        s = s.contiguous(memory_format=torch.channels_last)
    out = _nvrtc_ops.residual_add(rt, arr(r), arr(s), stride=stride, relu=relu)
    shortcut = F.pad(s[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, r.shape[1] - s.shape[1]))
    ref = (r.float() + shortcut.float()).to(dtype)  # one rounding, as torch's add
    assert torch.equal(tensor(out), torch.relu(ref) if relu else ref)
    if case == "strided_padded":  # the padded channels add +0.0, as torch's r + pad(s): -0.0 comes out +0.0
        r[:, 3:] = -0.0
        out = tensor(_nvrtc_ops.residual_add(rt, arr(r), arr(s), stride=stride, relu=relu))
        assert not out[:, 3:].signbit().any()
    kernel = rt.launch.launches[-1].kernel
    assert ("flat" in kernel) == (case in ("flat", "flat_unaligned", "channels_last"))
    assert (", 1, " in kernel) == (case == "flat_unaligned")


def test_residual_add_errors_match_functional(rt):
    r, s = randn(2, 4, 3, 3), randn(2, 6, 5, 5)
    with pytest.raises(ValueError, match=r"shortcut has 6 channels, more than the residual's 4"):
        _nvrtc_ops.residual_add(rt, arr(r), arr(s), stride=2)
    with pytest.raises(ValueError, match=r"stride must be an int"):
        _nvrtc_ops.residual_add(rt, arr(r), arr(r), stride=1.0)


def test_a_mirror_out_of_step_fails_the_emulated_launch(rt, emulated_kernels, monkeypatch):
    """An argument whose ctypes type or size differs from the kernel's parameter is refused, never misread: by the
    Launch itself (the type the plan declared), and by the emulated driver (the size the kernel takes)."""
    class ShortStrides(ctypes.Structure):
        _fields_ = [(n, ctypes.c_int32) for n in "nchw"]

    x = arr(randn(1, 2, 4, 4))
    with monkeypatch.context() as m:
        m.setattr(_nvrtc_ops.ArraySpec, "strides4", lambda self: ShortStrides(*self.strides))
        with pytest.raises(AssertionError, match="ShortStrides packed for a fastconv::Strides4 parameter"):
            _nvrtc_ops.max_pool2d(rt, x, 2)
    _nvrtc_ops.max_pool2d(rt, x, 2)
    launch = rt.launch.launches[-1]  # (problem, channels_fastest, fits_32bit, x, xs, ...): xs made short
    object.__setattr__(launch, "args", launch.args[:4] + (ShortStrides(1, 1, 1, 1),) + launch.args[5:])
    with pytest.raises(AssertionError, match="argument 4 has the wrong size for its parameter"):
        EmulatedLaunches(emulated_kernels)(launch)


def test_the_package_imports_without_the_extension():
    """Without fastconv._C: `import fastconv` works, the torch API raises the build instructions, and
    fastconv.cupy chooses the build-free path (a stand-in cupy module: CuPy needs a driver to import its
    runtime here)."""
    script = textwrap.dedent("""
        import sys, types
        sys.modules["fastconv._C"] = None  # the extension fails to import
        cupy = types.ModuleType("cupy")
        cupy.ndarray = type("ndarray", (), {})
        sys.modules["cupy"] = cupy
        import fastconv
        assert fastconv.WITH_CUDA is False
        try:
            fastconv.Conv2d
        except ImportError as e:
            assert "pip install --no-build-isolation ." in str(e) and "fastconv.cupy" in str(e), e
        else:
            raise AssertionError("fastconv.Conv2d without the extension")
        import fastconv.cupy as fcp
        assert fcp.BACKEND == "nvrtc", fcp.BACKEND
        try:
            fcp.conv2d(1, 2)
        except TypeError as e:
            assert "input must be a cupy.ndarray" in str(e), e
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_kernel_sources_ship_with_the_package(tmp_path):
    """A pip install (here setup.py's build_py, with the extension switched off as for a machine without a
    compiler) carries the kernel sources as fastconv/_csrc, which _nvrtc.source_root() then finds."""
    env = {**__import__("os").environ, "FASTCONV_NO_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = tmp_path / "fastconv" / "_csrc"
    for source in INSTANTIATIONS:
        assert (shipped / "cuda" / source).read_text() == (CUDA_SOURCES / source).read_text()
    assert (shipped / "conv2d_problem.h").exists() and (shipped / "cuda" / "kernel_utils.cuh").exists()
    probe = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import fastconv._nvrtc as j; print(j.source_root())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONPATH": ""}, cwd=tmp_path)
    assert result.stdout.strip() == str(shipped), result.stdout + result.stderr


def test_memory_format_rules_match_torch():
    """_checks' copies of c10's channels_last suggestion and of is_contiguous(memory_format), which the path
    uses to lay out its outputs, against the extension's C++ (max_pool2d's output follows the input's suggested
    format) and torch, over permuted, sliced and size-1 layouts."""
    g = torch.Generator().manual_seed(5)
    for _ in range(400):
        shape = [int(v) for v in torch.randint(1, 4, (4,), generator=g)]
        base = torch.randn(*[2 * v for v in shape], generator=g)
        perm = torch.randperm(4, generator=g).tolist()
        x = base.permute(perm)[: shape[0], : shape[1], : shape[2], : shape[3]]
        if torch.rand(1, generator=g) < 0.3:
            x = x[:, :, ::2] if x.shape[2] > 1 else x
        sizes, strides = list(x.shape), list(x.stride())
        cl = _checks.strides_like_channels_last(sizes, strides)
        fmt = torch.channels_last if cl else torch.contiguous_format
        out = fastconv.functional.max_pool2d(x, 1)
        assert out.is_contiguous(memory_format=fmt), (sizes, strides)  # (where C or H*W is 1, both formats are)
        for channels_last in (False, True):
            want = x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert _checks.is_dense_in(sizes, strides, channels_last) == want, (sizes, strides, channels_last)
