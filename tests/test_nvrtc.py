"""Every kernel source compiles through NVRTC, the runtime compiler, for sm_80 and sm_90, with no GPU:
the .cu files keep their host code (launch configuration, launchers) behind `!defined(__CUDACC_RTC__)`, so
the same sources can be JIT-compiled without a C++ build step (the groundwork of a build-free path).
NVRTC comes with torch's CUDA dependencies (nvidia/cu*/lib); the headers from the CUDA toolkit.

Each kernel is named through NVRTC name expressions, which instantiates the templates the extension
launches and checks that they are reachable by name."""
import ctypes
import glob
import os
from pathlib import Path

import pytest
import torch

from fastconv import _checks, _nvrtc

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
DTYPES = ["float", "__half", "__nv_bfloat16"]
# (the mma.sync tiles: the build-free path compiles no sm_90a wgmma kernel)
IMPLICIT_GEMM_TILES = [f"fastconv::ImplicitGemmTile{i}" for i in range(_checks.IMPLICIT_GEMM_MMA_SYNC_TILES)]

# Per source file: the kernel instantiations the extension's launchers use.
KERNELS = {
    "batch_norm_relu_kernel.cu": [f"batch_norm_stats_partials_kernel<{t}>" for t in DTYPES]
    + [f"batch_norm_relu_normalize_kernel<{t}>" for t in DTYPES] + ["batch_norm_stats_finalize_kernel"],
    "batch_norm_relu_backward_kernel.cu": [f"batch_norm_relu_grad_partials_kernel<{t}>" for t in DTYPES]
    + [f"batch_norm_relu_grad_input_kernel<{t}>" for t in DTYPES] + ["batch_norm_relu_grad_finalize_kernel"],
    "conv2d_bias_grad_kernel.cu": [f"conv2d_bias_grad_kernel<{t}>" for t in DTYPES],
    "conv2d_direct_dgrad_kernel.cu": [f"conv2d_direct_dgrad_kernel<{t}, {c}>" for t in DTYPES for c in (1, 8)]
    + [f"conv2d_depthwise_dgrad_kernel<{t}>" for t in DTYPES],
    "conv2d_direct_fprop_kernel.cu": [f"conv2d_direct_fprop_kernel<{t}, {k}, {s}>" for t in DTYPES for k in (1, 8)
                                      for s in ("true", "false")] + [f"conv2d_depthwise_fprop_kernel<{t}>" for t in DTYPES],
    "conv2d_direct_wgrad_kernel.cu": [f"conv2d_direct_wgrad_kernel<{t}, {n}>" for t in DTYPES for n in (1, 9)]
    + [f"conv2d_depthwise_wgrad_kernel<{t}, 9>" for t in DTYPES] + [f"conv2d_depthwise_wgrad_reduce_kernel<{t}>"
                                                                     for t in DTYPES],
    "gemm_kernel.cu": [f"gemm_simt_kernel<{t}, {o}>" for t in DTYPES for o in sorted({t, "float"})]
    + [f"gemm_wmma_kernel<{t}, {o}>" for t in DTYPES[1:] for o in (t, "float")],
    "conv2d_implicit_gemm_fprop_kernel.cu": [f"conv2d_implicit_gemm_fprop_kernel<{t}, {c}, false>" for t in DTYPES
                                              for c in IMPLICIT_GEMM_TILES]
    + [f"conv2d_implicit_gemm_fprop_kernel<{t}, fastconv::ImplicitGemmSplitTile, true>" for t in DTYPES]
    + [f"conv2d_implicit_gemm_fprop_reduce_kernel<{t}>" for t in DTYPES],
    **{f"conv2d_implicit_gemm_{p}_wgmma_kernel.cu": [f"conv2d_implicit_gemm_{p}_wgmma_kernel<{t}, {c}>" for t in DTYPES[1:]
                                                    for c in ("fastconv::ImplicitGemmWgmmaTile6",
                                                              "fastconv::ImplicitGemmWgmmaTile7")]
       for p in ("fprop", "dgrad")},
    "conv2d_implicit_gemm_dgrad_kernel.cu": [f"conv2d_implicit_gemm_dgrad_kernel<{t}, {c}>" for t in DTYPES
                                              for c in IMPLICIT_GEMM_TILES],
    "conv2d_implicit_gemm_wgrad_kernel.cu": [f"conv2d_implicit_gemm_wgrad_kernel<{t}, {c}>" for t in DTYPES
                                              for c in IMPLICIT_GEMM_TILES]
    + [f"conv2d_implicit_gemm_wgrad_reduce_kernel<{t}>" for t in DTYPES],
    "im2col_kernel.cu": [f"im2col_kernel<{t}>" for t in DTYPES] + [f"col2im_kernel<{t}>" for t in DTYPES],
    "max_pool2d_kernel.cu": [f"max_pool2d_{d}_kernel<{t}>" for t in DTYPES for d in ("forward", "backward")],
    "residual_add_kernel.cu": [f"residual_add_flat_kernel<{t}, {v}, {r}>" for t in DTYPES for v in (1, "16 / sizeof(" + t + ")")
                               for r in ("true", "false")]
    + [f"residual_add_backward_flat_kernel<{t}, {v}>" for t in DTYPES for v in (1, "16 / sizeof(" + t + ")")]
    + [f"residual_add_strided_kernel<{t}, {r}>" for t in DTYPES for r in ("true", "false")]
    + [f"residual_add_backward_strided_kernel<{t}>" for t in DTYPES],
}


def _site_cuda_dirs():
    site = Path(torch.__file__).parent.parent / "nvidia"
    return sorted(site.glob("cu[0-9]*"))


def load_nvrtc():
    for d in _site_cuda_dirs() + [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]:
        for lib_dir in (d / "lib", d / "lib64"):
            builtins = sorted(lib_dir.glob("libnvrtc-builtins.so*"))
            libs = sorted(p for p in lib_dir.glob("libnvrtc.so*") if "alt" not in p.name)
            if libs:
                for b in builtins:
                    if "alt" not in b.name:
                        ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by soname
                return ctypes.CDLL(str(libs[0]))
    return None


def include_dirs():
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    dirs = [cuda_home / "include"] + [d / "include" for d in _site_cuda_dirs()]
    return [d for d in dirs if (d / "cuda_fp16.h").exists()]


NVRTC = load_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None or not include_dirs(), reason="no NVRTC library or CUDA headers")


def nvrtc_compile(path: Path, arch: int, names: list[str], code: str = None):
    """(ok, log, {name expression: lowered name}); `code` replaces the file's text."""
    lib = NVRTC
    prog = ctypes.c_void_p()
    text = path.read_bytes() if code is None else code.encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), text, str(path).encode(), 0, None, None) == 0
    for n in names:
        assert lib.nvrtcAddNameExpression(prog, f"fastconv::{n}".encode()) == 0
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", f"-I{path.parent}".encode()]
    opts += [f"-I{d}".encode() for d in include_dirs()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lowered = {}
    if rc == 0:
        for n in names:
            out = ctypes.c_char_p()
            assert lib.nvrtcGetLoweredName(prog, f"fastconv::{n}".encode(), ctypes.byref(out)) == 0
            lowered[n] = out.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace"), lowered


def test_every_kernel_source_is_listed():
    assert sorted(KERNELS) == sorted(os.path.basename(p) for p in glob.glob(str(CUDA_DIR / "*.cu")))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_kernel_source_compiles_with_nvrtc(source, arch):
    ok, log, lowered = nvrtc_compile(CUDA_DIR / source, arch, KERNELS[source])
    assert ok, log
    assert len(lowered) == len(KERNELS[source]) and all(v.startswith("_Z") for v in lowered.values())


@pytest.mark.parametrize("source", ["conv2d_implicit_gemm_fprop_wgmma_kernel.cu",
                                    "conv2d_implicit_gemm_dgrad_wgmma_kernel.cu"])
def test_wgmma_kernel_compiles_for_sm90a_with_nvrtc(source):
    """The wgmma kernels' bodies exist in sm_90a code only (elsewhere: a trap), so the loop above compiles stubs."""
    ok, log, lowered = nvrtc_compile(CUDA_DIR / source, "90a", KERNELS[source])
    assert ok, log
    assert len(lowered) == len(KERNELS[source])


# ---- the build-free path (fastconv/_nvrtc.py) --------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(_nvrtc.STRUCTS))
def test_build_free_path_layout_checks_hold(source):
    """What fastconv.cupy's build-free path compiles: the file plus static_asserts that its ctypes mirrors and
    copied constants match the kernel's (sizes, field names, types and order)."""
    code = (CUDA_DIR / source).read_text() + _nvrtc.layout_checks(source)
    assert "static_assert" in _nvrtc.layout_checks(source)
    ok, log, _ = nvrtc_compile(CUDA_DIR / source, 90, KERNELS[source], code)
    assert ok, log


def test_build_free_path_refuses_a_mirror_out_of_step(monkeypatch):
    class FpropTiling(ctypes.Structure):  # channels_fastest widened to an int: same size, wrong type
        _fields_ = [(n, ctypes.c_int32) for n in ("tile_p", "tile_q", "k_lanes", "c_tile", "patch_h", "patch_w",
                                                  "channels_fastest")] + [
            (n, ctypes.c_int64) for n in ("tiles_p", "tiles_q", "k_blocks", "total_blocks")]

    source = "conv2d_direct_fprop_kernel.cu"
    monkeypatch.setitem(_nvrtc.STRUCTS[source], "fastconv::FpropTiling", FpropTiling)
    code = (CUDA_DIR / source).read_text() + _nvrtc.layout_checks(source)
    ok, log, _ = nvrtc_compile(CUDA_DIR / source, 90, [], code)
    assert not ok and "type of channels_fastest: fastconv/_nvrtc.py's FpropTiling" in log, log
    monkeypatch.setitem(_nvrtc.MIRRORED_CONSTANTS[source], "fastconv::kMaxTile", 32)
    ok, log, _ = nvrtc_compile(CUDA_DIR / source, 90, [], code + _nvrtc.layout_checks(source))
    assert not ok and "copies fastconv::kMaxTile = 32" in log, log


@pytest.mark.parametrize("source", sorted(_nvrtc.STRUCTS))
def test_cupy_compiles_what_the_build_free_path_launches(source, monkeypatch):
    """CuPy's own NVRTC route (the one cupy.RawModule takes, with the flags CuPy adds), for sm_90. CuPy asks the
    GPU for its architecture; without one the test names it."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import compiler

    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    code = (_nvrtc.source_root() / "cuda" / source).read_text() + _nvrtc.layout_checks(source)
    names = [f"fastconv::{n}" for n in KERNELS[source]]
    cubin, mapping = compiler.compile_using_nvrtc(code, _nvrtc.compile_options(), arch=90, name_expressions=names)
    assert cubin and sorted(mapping) == sorted(names), cupy.__version__


def sample_launches():
    """One plan of each kernel kind the build-free path launches, in each dtype."""
    J = _nvrtc
    s4 = J.Strides4(1, 1, 1, 1)
    for dtype in J.CUDA_TYPES:
        conv = J.Conv2dProblem(2, 16, 9, 9, 32, 3, 3, 9, 9, 1, 1, 1, 1, 1, 1, 1)
        yield J.plan_conv2d_direct_fprop(conv, dtype, 16, s4, 16, s4, None, True, 16, s4)
        depthwise = J.Conv2dProblem(1, 8, 300, 9, 8, 3, 1, 180, 9, 0, 0, 1, 1, 60, 1, 8)  # 1 channel per thread, unstaged
        yield J.plan_conv2d_direct_fprop(depthwise, dtype, 16, s4, 16, s4, 16, False, 16, s4)
        pool = J.Conv2dProblem(1, 4, 8, 8, 4, 3, 3, 4, 4, 1, 1, 2, 2, 1, 1, 4)
        yield J.plan_max_pool2d_forward(pool, dtype, 16, s4, 16, s4, 16, s4, True)
        yield J.plan_residual_add_flat(dtype, 16, 16, 16, 1000, True)
        yield J.plan_residual_add_flat(dtype, 18, 16, 16, 1000, False)
        yield J.plan_residual_add_strided(J.ResidualAddShape(2, 8, 4, 4, 4, 8, 8, 2), dtype, 16, s4, 16, s4, 16, s4,
                                          False)


@pytest.mark.parametrize("launch", list(sample_launches()), ids=lambda launch: launch.kernel.split("::")[1])
def test_build_free_path_signature_checks_hold(launch):
    """What CupyLauncher compiles for a launch (the kernel file, the layout checks and the check that the
    instantiation's parameters are the types its arguments were packed for) compiles, under that name."""
    ok, log, lowered = nvrtc_compile(CUDA_DIR / launch.source, 90, [launch.kernel.removeprefix("fastconv::")],
                                     _nvrtc.module_source(launch))
    assert ok, log
    assert len(lowered) == 1


def test_build_free_path_refuses_a_launch_packed_for_another_signature():
    launch = next(sample_launches())  # conv fprop: (problem, tiling, x, xs, w, ws, bias, relu, y, ys)
    params = list(launch.params)
    params[2], params[4] = params[4], "const __half*"  # x's type changed: the plan and the kernel disagree
    swapped = _nvrtc.Launch(launch.source, launch.kernel, launch.grid, launch.block, launch.shared_mem, launch.args,
                            tuple(params))
    ok, log, _ = nvrtc_compile(CUDA_DIR / launch.source, 90, [], _nvrtc.module_source(swapped))
    assert not ok and "fastconv/_nvrtc.py packs" in log, log
    with pytest.raises(AssertionError, match="packed for a bool parameter"):
        _nvrtc.Launch(launch.source, launch.kernel, 1, 1, 0, launch.args, launch.params[:7] + ("bool",) * 3)
