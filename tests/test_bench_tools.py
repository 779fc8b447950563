"""The benchmark tooling that runs without a GPU: shape sets, peaks, the report script and the profiling
target (the ncu wrapper itself needs a GPU machine)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peaks  # noqa: E402
import shapes  # noqa: E402


def test_resnet50_layer_set_is_every_distinct_conv():
    layers = shapes.resnet50_layers()
    assert len(layers) == 23 and len({(l.C, l.H, l.K, l.R, l.stride) for l in layers}) == 23
    flops = sum(l.flops() for l in layers)
    assert flops > 0 and layers[0].output_hw() == (112, 112) and layers[-1].output_hw() == (7, 7)
    assert [l.output_hw()[0] for l in shapes.alexnet_layers()] == [55, 27, 13, 13, 13]


def test_peaks_known_cards_and_units():
    assert peaks.peak_rate("NVIDIA H100 80GB HBM3", "bfloat16", "GFLOP/s") == 989e3
    assert peaks.peak_rate("NVIDIA H100 PCIe", "float32", "GB/s") == 2.0e3
    assert peaks.peak_rate("NVIDIA H200", "float32", "GFLOP/s") == 67e3
    assert peaks.peak_rate("CPU (x86_64, 2 threads)", "float32", "GFLOP/s") is None


def test_report_writes_markdown_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for layer, scale in (("l1", 1.0), ("l2", 4.0)):
        for impl, ms in (("fastconv-im2col", 2.0), ("fastconv-direct", 4.0), ("torch", 1.0)):
            rows.append(dict(layer=layer, dtype="bfloat16", impl=impl, ms=ms * scale if impl != "torch" else ms,
                             rate=7e3 / ms, unit="GFLOP/s", peak_frac=0.1, bytes=5e7, work=7e9, **{"pass": "fprop"}))
    for impl, ms in (("fastconv", 0.5), ("torch", 1.0)):
        rows.append(dict(layer="add", dtype="float32", impl=impl, ms=ms, rate=100 / ms, unit="GB/s", peak_frac=None,
                         **{"pass": "fwd"}))
    data = {"device": "NVIDIA H100 80GB HBM3", "torch": "x", "cuda": "13.0", "rows": rows}
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(src), "--title", "t"],
                         capture_output=True, text=True, check=True)
    assert "report.png" in out.stdout
    md = (tmp_path / "report.md").read_text()
    assert "| l1 | fprop | bfloat16 | fastconv-im2col | 2.000 |" in md and "0.50x" in md and "2.00x" in md
    # per implementation, pass and dtype: im2col's ratios 0.5 and 0.125 have geometric mean 0.25
    assert "| fastconv-im2col | fprop | bfloat16 | 2 | 0.250x |" in md
    assert "| fastconv-direct | fprop | bfloat16 | 2 | 0.125x |" in md
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_names_the_fastest_implicit_gemm_tile_per_shape(tmp_path):
    """The tile rows (implicit_gemm/<n>) give, per shape, the fastest tile against the heuristic's, and the geometric
    mean the heuristic would reach by always picking it."""
    rows = []
    for layer, times in (("l1", {"0": 2.0, "3": 1.0, "7": 0.5}), ("l2", {"0": 4.0, "3": 8.0})):
        rows.append(dict(layer=layer, dtype="bfloat16", impl="torch", ms=1.0, rate=1.0, unit="GFLOP/s",
                         peak_frac=None, **{"pass": "fprop"}))
        rows.append(dict(layer=layer, dtype="bfloat16", impl="fastconv-implicit_gemm", ms=times["0"], rate=1.0,
                         unit="GFLOP/s", peak_frac=None, **{"pass": "fprop"}))
        for tile, ms in times.items():
            rows.append(dict(layer=layer, dtype="bfloat16", impl=f"fastconv-implicit_gemm/{tile}", ms=ms, rate=1.0,
                             unit="GFLOP/s", peak_frac=None, **{"pass": "fprop"}))
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(src), "--title", "t"], capture_output=True,
                   text=True, check=True)
    md = (tmp_path / "report.md").read_text()
    assert "| l1 | fprop | bfloat16 | 2.000 | 7 | 0.500 | 2.00x |" in md
    assert "| l2 | fprop | bfloat16 | 4.000 | 0 | 4.000 | 0.25x |" in md
    # the fastest tiles' ratios 2 and 0.25: geometric mean 0.707; the heuristic's 0.5 and 0.25: 0.354
    assert "| fastconv-implicit_gemm/fastest-tile | fprop | bfloat16 | 2 | 0.707x |" in md
    assert "| fastconv-implicit_gemm | fprop | bfloat16 | 2 | 0.354x |" in md


@pytest.mark.parametrize("args", [["--layer", "small_3x3", "--op", "bn_train", "--algo", "direct", "--dtype", "float32"],
                                  ["--layer", "small_1x1", "--op", "wgrad", "--layout", "nchw", "--dtype", "float32"],
                                  ["--layer", "small_k3s2", "--op", "max_pool2d", "--dtype", "float32"]])
def test_profile_target_runs_on_cpu(args):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_target.py"), "--device", "cpu", *args],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "profile_target: ran" in out.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_resilient_runner_survives_a_crashing_test(tmp_path, workers):
    """scripts/run_tests_resilient.py (the device check's test runner): a test that kills the process is
    reported as crashed and the tests after it still run, in one process (pytest runs again without the tests
    done) or in pytest-xdist workers (xdist replaces the dead one)."""
    if workers > 1:
        pytest.importorskip("xdist")
    (tmp_path / "test_sample.py").write_text(
        "import os, signal\n"
        "def test_a(): pass\n"
        "def test_b(): os.kill(os.getpid(), signal.SIGSEGV)\n"
        "def test_c(): assert False\n"
        "def test_d(): pass\n")
    runner = Path(__file__).resolve().parent.parent / "scripts" / "run_tests_resilient.py"
    result = subprocess.run([sys.executable, str(runner), "--workers", str(workers), "--", "-q", "-p", "no:cacheprovider",
                             "test_sample.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    runs = 2 if workers == 1 else 1
    assert f"2 passed, 1 failed, 0 skipped, 0 errors, 1 crashed the process, in {runs} pytest runs" in out, out
    assert "CRASHED test_sample.py::test_b" in out and "FAILED test_sample.py::test_c" in out, out
