"""A small program that runs every fastconv CUDA kernel once per variant, for compute-sanitizer.

Covers direct conv fprop (8 and 1 output channels per thread, input staged in shared memory and not),
dgrad, wgrad (1x1 and 3x3 tap chunks) and the bias gradient; im2col, col2im and the GEMM (SIMT for fp32,
WMMA for fp16/bf16, the 1x1 path without im2col); max pooling forward and backward; residual add
forward and backward (flat vectorised with a scalar tail, and strided); the fused conv + bias + ReLU
epilogue of the conv algorithms; the implicit-GEMM kernels (every tile configuration, the fused
scale/shift/residual/ReLU epilogue, split-K wgrad and its reduce, TF32 for fp32, padded channel counts);
and the training-mode BatchNorm + ReLU kernels (statistics, normalise,
backward sums, input gradient; thin and wide channel counts), in fp32, fp16 and bf16, NCHW and channels_last, and checks each result against torch so that a silent wrong answer fails too. Exit
code 0 = all ran and matched.
"""
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's in-place build
import fastconv  # noqa: E402
from fastconv._checks import IMPLICIT_GEMM_MMA_SYNC_TILES, IMPLICIT_GEMM_TILES  # noqa: E402

CASES = [  # (input shape, weight shape, stride, padding, dilation, groups)
    ((2, 16, 13, 11), (24, 16, 3, 3), 1, 1, 1, 1),  # 8 channels per thread, staged input
    ((2, 6, 9, 9), (6, 1, 3, 3), 2, 1, 1, 6),  # depthwise: 1 channel per thread
    ((1, 8, 7, 6), (16, 8, 1, 1), 2, 0, 1, 1),  # 1x1, strided
    ((2, 8, 5, 6), (16, 4, 1, 1), 1, 0, 1, 2),  # 1x1 stride 1: im2col's GEMM reads the input in place
    ((1, 2, 130, 130), (8, 2, 3, 3), 1, 1, 60, 1),  # patch too large: input read from global
    ((1, 3, 23, 23), (4, 3, 11, 11), 4, 2, 1, 1),  # AlexNet-like
]


def rel_err(a, r) -> float:
    return ((a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()


def check_pool_and_residual(dtype, layout) -> int:
    failures = 0
    x = torch.randn(2, 6, 13, 11, device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
    y, idx = fastconv.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    ry, ridx = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (rgx,) = torch.autograd.grad(ry, x, torch.ones_like(ry))
    ok = torch.equal(y, ry) and torch.equal(idx, ridx) and rel_err(gx, rgx) < 1e-2
    for shapes, stride in ((((2, 8, 9, 7), (2, 8, 9, 7)), 1), (((1, 3, 5, 7), (1, 3, 5, 7)), 1),
                           (((2, 8, 5, 4), (2, 4, 9, 8)), 2)):
        r = torch.randn(shapes[0], device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
        s = torch.randn(shapes[1], device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
        out = fastconv.functional.residual_add(r, s, stride=stride, relu=True)
        ref = torch.relu(r + F.pad(s[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, r.shape[1] - s.shape[1])))
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(out, (r, s), g)
        ref_grads = torch.autograd.grad(ref, (r, s), g)
        ok = ok and torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    if not ok:
        failures += 1
        print(f"MISMATCH max_pool2d/residual_add {dtype} {layout}")
    return failures


def check_conv_bn_relu(dtype, layout, tol) -> int:
    failures = 0
    for shape in ((4, 5, 9, 7), (2, 48, 7, 7), (3, 3, 1, 1)):
        x = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).to(memory_format=layout).requires_grad_()
        w = torch.randn(shape[1], device="cuda").requires_grad_()
        b = torch.randn(shape[1], device="cuda").requires_grad_()
        y, _, _ = torch.ops.fastconv.batch_norm_relu(x, w, b, 1e-5, True)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        ref = torch.relu(F.batch_norm(x64, None, None, w64, b64, True, 0.0, 1e-5))
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(y, (x, w, b), g.to(dtype))
        ref_grads = torch.autograd.grad(ref, (x64, w64, b64), g)
        torch.cuda.synchronize()
        for name, a, r in [("y", y, ref)] + list(zip(("dx", "dgamma", "dbeta"), grads, ref_grads)):
            err = rel_err(a, r)
            if not err <= 10 * tol:
                failures += 1
                print(f"MISMATCH batch_norm_relu {dtype} {layout} {shape} {name}: relative error {err:.3g}")
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=dtype).to(memory_format=layout)
    w = torch.randn(12, 8, 3, 3, device="cuda", dtype=dtype)
    bias = torch.randn(12, device="cuda", dtype=dtype)
    ref = torch.relu(F.conv2d(x.double(), w.double(), bias.double(), padding=1))
    for algo, extra in (("direct", ()), ("im2col", (2**26,))):
        op = getattr(torch.ops.fastconv, f"conv2d_{algo}")
        y = op(x, w, bias, [1, 1], [1, 1], [1, 1], 1, *extra, True)
        torch.cuda.synchronize()
        if not rel_err(y, ref) <= tol or (y < 0).any():
            failures += 1
            print(f"MISMATCH conv2d_{algo} + relu epilogue {dtype} {layout}")
    return failures


ALGOS = ("direct", "im2col", "implicit_gemm")


def algo_tol(algo, dtype, tol) -> float:
    # implicit_gemm's fp32 runs on TF32 tensor cores (allowed below): a 10-bit mantissa
    return 5e-3 if algo == "implicit_gemm" and dtype == torch.float32 else tol


def check_implicit_gemm_tiles(dtype, layout, tol) -> int:
    """Each tile configuration once: fused fprop (scale, shift, residual, ReLU), dgrad, split-K wgrad; and the
    split-K fprop."""
    failures = 0
    ig = torch.ops.fastconv
    x = torch.randn(4, 32, 10, 10, device="cuda", dtype=dtype).to(memory_format=layout)
    w = torch.randn(40, 32, 3, 3, device="cuda", dtype=dtype)
    scale, shift = torch.rand(40, device="cuda", dtype=dtype) + 0.5, torch.randn(40, device="cuda", dtype=dtype)
    conv = ([2, 2], [1, 1], [1, 1], 1)
    ref = F.conv2d(x.double(), w.double(), None, *conv)
    res = torch.randn(ref.shape, device="cuda", dtype=dtype).to(memory_format=layout)
    ref_fused = torch.relu(ref * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1) + res.double())
    gy = torch.randn(ref.shape, device="cuda", dtype=dtype).to(memory_format=layout)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), gy.double(), stride=2, padding=1)
    ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), stride=2, padding=1)
    # (FASTCONV_SKIP_WGMMA=1: the device check's wgmma step failed, so the Hopper tiles are left out)
    skip_wgmma = os.environ.get("FASTCONV_SKIP_WGMMA", "0") not in ("", "0")
    for tile in range(IMPLICIT_GEMM_MMA_SYNC_TILES if skip_wgmma else IMPLICIT_GEMM_TILES):
        y = ig.conv2d_implicit_gemm_fused(x, w, scale, shift, res, *conv, tile, True)
        dx = ig.conv2d_implicit_gemm_dgrad(gy, w, list(x.shape), *conv, tile)
        dw = ig.conv2d_implicit_gemm_wgrad(gy, x, list(w.shape), *conv, tile)
        torch.cuda.synchronize()
        for name, a, r in (("fused y", y, ref_fused), ("dx", dx, ref_dx), ("dw", dw, ref_dw)):
            err = rel_err(a, r)
            if not err <= algo_tol("implicit_gemm", dtype, tol):
                failures += 1
                print(f"MISMATCH implicit_gemm tile {tile} {dtype} {layout} {name}: relative error {err:.3g}")
    # split-K fprop: one 7x7 image with a long reduction is a single tile, so the reduction is split
    xs = torch.randn(1, 256, 7, 7, device="cuda", dtype=dtype).to(memory_format=layout)
    ws = torch.randn(64, 256, 3, 3, device="cuda", dtype=dtype)
    sc, sh = torch.rand(64, device="cuda", dtype=dtype) + 0.5, torch.randn(64, device="cuda", dtype=dtype)
    ref = F.conv2d(xs.double(), ws.double(), None, 1, 1)
    rs = torch.randn(ref.shape, device="cuda", dtype=dtype).to(memory_format=layout)
    ref = torch.relu(ref * sc.double().view(1, -1, 1, 1) + sh.double().view(1, -1, 1, 1) + rs.double())
    y = ig.conv2d_implicit_gemm_fused(xs, ws, sc, sh, rs, [1, 1], [1, 1], [1, 1], 1, -1, True)
    torch.cuda.synchronize()
    err = rel_err(y, ref)
    if not err <= algo_tol("implicit_gemm", dtype, tol):
        failures += 1
        print(f"MISMATCH implicit_gemm split-K fprop {dtype} {layout}: relative error {err:.3g}")
    return failures


def main() -> int:
    assert fastconv.WITH_CUDA and torch.cuda.is_available(), "needs a GPU and the CUDA build"
    torch.backends.cudnn.allow_tf32 = True  # so that implicit_gemm's fp32 runs its TF32 kernels
    failures = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        for layout in (torch.contiguous_format, torch.channels_last):
            failures += check_pool_and_residual(dtype, layout)
            failures += check_conv_bn_relu(dtype, layout, tol)
            failures += check_implicit_gemm_tiles(dtype, layout, tol)
            for xs, ws, stride, padding, dilation, groups in CASES:
                x = torch.randn(xs, device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
                w = torch.randn(ws, device="cuda", dtype=dtype).requires_grad_()
                b = torch.randn(ws[0], device="cuda", dtype=dtype).requires_grad_()
                args = (stride, padding, dilation, groups)
                x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
                ref = F.conv2d(x64, w64, b64, *args)
                ref_grads = torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref))
                for algo in ALGOS:
                    y = fastconv.functional.conv2d(x, w, b, *args, algo=algo)
                    grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
                    torch.cuda.synchronize()
                    for name, a, r in [("y", y, ref)] + list(zip(("dx", "dw", "db"), grads, ref_grads)):
                        err = rel_err(a, r)
                        if not err <= algo_tol(algo, dtype, tol):
                            failures += 1
                            print(f"MISMATCH {algo} {dtype} {layout} {xs} {ws} {name}: relative error {err:.3g}")
    print(f"sanitizer smoke: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
