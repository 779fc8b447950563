"""Loads the compiled extension, fastconv._C (the ops' schemas and CPU/CUDA kernels), with the way to build it
in the error when it is missing."""
try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "fastconv's compiled extension (fastconv._C) is missing or was built for another torch: build it with "
        "`pip install --no-build-isolation .` or `python setup.py build_ext --inplace` (scripts/test.sh does "
        "this). Without it only fastconv.cupy works (its build-free path compiles the kernels with NVRTC). "
        f"Original error: {e}"
    ) from e

__all__ = ["_C"]
