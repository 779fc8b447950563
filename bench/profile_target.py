"""Runs one fastconv op on one benchmark shape, for a profiler: a few warm-up calls, then `--iters` calls
inside an NVTX range named "profile" (scripts/profile.sh points Nsight Compute at that range).

    python bench/profile_target.py --layer resnet50_l1_3x3 --op fprop --algo im2col --dtype bfloat16 --layout channels_last

Ops: fprop, dgrad, wgrad (conv layers of bench/shapes.py, any algo), bn_train (the fused conv-BN-ReLU
training forward and backward: conv, statistics, normalise, backward kernels), bn_eval (folded conv + bias
+ ReLU), max_pool2d and residual_add (their shapes in bench/shapes.py, forward and backward).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's in-place build
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastconv  # noqa: E402
import shapes  # noqa: E402
from conv_passes import fastconv_pass  # noqa: E402
from fastconv._checks import IMPLICIT_GEMM_TILES  # noqa: E402
from fastconv.ops import CONV_OPS  # noqa: E402

CONV_LAYERS = {layer.name: layer for layer in shapes.resnet50_layers() + shapes.alexnet_layers()
               + shapes.GPU_SLICE + shapes.CPU_LAYERS}
POOLS = {p.name: p for p in shapes.GPU_POOLS + shapes.CPU_POOLS}
RESIDUALS = {r.name: r for r in shapes.GPU_RESIDUALS + shapes.CPU_RESIDUALS}


def build(args, device):
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    if args.op == "max_pool2d":
        p = POOLS[args.layer]
        x = torch.randn(p.N, p.C, p.H, p.W, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()

        def run():
            y = fastconv.functional.max_pool2d(x, p.kernel, p.stride, p.padding, ceil_mode=p.ceil_mode)
            torch.autograd.grad(y, x, torch.ones_like(y))
        return run
    if args.op == "residual_add":
        r = RESIDUALS[args.layer]
        a = torch.randn(r.N, r.C, r.P, r.Q, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
        s = torch.randn(r.N, r.J, r.H, r.W, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()

        def run():
            y = fastconv.functional.residual_add(a, s, stride=r.stride, relu=True)
            torch.autograd.grad(y, (a, s), torch.ones_like(y))
        return run
    layer = CONV_LAYERS[args.layer]
    x = torch.randn(layer.N, layer.C, layer.H, layer.W, device=device, dtype=dtype).to(memory_format=fmt)
    if args.op in ("bn_train", "bn_eval"):
        module = fastconv.ConvBNReLU(layer.C, layer.K, layer.R, layer.stride, layer.padding, groups=layer.groups,
                                     algo=args.algo).to(device=device, dtype=dtype, memory_format=fmt)
        if args.op == "bn_eval":
            module.eval()

            def run():
                with torch.no_grad():
                    module(x)
            return run
        x.requires_grad_()

        def run():
            y = module(x)
            torch.autograd.grad(y, [x] + list(module.parameters()), torch.ones_like(y))
        return run
    w = torch.randn(layer.K, layer.C // layer.groups, layer.R, layer.S, device=device, dtype=dtype).to(memory_format=fmt)
    p, q = layer.output_hw()
    gy = torch.randn(layer.N, layer.K, p, q, device=device, dtype=dtype).to(memory_format=fmt)
    return fastconv_pass(args.algo, args.op, x, w, gy, layer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="resnet50_l1_3x3", help="a name from bench/shapes.py")
    parser.add_argument("--op", default="fprop",
                        choices=["fprop", "dgrad", "wgrad", "bn_train", "bn_eval", "max_pool2d", "residual_add"])
    parser.add_argument("--algo", default="im2col",
                        choices=list(CONV_OPS) + [f"implicit_gemm/{t}" for t in range(IMPLICIT_GEMM_TILES)],
                        help="an algorithm, or implicit_gemm/<tile> for one tile configuration (conv ops only)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layout", default="channels_last", choices=["nchw", "channels_last"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    run = build(args, args.device)
    for _ in range(args.warmup):
        run()
    if args.device == "cuda":
        torch.cuda.synchronize()
    with torch.cuda.nvtx.range("profile") if args.device == "cuda" else _null():
        for _ in range(args.iters):
            run()
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"profile_target: ran {args.op} {args.layer} {args.algo} {args.dtype} {args.layout} x{args.iters} on {args.device}")
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
