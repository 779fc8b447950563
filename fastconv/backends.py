"""Algorithm choice and workspace limits, in the spirit of ``torch.backends.cudnn``.

``algo="auto"`` picks per call:

1. with ``fastconv.backends.benchmark = True``, on CUDA and outside ``torch.compile`` tracing, the first
   call for each (shapes, stride, padding, dilation, groups, dtype, memory formats, device) times the
   forward pass of every algorithm and caches the fastest (like ``torch.backends.cudnn.benchmark``);
2. otherwise the shape heuristic :func:`heuristic_algo`: depthwise convolutions (one input channel per
   group) go to ``"direct"``, whose per-channel loops beat a GEMM of width 1; everything else goes to
   ``"im2col"`` (1x1 stride-1 convolutions skip im2col there and are a plain GEMM), unless one image's
   im2col matrix would exceed the workspace limit, in which case ``"direct"``.

The im2col workspace limit defaults to 256 MiB; set it with :func:`set_workspace_limit` or the
environment variable ``FASTCONV_WORKSPACE_LIMIT_MB``. Results never depend on it.

The benchmark cache is guarded by a lock (several Python threads may call fastconv at once), and while a
CUDA graph is being captured nothing is timed: a configuration already in the cache uses its winner, any
other the heuristic, so capture sees no synchronisation and no data-dependent host decision.
"""
from __future__ import annotations

import os
import threading

import torch

#: Time every algorithm once per configuration on CUDA and cache the fastest (off by default).
benchmark: bool = False

_DEFAULT_WORKSPACE_BYTES = 256 * 2**20
_workspace_bytes = int(float(os.environ.get("FASTCONV_WORKSPACE_LIMIT_MB", 256)) * 2**20) or _DEFAULT_WORKSPACE_BYTES
_benchmark_cache: dict[tuple, str] = {}
_benchmark_lock = threading.Lock()


def workspace_limit() -> int:
    """The largest im2col workspace, in bytes, one call may allocate."""
    return _workspace_bytes


def set_workspace_limit(num_bytes: int) -> None:
    """Set the im2col workspace limit in bytes (positive). The batch is chunked to stay under it."""
    global _workspace_bytes
    if not isinstance(num_bytes, int) or num_bytes <= 0:
        raise ValueError(f"fastconv.backends.set_workspace_limit: expected a positive int, got {num_bytes!r}")
    _workspace_bytes = num_bytes


def clear_benchmark_cache() -> None:
    with _benchmark_lock:
        _benchmark_cache.clear()


def _im2col_bytes_per_image(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> int:
    _, c, h, w = input.shape
    r, s = weight.shape[2:]
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    # Counted at the accumulation width, as the ops count it (csrc/conv2d_args.h): 4 bytes, 8 for float64.
    return max(p, 0) * max(q, 0) * c * r * s * max(input.element_size(), 4)


def heuristic_algo(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> str:
    """The documented shape rule (module docstring, step 2)."""
    if any(v <= 0 for v in stride):
        return "direct"  # invalid: the op itself raises the error that names it
    if weight.shape[1] == 1 and groups > 1:
        return "direct"
    pointwise = tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    if not pointwise and _im2col_bytes_per_image(input, weight, stride, padding, dilation) > _workspace_bytes:
        return "direct"
    return "im2col"


def _benchmarkable(input: torch.Tensor) -> bool:
    if not (benchmark and input.is_cuda) or torch.compiler.is_compiling():
        return False
    return not isinstance(input, torch._subclasses.FakeTensor)


def choose_algo(input, weight, bias, stride, padding, dilation, groups: int, candidates: dict) -> str:
    """The algorithm ``algo="auto"`` runs for this call; `candidates` maps names to forward callables."""
    if not _benchmarkable(input):
        return heuristic_algo(input, weight, stride, padding, dilation, groups)
    key = (tuple(input.shape), tuple(weight.shape), bias is not None, tuple(stride), tuple(padding), tuple(dilation),
           groups, input.dtype, input.is_contiguous(memory_format=torch.channels_last),
           weight.is_contiguous(memory_format=torch.channels_last), input.device)
    with _benchmark_lock:  # one thread times a configuration; the others wait for its answer
        if key not in _benchmark_cache:
            if torch.cuda.is_current_stream_capturing():
                return heuristic_algo(input, weight, stride, padding, dilation, groups)  # no timing inside a capture
            _benchmark_cache[key] = _time_candidates(candidates)
        return _benchmark_cache[key]


def _time_candidates(candidates: dict) -> str:
    times = {}
    with torch.no_grad():
        for name, run in candidates.items():
            try:
                run()  # warm-up (and: does it run at all, e.g. within the workspace limit)
            except (RuntimeError, ValueError):
                continue
            elapsed = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                elapsed.append(start.elapsed_time(end))
            times[name] = sorted(elapsed)[1]
    return min(times, key=times.get)
