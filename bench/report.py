"""Turns a benchmark run's bench.json (written by `pytest bench/` with FASTCONV_BENCH_OUT=DIR) into a
markdown report and a PNG chart.

    python bench/report.py DIR/bench.json [--out DIR] [--title TEXT]

The chart has up to three panels: the speed ratio to native torch for every fastconv row (log scale; right
of 1 is faster than torch), a roofline of the FLOP-bound rows (achieved GFLOP/s against arithmetic
intensity, FLOPs per byte of the fewest bytes the op must move, under the card's compute and bandwidth
roofs when bench/peaks.py knows the card), and the memory-bound rows' GB/s against the card's bandwidth.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peaks import card_peaks  # noqa: E402


def pair_rows(rows):
    """{(layer, pass, dtype): {impl: row}}."""
    groups = defaultdict(dict)
    for row in rows:
        groups[(row["layer"], row["pass"], row["dtype"])][row["impl"]] = row
    return groups


# The per-tile rows of the implicit GEMM (bench/test_conv2d_bench.py::test_implicit_gemm_tiles): fastconv-implicit_gemm/<n>
TILE_ROW = re.compile(r"^fastconv-implicit_gemm/(\d+)$")


def best_tiles(groups):
    """{(layer, pass, dtype): (tile, row)}: the fastest implicit-GEMM tile of each shape whose tiles were timed."""
    best = {}
    for key, impls in groups.items():
        tiles = [(int(m.group(1)), row) for name, row in impls.items() if (m := TILE_ROW.match(name))]
        if tiles:
            best[key] = min(tiles, key=lambda tile_row: tile_row[1]["ms"])
    return best


def geometric_mean(values) -> float:
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))


def markdown(data, title: str) -> str:
    groups = pair_rows(data["rows"])
    lines = [f"# {title}", "", f"device: {data['device']}; torch {data.get('torch', '?')} (CUDA {data.get('cuda', '?')})",
             "", "| op / shape | pass | dtype | impl | ms | rate | % peak | torch ms | speed vs torch |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    ratios = defaultdict(list)  # (impl, pass, dtype) -> speed ratios against torch
    for (layer, pas, dtype), impls in groups.items():
        theirs = impls.get("torch")
        for name, row in impls.items():
            if name == "torch":
                continue
            pct = "-" if row.get("peak_frac") is None else f"{100 * row['peak_frac']:.1f}%"
            ratio = theirs["ms"] / row["ms"] if theirs else None
            if ratio:
                ratios[(name, pas, dtype)].append(ratio)
            lines.append(f"| {layer} | {pas} | {dtype} | {name} | {row['ms']:.3f} | {row['rate']:.1f} {row['unit']} | "
                         f"{pct} | {theirs['ms']:.3f} | {ratio:.2f}x |" if theirs else
                         f"| {layer} | {pas} | {dtype} | {name} | {row['ms']:.3f} | {row['rate']:.1f} {row['unit']} | "
                         f"{pct} | - | - |")
    best = best_tiles(groups)
    if best:
        # what the size heuristic (the fastconv-implicit_gemm row) would reach if it always picked the fastest tile
        lines += ["", "Fastest implicit-GEMM tile per shape (the tile rows), against the size heuristic's choice "
                      "(fastconv-implicit_gemm) and torch:", "",
                  "| op / shape | pass | dtype | heuristic ms | fastest tile | its ms | torch time / its time |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for (layer, pas, dtype), (tile, row) in best.items():
            impls = groups[(layer, pas, dtype)]
            heuristic, theirs = impls.get("fastconv-implicit_gemm"), impls.get("torch")
            ratio = theirs["ms"] / row["ms"] if theirs else None
            if ratio:
                ratios[("fastconv-implicit_gemm/fastest-tile", pas, dtype)].append(ratio)
            lines.append(f"| {layer} | {pas} | {dtype} | " + (f"{heuristic['ms']:.3f}" if heuristic else "-") +
                         f" | {tile} | {row['ms']:.3f} | " + (f"{ratio:.2f}x |" if ratio else "- |"))
    if ratios:
        # the figure the targets are stated in: per implementation, pass and dtype, over the shapes measured
        lines += ["", "Geometric mean of the speed ratios (torch time / fastconv time) per implementation, pass and "
                      "dtype, over the shapes measured:", "", "| impl | pass | dtype | shapes | geometric mean |",
                  "|---|---|---|---:|---:|"]
        for (name, pas, dtype), values in sorted(ratios.items()):
            lines.append(f"| {name} | {pas} | {dtype} | {len(values)} | {geometric_mean(values):.3f}x |")
    return "\n".join(lines) + "\n"


def chart(data, path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; wrote the markdown only", file=sys.stderr)
        return False
    groups = pair_rows(data["rows"])
    bars = []  # (label, ratio, impl)
    for (layer, pas, dtype), impls in groups.items():
        theirs = impls.get("torch")
        for name, row in impls.items():
            if name != "torch" and theirs:
                bars.append((f"{layer} {pas} {dtype} [{name.removeprefix('fastconv-')}]", theirs["ms"] / row["ms"], name))
    flop_rows = [r for r in data["rows"] if r["unit"] == "GFLOP/s" and r.get("bytes")]
    mem_rows = [r for r in data["rows"] if r["unit"] == "GB/s"]
    panels = [p for p, present in (("ratio", bars), ("roofline", flop_rows), ("memory", mem_rows)) if present]
    if not panels:
        return False
    heights = {"ratio": max(3.0, 0.18 * len(bars)), "roofline": 5.0, "memory": max(3.0, 0.3 * len(mem_rows))}
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights[p] for p in panels) + 1),
                             gridspec_kw={"height_ratios": [heights[p] for p in panels]})
    axes = [axes] if len(panels) == 1 else list(axes)
    impls = sorted({r["impl"] for r in data["rows"]})
    colors = {impl: plt.cm.tab10(i % 10) for i, impl in enumerate(impls)}
    peaks = card_peaks(data["device"])
    for ax, panel in zip(axes, panels):
        if panel == "ratio":
            ax.barh(range(len(bars)), [b[1] for b in bars], color=[colors[b[2]] for b in bars])
            ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.axvline(1.0, color="black", lw=1)
            ax.set_xlabel("speed vs native torch (torch time / fastconv time; > 1 is faster)")
            ax.set_title("fastconv vs native torch, per layer and pass")
        elif panel == "roofline":
            for impl in impls:
                pts = [r for r in flop_rows if r["impl"] == impl]
                if pts:
                    ax.scatter([r["work"] / r["bytes"] for r in pts], [r["rate"] for r in pts], s=14,
                               color=colors[impl], label=impl, alpha=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            if peaks:
                xs = [min(r["work"] / r["bytes"] for r in flop_rows) / 2, max(r["work"] / r["bytes"] for r in flop_rows) * 2]
                bw = peaks["TB/s"] * 1e3  # GB/s: GFLOP/s = intensity * GB/s
                for dt in sorted({r["dtype"] for r in flop_rows}):
                    if dt in peaks:
                        roof = peaks[dt] * 1e3
                        ax.plot(xs, [min(roof, x * bw) for x in xs], lw=1, ls="--", label=f"{dt} roof")
            ax.set_xlabel("arithmetic intensity (FLOP per byte moved at least)")
            ax.set_ylabel("GFLOP/s")
            ax.set_title("roofline" + ("" if peaks else " (card peaks unknown: no roofs drawn)"))
            ax.legend(fontsize=7)
        else:
            labels = [f"{r['layer']} {r['pass']} {r['dtype']} [{r['impl']}]" for r in mem_rows]
            ax.barh(range(len(mem_rows)), [r["rate"] for r in mem_rows], color=[colors[r["impl"]] for r in mem_rows])
            ax.set_yticks(range(len(mem_rows)), labels, fontsize=6)
            ax.invert_yaxis()
            if peaks:
                ax.axvline(peaks["TB/s"] * 1e3, color="black", lw=1, ls="--", label="HBM peak")
                ax.legend(fontsize=7)
            ax.set_xlabel("GB/s (fewest bytes the op must move / time)")
            ax.set_title("memory-bound ops")
    fig.suptitle(f"{title}\n{data['device']}, torch {data.get('torch', '?')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the JSON's folder)")
    parser.add_argument("--title", default="fastconv benchmark")
    args = parser.parse_args(argv)
    data = json.loads(args.bench_json.read_text())
    out = args.out or args.bench_json.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(data, args.title))
    wrote_png = chart(data, out / "report.png", args.title)
    print(f"wrote {out / 'report.md'}" + (f" and {out / 'report.png'}" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
