"""Benchmark session: picks the device, collects each row and prints the fastconv-vs-torch table last.

FASTCONV_BENCH_OUT=DIR also writes the table as markdown and JSON there.
"""
import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = []


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.fixture
def record_row():
    return ROWS.append


def _table():
    by_key = {}
    for row in ROWS:
        by_key.setdefault((row["layer"], row["pass"], row["dtype"]), {})[row["impl"]] = row
    lines = [
        f"device: {device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}); median of timed calls",
        "",
        "| layer | pass | dtype | fastconv ms | torch ms | fastconv GFLOP/s | torch GFLOP/s | torch time / fastconv time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (layer, pas, dtype), impls in by_key.items():
        ours, theirs = impls.get("fastconv"), impls.get("torch")
        if not ours or not theirs:
            continue
        lines.append(
            f"| {layer} | {pas} | {dtype} | {ours['ms']:.3f} | {theirs['ms']:.3f} | {ours['gflops']:.1f} | "
            f"{theirs['gflops']:.1f} | {theirs['ms'] / ours['ms']:.2f} |"
        )
    return "\n".join(lines)


def pytest_configure(config):
    # pytest-benchmark's own table: just the columns that matter, so ours (printed last) stays in view.
    if hasattr(config.option, "benchmark_columns"):
        config.option.benchmark_columns = ["median", "iqr", "rounds"]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    table = _table()
    terminalreporter.write_sep("=", "fastconv vs native torch")
    terminalreporter.write_line(table)
    out = os.environ.get("FASTCONV_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench_conv2d.md").write_text(table + "\n")
        Path(out, "bench_conv2d.json").write_text(json.dumps({"device": device_name(), "torch": torch.__version__, "rows": ROWS}, indent=1))
