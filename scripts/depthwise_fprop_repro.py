"""Reproducer, for a device session: the implicit-GEMM fprop of a depthwise conv with a 2x1 filter was wrong on the
H100 (2026-11-28, relative error ~0.8 against the CPU twin) while 1x1, 1x2 and 2x2 were right, and the CPU kernel
emulation (tests/test_kernel_emulation.py) runs the same configuration bit-exactly. Prints the GPU's error
against the CPU twin per filter shape and dtype."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastconv  # noqa: E402,F401

IG = torch.ops.fastconv
torch.backends.cudnn.allow_tf32 = True  # fp32 runs the implicit GEMM as TF32
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for r, s in ((2, 1), (1, 2), (2, 2), (3, 1), (1, 3), (1, 1), (3, 3)):
        for channels, groups in ((6, 6), (8, 8), (16, 8)):
            x = torch.randn(2, channels, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
            w = torch.randn(channels, channels // groups, r, s, dtype=torch.float64)
            cpu = IG.conv2d_implicit_gemm(x, w, None, [1, 1], [0, 0], [1, 1], groups, -1, False)
            gpu = IG.conv2d_implicit_gemm(x.cuda().to(dtype), w.cuda().to(dtype), None, [1, 1], [0, 0], [1, 1], groups,
                                          -1, False).double().cpu()
            err = ((gpu - cpu).norm() / cpu.norm()).item()
            print(f"{str(dtype):15} {r}x{s} C={channels:2} groups={groups}: rel err {err:.3g}{'  WRONG' if err > 1e-2 else ''}")
