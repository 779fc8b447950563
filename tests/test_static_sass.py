"""Static checks of the compiled CUDA kernels that need no GPU: the build's resource report shows no
register spills (no local memory) in any fastconv kernel, and the tensor-core GEMM's SASS holds HMMA
instructions. cuobjdump ships with triton in the torch environment (triton/backends/nvidia/bin)."""
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fastconv
from fastconv._checks import IMPLICIT_GEMM_MMA_SYNC_TILES, IMPLICIT_GEMM_WGMMA_TILES


def cuobjdump():
    try:
        import triton
        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


pytestmark = [
    pytest.mark.skipif(not fastconv.WITH_CUDA, reason="CPU-only build: no CUDA kernels to inspect"),
    pytest.mark.skipif(cuobjdump() is None, reason="no cuobjdump (it ships with triton)"),
]


def library() -> str:
    return str(fastconv._C.__file__)


@functools.lru_cache(maxsize=None)  # each listing of the whole library takes seconds, and tests share them
def dump(*args) -> str:
    return subprocess.run([cuobjdump(), *args, library()], capture_output=True, text=True, check=True).stdout


# mma.sync: 3 passes x 3 dtypes x every mma.sync tile x 2 archs, plus fprop's split-K variant (one tile) per dtype
# and arch
IMPLICIT_GEMM_KERNELS = 3 * 3 * IMPLICIT_GEMM_MMA_SYNC_TILES * 2 + 3 * 2


@functools.lru_cache(maxsize=None)
def hopper_arch() -> str:
    """The build's Hopper code: sm_90a (setup.py's default, with the wgmma kernels), sm_90, or none ("")."""
    elf = dump("-lelf")
    return "sm_90a" if "sm_90a" in elf else "sm_90" if "sm_90" in elf else ""


def test_no_kernel_spills_registers_to_local_memory():
    """No local memory in any kernel, and no local stores (STL: what a register spill compiles to) in the
    implicit-GEMM kernels: the resource report's LOCAL counts only local arrays; spills show there only as a
    stack frame."""
    functions = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump("-res-usage"))
    ours = [f for f in functions if "fastconv" in f[0]]
    assert len(ours) > 50, "expected every fastconv kernel in the resource report"
    spilling = [(name, local) for name, _reg, _stack, _shared, local in ours if int(local) != 0]
    assert not spilling, spilling
    assert all(int(reg) <= 255 for _, reg, *_ in ours)
    # The implicit-GEMM kernels hold no array in local memory, so any local store there is a spill. (Other kernels
    # keep small per-thread arrays on the stack: the BatchNorm partials, direct dgrad's taps.)
    blocks = [b for b in re.split(r"\n\s*Function : ", dump("-sass"))[1:]
              if re.match(r"\S*\d+conv2d_implicit_gemm_(fprop|dgrad|wgrad)_kernelI", b)]
    assert len(blocks) == IMPLICIT_GEMM_KERNELS, len(blocks)
    stores = [b.split("\n", 1)[0] for b in blocks if re.search(r"\bSTL(\.\S+)?\s", b)]
    assert not stores, f"local stores (register spills) in {stores}"


def test_tensor_core_gemm_uses_hmma_for_every_dtype_and_arch():
    sass = dump("-sass")
    blocks = re.split(r"\n\s*Function : ", sass)
    wmma = [b for b in blocks if "gemm_wmma_kernel" in b.split("\n", 1)[0]]
    assert wmma, "no gemm_wmma_kernel in the SASS"
    assert all(re.search(r"\bHMMA\.", b) for b in wmma), "a WMMA GEMM variant has no HMMA instruction"
    simt = [b for b in blocks if "gemm_simt_kernel" in b.split("\n", 1)[0]]
    assert simt and all("FFMA" in b for b in simt)


def test_implicit_gemm_main_loop_uses_tensor_cores_ldmatrix_and_cp_async():
    """Every implicit-GEMM kernel (3 passes x 3 dtypes x every tile x 2 archs, and fprop's split-K variant)
    issues HMMA (mma.sync; TF32 for fp32) fed by LDGSTS (cp.async: .ca for the gathered activation, .cg for the
    other operand); the fp16/bf16 ones load fragments with LDSM (ldmatrix)."""
    blocks = re.split(r"\n\s*Function : ", dump("-sass"))
    ours = [b for b in blocks if re.match(r"\S*\d+conv2d_implicit_gemm_(fprop|dgrad|wgrad)_kernelI", b)]
    assert len(ours) == IMPLICIT_GEMM_KERNELS, len(ours)
    for b in ours:
        name = b.split("\n", 1)[0]
        assert re.search(r"\bHMMA\.", b), f"{name}: no HMMA"
        assert "LDGSTS" in b, f"{name}: no cp.async (LDGSTS)"
        # the gathered activations are cached in L1 too (cp.async.ca: the taps re-read pixels within a block),
        # the operand a block reads once only in L2 (cp.async.cg: LDGSTS.E.BYPASS)
        assert re.search(r"LDGSTS(?!\.E\.BYPASS)", b), f"{name}: no L1-cached cp.async (.ca) for the gather"
        assert "LDGSTS.E.BYPASS" in b, f"{name}: no L2-only cp.async (.cg)"
        is_fp32 = re.search(r"_kernelIfN", name) is not None  # first template argument `float`
        if is_fp32:
            assert re.search(r"HMMA\.\S*TF32", b), f"{name}: fp32 should run as TF32"
        else:
            assert "LDSM" in b, f"{name}: no ldmatrix (LDSM)"


def main_loop(function_sass: str) -> list:
    """The instructions of the loop that holds a kernel's HMMAs (from its first instruction to the backward branch
    that closes it)."""
    lines = [line for line in function_sass.split("\n") if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]{4,})\*/", line).group(1), 16) for line in lines]
    hmma = [i for i, line in enumerate(lines) if "HMMA" in line]
    for i in range(hmma[-1], len(lines)):
        target = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", lines[i])
        if target and int(target.group(1), 16) <= addr[hmma[0]]:
            return lines[addr.index(int(target.group(1), 16)):i + 1]
    raise AssertionError("no loop closes around the HMMAs")


def test_implicit_gemm_fprop_issues_mmas_before_the_next_stages_copies_and_fits_its_occupancy():
    """The properties version 3 of the main loop was built for (csrc/cuda/NOTES.md), on sm_90's fp16/bf16 fprop:
    between the loop's barrier and its first cp.async come MMAs (the tensor pipe works through them while the
    warp does the loaders' address math; the loop may close between the two), and every tile's registers let the
    blocks per SM it was built for (MIN_BLOCKS, its shared memory's count) fit."""
    if not hopper_arch():
        pytest.skip("the build has no sm_90 code (TORCH_CUDA_ARCH_LIST)")
    blocks = re.split(r"\n\s*Function : ", dump("-sass", "-arch", hopper_arch()))
    fprop = [b for b in blocks if re.match(r"\S*\d+conv2d_implicit_gemm_fprop_kernelI(6__half|13__nv_bfloat16)", b)]
    assert len(fprop) == 2 * (IMPLICIT_GEMM_MMA_SYNC_TILES + 1), len(fprop)  # + fprop's split-K variant
    for b in fprop:
        loop = main_loop(b)
        barrier = next(i for i, line in enumerate(loop) if "BAR.SYNC" in line)
        cycle = loop[barrier:] + loop[:barrier]  # the loop from its barrier on, round to the top
        first_copy = next(i for i, line in enumerate(cycle) if "LDGSTS" in line)
        assert any("HMMA" in line for line in cycle[:first_copy]), \
            f"{b.split(chr(10), 1)[0]}: no MMA between the loop's barrier and its copies"
    # every fp16/bf16 fprop tile fits the blocks per SM it is built for (its MIN_BLOCKS, 6th template argument)
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", dump("-res-usage", "-arch", hopper_arch()))
    tiles = 0
    for name, reg in usage:
        if not re.search(r"conv2d_implicit_gemm_fprop_kernelI(6__half|13__nv_bfloat16)", name):
            continue
        _bm, _bn, wm, wn, _stages, min_blocks, _buffers = map(int, re.search(
            r"ImplicitGemmTileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", name).groups())
        threads = 32 * wm * wn
        assert int(reg) * threads * min_blocks <= 65536, (name, reg, min_blocks)
        tiles += 1
    assert tiles == 2 * (IMPLICIT_GEMM_MMA_SYNC_TILES + 1)


def test_wgmma_main_loop_keeps_one_group_of_warpgroup_mmas_in_flight():
    """The Hopper tiles (csrc/cuda/wgmma.cuh), in the sm_90a code: each fp16/bf16 fprop and dgrad kernel's main loop
    issues HGMMA (wgmma, operands by descriptor) between a WARPGROUP.ARRIVE (wgmma.fence) and a WARPGROUP.DEPBAR
    that leaves one group in flight (wait_group 1), fences the copies to the async proxy (FENCE.VIEW.ASYNC.S)
    before its barrier, loads no fragments (no LDSM) and issues no mma.sync (no HMMA); ptxas kept the MMAs
    asynchronous (it would serialise them, waiting after each, if other instructions touched the accumulators in
    flight), and the registers fit the blocks per SM the tile is built for. Elsewhere (sm_80) the kernels are
    stubs."""
    # the extension says so too (fastconv._C.WITH_SM90A: the host side launches the wgmma kernels)
    assert bool(fastconv._C.WITH_SM90A) == (hopper_arch() == "sm_90a")
    if hopper_arch() != "sm_90a":
        pytest.skip("the build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a, or FASTCONV_NO_SM90A=1)")
    blocks = re.split(r"\n\s*Function : ", dump("-sass", "-arch", "sm_90a"))
    wgmma = [b for b in blocks if re.match(r"\S*\d+conv2d_implicit_gemm_(fprop|dgrad)_wgmma_kernelI", b)]
    assert len(wgmma) == 2 * 2 * len(IMPLICIT_GEMM_WGMMA_TILES), len(wgmma)  # fprop, dgrad x fp16, bf16
    for b in wgmma:
        name = b.split("\n", 1)[0]
        lines = [line for line in b.split("\n") if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
        addr = [int(re.match(r"\s*/\*([0-9a-f]{4,})\*/", line).group(1), 16) for line in lines]
        mmas = [i for i, line in enumerate(lines) if "HGMMA" in line]
        assert mmas, f"{name}: no HGMMA"
        # the loop: from the backward branch's target to the branch, around the HGMMAs
        loop = None
        for i in range(mmas[-1], len(lines)):
            target = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", lines[i])
            if target and int(target.group(1), 16) <= addr[mmas[0]]:
                loop = lines[addr.index(int(target.group(1), 16)):i + 1]
                break
        assert loop is not None, f"{name}: no loop closes around the HGMMAs"
        text = "\n".join(loop)
        assert "WARPGROUP.ARRIVE" in text and "LDGSTS" in text and "BAR.SYNC" in text, name
        assert re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", text), f"{name}: the loop does not keep one group in flight"
        fence = text.index("FENCE.VIEW.ASYNC.S")
        assert fence < text.index("BAR.SYNC"), f"{name}: no proxy fence before the barrier"
        # each k step one HGMMA; the last of a tile closes the group (gsb0); nothing waits between them
        tile_mmas = [line for line in loop if "HGMMA" in line]
        assert len(tile_mmas) == 2 and "gsb0" in tile_mmas[-1] and "gsb0" not in tile_mmas[0], (name, tile_mmas)
        # the shape and types the tile and element type call for (what the emulation takes on trust from the PTX
        # text): 64 x BN x 16 with fp32 accumulators, bf16 operands exactly in the bf16 kernels (fp16 has no suffix)
        bn = int(re.search(r"WgmmaTileILi\d+ELi(\d+)E", name).group(1))
        bf16 = "13__nv_bfloat16" in name
        shapes = {re.search(r"HGMMA\.(\S+)", line).group(1) for line in tile_mmas}
        assert shapes == {f"64x{bn}x16.F32" + (".BF16" if bf16 else "")}, (name, shapes)
        # the descriptors' high word: 512-byte stride, base offset 0, 64-byte swizzle (0x80000020)
        assert re.search(r"-0x7fffffe0\b|\b0x80000020\b", b), f"{name}: no 64B-swizzle descriptor constant"
        assert "LDSM" not in b and not re.search(r"\bHMMA\.", b), f"{name}: fragments or mma.sync in a wgmma kernel"
        assert not re.search(r"\bSTL(\.\S+)?\s", b), f"{name}: local stores (register spills)"
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", dump("-res-usage", "-arch", "sm_90a"))
    fitted = 0
    for name, reg in usage:
        if not re.search(r"conv2d_implicit_gemm_(fprop|dgrad)_wgmma_kernelI", name):
            continue
        bm, _bn, _stages, min_blocks = map(int, re.search(r"WgmmaTileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", name).groups())
        if "dgrad" in name:
            min_blocks = min(min_blocks, 2)  # (dgrad's gather asks for at most 2)
        assert int(reg) * (bm // 64) * 128 * min_blocks <= 65536, (name, reg, min_blocks)
        fitted += 1
    assert fitted == 2 * 2 * len(IMPLICIT_GEMM_WGMMA_TILES)
    if "sm_80" in dump("-lelf"):  # the other arch compiles the trap stub only
        stubs = [b for b in re.split(r"\n\s*Function : ", dump("-sass", "-arch", "sm_80"))
                 if re.match(r"\S*\d+conv2d_implicit_gemm_(fprop|dgrad)_wgmma_kernelI", b)]
        assert stubs and all("HGMMA" not in b and "LDGSTS" not in b for b in stubs)


def test_conv_epilogue_stages_through_shared_memory_and_stores_16_bytes():
    """The staged epilogue (csrc/cuda/implicit_gemm.cuh, version 8) in every fprop and dgrad kernel that applies it
    (all but fprop's split-K variant, whose blocks write fp32 partials): accumulator pairs to shared memory (STS.64),
    read back as 16-byte quarters (LDS.128), out as 16-byte global stores (STG.E.128; nvcc had split a plain uint4
    assignment into four 32-bit stores)."""
    blocks = re.split(r"\n\s*Function : ", dump("-sass"))
    kernels = [b for b in blocks if re.match(r"\S*\d+conv2d_implicit_gemm_(fprop|dgrad)(_wgmma)?_kernelI", b)]
    staged = []
    for b in kernels:
        name = b.split("\n", 1)[0]
        if re.search(r"ELb1EEEv", name) or ("_wgmma_kernel" in name and "HGMMA" not in b):
            continue  # fprop's split-K variant (template argument SPLIT true); a wgmma kernel's stub (not sm_90a)
        staged.append(b)
        assert re.search(r"\bSTS\.64\b", b), f"{name}: accumulator pairs not staged in shared memory (STS.64)"
        assert re.search(r"\bLDS\.128\b", b), f"{name}: the staged slice not read back as 16-byte loads (LDS.128)"
        assert re.search(r"\bSTG\.E\.128\b", b), f"{name}: no 16-byte global store (STG.E.128)"
    # fprop and dgrad x 3 dtypes x every mma.sync tile, per arch
    assert len(staged) >= 2 * 3 * IMPLICIT_GEMM_MMA_SYNC_TILES, len(staged)
