"""Timing that is honest about asynchronous GPUs.

GPU: warm-up calls first, then each timed call bracketed by CUDA events, with the L2 cache flushed
between calls (a 256 MiB write outside the timed region) so small layers are not timed from cache; the
median is reported. CPU: perf_counter around each call, median.
"""
import statistics
import time

import torch

_flush_buffer = None


def _flush_l2():
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device="cuda")
    _flush_buffer.zero_()


def median_ms(fn, device: str, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            _flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
