"""The implicit-GEMM CUDA kernels run in a CPU emulation (tests/kernel_emulation): no GPU needed.

g++ compiles copies of the current kernel sources (csrc/cuda/implicit_gemm.cuh, wgmma.cuh and
conv2d_implicit_gemm_{fprop,dgrad,wgrad,fprop_wgmma,dgrad_wgmma}_kernel.cu) in which only the PTX wrappers (cp.async, commit
and wait_group, ldmatrix, mma.sync, cvt.rna.tf32, Hopper's wgmma with its fences, commit and wait_group, and the
kernels' `extern __shared__` array) are replaced by emulators: one std::thread per CUDA thread, warp- and
warpgroup-collective instructions with the PTX ISA's fragment layouts and matrix descriptors, cp.async landing
and wgmma reading at the latest or the earliest moment the ISA allows. Every configuration's output
must match a double-precision reference bit for bit, with aligned, in-bounds addresses and shared-memory
accesses (cp.async copies, ldmatrix rows) free of bank conflicts.

This checks the kernels' index math, fragment layouts, pipeline synchronisation and alignment on any machine;
it is not a GPU run and says nothing about speed or about hardware behaviour beyond the PTX ISA. A planted
bug (a wait_group one stage short, swapped B fragment registers, an unswizzled or padded layout; a wrong
descriptor stride, a stage refilled under MMAs in flight, a missing proxy fence) must make it fail."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = ROOT / "csrc" / "cuda"
EMULATION = ROOT / "tests" / "kernel_emulation"
CUDA_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime_api.h")  # what emu.h and the kernels include
CXX = shutil.which("g++")


def find_cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and all((Path(home) / "include" / h).exists() for h in CUDA_HEADERS):
            return Path(home) / "include"
    return None


CUDA_INCLUDE = find_cuda_include()

pytestmark = [
    pytest.mark.skipif(CXX is None, reason="needs g++"),
    pytest.mark.skipif(CUDA_INCLUDE is None, reason=f"needs the CUDA headers {', '.join(CUDA_HEADERS)} "
                       "(in $CUDA_HOME/include, $CUDA_PATH/include or /usr/local/cuda/include)"),
]

# ---- patching the kernel sources --------------------------------------------------------------------------

ARCH_GUARD = "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800"
SM90A_GUARD = "#if defined(__CUDA_ARCH_FEAT_SM90_ALL)"  # wgmma.cuh and the wgmma kernel: sm_90a code only
# each kernel file and the guard around its kernel body
KERNEL_FILES = {**{f"conv2d_implicit_gemm_{p}_kernel.cu": ARCH_GUARD for p in ("fprop", "dgrad", "wgrad")},
                **{f"conv2d_implicit_gemm_{p}_wgmma_kernel.cu": SM90A_GUARD for p in ("fprop", "dgrad")}}

# The PTX wrappers of implicit_gemm.cuh: signature, the PTX its guarded block must hold (the semantics
# emu.h emulates), and the emulator call that replaces the block.
PTX_WRAPPERS = [
    ("void cp_async_16(void* dst, const void* src, bool valid)",
     ["cp.async.ca.shared.global [%0], [%1], 16, %2;", "cp.async.cg.shared.global [%0], [%1], 16, %2;"],
     "emu_cp_async(dst, src, valid);"),
    ("void cp_async_commit()", ["cp.async.commit_group;"], "emu_commit();"),
    ("void cp_async_wait()", ["cp.async.wait_group %0;"], "emu_wait(N);"),
    ("void ldmatrix_x4(uint32_t (&r)[4], const void* p)",
     ["ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.shared.b16"],
     "emu_ldmatrix(r, p, TRANS);"),
    ("void mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])",
     ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"], "emu_mma<T>(d, a, b);"),
    ("uint32_t to_tf32(float v)", ["cvt.rna.tf32.f32"], "r = emu_tf32(v);"),
    # the TF32 fragments' shared-memory loads (plain C++ on the GPU; wrapped for the race check)
    ("float load_shared_f32(const float* p)", ["v = *p;"], "v = emu_load_shared_f32(p);"),
    ("unsigned reread_block_index()", ["mov.u32 %0, %%ctaid.z;", "mov.u32 %0, %%ctaid.x;"],
     "v = Z ? blockIdx.z : blockIdx.x;"),
    # the staged epilogue's shared-memory accesses (plain C++ on the GPU; wrapped for the bank checks)
    ("void stage_store2(float* p, float a, float b)", ["*reinterpret_cast<float2*>(p) = make_float2(a, b);"],
     "emu_stage_store2(p, a, b);"),
    ("void stage_load4(float (&v)[4], const float* p)", ["const float4 f = *reinterpret_cast<const float4*>(p);"],
     "emu_stage_load4(v, p);"),
    ("void st_global_16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d)",
     ["st.global.v4.b32 [%0], {%1, %2, %3, %4};"], "emu_st_global_16(p, a, b, c, d);"),
]

# The PTX wrappers of wgmma.cuh (guarded by SM90A_GUARD). wgmma_64xNx16's block names its instructions through
# macros, whose text is checked separately (WGMMA_INSTRUCTIONS).
WGMMA_PTX_WRAPPERS = [
    ("void fence_proxy_async_shared()", ["fence.proxy.async.shared::cta;"], "emu_fence_proxy_async();"),
    ("void wgmma_fence()", ["wgmma.fence.sync.aligned;"], "emu_wgmma_fence();"),
    ("void wgmma_commit()", ["wgmma.commit_group.sync.aligned;"], "emu_wgmma_commit();"),
    ("void wgmma_wait()", ["wgmma.wait_group.sync.aligned %0;"], "emu_wgmma_wait(N);"),
    ("void wgmma_fence_operand(float& r)", ['asm volatile("" : "+f"(r)::"memory");'], "(void)r;"),
    ("void wgmma_64xNx16(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b)",
     ['if constexpr (N == 64 && same_type<T, __half>::value) {\n    asm volatile(FASTCONV_WGMMA_N64("f16") : FASTCONV_WGMMA_D32 :',
      '} else if constexpr (N == 64) {\n    asm volatile(FASTCONV_WGMMA_N64("bf16") : FASTCONV_WGMMA_D32 :',
      '} else if constexpr (same_type<T, __half>::value) {\n    asm volatile(FASTCONV_WGMMA_N128("f16") : FASTCONV_WGMMA_D64 :',
      '} else {\n    asm volatile(FASTCONV_WGMMA_N128("bf16") : FASTCONV_WGMMA_D64 :',
      ': "l"(desc_a), "l"(desc_b), "r"(1));'], "emu_wgmma<T, N>(d, desc_a, desc_b);"),
]
# What emu_wgmma emulates: m64nNk16, fp32 accumulators, scale-d from a register, A and B scales 1, K-major.
WGMMA_INSTRUCTIONS = ['"{\\n.reg .pred p;\\nsetp.ne.b32 p, " op ", 0;\\n"',
                      '"wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " "',
                      '"wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " "',
                      '", %32, %33, p, 1, 1, 0, 0;', '", %64, %65, p, 1, 1, 0, 0;',
                      # the accumulators in the D layout's register order: d[j][0..3] for slice j = 0, 1, ...
                      '#define FASTCONV_WGMMA_D4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])',
                      'FASTCONV_WGMMA_D4(0), FASTCONV_WGMMA_D4(1), FASTCONV_WGMMA_D4(2), FASTCONV_WGMMA_D4(3), '
                      'FASTCONV_WGMMA_D4(4), \\\n      FASTCONV_WGMMA_D4(5), FASTCONV_WGMMA_D4(6), FASTCONV_WGMMA_D4(7)',
                      'FASTCONV_WGMMA_D32, FASTCONV_WGMMA_D4(8), FASTCONV_WGMMA_D4(9), FASTCONV_WGMMA_D4(10), '
                      'FASTCONV_WGMMA_D4(11), \\\n      FASTCONV_WGMMA_D4(12), FASTCONV_WGMMA_D4(13), FASTCONV_WGMMA_D4(14), '
                      'FASTCONV_WGMMA_D4(15)']

# A kernel file's host-code section (launch configuration, <<<>>> launchers), which NVRTC skips too: the driver
# launches through emu_launch instead.
HOST_CODE = re.compile(r"#if !defined\(__CUDACC_RTC__\)\s*// host code.*?#endif\s*// !defined\(__CUDACC_RTC__\)", re.S)

# Planted bugs, each an edit of implicit_gemm.cuh (or, under WGMMA_PLANTED_BUGS, of wgmma.cuh) the emulation
# must catch.
PLANTED_BUGS = {
    # waits for one stage less than the loop reads: the stage about to be used has not landed
    "wait_group_one_short": ("cp_async_wait<Cfg::STAGES - 2>();\n      __syncthreads();  // stage (t + 1)",
                             "cp_async_wait<Cfg::STAGES - 1>();\n      __syncthreads();  // stage (t + 1)"),
    # the two k halves of a B fragment exchanged
    "b_fragment_registers_swapped": ("f.b[nj][0] = r[0], f.b[nj][1] = r[1],", "f.b[nj][0] = r[1], f.b[nj][1] = r[0],"),
    # dgrad's column tap not negated (fprop's direction): stride-1 dgrad then gathers the mirrored pixel
    "dgrad_tap_not_negated": ("dx = DGRAD ? -s * dil_w : s * dil_w;", "dx = DGRAD ? s * dil_w : s * dil_w;"),
    # K-major rows without the swizzle: an ldmatrix phase reads one chunk of 8 rows 64 bytes apart, 4 per bank group
    "k_major_swizzle_dropped": ("const int chunk = (kk / E::VEC) ^ ((i >> 1) & 3);", "const int chunk = kk / E::VEC;"),
    # K-major rows padded to 80 bytes (version 3's layout): the two rows a quarter warp's copies fill overlap
    "k_major_rows_padded": ("static constexpr int LD = K_MAJOR ? E::BK : ROWS", "static constexpr int LD = K_MAJOR ? E::BK + E::VEC : ROWS"),
    # the gather's setup by multiplies (GatherDivisors, the path every shape here takes) splitting the row's first
    # reduction index without the thread's chunk: each row's four chunks read the same channels
    "gather_divisors_chunk_dropped": ("split_tap_channel(static_cast<uint32_t>(k0 + chunk_k), gd)",
                                      "split_tap_channel(static_cast<uint32_t>(k0), gd)"),
    # the epilogue's staged rows unpadded: a half warp's 8-byte stores land 4 to a slot
    "epilogue_rows_unpadded": ("constexpr int LD = Cfg::WN + 8;", "constexpr int LD = Cfg::WN;"),
    # the staged slice unswizzled (both sides): the two rows of a read phase hit the same 4 of the 8 bank groups
    "epilogue_swizzle_dropped": (
        "int staged_column(int row, int col) { return col ^ (((row ^ (col >> 5)) & 1) << 2); }",
        "int staged_column(int row, int col) { return col; }"),
    # the read-back ignoring the swizzle the writes applied: every other row's two halves exchanged
    "epilogue_read_unswizzled": ("read_at[q] = row_in * LD + staged_column(row_in, chunk * VEC + 4 * q);",
                                 "read_at[q] = row_in * LD + chunk * VEC + 4 * q;"),
    # 16-byte accesses without the pointers' alignment test: a residual view at an odd offset faults on a GPU
    "epilogue_alignment_unchecked": ("const bool whole = aligned && cols == VEC;", "const bool whole = cols == VEC;"),
    # the staging starts while other warps may still read the main loop's last stage, which the slices overlap
    "epilogue_block_barrier_dropped": (
        "  __syncthreads();  // every warp has finished reading the main loop's stages, which the slices may overlap",
        ""),
    # a slice staged over the previous one before every lane has read that back
    "epilogue_slice_barrier_dropped": ("    if (mi > 0) __syncwarp();  // the previous slice has been read back", ""),
    # a slice read back before the other lanes' stores to it
    "epilogue_staged_barrier_dropped": ("    __syncwarp();\n#pragma unroll\n    for (int step = 0;",
                                        "#pragma unroll\n    for (int step = 0;"),
    # the main loop's barrier gone: a warp reads a stage other threads' copies filled, and refills one another warp
    # may still be reading
    "mainloop_barrier_dropped": ("      __syncthreads();  // stage (t + 1) % STAGES is visible to all;", "      //"),
    # the same in fp32 (TF32 fragments, loaded without ldmatrix), with copies landing at once: no value shows it
    "tf32_mainloop_barrier_dropped": ("      __syncthreads();  // stage (t + 1) % STAGES is visible to all;",
                                      "      //"),
}
WGMMA_PLANTED_BUGS = {
    # 1024 bytes between groups of 8 rows (a 128-byte-row layout's): the MMAs read the wrong rows
    "wgmma_stride_offset_doubled": ("constexpr uint32_t kWgmmaSw64DescriptorHi = (512 >> 4)",
                                    "constexpr uint32_t kWgmmaSw64DescriptorHi = (1024 >> 4)"),
    # two groups left in flight: a stage is refilled while the MMAs of the tile it held may still read it
    "wgmma_stage_refilled_in_flight": ("    cp_async_commit();\n    wgmma_wait<1>();",
                                       "    cp_async_commit();\n    wgmma_wait<2>();"),
    # the copies' generic-proxy writes not fenced before the async proxy's reads
    "proxy_fence_dropped": ("    fence_proxy_async_shared();\n    __syncthreads();", "    __syncthreads();"),
    # fenced only after the barrier: another warpgroup's MMAs may read them first
    "proxy_fence_after_barrier": ("    fence_proxy_async_shared();\n    __syncthreads();",
                                  "    __syncthreads();\n    fence_proxy_async_shared();"),
    # the stages where the shared memory starts, not on a 512-byte boundary of the address (the emulated window
    # starts 48 bytes past one): the hardware's swizzle then disagrees with the loaders' layout
    "wgmma_stages_unaligned": ("return reinterpret_cast<T*>(smem_bytes + (512 - smem_address(smem_bytes) % 512) % 512);",
                               "return reinterpret_cast<T*>(smem_bytes);"),
    # the MMAs issued without the barrier: they may read copies other threads landed, and the copies refill a stage
    # another warpgroup's MMAs may still read
    "wgmma_barrier_dropped": ("    fence_proxy_async_shared();\n    __syncthreads();", "    fence_proxy_async_shared();"),
    # the copies waited for one tile short: the MMAs may read a stage that has not landed
    "wgmma_copies_waited_one_short": ("    cp_async_wait<Cfg::STAGES - 3>();\n    fence_proxy_async_shared();",
                                      "    cp_async_wait<Cfg::STAGES - 2>();\n    fence_proxy_async_shared();"),
}
# The order each wgmma planted bug runs in (the others: copies landing at once, MMAs reading at the wait, the order
# that exposes a stage refilled too early); a copy waited for too late shows when copies land late and MMAs read
# early.
WGMMA_PLANTED_BUG_ORDER = {"wgmma_copies_waited_one_short": ("deferred", "immediate")}
PLANTED_BUGS.update(WGMMA_PLANTED_BUGS)
# The pass each planted bug is run in (the others: fprop).
PLANTED_BUG_PASS = {"dgrad_tap_not_negated": "dgrad"}
# The element type and cp.async completion each planted bug is run in (the others: fp16, deferred).
PLANTED_BUG_DTYPE = {"tf32_mainloop_barrier_dropped": ("fp32", "immediate")}
EMU_DTYPE_BITS = {"fp16": 1, "bf16": 2, "fp32": 4}
# Arguments a planted bug's run adds (a misaligned residual view for the epilogue's alignment test).
PLANTED_BUG_ARGS = {"epilogue_alignment_unchecked": {"residual_offset": 1},
                    # SHAPES["deep_reduction"]: 18 reduction tiles, the last read from stage 1 of 4, which the staged
                    # slices overlap (c40's last, stage 3, lies past them)
                    "epilogue_block_barrier_dropped": dict(N=1, C=64, H=6, W=6, K=136, R=3, S=3, pad=1)}
# What the emulation reports for each planted bug (the others: a wrong output).
PLANTED_BUG_REPORT = {
    "k_major_swizzle_dropped": "ldmatrix phases have shared-memory bank conflicts",
    "k_major_rows_padded": "cp.async phases have shared-memory bank conflicts",
    "epilogue_rows_unpadded": "epilogue staging phases have shared-memory bank conflicts",
    "epilogue_swizzle_dropped": "epilogue staging phases have shared-memory bank conflicts",
    "epilogue_alignment_unchecked": "not 16-byte aligned",  # (emu.h's check of the 16-byte load: abort)
    "proxy_fence_dropped": "fence.proxy.async",  # an emulation check (abort)
    "proxy_fence_after_barrier": "fence.proxy.async",
    "wgmma_stride_offset_doubled": "wgmma operand outside the block's shared memory",  # (the last B stage's rows)
    "epilogue_block_barrier_dropped": "shared-memory races",
    "epilogue_slice_barrier_dropped": "shared-memory races",
    "epilogue_staged_barrier_dropped": "shared-memory races",
    "mainloop_barrier_dropped": "shared-memory races",
    "tf32_mainloop_barrier_dropped": "shared-memory races",
    "wgmma_barrier_dropped": "shared-memory races",
}


def stale(path: Path, what: str) -> str:
    return (f"csrc/cuda/{path.name}: {what}. The kernel sources changed: update tests/kernel_emulation and the "
            f"patching in tests/test_kernel_emulation.py to match.")


def replace_once(text: str, old: str, new: str, path: Path) -> str:
    count = text.count(old)
    assert count == 1, stale(path, f"expected exactly one {old!r}, found {count}")
    return text.replace(old, new)


def replace_ptx_block(text: str, signature: str, ptx: list, call: str, path: Path, arch_guard: str = ARCH_GUARD) -> str:
    """The `#if <arch_guard> ... #endif` block of the wrapper declared by `signature` becomes `call`."""
    assert text.count(signature) == 1, stale(path, f"expected one PTX wrapper `{signature}`")
    start = text.index(signature)
    guard = text.find(arch_guard, start)
    end = text.find("#endif", guard)
    assert guard >= 0 and end >= 0 and text[start:guard].count("{") == 1, \
        stale(path, f"`{signature}` no longer opens with an `{arch_guard}` guard around its PTX")
    block = text[guard + len(arch_guard):end]
    assert "#if" not in block, stale(path, f"`{signature}`: nested #if in its PTX block")
    for instruction in ptx:
        assert instruction in block, stale(path, f"`{signature}` no longer issues `{instruction}` (emu.h emulates that)")
    return text[:guard] + "  " + call + text[end + len("#endif"):]


def patched_sources(out_dir: Path, planted_bug: str = None) -> Path:
    """Writes the emulation's copies of the current kernel sources to out_dir/cuda; returns that directory."""
    cuda = out_dir / "cuda"
    cuda.mkdir(parents=True)

    for header, guard, wrappers in (("implicit_gemm.cuh", ARCH_GUARD, PTX_WRAPPERS),
                                    ("wgmma.cuh", SM90A_GUARD, WGMMA_PTX_WRAPPERS)):
        path = CUDA_SOURCES / header
        text = path.read_text()
        for signature, ptx, call in wrappers:
            text = replace_ptx_block(text, signature, ptx, call, path, guard)
        assert guard not in text and not re.search(r"\basm\b", text), \
            stale(path, "a PTX block the emulation does not know (emu.h has no emulator for it)")
        if header == "wgmma.cuh":
            for instruction in WGMMA_INSTRUCTIONS:
                assert instruction in text, stale(path, f"the wgmma macros no longer read `{instruction}` (emu.h emulates that)")
        if planted_bug is not None and (planted_bug in WGMMA_PLANTED_BUGS) == (header == "wgmma.cuh"):
            text = replace_once(text, *PLANTED_BUGS[planted_bug], path)
        (cuda / path.name).write_text(text)

    for name, guard in KERNEL_FILES.items():
        path = CUDA_SOURCES / name
        text = path.read_text()
        text = replace_once(text, guard, "#if 1", path)  # the kernel body
        text = replace_once(text, "extern __shared__ __align__(16) unsigned char smem_bytes[];",
                            "unsigned char* smem_bytes = emu_smem;", path)
        # the launchers (<<<...>>>) go: the driver launches through emu_launch
        text, count = HOST_CODE.subn("", text)
        assert count == 1, stale(path, "expected one `#if !defined(__CUDACC_RTC__)  // host code` section")
        assert not re.search(r"\basm\b", text), stale(path, "inline PTX in a kernel file")
        (cuda / name).write_text(text)
    return cuda


def build(out_dir: Path, planted_bug: str = None, defines=()) -> Path:
    sources = patched_sources(out_dir, planted_bug)
    binary = out_dir / "emulate_implicit_gemm"
    # (-fno-strict-aliasing: the epilogue reads a 32-bit word as a __half2, as CUDA's own headers do)
    command = [CXX, "-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", *[f"-D{d}" for d in defines],
               "-I", str(sources), "-I", str(CUDA_SOURCES), "-isystem", str(CUDA_INCLUDE),
               str(EMULATION / "emulate_implicit_gemm.cpp"), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulation failed:\n{' '.join(command)}\n{result.stderr[-6000:]}"
    return binary


def emulate(binary: Path, args: dict) -> subprocess.CompletedProcess:
    argv = [f"{k}={v}" for k, v in args.items()]
    # (a run takes seconds; the timeout turns a deadlocked emulation into a failure)
    return subprocess.run([str(binary), *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kernel_emulation"))


# ---- the configurations ------------------------------------------------------------------------------------

SHAPES = {
    # 40 channels: the reduction's last tile is partial (BK = 32 fp16/bf16, 16 fp32)
    "c40": dict(N=2, C=40, H=7, W=7, K=24, R=3, S=3, pad=1),
    # the RGB stem: 3 channels, which the host pads to 8; 7x7 taps, stride 2
    "rgb_stem": dict(N=1, C=3, H=11, W=11, K=16, R=7, S=7, stride=2, pad=3),
    "groups2_dilation2": dict(N=1, C=16, H=9, W=9, K=20, R=3, S=3, pad=2, dil=2, groups=2),
    # 3 channels and 3 filters per group: both padded, odd output columns (unpaired stores)
    "groups4_of_3": dict(N=1, C=12, H=6, W=6, K=12, R=3, S=3, pad=1, groups=4),
    # several block tiles along M and N (128-wide tiles too), images straddling tiles
    "multi_tile": dict(N=2, C=16, H=9, W=9, K=136, R=3, S=3, pad=1),
    # the same for dgrad, whose GEMM's N is the input channels
    "multi_tile_dgrad": dict(N=2, C=136, H=9, W=9, K=16, R=3, S=3, pad=1),
    "pointwise_stride2": dict(N=2, C=64, H=8, W=8, K=72, R=1, S=1, stride=2),
    "asymmetric": dict(N=3, C=8, H=7, W=9, K=8, R=3, S=3, stride="2,1", pad="0,2", dil="1,2"),
    "stride3_groups2": dict(N=1, C=16, H=10, W=10, K=20, R=3, S=3, stride=3, pad=1, groups=2),
    "depthwise": dict(N=1, C=8, H=7, W=7, K=8, R=3, S=3, pad=1, groups=8),
    # 12 channels (dgrad) and 12 filters (fprop) per group of 2
    "groups2_partial_chunks": dict(N=2, C=24, H=7, W=7, K=24, R=3, S=3, pad=1, groups=2),
    # 18 reduction tiles (fp16/bf16): every stage of the deepest pipeline is refilled, some more than once
    "deep_reduction": dict(N=1, C=64, H=6, W=6, K=136, R=3, S=3, pad=1),
}
FULL_EPILOGUE = "scale+shift+residual+relu"


def case(pass_, dtype, tile, cp_async, shape, **extra):
    args = {"pass": pass_, "dtype": dtype, "tile": tile, "cp_async": cp_async, **SHAPES[shape], **extra}
    name = "-".join([pass_, dtype, f"tile{tile}", cp_async, shape, *(f"{k}={v}" for k, v in extra.items())])
    return pytest.param(args, id=name)


# Every pass runs each dtype and each tile at least once, each in both cp.async completion modes somewhere.
CASES = [
    case("fprop", "fp16", 0, "deferred", "c40", epilogue=FULL_EPILOGUE),
    case("fprop", "bf16", 1, "immediate", "rgb_stem", epilogue=FULL_EPILOGUE),
    case("fprop", "fp32", 2, "deferred", "groups2_dilation2", epilogue="shift"),
    case("fprop", "fp16", 2, "immediate", "groups4_of_3", epilogue=FULL_EPILOGUE),
    case("fprop", "bf16", 0, "deferred", "multi_tile", epilogue="scale+shift+relu"),
    case("fprop", "fp32", 1, "immediate", "pointwise_stride2"),
    case("fprop", "fp16", 1, "deferred", "depthwise", epilogue="residual"),
    case("fprop", "bf16", 3, "immediate", "multi_tile", epilogue=FULL_EPILOGUE),
    case("fprop", "fp32", 3, "deferred", "asymmetric"),
    case("fprop", "bf16", 4, "deferred", "multi_tile", epilogue=FULL_EPILOGUE),
    case("fprop", "fp32", 5, "immediate", "c40", epilogue="scale+relu"),
    # split-K (the reduction in ranges, then the split-sum kernel applies the epilogue)
    case("fprop", "fp16", 3, "deferred", "c40", epilogue=FULL_EPILOGUE, splits=3),
    case("fprop", "bf16", 2, "immediate", "groups2_dilation2", epilogue="shift+residual", splits=2),
    case("fprop", "bf16", 2, "deferred", "multi_tile", epilogue=FULL_EPILOGUE, splits=2),
    case("fprop", "fp32", 0, "deferred", "rgb_stem", epilogue="scale+shift+relu", splits=4),
    # Hopper's wgmma tiles (fp16/bf16 fprop), in every order of copies landing and MMAs reading; fp32 runs the twin
    case("fprop", "bf16", 6, "immediate", "multi_tile", epilogue=FULL_EPILOGUE, wgmma="deferred"),
    case("fprop", "fp16", 6, "deferred", "c40", epilogue=FULL_EPILOGUE, wgmma="immediate"),
    case("fprop", "fp16", 7, "immediate", "rgb_stem", epilogue="scale+shift+relu", wgmma="deferred"),
    case("fprop", "bf16", 7, "deferred", "groups4_of_3", epilogue=FULL_EPILOGUE, wgmma="deferred"),
    case("fprop", "bf16", 6, "immediate", "asymmetric", wgmma="immediate"),
    case("fprop", "fp16", 6, "immediate", "deep_reduction", epilogue="scale+shift+relu", wgmma="deferred"),
    case("fprop", "bf16", 7, "deferred", "deep_reduction", epilogue="residual", wgmma="immediate"),
    case("fprop", "fp16", 7, "deferred", "pointwise_stride2", epilogue="residual", wgmma="deferred"),
    case("fprop", "fp32", 6, "immediate", "c40", epilogue="shift"),
    # the gather's setup by division (GatherDivisors' fallback where an index may reach 2^31)
    case("fprop", "bf16", 3, "deferred", "asymmetric", epilogue=FULL_EPILOGUE, divisors="divide"),
    case("fprop", "fp16", 7, "immediate", "groups2_dilation2", wgmma="deferred", divisors="divide"),
    # a residual view not 16-byte aligned: the epilogue's pair and element paths on aligned channels
    case("fprop", "fp16", 0, "deferred", "multi_tile", epilogue=FULL_EPILOGUE, residual_offset=1),
    case("fprop", "fp32", 5, "immediate", "multi_tile", epilogue="residual+relu", residual_offset=2),
    case("fprop", "bf16", 6, "deferred", "multi_tile", epilogue=FULL_EPILOGUE, wgmma="immediate", residual_offset=3),
    # 12 filters per group: group 0's second chunk is partial (4 columns), group 1 starts 4 channels into a chunk
    case("fprop", "fp16", 0, "immediate", "groups2_partial_chunks", epilogue=FULL_EPILOGUE),
    case("fprop", "bf16", 6, "deferred", "groups2_partial_chunks", epilogue=FULL_EPILOGUE, wgmma="deferred"),
    case("dgrad", "bf16", 4, "immediate", "groups2_partial_chunks"),
    case("dgrad", "fp16", 0, "deferred", "c40"),
    case("dgrad", "bf16", 1, "immediate", "rgb_stem"),
    case("dgrad", "fp32", 2, "deferred", "stride3_groups2"),
    case("dgrad", "fp16", 2, "immediate", "groups4_of_3"),
    case("dgrad", "bf16", 2, "deferred", "asymmetric"),
    case("dgrad", "fp32", 1, "immediate", "pointwise_stride2"),
    case("dgrad", "fp16", 3, "deferred", "groups2_dilation2"),
    case("dgrad", "fp32", 4, "immediate", "asymmetric"),
    case("dgrad", "bf16", 5, "deferred", "multi_tile"),
    case("dgrad", "fp16", 6, "immediate", "deep_reduction", wgmma="deferred"),
    case("dgrad", "bf16", 7, "deferred", "asymmetric", wgmma="immediate"),
    case("dgrad", "bf16", 6, "immediate", "groups4_of_3", wgmma="deferred"),
    case("dgrad", "fp32", 7, "deferred", "c40"),
    case("dgrad", "fp16", 1, "immediate", "stride3_groups2", divisors="divide"),
    # several N tiles: dgrad's tile order (N fastest) and its recomputed tile
    case("dgrad", "bf16", 0, "deferred", "multi_tile_dgrad"),
    case("dgrad", "fp16", 2, "immediate", "multi_tile_dgrad"),
    case("dgrad", "bf16", 7, "immediate", "multi_tile_dgrad", wgmma="deferred"),
    case("wgrad", "fp16", 0, "deferred", "c40", splits=1),
    case("wgrad", "bf16", 1, "immediate", "rgb_stem", splits=3),
    case("wgrad", "fp32", 2, "deferred", "groups2_dilation2", splits=7),
    case("wgrad", "fp16", 2, "immediate", "groups4_of_3", splits=2),
    case("wgrad", "bf16", 2, "deferred", "asymmetric", splits=4),
    case("wgrad", "fp32", 0, "immediate", "multi_tile", splits=5),
    case("wgrad", "bf16", 3, "deferred", "c40", splits=2),
    case("wgrad", "fp16", 4, "immediate", "multi_tile", splits=3),
    case("wgrad", "fp32", 5, "deferred", "rgb_stem", splits=2),
]


@pytest.mark.parametrize("args", CASES)
def test_kernel_matches_reference_bit_exactly(emulator, args):
    result = emulate(emulator, args)
    assert result.returncode == 0 and "bit-exact" in result.stdout, \
        f"exit status {result.returncode}\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    if args.get("splits", 1) > 1:  # the split path really ran
        splits = re.search(r"(\d+) split\(s\)", result.stdout)
        assert splits and int(splits.group(1)) > 1, result.stdout[-2000:]


# ---- the test has teeth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_planted_bug_is_caught(tmp_path, bug):
    # one pass in one dtype keeps this build short; deferred cp.async, so that a copy waited for too late is missed
    pass_ = PLANTED_BUG_PASS.get(bug, "fprop")
    dtype, cp_async = PLANTED_BUG_DTYPE.get(bug, ("fp16", "deferred"))
    binary = build(tmp_path, planted_bug=bug,
                   defines=[f"EMU_PASSES={1 if pass_ == 'fprop' else 2}", f"EMU_DTYPES={EMU_DTYPE_BITS[dtype]}"])
    args = {"pass": pass_, "dtype": dtype, "tile": 2, "cp_async": cp_async, **SHAPES["c40"]}
    if bug in WGMMA_PLANTED_BUGS:
        cp_async, wgmma = WGMMA_PLANTED_BUG_ORDER.get(bug, ("immediate", "deferred"))
        args.update(tile=6, cp_async=cp_async, wgmma=wgmma, **SHAPES["deep_reduction"])
    if pass_ == "fprop":
        args["epilogue"] = FULL_EPILOGUE
    args.update(PLANTED_BUG_ARGS.get(bug, {}))
    result = emulate(binary, args)
    report = PLANTED_BUG_REPORT.get(bug, "mismatch at")
    # a wrong output or a bank conflict fails the run (exit status 1); a broken emulation check aborts
    assert result.returncode != 0 and report in result.stdout + result.stderr, \
        f"planted bug {bug} not caught: exit status {result.returncode}\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
