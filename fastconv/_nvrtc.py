"""The build-free path's kernels: fastconv's CUDA kernels compiled at run time by NVRTC (through
``cupy.RawModule``) from the same ``csrc/cuda/*.cu`` files the extension builds, and launched with the
configuration the extension's host code would choose.

What lives where:

* the kernels: only in ``csrc/cuda``. NVRTC compiles each file's device code; the host launchers in those files
  sit behind ``#if !defined(__CUDACC_RTC__)``. A pip install ships the sources as ``fastconv/_csrc``
  (setup.py's ``build_py``); a checkout reads ``csrc/`` itself.
* the launch configuration (the host code NVRTC does not see): the ``plan_*`` functions below, one per launcher
  they stand in for, each naming that launcher. They return a :class:`Launch`: a kernel instantiation, its
  grid, block and dynamic shared memory, and its arguments as ctypes values in parameter order.
* the by-value argument structs (``Conv2dProblem``, ``Strides4``, ...): ctypes mirrors. Every compiled module
  also carries ``static_assert``s, generated from the mirrors, on each struct's size, field names, types and
  order, on the constants the plans copy (``MIRRORED_CONSTANTS``) and on the launched instantiation's parameter
  list (``signature_check``), so a kernel change that the Python side misses fails to compile instead of
  reading garbage.

This module needs neither torch nor the extension; CuPy is imported only to compile and launch
(:class:`CupyLauncher`). tests/test_nvrtc_path.py runs the plans through a CPU emulation of the kernels.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# ---- where the kernel sources and the CUDA headers are -------------------------------------------------------


def source_root() -> Path:
    """The directory holding ``cuda/*.cu`` and the headers they include: the copy a pip install ships, else the
    checkout's ``csrc``."""
    here = Path(__file__).resolve().parent
    for root in (here / "_csrc", here.parent / "csrc"):
        if (root / "cuda" / "kernel_utils.cuh").exists():
            return root
    raise FileNotFoundError(
        f"fastconv: the CUDA kernel sources are missing (looked for {here / '_csrc'} and {here.parent / 'csrc'}); "
        "reinstall fastconv"
    )


def cuda_include_dirs() -> list[Path]:
    """Directories with the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h): the toolkit's
    (CUDA_HOME, CUDA_PATH, /usr/local/cuda) and those of the nvidia-* pip packages torch and CuPy depend on."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/include"))
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            candidates += sorted(nvidia.glob("cu[0-9]*/include")) + sorted(nvidia.glob("cuda_runtime/include"))
    dirs = []
    for d in candidates:
        if (d / "cuda_fp16.h").exists() and d not in dirs:
            dirs.append(d)
    return dirs


def compile_options() -> tuple[str, ...]:
    root = source_root()
    return ("-std=c++17", f"-I{root / 'cuda'}", f"-I{root}", *(f"-I{d}" for d in cuda_include_dirs()))


# ---- the kernels' by-value argument structs ------------------------------------------------------------------

i32, i64, boolean = ctypes.c_int32, ctypes.c_int64, ctypes.c_bool


class Strides4(ctypes.Structure):
    """csrc/conv2d_problem.h: element strides in (n, c, h, w) order."""

    _fields_ = [(name, i64) for name in ("n", "c", "h", "w")]


class Conv2dProblem(ctypes.Structure):
    """csrc/conv2d_problem.h: the sizes of one convolution (also a pooling window's geometry)."""

    _fields_ = [(name, i64) for name in ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "pad_h", "pad_w", "stride_h",
                                         "stride_w", "dil_h", "dil_w", "groups")]


class FpropTiling(ctypes.Structure):
    """csrc/cuda/conv2d_direct_fprop_kernel.cu: one direct fprop launch's tiling."""

    _fields_ = [("tile_p", i32), ("tile_q", i32), ("k_lanes", i32), ("c_tile", i32), ("patch_h", i32),
                ("patch_w", i32), ("channels_fastest", boolean), ("tiles_p", i64), ("tiles_q", i64),
                ("k_blocks", i64), ("total_blocks", i64)]


class DepthwiseWgradPlan(ctypes.Structure):
    """csrc/cuda/conv2d_direct_wgrad_kernel.cu: the depthwise wgrad launch's plan. (The extension's: the build-free
    path has no wgrad. tests/test_nvrtc_path.py launches the kernel in the CPU emulation with it.)"""

    _fields_ = [("split_pixels", i64), ("k_lanes", i32), ("pixel_lanes", i32), ("k_blocks", i32), ("tap_chunks", i32),
                ("splits", i32), ("channels_fastest", boolean)]


class ResidualAddShape(ctypes.Structure):
    """csrc/residual_add_shape.h: the sizes of one residual add."""

    _fields_ = [(name, i64) for name in ("N", "C", "P", "Q", "J", "H", "W", "stride")]


# The C++ name of each mirror, per source file that passes it by value.
STRUCTS = {
    "conv2d_direct_fprop_kernel.cu": {"fastconv::Conv2dProblem": Conv2dProblem, "fastconv::Strides4": Strides4,
                                      "fastconv::FpropTiling": FpropTiling},
    "conv2d_direct_wgrad_kernel.cu": {"fastconv::Conv2dProblem": Conv2dProblem, "fastconv::Strides4": Strides4,
                                      "fastconv::DepthwiseWgradPlan": DepthwiseWgradPlan},
    "max_pool2d_kernel.cu": {"fastconv::Conv2dProblem": Conv2dProblem, "fastconv::Strides4": Strides4},
    "residual_add_kernel.cu": {"fastconv::ResidualAddShape": ResidualAddShape, "fastconv::Strides4": Strides4},
}

# Constants of the kernels' host code that the plans below copy (launch.h and the kernel files).
THREADS = 256                     # kThreads of every kernel used here
SHARED_MEMORY_BUDGET = 48 * 1024  # launch.h kSharedMemoryBudgetBytes
MAX_DIRECT_FILTER_TAPS = SHARED_MEMORY_BUDGET // 4
DIRECT_MAX_TILE = 16
DIRECT_MAX_CHANNEL_STEP = 16
DEPTHWISE_WGRAD_TAPS = 9                            # kDepthwiseWgradTaps: a thread's taps
DEPTHWISE_WGRAD_LANE_SUMS = THREADS + THREADS // 32  # kLaneSumsStride: floats per tap in its shared memory
DEPTHWISE_WGRAD_TARGET_BLOCKS = 512                 # kDepthwiseWgradTargetBlocks: the plan's aim
MIRRORED_CONSTANTS = {
    "conv2d_direct_fprop_kernel.cu": {"fastconv::kThreads": THREADS,
                                      "fastconv::kSharedMemoryBudgetBytes": SHARED_MEMORY_BUDGET,
                                      "fastconv::kMaxDirectFilterTaps": MAX_DIRECT_FILTER_TAPS,
                                      "fastconv::kMaxTile": DIRECT_MAX_TILE,
                                      "fastconv::kMaxChannelStep": DIRECT_MAX_CHANNEL_STEP},
    "conv2d_direct_wgrad_kernel.cu": {"fastconv::kThreads": THREADS,
                                      "fastconv::kDepthwiseWgradTaps": DEPTHWISE_WGRAD_TAPS,
                                      "fastconv::kLaneSumsStride": DEPTHWISE_WGRAD_LANE_SUMS,
                                      "fastconv::kDepthwiseWgradTargetBlocks": DEPTHWISE_WGRAD_TARGET_BLOCKS},
    "max_pool2d_kernel.cu": {"fastconv::kThreads": THREADS},
    "residual_add_kernel.cu": {"fastconv::kThreads": THREADS},
}


CXX_TYPES = {i32: "int", i64: "int64_t", boolean: "bool"}


def layout_checks(source: str) -> str:
    """C++ appended to `source` before it is compiled: static_asserts that each ctypes mirror has its struct's
    size, field names, field types and field order (which fix the layout, both sides following the C ABI), and
    that the copied constants match the kernel's own."""
    lines = ["", "// fastconv/_nvrtc.py: the Python side's copies of the kernel's argument layouts and constants"]
    for cxx, mirror in STRUCTS.get(source, {}).items():
        where = f"fastconv/_nvrtc.py's {mirror.__name__} and {cxx} in {source} differ"
        lines.append(f'static_assert(sizeof({cxx}) == {ctypes.sizeof(mirror)}, "size: {where}");')
        values = []
        for i, (name, ctype) in enumerate(mirror._fields_):
            lines.append(f'static_assert(fastconv::same_type<decltype({cxx}::{name}), {CXX_TYPES[ctype]}>::value, '
                         f'"type of {name}: {where}");')
            values.append(("true" if i % 2 else "false") if ctype is boolean else str(i + 1))
        # aggregate initialisation follows declaration order: each field reads back its own value
        probe = f"{cxx}{{{', '.join(values)}}}"
        checks = " && ".join(f"{probe}.{name} == {v}" for (name, _), v in zip(mirror._fields_, values))
        lines.append(f'static_assert({checks}, "field order: {where}");')
    for cxx, value in MIRRORED_CONSTANTS.get(source, {}).items():
        lines.append(f'static_assert({cxx} == {value}, "fastconv/_nvrtc.py copies {cxx} = {value} from {source}");')
    return "\n".join(lines) + "\n"


# ---- launches ---------------------------------------------------------------------------------------------------

#: The CUDA element type of each dtype name the kernels are built for.
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel<<<grid, block, shared_mem, stream>>>(*args)``."""

    source: str   # file in csrc/cuda
    kernel: str   # NVRTC name expression of the instantiation
    grid: int
    block: int
    shared_mem: int
    args: tuple   # ctypes values, in the kernel's parameter order (pointers as c_void_p)
    params: tuple  # the C++ parameter types the plan packs `args` for (signature_check compiles them in)

    def __post_init__(self):
        assert len(self.args) == len(self.params), (self.kernel, self.params)
        for arg, param in zip(self.args, self.params):
            expected = ctypes.c_void_p if param.endswith("*") else _CTYPES_OF.get(param)
            assert type(arg) is expected, f"{self.kernel}: {type(arg).__name__} packed for a {param} parameter"


# The ctypes type that packs each by-value C++ parameter type (pointers are c_void_p).
_CTYPES_OF = {cxx: ctype for ctype, cxx in CXX_TYPES.items()}
_CTYPES_OF.update((cxx, mirror) for mirrors in STRUCTS.values() for cxx, mirror in mirrors.items())


def signature_check(launch: Launch) -> str:
    """C++ appended to the compiled source: a static_assert that the instantiation's parameter list is the one the
    plan packed its arguments for (a reordered or retyped kernel parameter fails to compile)."""
    params = ", ".join(launch.params)
    return (f"static_assert(fastconv::same_type<decltype(&{launch.kernel}), void (*)({params})>::value, "
            f'"fastconv/_nvrtc.py packs ({params}) for {launch.kernel}: the kernel\'s parameters differ");\n')


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(v: int, cap: int) -> int:
    p = 1
    while p < v and p < cap:
        p *= 2
    return p


def grid_for(blocks: int) -> int:
    return min(blocks, 0x7FFFFFFF)


def elementwise_blocks(total: int, threads: int) -> int:
    return min(ceil_div(total, threads), 65536)


PROBLEM, STRIDES = "fastconv::Conv2dProblem", "fastconv::Strides4"


def ptr(address: int | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(address or None)


def _direct_fprop_tiling(pb: Conv2dProblem, kpt: int, channels_fastest: bool) -> tuple[FpropTiling, bool]:
    """choose_tiling<KPT> of conv2d_direct_fprop_kernel.cu: the largest output tile up to 16 x 16 that the
    output fills, the rest of the 256 threads over output channels, then as many input channels per step as
    shared memory holds."""
    tl = FpropTiling()
    cg, kg, rs = pb.C // pb.groups, pb.K // pb.groups, pb.R * pb.S
    tl.tile_q = pow2_at_least(pb.Q, DIRECT_MAX_TILE)
    tl.tile_p = pow2_at_least(pb.P, DIRECT_MAX_TILE)
    spatial = tl.tile_p * tl.tile_q
    tl.k_lanes = min(ceil_div(kg, kpt), THREADS // spatial)
    patch_h = (tl.tile_p - 1) * pb.stride_h + (pb.R - 1) * pb.dil_h + 1
    patch_w = (tl.tile_q - 1) * pb.stride_w + (pb.S - 1) * pb.dil_w + 1
    budget = SHARED_MEMORY_BUDGET // 4
    while tl.k_lanes > 1 and rs * tl.k_lanes * kpt > budget:
        tl.k_lanes //= 2
    filter_per_c = rs * tl.k_lanes * kpt
    staged_per_c = filter_per_c + patch_h * patch_w
    stage_input = staged_per_c <= budget
    if stage_input:
        c_tile = budget // staged_per_c
        tl.patch_h, tl.patch_w = patch_h, patch_w
    else:
        c_tile = budget // filter_per_c
    tl.c_tile = max(1, min(c_tile, DIRECT_MAX_CHANNEL_STEP, cg))
    tl.channels_fastest = channels_fastest
    tl.tiles_p, tl.tiles_q = ceil_div(pb.P, tl.tile_p), ceil_div(pb.Q, tl.tile_q)
    tl.k_blocks = ceil_div(kg, tl.k_lanes * kpt)
    tl.total_blocks = pb.N * pb.groups * tl.k_blocks * tl.tiles_p * tl.tiles_q
    return tl, stage_input


def plan_conv2d_direct_fprop(pb: Conv2dProblem, dtype: str, x: int, xs: Strides4, w: int, ws: Strides4,
                             bias: int | None, relu: bool, y: int, ys: Strides4) -> Launch:
    """launch_conv2d_direct_fprop (conv2d_direct_fprop_kernel.cu): depthwise convolutions (one input channel per
    group) take their own kernel, a block per output row; the others eight output channels per thread when the
    group has them, one for thin groups."""
    kg, rs = pb.K // pb.groups, pb.R * pb.S
    t = CUDA_TYPES[dtype]
    limit = 1 << 30  # depthwise_kernel_fits: the kernel's 32-bit indices hold
    fits = (pb.Q * pb.K <= 0x7FFFFFFF - THREADS and pb.H + 2 * pb.pad_h + (pb.R - 1) * pb.dil_h < limit
            and pb.W + 2 * pb.pad_w + (pb.S - 1) * pb.dil_w < limit and pb.P * pb.stride_h < limit
            and pb.Q * pb.stride_w < limit)
    if pb.C // pb.groups == 1 and fits:
        kernel = f"fastconv::conv2d_depthwise_fprop_kernel<{t}>"
        channels_fastest = xs.c == 1 and pb.C > 1  # x's layout, as the C++ launcher
        args = (pb, ptr(x), xs, ptr(w), ws, ptr(bias), boolean(relu), ptr(y), ys, boolean(channels_fastest))
        params = (PROBLEM, f"const {t}*", STRIDES, f"const {t}*", STRIDES, f"const {t}*", "bool", f"{t}*", STRIDES,
                  "bool")
        return Launch("conv2d_direct_fprop_kernel.cu", kernel, grid_for(pb.N * pb.P), THREADS, 0, args, params)
    kpt = 8 if kg >= 8 and rs * 8 <= MAX_DIRECT_FILTER_TAPS else 1
    tl, stage_input = _direct_fprop_tiling(pb, kpt, xs.c == 1 and pb.C > 1)
    smem = tl.c_tile * rs * tl.k_lanes * kpt + (tl.c_tile * tl.patch_h * tl.patch_w if stage_input else 0)
    kernel = f"fastconv::conv2d_direct_fprop_kernel<{t}, {kpt}, {'true' if stage_input else 'false'}>"
    args = (pb, tl, ptr(x), xs, ptr(w), ws, ptr(bias), boolean(relu), ptr(y), ys)
    params = (PROBLEM, "fastconv::FpropTiling", f"const {t}*", STRIDES, f"const {t}*", STRIDES, f"const {t}*", "bool",
              f"{t}*", STRIDES)
    return Launch("conv2d_direct_fprop_kernel.cu", kernel, grid_for(tl.total_blocks),
                  tl.tile_p * tl.tile_q * tl.k_lanes, smem * 4, args, params)


def plan_max_pool2d_forward(pb: Conv2dProblem, dtype: str, x: int, xs: Strides4, y: int, ys: Strides4,
                            indices: int, is_: Strides4, channels_fastest: bool) -> Launch:
    """launch_max_pool2d_forward (max_pool2d_kernel.cu)."""
    total = pb.N * pb.C * pb.P * pb.Q
    t = CUDA_TYPES[dtype]
    args = (pb, boolean(channels_fastest), boolean(total <= 0xFFFFFFFF), ptr(x), xs, ptr(y), ys, ptr(indices), is_)
    params = (PROBLEM, "bool", "bool", f"const {t}*", STRIDES, f"{t}*", STRIDES, "int64_t*", STRIDES)
    return Launch("max_pool2d_kernel.cu", f"fastconv::max_pool2d_forward_kernel<{t}>",
                  elementwise_blocks(total, THREADS), THREADS, 0, args, params)


def plan_residual_add_flat(dtype: str, residual: int, shortcut: int, out: int, numel: int, relu: bool) -> Launch:
    """launch_residual_add_flat (residual_add_kernel.cu): 16-byte vectors when every pointer is 16-byte aligned."""
    vector = all(p % 16 == 0 for p in (residual, shortcut, out))
    itemsize = 4 if dtype == "float32" else 2
    vec = 16 // itemsize if vector else 1
    t = CUDA_TYPES[dtype]
    kernel = f"fastconv::residual_add_flat_kernel<{t}, {vec}, {'true' if relu else 'false'}>"
    return Launch("residual_add_kernel.cu", kernel, elementwise_blocks(ceil_div(numel, vec), THREADS), THREADS, 0,
                  (ptr(residual), ptr(shortcut), ptr(out), i64(numel)), (f"const {t}*", f"const {t}*", f"{t}*", "int64_t"))


def plan_residual_add_strided(shape: ResidualAddShape, dtype: str, residual: int, rs: Strides4, shortcut: int,
                              ss: Strides4, out: int, os_: Strides4, relu: bool) -> Launch:
    """launch_residual_add_strided (residual_add_kernel.cu): any stride, channel padding and layout."""
    total = shape.N * shape.C * shape.P * shape.Q
    fits_32bit = total <= 0xFFFFFFFF and shape.N * shape.J * shape.H * shape.W <= 0xFFFFFFFF
    channels_fastest = os_.c == 1 and shape.C > 1
    t = CUDA_TYPES[dtype]
    kernel = f"fastconv::residual_add_strided_kernel<{t}, {'true' if relu else 'false'}>"
    args = (shape, boolean(channels_fastest), boolean(fits_32bit), ptr(residual), rs, ptr(shortcut), ss, ptr(out), os_)
    params = ("fastconv::ResidualAddShape", "bool", "bool", f"const {t}*", STRIDES, f"const {t}*", STRIDES, f"{t}*",
              STRIDES)
    return Launch("residual_add_kernel.cu", kernel, elementwise_blocks(total, THREADS), THREADS, 0, args, params)


# ---- compiling and launching through CuPy ------------------------------------------------------------------------


def module_source(launch: Launch) -> str:
    """What NVRTC compiles for a launch: its kernel file, the layout checks and the signature check."""
    return (source_root() / "cuda" / launch.source).read_text() + layout_checks(launch.source) + signature_check(launch)


def kernel_params(args) -> ctypes.Array:
    """cuLaunchKernel's kernelParams: one pointer per argument, to that argument's bytes."""
    return (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))


class CupyLauncher:
    """Compiles each kernel instantiation once per device with ``cupy.RawModule`` (CuPy also caches the cubin
    on disk, ``~/.cupy/kernel_cache``) and launches it on a CuPy stream."""

    def __init__(self):
        import cupy  # noqa: F401  (fails here, with CuPy's message, when CuPy is absent)

        self._modules: dict = {}

    def module(self, launch: Launch):
        import cupy

        key = (launch.source, launch.kernel, cupy.cuda.Device().id)
        if key not in self._modules:
            self._modules[key] = cupy.RawModule(code=module_source(launch), options=compile_options(),
                                                name_expressions=[launch.kernel])
        return self._modules[key]

    def __call__(self, launch: Launch, stream_ptr: int) -> None:
        from cupy.cuda import driver

        function = self.module(launch).get_function(launch.kernel).kernel  # the RawKernel's cupy.cuda.Function
        params = kernel_params(launch.args)
        driver.launchKernel(function.ptr, launch.grid, 1, 1, launch.block, 1, 1, launch.shared_mem, stream_ptr,
                            ctypes.addressof(params), 0)
