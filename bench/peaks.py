"""Datasheet peaks of the cards the benchmarks may run on, for the "% of peak" columns and the roofline.

Dense rates: fp32 on the CUDA cores (fastconv's fp32 kernels; note that torch's fp32 convolutions use
TF32 tensor cores by default, torch.backends.cudnn.allow_tf32, so torch's fp32 rows can pass 100%), fp16
and bf16 on the tensor cores, and HBM bandwidth. Unknown cards (and CPUs) get no peak.
"""
from __future__ import annotations

import torch

# (substrings of torch.cuda.get_device_name(), all required) -> TFLOP/s per dtype and TB/s
_CARDS = [
    (("H200",), {"float32": 67.0, "float16": 989.0, "bfloat16": 989.0, "TB/s": 4.8}),
    (("H100", "PCIe"), {"float32": 51.0, "float16": 756.0, "bfloat16": 756.0, "TB/s": 2.0}),
    (("H100", "NVL"), {"float32": 60.0, "float16": 835.0, "bfloat16": 835.0, "TB/s": 3.9}),
    (("H100",), {"float32": 67.0, "float16": 989.0, "bfloat16": 989.0, "TB/s": 3.35}),  # SXM (80GB HBM3)
    (("A100",), {"float32": 19.5, "float16": 312.0, "bfloat16": 312.0, "TB/s": 2.0}),
]


def card_peaks(device_name: str) -> dict | None:
    for keys, peaks in _CARDS:
        if all(k in device_name for k in keys):
            return peaks
    return None


def peak_rate(device_name: str, dtype: torch.dtype | str, unit: str) -> float | None:
    """The card's peak in the row's unit (GFLOP/s or GB/s), or None."""
    peaks = card_peaks(device_name)
    if peaks is None:
        return None
    if unit == "GFLOP/s":
        tflops = peaks.get(str(dtype).replace("torch.", ""))
        return tflops * 1e3 if tflops else None
    if unit == "GB/s":
        return peaks["TB/s"] * 1e3
    return None
