"""Builds fastconv's extension, fastconv._C.

The CUDA kernels are built whenever a CUDA toolkit (nvcc) and a CUDA build of torch are present, with or
without a GPU; otherwise (or with FASTCONV_FORCE_CPU=1) the extension is CPU-only.

Environment switches:
  FASTCONV_CUDA_ARCH    architectures, e.g. "9.0" or "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST). Default: an
                        explicit TORCH_CUDA_ARCH_LIST, else the visible GPUs', else "8.0;9.0". A bare "9.0"
                        (Hopper) is built as 9.0a, whose code runs on compute capability 9.0 only and adds the
                        wgmma kernels (implicit-GEMM tiles 6 and 7); FASTCONV_NO_SM90A=1 keeps plain 9.0, and
                        "9.0+PTX" stays as written (its PTX serves newer GPUs).
  FASTCONV_FORCE_CPU=1  skip the CUDA kernels.
  FASTCONV_NO_EXTENSION=1  no compiled extension at all (a machine without a compiler): the package then
                        offers fastconv.cupy's build-free path, which compiles the kernels with NVRTC at run time.
  MAX_JOBS              parallel compile jobs (honoured by torch's ninja build).
  CUDA_HOME             the toolkit; defaults to /usr/local/cuda when nvcc is there.
  FASTCONV_LINEINFO=0   drop nvcc's -lineinfo (default on: Nsight Compute then attributes samples and stalls
                        to source lines; it changes no generated code).
  FASTCONV_DEBUG=1      a debug build: host -O0 -g, device -G -g (kernels become much slower; for cuda-gdb
                        and for compute-sanitizer reports with full device line information).
"""
import glob
import os

# torch.utils.cpp_extension reads CUDA_HOME when imported; without a GPU it would guess /usr/local.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def want_cuda() -> bool:
    if os.environ.get("FASTCONV_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    )


def set_cuda_archs() -> list:
    """Sets TORCH_CUDA_ARCH_LIST where fastconv decides it, and returns the list ([] when torch decides: visible
    GPUs that are not all Hopper)."""
    if os.environ.get("FASTCONV_CUDA_ARCH"):
        archs = os.environ["FASTCONV_CUDA_ARCH"]
    elif os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    elif torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        if caps != {(9, 0)}:
            return []  # torch's own choice for the visible GPUs (capped at what it supports, +PTX)
        archs = "9.0"
    else:
        archs = DEFAULT_ARCHS  # no GPU to ask
    arch_list = [a for a in archs.replace(" ", ";").split(";") if a]
    if os.environ.get("FASTCONV_NO_SM90A", "0") in ("", "0"):
        # a bare 9.0 becomes 9.0a: sm_90 plus the arch-specific instructions (wgmma), for compute capability 9.0
        # exactly. "9.0+PTX" stays as it is: its compute_90 PTX is what newer GPUs compile at load time.
        arch_list = ["9.0a" if a == "9.0" else a for a in arch_list]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_list)
    return arch_list


def pip_cuda_include_flags() -> list:
    """Headers that torch's pip dependencies ship (cuBLAS, cuSPARSE, ...), which ATen's CUDA headers
    include but a bare toolkit may lack. Searched after every -I directory (-idirafter), so the toolkit's
    own headers always win and only the missing ones come from pip. Host compiler only: the .cu kernels
    include no torch header."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include")))
    return [flag for d in dirs for flag in ("-idirafter", d)]


def sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def make_extension():
    debug = os.environ.get("FASTCONV_DEBUG", "0") not in ("", "0")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]  # torch adds its own -std
    common = sources("*.cpp") + sources("cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        print("fastconv: building the CPU-only extension (no CUDA toolkit or CPU-only torch)")
        return CppExtension("fastconv._C", common, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})
    arch_list = set_cuda_archs()
    print(f"fastconv: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch: the visible GPUs)')}")
    macros = [("FASTCONV_WITH_CUDA", "1")]
    if any(a.split("+")[0] == "9.0a" for a in arch_list):
        # the wgmma kernels exist (implicit_gemm_wgmma_supported); a plain 9.0 next to it would let a Hopper GPU
        # load the sm_90 image, whose wgmma kernels are stubs
        if any(a.split("+")[0] == "9.0" for a in arch_list):
            raise SystemExit("fastconv: TORCH_CUDA_ARCH_LIST lists both 9.0 and 9.0a; keep one (9.0a has the wgmma kernels)")
        macros.append(("FASTCONV_WITH_SM90A", "1"))
    nvcc_flags = ["-O0", "-G", "-g"] if debug else ["-O3"]
    if not debug and os.environ.get("FASTCONV_LINEINFO", "1") not in ("", "0"):
        nvcc_flags.append("-lineinfo")  # Nsight Compute maps samples to source lines
    return CUDAExtension(
        "fastconv._C",
        common + sources("cuda/*.cpp") + sources("cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags + pip_cuda_include_flags(), "nvcc": nvcc_flags},
    )


class build_py_with_kernel_sources(build_py):
    """Also copies the kernel sources into the package as fastconv/_csrc, for fastconv.cupy's build-free path
    (fastconv/_nvrtc.py compiles them with NVRTC). Copied at build time only: csrc/ stays the one source."""

    def run(self):
        super().run()
        for pattern in ("*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"):
            for path in glob.glob(os.path.join(ROOT, "csrc", pattern)):
                rel = os.path.relpath(path, os.path.join(ROOT, "csrc"))
                target = os.path.join(self.build_lib, "fastconv", "_csrc", rel)
                self.mkpath(os.path.dirname(target))
                self.copy_file(path, target)


NO_EXTENSION = os.environ.get("FASTCONV_NO_EXTENSION", "0") not in ("", "0")

setup(
    name="fastconv",
    version="0.1.0",
    description="Hand-written CUDA kernels for convolutional networks in PyTorch: conv, fused conv-BN-ReLU, pooling, residual add",
    packages=["fastconv", "fastconv.models"],
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=[] if NO_EXTENSION else [make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": build_py_with_kernel_sources},
    zip_safe=False,
)
