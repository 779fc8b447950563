"""Algorithm choice, kernel tile choice and workspace limits, in the spirit of ``torch.backends.cudnn``.

``algo="auto"`` picks per call:

1. with ``fastconv.backends.benchmark = True``, on CUDA and outside ``torch.compile`` tracing, the first
   call for each (shapes, stride, padding, dilation, groups, dtype, memory formats, GPU model) times the
   forward pass of every algorithm, and of every tile configuration of ``"implicit_gemm"``, and caches the
   fastest (like ``torch.backends.cudnn.benchmark``). The cache can be saved to and loaded from a JSON file
   (:func:`save_benchmark_cache`, :func:`load_benchmark_cache`), so a deployment tunes once;
2. otherwise the shape heuristic :func:`heuristic_algo`: on a CUDA GPU with tensor cores (sm_80+), float16
   and bfloat16 convolutions go to ``"implicit_gemm"`` (channels per group zero-padded to a multiple of 8,
   its tile chosen by the kernel from the problem size), except depthwise ones (one input channel per
   group), which go to ``"direct"``, whose per-channel loops beat a GEMM of width 1; everything else goes to
   ``"im2col"`` (1x1 stride-1 convolutions skip im2col there and are a plain GEMM), unless one image's
   im2col matrix would exceed the workspace limit, in which case ``"direct"``. (float32 goes to
   ``"implicit_gemm"`` only when asked for or when the benchmark picks it, which it considers only while
   torch.backends.cudnn.allow_tf32 allows TF32: otherwise that algorithm runs the exact direct kernels.)
   With ``wgmma_tiles`` on, fp16/bf16 on a compute capability 9.0 GPU takes the Hopper tiles 6 and 7 wherever
   their grid fills the GPU.

The im2col workspace limit defaults to 256 MiB; set it with :func:`set_workspace_limit` or the
environment variable ``FASTCONV_WORKSPACE_LIMIT_MB``. Results never depend on it.

The benchmark cache is guarded by a lock (several Python threads may call fastconv at once), and while a
CUDA graph is being captured nothing is timed: a configuration already in the cache uses its winner, any
other the heuristic, so capture sees no synchronisation and no data-dependent host decision.
"""
from __future__ import annotations

import functools
import json
import os
import threading

import torch

from . import _checks

#: Time every algorithm once per configuration on CUDA and cache the fastest (off by default).
benchmark: bool = False

#: Let ``auto`` use implicit_gemm's Hopper tiles 6 and 7 (wgmma, sm_90a; fp16/bf16 on a compute capability 9.0
#: GPU): the shape heuristic takes them where their grid fills the GPU, and the benchmark times them too. The
#: choice is the forward's; autograd passes it on to dgrad (wgmma too) and wgrad (their mma.sync twins). Off by default (environment: ``FASTCONV_WGMMA_TILES=1``): those kernels have not yet run on a GPU,
#: only in the CPU emulation (csrc/cuda/wgmma.cuh). Asked for explicitly (``tile=6``) they run regardless.
wgmma_tiles: bool = os.environ.get("FASTCONV_WGMMA_TILES", "0") not in ("", "0")

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


def _output_extent(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    """The output's P x Q (0 where the arguments leave no output; the ops themselves reject invalid ones)."""
    h, w = input.shape[2:]
    r, s = weight.shape[2:]
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return max(p, 0), max(q, 0)


def _im2col_bytes_per_image(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> int:
    c = input.shape[1]
    r, s = weight.shape[2:]
    p, q = _output_extent(input, weight, stride, padding, dilation)
    # Counted at the accumulation width, as the ops count it (csrc/conv2d_args.h): 4 bytes, 8 for float64.
    return p * q * c * r * s * max(input.element_size(), 4)


def algo_args(algo: str, tile: int = -1) -> tuple:
    """The algorithm's own op arguments after ``groups``: im2col's workspace limit, implicit_gemm's tile."""
    if algo == "im2col":
        return (workspace_limit(),)
    if algo == "implicit_gemm":
        return (tile,)
    return ()


def parse_choice(choice: str) -> tuple[str, int]:
    """``"implicit_gemm/1"`` -> ``("implicit_gemm", 1)``; a plain algorithm name -> ``(name, -1)``."""
    algo, _, tile = choice.partition("/")
    return algo, int(tile) if tile else -1


def candidate_choices(input: torch.Tensor) -> list[str]:
    """What the benchmark times: every algorithm, implicit_gemm once per tile configuration (on CUDA)."""
    from .ops import CONV_OPS

    choices = [name for name in CONV_OPS if name != "implicit_gemm"]
    if input.is_cuda and _tensor_cores(input.device) and (input.dtype != torch.float32 or _tf32_allowed()):
        choices += [f"implicit_gemm/{t}" for t in range(_checks.IMPLICIT_GEMM_MMA_SYNC_TILES)]
        # (elsewhere a wgmma tile runs as its mma.sync twin: timing it would time a duplicate)
        if wgmma_tiles and input.dtype != torch.float32 and _wgmma_available(input.device):
            choices += [f"implicit_gemm/{t}" for t in _checks.IMPLICIT_GEMM_WGMMA_TILES]
    return choices


@functools.lru_cache(maxsize=None)
def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def _tensor_cores(device: torch.device) -> bool:
    # (a fake CUDA tensor on a machine without a GPU has none to ask)
    return device.type == "cuda" and torch.cuda.is_available() and _device_capability(device)[0] >= 8


def _tf32_allowed() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


def heuristic_algo(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> str:
    """The documented shape rule (module docstring, step 2)."""
    if stride[0] <= 0 or stride[1] <= 0:
        return "direct"  # invalid: the op itself raises the error that names it
    if weight.shape[1] == 1 and groups > 1:
        return "direct"
    if input.is_cuda and input.dtype in (torch.float16, torch.bfloat16) and _tensor_cores(input.device):
        # channels per group not a multiple of 8 (the RGB stem) are zero-padded by the op: ResNet-50's conv1
        # there runs 1.3x cuDNN, where im2col's fprop ran 0.28x and its wgrad 0.001x (H200, batch 64)
        if wgmma_tiles and _wgmma_available(input.device):
            tile = _wgmma_tile(input, weight, stride, padding, dilation, groups)
            if tile is not None:
                return f"implicit_gemm/{tile}"
        return "implicit_gemm"
    pointwise = tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    if not pointwise and _im2col_bytes_per_image(input, weight, stride, padding, dilation) > _workspace_bytes:
        return "direct"
    return "im2col"


def _wgmma_available(device: torch.device) -> bool:
    """Does this build run the wgmma tiles on this GPU (sm_90a code, compute capability 9.0)?"""
    from ._extension import _C

    return bool(getattr(_C, "WITH_SM90A", 0)) and _device_capability(device) == (9, 0)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wgmma_tile(input, weight, stride, padding, dilation, groups: int):
    """With ``wgmma_tiles`` on a compute capability 9.0 GPU: the Hopper tile for this forward, by the kernels' own
    size rule (implicit_gemm_pick_tile) over the twins' block shapes: 6 (128 x 128) when more than 64 filters per
    group still give every SM a block, else 7 (128 x 64) when that does; None leaves smaller grids to the kernels'
    rule (the 64 x 64 tile, split-K)."""
    p, q = _output_extent(input, weight, stride, padding, dilation)
    k = weight.shape[0] // max(groups, 1)
    rows = -(-(input.shape[0] * p * q) // 128) * groups
    sms = _multiprocessors(input.device)
    if k > 64 and rows * -(-k // 128) >= sms:
        return 6
    return 7 if rows * -(-k // 64) >= sms else None


def _benchmarkable(input: torch.Tensor) -> bool:
    if not (benchmark and input.is_cuda) or torch.compiler.is_compiling():
        return False
    return not isinstance(input, torch._subclasses.FakeTensor)


def choose_algo(input, weight, bias, stride, padding, dilation, groups: int, candidates) -> str:
    """The choice ``algo="auto"`` runs for this call (an algorithm name, or ``"implicit_gemm/<tile>"``, see
    :func:`parse_choice`); `candidates()` maps choices to forward callables (built only when timing)."""
    if not _benchmarkable(input):
        return heuristic_algo(input, weight, stride, padding, dilation, groups)
    # JSON-friendly (save_benchmark_cache), and keyed on the GPU model rather than its index
    key = (tuple(input.shape), tuple(weight.shape), bias is not None, tuple(stride), tuple(padding), tuple(dilation),
           groups, str(input.dtype), input.is_contiguous(memory_format=torch.channels_last),
           weight.is_contiguous(memory_format=torch.channels_last), _device_name(input.device))
    with _benchmark_lock:  # one thread times a configuration; the others wait for its answer
        if key not in _benchmark_cache:
            if torch.cuda.is_current_stream_capturing():
                return heuristic_algo(input, weight, stride, padding, dilation, groups)  # no timing inside a capture
            _benchmark_cache[key] = _time_candidates(candidates())
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


# /2: implicit-GEMM tile 3 changed from 256 x 64 to 128 x 64 with 3 stages, so a /1 file's "implicit_gemm/3"
# names another kernel (timings saved against the old tile set are not loaded). /3: the swizzled layout gave
# tiles 3 and 5 a fourth stage.
_CACHE_FORMAT = "fastconv-benchmark-cache/3"


def save_benchmark_cache(path: str | os.PathLike) -> None:
    """Write the benchmark's choices to a JSON file (keys name the GPU model, so a file tuned on one card
    type is only used on that type)."""
    with _benchmark_lock:
        entries = [{"key": list(key), "choice": choice} for key, choice in _benchmark_cache.items()]
    with open(path, "w") as f:
        json.dump({"format": _CACHE_FORMAT, "entries": entries}, f, indent=1)


def _as_key(value):
    return tuple(_as_key(v) for v in value) if isinstance(value, list) else value


def load_benchmark_cache(path: str | os.PathLike) -> int:
    """Merge the choices saved by :func:`save_benchmark_cache` into the cache (with ``benchmark = True``,
    those configurations are then not timed again). Returns the number of entries loaded."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        raise ValueError(f"fastconv.backends.load_benchmark_cache: {path} is not a {_CACHE_FORMAT} file")
    from .ops import CONV_OPS

    loaded = {}
    for entry in data["entries"]:
        algo, tile = parse_choice(entry["choice"])
        if algo not in CONV_OPS or not -1 <= tile < _checks.IMPLICIT_GEMM_TILES:
            raise ValueError(f"fastconv.backends.load_benchmark_cache: unknown choice {entry['choice']!r} in {path}")
        loaded[_as_key(entry["key"])] = entry["choice"]
    with _benchmark_lock:
        _benchmark_cache.update(loaded)
    return len(loaded)
