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

from peaks import peak_rate  # noqa: E402
from timing import median_ms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = []


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.fixture
def measure(benchmark):
    """measure(step, name, pas, dtype, impl, work, unit, bytes_moved=None): times `step` (bench/timing.py),
    records a table row with the rate work / time (work in FLOPs for "GFLOP/s", bytes for "GB/s", images * 1e9
    for "images/s"), its fraction of the card's peak (bench/peaks.py) and, for FLOP rows, the fewest bytes
    the op must move (the roofline's arithmetic intensity), and runs pytest-benchmark's own synchronised
    timing of the same step for its report."""

    def run(step, name, pas, dtype, impl, work, unit, bytes_moved=None):
        ms = median_ms(step, DEVICE, warmup=2, reps=10 if DEVICE == "cuda" else 5)
        # work is FLOPs for unit GFLOP/s, bytes for GB/s: work / (ms * 1e-3 s) / 1e9
        row = dict(layer=name, dtype=str(dtype).replace("torch.", ""), impl=impl, ms=ms, rate=work / ms / 1e6, unit=unit)
        row["pass"] = pas
        peak = peak_rate(device_name(), dtype, unit) if DEVICE == "cuda" else None
        row["peak_frac"] = row["rate"] / peak if peak else None
        if bytes_moved is not None:
            row["bytes"] = bytes_moved
            row["work"] = work
        benchmark.group = f"{name}-{pas}-{row['dtype']}"
        benchmark.extra_info.update(row, device=device_name(), torch=torch.__version__, cuda=torch.version.cuda)

        def synced():
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=3 if DEVICE == "cuda" else 2, warmup_rounds=0)
        ROWS.append(row)
        _write_results()  # after every row: a run cut short (a device check's time limit) keeps what it measured

    return run


def _table():
    """One line per fastconv implementation and case, beside torch's time for the same case."""
    by_key = {}
    for row in ROWS:
        by_key.setdefault((row["layer"], row["pass"], row["dtype"]), {})[row["impl"]] = row
    lines = [
        f"device: {device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}); median of timed calls",
        "",
        "| op / shape | pass | dtype | impl | ms | rate | % peak | torch ms | torch rate | torch % peak | torch time / impl time |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(row):
        return "-" if row.get("peak_frac") is None else f"{100 * row['peak_frac']:.1f}%"

    for (layer, pas, dtype), impls in by_key.items():
        theirs = impls.get("torch")
        if not theirs:
            continue
        for name, ours in impls.items():
            if name == "torch":
                continue
            lines.append(
                f"| {layer} | {pas} | {dtype} | {name} | {ours['ms']:.3f} | {ours['rate']:.1f} {ours['unit']} | "
                f"{pct(ours)} | {theirs['ms']:.3f} | {theirs['rate']:.1f} {theirs['unit']} | {pct(theirs)} | "
                f"{theirs['ms'] / ours['ms']:.2f} |"
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
    terminalreporter.write_sep("=", "fastconv vs native torch")
    terminalreporter.write_line(_table())
    _write_results()


def _write_results():
    out = os.environ.get("FASTCONV_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench.md").write_text(_table() + "\n")
        meta = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
        Path(out, "bench.json").write_text(json.dumps({**meta, "rows": ROWS}, indent=1))
