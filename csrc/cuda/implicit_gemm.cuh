// The tensor-core main loop shared by the implicit-GEMM convolution kernels (fprop, dgrad and wgrad in
// conv2d_implicit_gemm_*_kernel.cu; the GEMM each pass is: csrc/implicit_gemm_problem.h).
//
// Tiling. A block computes a BM x BN tile of C with WARPS_M x WARPS_N warps, each owning a WM x WN
// sub-tile made of (WM/16) x (WN/8) mma.sync tiles of 16 x 8. Along the reduction the block walks tiles
// of BK elements (64 bytes: 32 fp16/bf16, 16 fp32) in a STAGES-deep cp.async pipeline: while the tensor
// cores work on stage i, the loads of stages i+1 .. i+STAGES-1 are in flight. Operands are loaded with
// 16-byte cp.async copies (VEC = 8 fp16/bf16 or 4 fp32 channels): a copy whose source is padding (or
// past the end of the matrix) has source size 0, which zero-fills the destination, so borders cost no
// branches in the main loop.
//
// Shared-memory layouts. An operand tile is stored either K-major (one row per m or n, the reduction
// index contiguous: activations gathered along (r, s, c) and filters) or MN-major (one row per reduction
// index, m or n contiguous: wgrad's operands, whose reduction runs over pixels). Shared memory serves a
// warp's 16-byte accesses in phases of 8 lanes (one 8 x 8 matrix of an ldmatrix, a quarter of a cp.async);
// a phase is conflict-free when its 8 chunks fall in the 8 distinct 16-byte bank groups of a 128-byte line.
// (TF32 fragments are 4-byte scalar loads, one phase of 32 lanes: conflict-free when the lanes' banks differ.)
//  - K-major rows are BK elements (64 bytes, 4 chunks) with no padding, and chunk c of row i is stored at
//    chunk c ^ ((i / 2) % 4) of the row (an XOR swizzle: the 64-byte swizzle of wgmma's and TMA's shared
//    layouts). A cp.async phase writes two whole neighbouring rows (one 128-byte line); an ldmatrix phase
//    reads one chunk of 8 consecutive rows, which the swizzle spreads over the 8 groups; a TF32 load reads a
//    chunk of 8 rows too, lane (g, t) from bank (g % 2) * 16 + (c ^ (g / 2) % 4) * 4 + t, all distinct.
//    (Rows padded to 80 bytes, version 3, kept ldmatrix conflict-free but not the copies: ncu counted 2
//    wavefronts per cp.async phase.)
//  - MN-major rows are padded by 16 bytes (32 for fp32): a cp.async phase writes 128 contiguous bytes of one
//    row, and the rows an ldmatrix.trans phase (or a TF32 load) reads land 16 bytes apart in the banks.
// tests/test_kernel_emulation.py checks both the copies and the ldmatrix phases for conflicts (not the TF32
// loads, plain C++ reads there).
//
// Fragments. fp16/bf16: ldmatrix.x4 (".trans" for MN-major tiles) loads a 16x16 A fragment or two 16x8
// B fragments per instruction, then mma.sync.m16n8k16 with fp32 accumulators. fp32: TF32 tensor cores,
// mma.sync.m16n8k8, fragments read with scalar shared loads and rounded to TF32 (cvt.rna).
#pragma once

#if !defined(__CUDACC_RTC__)
#include <algorithm>  // (the host-side tile and split choices)
#endif

#include "kernel_utils.cuh"
#include "../fast_divmod.h"
#include "../implicit_gemm_problem.h"

namespace fastconv {

// MIN_BLOCKS: the blocks per SM the tile is built for (__launch_bounds__ of fp16/bf16 fprop), so the compiler
// keeps registers within 65536 / (MIN_BLOCKS * THREADS): at most the number of blocks its shared memory
// allows, and fewer where that would leave a thread under 128 registers, the warp tile needs more (64 x 64:
// about 220), or the tile is the register-richer twin of another (tile 1 of tile 3).
// FRAGMENT_BUFFERS: 2 to load the next k step's fragments while
// the MMAs of this one run (24 more registers for a 64 x 32 warp tile), 1 to load each just before its MMAs
// (what fits 128 registers with a 64 x 32 warp tile: double buffering there spills).
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_, int FRAGMENT_BUFFERS_>
struct ImplicitGemmTile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_, FRAGMENT_BUFFERS = FRAGMENT_BUFFERS_;
  static_assert(FRAGMENT_BUFFERS == 1 || FRAGMENT_BUFFERS == 2, "one or two fragment sets");
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;  // mma tiles per warp
  static_assert(WM % 16 == 0 && WN % 16 == 0, "a warp tile is a whole number of 16 x 16 fragments");
  static_assert(MIN_BLOCKS * THREADS * 128 <= 65536, "at least 128 registers per thread");
};

// The tile configurations the launchers instantiate, indexed by the ops' `tile` argument (-1 picks one by
// the grid's size, see implicit_gemm_pick_tile). Shared memory per block: STAGES x (BM + BN) rows x 64 bytes
// (fprop, dgrad; wgrad's padded MN-major rows: STAGES x (BM + BN + 16) x 64 bytes), any element type.
using ImplicitGemmTile0 = ImplicitGemmTile<128, 128, 2, 4, 3, 2, 1>;  // 8 warps of 64 x 32; 48 KiB, 2 blocks/SM
using ImplicitGemmTile1 = ImplicitGemmTile<128, 64, 2, 2, 4, 3, 1>;   // 4 warps of 64 x 32; 48 KiB, see below
using ImplicitGemmTile2 = ImplicitGemmTile<64, 64, 2, 2, 4, 4, 2>;    // 4 warps of 32 x 32; 32 KiB, 4 blocks/SM
// Tiles 1 and 3 differ only in fp16/bf16 fprop's register budget, the one place MIN_BLOCKS applies (dgrad,
// wgrad and fp32 compile them alike). Tile 1: 3 blocks per SM, up to 170 registers (ptxas takes about 145).
// Tile 3: 4 blocks per SM (16 warps instead of 12), registers capped at 128. With 80-byte rows (version 3)
// only 3 stages fitted 4 blocks; the unpadded rows fit 4 stages (4 x 48 KiB, wgrad 4 x 52 KiB).
using ImplicitGemmTile3 = ImplicitGemmTile<128, 64, 2, 2, 4, 4, 1>;
// Warp tiles of 64 x 64 (CUTLASS's usual Ampere warp tile): twice tile 1's MMAs per fragment loaded and per
// copy. 128 accumulators per thread (about 220 registers), so 2 blocks of 4 warps per SM; 4 stages then cost
// no occupancy on sm_90 (on sm_80, whose SM has 164 KiB, tile 5's wgrad at 84 KiB fits one block). Tile 4 is
// 2 x 2 such warps (64 KiB). Tile 5 is 4 x 1 (80 KiB, wgrad 84: under the 99 KiB a block may have on sm_86
// and sm_89), for layers of 64 filters, which leave half of a 128-wide tile idle.
using ImplicitGemmTile4 = ImplicitGemmTile<128, 128, 2, 2, 4, 2, 1>;
using ImplicitGemmTile5 = ImplicitGemmTile<256, 64, 4, 1, 4, 2, 1>;

// The tile fprop's split-K variant is built for (conv2d_implicit_gemm_fprop_kernel.cu): the smallest, which
// implicit_gemm_pick_tile takes for the grids that leave SMs idle, the ones split-K is for.
constexpr int kImplicitGemmSplitTile = 2;
using ImplicitGemmSplitTile = ImplicitGemmTile2;

// Element type T's reduction tile (64 bytes) and 16-byte copy width.
template <typename T>
struct ImplicitGemmElement {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int BK = 64 / sizeof(T);
  static constexpr int MN_MAJOR_PAD = 8;                       // 32 bytes (fp32), 16 bytes (fp16/bf16)
};

// Shared-memory elements of one stage of an operand tile of `rows` m (or n) by BK (layouts: see the top).
template <typename T, bool K_MAJOR, int ROWS>
struct OperandTile {
  using E = ImplicitGemmElement<T>;
  static constexpr int LD = K_MAJOR ? E::BK : ROWS + E::MN_MAJOR_PAD;  // elements per smem row
  static constexpr int ELEMS = K_MAJOR ? ROWS * LD : E::BK * LD;
  // K-major: the swizzle repeats every 8 rows, so at(i + 8j, kk) = at(i, kk) + 8j * LD.
  static constexpr int SWIZZLE_ROWS = 8;
  static_assert(!K_MAJOR || ROWS % SWIZZLE_ROWS == 0, "whole swizzle periods per tile");
  // Offset of element (row i in m or n, reduction index kk) of the tile.
  __device__ __forceinline__ static int at(int i, int kk) {
    if constexpr (K_MAJOR) {
      const int chunk = (kk / E::VEC) ^ ((i >> 1) & 3);
      return i * LD + chunk * E::VEC + kk % E::VEC;
    } else {
      return kk * LD + i;
    }
  }
  // at(i, x + kk) from offset = at(i, x), for kk a multiple of VEC whose chunk bits are clear in x / VEC (the
  // fragment loads: x within chunks 0-1 or 0, kk a whole k step); K-major, adding kk to the chunk is an XOR.
  __device__ __forceinline__ static int add_k(int offset, int kk) { return K_MAJOR ? offset ^ kk : offset + kk * LD; }
  // at(i + rows, kk) from offset = at(i, kk), for rows a multiple of SWIZZLE_ROWS.
  __device__ __forceinline__ static constexpr int add_rows(int offset, int rows) {
    return K_MAJOR ? offset + rows * LD : offset + rows;
  }
};

// ---- PTX wrappers -------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; zero-fills the destination when !valid (nothing is read).
// CACHE_L1 copies with .ca, which keeps the line in L1 too: for the activation gathers, whose R*S taps re-read
// the same pixels within a block (CUTLASS's conv activation iterators do the same); without it .cg, L2 only,
// for operands a block reads once (filters, a dense dy).
template <bool CACHE_L1 = false>
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (CACHE_L1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
  }
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(p))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(p))
                 : "memory");
  }
#endif
}

// d += a * b on one 16 x 8 tile (fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (same_type<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (same_type<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {  // fp32 operands as TF32 (m16n8k8)
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// A shared-memory load of one fp32 operand element (the TF32 fragments, which no ldmatrix loads). Plain C++ on the
// GPU; wrapped so that the kernel emulation can check it for races (tests/kernel_emulation, emu.h).
__device__ __forceinline__ float load_shared_f32(const float* p) {
  float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  v = *p;
#endif
  return v;
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#endif
  return r;
}

// blockIdx.x (Z false) or blockIdx.z (Z true) read by volatile inline PTX, which the compiler neither merges with
// an earlier read nor hoists as a common subexpression: for values the epilogue recomputes after the main loop
// rather than keeping them live through it (the block's tile, the group's first channel g * Kg: at 128 registers,
// tile 3's fprop and tile 0's dgrad spilled them, and at 80 the wgmma tile 7).
template <bool Z>
__device__ __forceinline__ unsigned reread_block_index() {
  unsigned v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Z) {
    asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(v));
  } else {
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(v));
  }
#endif
  return v;
}

// ---- operand loaders ----------------------------------------------------------------------------------
//
// Each loader issues one stage's cp.async copies for its operand tile: `load(stage, k0)` for the reduction
// tile starting at k0, called with increasing k0. Threads own fixed vectors of the tile, spread so that
// neighbouring threads copy neighbouring 16-byte chunks (coalesced global reads).

// A dense row-major matrix read K-major: element (i, k) at src[i * ld + k], rows i < rows, k < K (K and ld
// multiples of VEC, K < 2^31: the host checks). The filter operand of fprop and dgrad. Each thread keeps the
// start of its rows, so a copy costs a compare and an add.
template <typename T, int ROWS, int THREADS>
struct DenseKMajorLoader {
  using E = ImplicitGemmElement<T>;
  using Tile = OperandTile<T, true, ROWS>;
  static constexpr int CHUNKS = E::BK / E::VEC;  // vectors per row
  static constexpr int ITERS = ROWS * CHUNKS / THREADS;
  static constexpr int ROW_STEP = THREADS / CHUNKS;  // rows between a thread's copies
  static_assert(ITERS >= 1 && ROWS * CHUNKS % THREADS == 0 && THREADS % CHUNKS == 0, "tile / thread mismatch");
  static_assert(ROW_STEP % Tile::SWIZZLE_ROWS == 0, "a thread's rows share their swizzle");
  const T* row_src[ITERS];  // the row's element 0; src itself for a row past the end (its copies zero-fill)
  bool row_valid[ITERS];
  int K, row0, chunk_k;
  int dst;  // the shared-memory offset of this thread's first chunk in a stage (its others: + it * ROW_STEP rows)

  __device__ __forceinline__ DenseKMajorLoader(const T* src, int64_t ld, int64_t rows, int64_t K_, int64_t i0)
      : K(static_cast<int>(K_)) {
    row0 = threadIdx.x / CHUNKS;
    chunk_k = (threadIdx.x % CHUNKS) * E::VEC;
    dst = Tile::at(row0, chunk_k);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t i = i0 + row0 + it * ROW_STEP;
      row_valid[it] = i < rows;
      row_src[it] = row_valid[it] ? src + i * ld : src;
    }
  }
  __device__ __forceinline__ void load(T* stage, int k0) const {
    const int k = k0 + chunk_k;
    const bool k_valid = k < K;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const bool valid = row_valid[it] && k_valid;
      cp_async_16(stage + dst + it * ROW_STEP * Tile::LD, row_src[it] + (valid ? k : 0), valid);
    }
  }
};

// A dense matrix read MN-major: element (k, i) at src[k * ld + i], k < K, i < cols (cols a multiple of
// VEC). wgrad's A operand: dy as an (N*P*Q) x K matrix, i the output channel within the group.
template <typename T, int COLS, int THREADS>
struct DenseMNMajorLoader {
  using E = ImplicitGemmElement<T>;
  using Tile = OperandTile<T, false, COLS>;
  static constexpr int CHUNKS = COLS / E::VEC;  // vectors per reduction row
  static constexpr int ITERS = E::BK * CHUNKS / THREADS;
  static_assert(ITERS >= 1 && E::BK * CHUNKS % THREADS == 0 && THREADS % CHUNKS == 0, "tile / thread mismatch");
  const T* src;
  int64_t ld, K;
  int kk0, col;
  bool col_valid;

  __device__ __forceinline__ DenseMNMajorLoader(const T* src_, int64_t ld_, int64_t cols, int64_t K_, int64_t i0)
      : src(src_ + i0), ld(ld_), K(K_) {
    kk0 = threadIdx.x / CHUNKS;
    col = (threadIdx.x % CHUNKS) * E::VEC;
    col_valid = i0 + col < cols;
  }
  __device__ __forceinline__ void load(T* stage, int k0) const {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int kk = kk0 + it * (THREADS / CHUNKS);
      const int64_t k = static_cast<int64_t>(k0) + kk;
      const bool valid = col_valid && k < K;
      cp_async_16(stage + Tile::at(col, kk), valid ? src + k * ld + col : src, valid);
    }
  }
};

// fprop's and dgrad's A operand, K-major: row i is the pixel m0 + i (output pixel (n, p, q) for fprop,
// input pixel (n, h, w) for dgrad), the reduction index k = (r, s, c) walks filter taps and the
// `channels` channels of the group (from `channel0`) of the gathered activation.
//
// Address arithmetic is split so that the per-copy work is small: per row (once per block) a pointer to
// the pixel the taps are relative to, and its coordinates y0, x0 in the source's grid; per reduction tile
// (once per thread, shared by its rows) the tap's offset (dy, dx) and the matching element offset `delta`,
// recomputed only when the tap changes (else delta just advances by BK channels); per copy two bounds
// tests and one 64-bit add. fprop reads x at (y0 + r*dil, x0 + s*dil) with
// (y0, x0) = (p*stride - pad, q*stride - pad). dgrad reads dy at ((h + pad - r*dil) / stride, ...) with
// (y0, x0) = (h + pad, w + pad) and negated taps: with stride 1 (most dgrad: strided dgrad runs as stride-1
// fprops, csrc/conv2d_dgrad_phases.h, unless dilated) that is fprop's form with the taps negated, and takes
// fprop's path; otherwise the quotient is tested for exactness per copy (`gather_direct` false). Each thread
// keeps its chunk's (r, s, c), advanced by BK per call (no division in the main loop but dgrad's). The reduction K = R*S*channels is
// below 2^31 (the host checks), so k, c and the tap are 32-bit; offsets into the tensor are 64-bit.
template <typename T, int ROWS, int THREADS, bool DGRAD>
struct ActivationKMajorLoader {
  using E = ImplicitGemmElement<T>;
  using Tile = OperandTile<T, true, ROWS>;
  static constexpr int CHUNKS = E::BK / E::VEC;
  static constexpr int ITERS = ROWS * CHUNKS / THREADS;
  static constexpr int ROW_STEP = THREADS / CHUNKS;  // rows between a thread's copies
  static constexpr int kNoRow = -(1 << 29);  // y0 of a row past the end: every tap lands outside the source
  static_assert(ITERS >= 1 && ROWS * CHUNKS % THREADS == 0 && THREADS % CHUNKS == 0, "tile / thread mismatch");
  static_assert(ROW_STEP % Tile::SWIZZLE_ROWS == 0, "a thread's rows share their swizzle");
  const T* src;           // the source's element 0: the address a zero-filling copy names
  int K, channels;
  int src_h, src_w;       // the source's spatial grid: x's H x W (fprop), dy's P x Q (dgrad)
  int64_t src_c;          // its channels (pixel stride)
  int dil_h, dil_w, stride_h, stride_w, S;
  int row0, chunk_k;
  int dst;                // the shared-memory offset of this thread's first chunk in a stage (+ it * ROW_STEP rows)
  const T* row_ptr[ITERS];  // fprop: the row's reference pixel (y0, x0), channel channel0; dgrad: its image, channel0
  int y0[ITERS], x0[ITERS];
  bool gather_direct;     // fprop, or stride-1 dgrad: the tap's offset from a row's pixel is one `delta`
  int r, s, c;            // tap and channel of this thread's chunk at the next load
  int dy, dx;             // that tap's offset from (y0, x0): forward for fprop, backward for dgrad
  int64_t delta;          // gather_direct: the element offset of (dy, dx, c) from a row's reference pixel

  __device__ __forceinline__ ActivationKMajorLoader(const T* src_, const Conv2dProblem& pb, const GatherDivisors& gd,
                                                    int64_t M, int64_t K_, int64_t channels_, int64_t channel0,
                                                    int64_t m0, int64_t k0)
      : src(src_), K(static_cast<int>(K_)), channels(static_cast<int>(channels_)) {
    row0 = threadIdx.x / CHUNKS;
    chunk_k = (threadIdx.x % CHUNKS) * E::VEC;
    dst = Tile::at(row0, chunk_k);
    src_h = static_cast<int>(DGRAD ? pb.P : pb.H);
    src_w = static_cast<int>(DGRAD ? pb.Q : pb.W);
    src_c = DGRAD ? pb.K : pb.C;
    dil_h = static_cast<int>(pb.dil_h), dil_w = static_cast<int>(pb.dil_w);
    stride_h = static_cast<int>(pb.stride_h), stride_w = static_cast<int>(pb.stride_w);
    S = static_cast<int>(pb.S);
    gather_direct = !DGRAD || (stride_h == 1 && stride_w == 1);
    // the pixel grid the rows walk: the output's for fprop, the input's for dgrad
    const int64_t height = DGRAD ? pb.H : pb.P, width = DGRAD ? pb.W : pb.Q;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t m = m0 + row0 + it * ROW_STEP;
      // (gd.fast: m < 2^31, split by multiplies)
      const Pixel px = gd.fast ? split_pixel(static_cast<uint32_t>(m), gd) : split_pixel(m, height, width);
      int yy, xx;
      if (DGRAD) {
        yy = static_cast<int>(px.y + pb.pad_h), xx = static_cast<int>(px.x + pb.pad_w);
      } else {
        yy = static_cast<int>(px.y * pb.stride_h - pb.pad_h), xx = static_cast<int>(px.x * pb.stride_w - pb.pad_w);
      }
      const int64_t image = px.n * src_h * src_w * src_c;
      // the direct gather adds the tap's offset from (y0, x0); strided dgrad the whole (p, q) offset per copy.
      // (The pointer may name a pixel outside the image, in the padding: only in-bounds taps are added and read.)
      const int64_t pixel = gather_direct ? (static_cast<int64_t>(yy) * src_w + xx) * src_c : 0;
      row_ptr[it] = m < M ? src + image + channel0 + pixel : src;
      y0[it] = m < M ? yy : kNoRow;
      x0[it] = xx;
    }
    // (no channels: no reduction tile is ever loaded, and nothing to divide by)
    // (gd.fast: k is below the whole reduction + BK <= 2^31 - 32, check_reduction_fits' headroom)
    const TapChannel t = channels <= 0 ? TapChannel{0, 0, 0}
                         : gd.fast    ? split_tap_channel(static_cast<uint32_t>(k0 + chunk_k), gd)
                                      : split_tap_channel(k0 + chunk_k, channels, pb.S);
    r = static_cast<int>(t.r), s = static_cast<int>(t.s), c = static_cast<int>(t.c);
    set_tap();
  }

  __device__ __forceinline__ void set_tap() {
    dy = DGRAD ? -r * dil_h : r * dil_h, dx = DGRAD ? -s * dil_w : s * dil_w;
    delta = (static_cast<int64_t>(dy) * src_w + dx) * src_c + c;
  }

  __device__ __forceinline__ void load(T* stage, int k0) {
    const bool k_valid = k0 + chunk_k < K;
    if (gather_direct) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int h = y0[it] + dy, w = x0[it] + dx;
        const bool valid = k_valid && static_cast<unsigned>(h) < static_cast<unsigned>(src_h) &&
                           static_cast<unsigned>(w) < static_cast<unsigned>(src_w);
        cp_async_16<true>(stage + dst + it * ROW_STEP * Tile::LD, valid ? row_ptr[it] + delta : src, valid);
      }
    } else {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        // the output pixel whose tap (r, s) reads input pixel (h, w): see Conv2dProblem::output_row
        const int th = y0[it] + dy, tw = x0[it] + dx;
        const int p = th / stride_h, q = tw / stride_w;
        const bool valid = k_valid && th >= 0 && tw >= 0 && p * stride_h == th && q * stride_w == tw &&
                           p < src_h && q < src_w;
        const int64_t offset = (static_cast<int64_t>(p) * src_w + q) * src_c + c;
        cp_async_16<true>(stage + dst + it * ROW_STEP * Tile::LD, valid ? row_ptr[it] + offset : src, valid);
      }
    }
    // advance this chunk's (r, s, c) by one reduction tile; the tap changes once every channels / BK tiles
    c += E::BK;
    if (c < channels) {
      delta += E::BK;
    } else {
      do {
        c -= channels;
        if (++s == S) s = 0, ++r;
      } while (c >= channels);
      set_tap();
    }
  }
};

// wgrad's B operand, MN-major: element (k, j) with k the output pixel (n, p, q) and j = (r, s, c) the
// filter element: x gathered at (n, p, q) through tap (r, s), channel channel0 + c. A thread's column
// (hence its (r, s, c)) is fixed; its rows change with every tile.
template <typename T, int COLS, int THREADS>
struct ActivationMNMajorLoader {
  using E = ImplicitGemmElement<T>;
  using Tile = OperandTile<T, false, COLS>;
  static constexpr int CHUNKS = COLS / E::VEC;
  static constexpr int ITERS = E::BK * CHUNKS / THREADS;
  static_assert(ITERS >= 1 && E::BK * CHUNKS % THREADS == 0 && THREADS % CHUNKS == 0, "tile / thread mismatch");
  const T* src;
  Conv2dProblem pb;
  int64_t K;  // reduction extent N * P * Q
  int kk0, col;
  bool col_valid;
  int dh, dw;          // r * dil - pad, s * dil - pad of this thread's tap
  int64_t channel;     // absolute channel of this thread's vector
  FastDivmod plane, width;  // P * Q and Q: a pixel index's image, then its row and column

  __device__ __forceinline__ ActivationMNMajorLoader(const T* src_, const Conv2dProblem& pb_, int64_t cols, int64_t K_,
                                                     int64_t channels, int64_t channel0, int64_t j0)
      : src(src_), pb(pb_), K(K_) {
    kk0 = threadIdx.x / CHUNKS;
    col = (threadIdx.x % CHUNKS) * E::VEC;
    col_valid = j0 + col < cols;
    const TapChannel t = channels > 0 ? split_tap_channel(j0 + col, channels, pb.S) : TapChannel{0, 0, 0};
    dh = static_cast<int>(t.r * pb.dil_h - pb.pad_h);
    dw = static_cast<int>(t.s * pb.dil_w - pb.pad_w);
    channel = channel0 + t.c;
    plane = FastDivmod(static_cast<uint32_t>(pb.P * pb.Q > 0 ? pb.P * pb.Q : 1));  // (empty: nothing is loaded)
    width = FastDivmod(static_cast<uint32_t>(pb.Q > 0 ? pb.Q : 1));
  }
  __device__ __forceinline__ void load(T* stage, int k0) const {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int kk = kk0 + it * (THREADS / CHUNKS);
      const int64_t k = static_cast<int64_t>(k0) + kk;
      int64_t offset = -1;
      if (col_valid && k < K) {
        // 32-bit pixel split, by multiplies: the host guarantees N * P * Q < 2^31
        uint32_t n, rest, p, q;
        plane.divmod(static_cast<uint32_t>(k), n, rest);
        width.divmod(rest, p, q);
        const int h = static_cast<int>(p) * static_cast<int>(pb.stride_h) + dh;
        const int w = static_cast<int>(q) * static_cast<int>(pb.stride_w) + dw;
        if (h >= 0 && h < pb.H && w >= 0 && w < pb.W)
          offset = ((static_cast<int64_t>(n) * pb.H + h) * pb.W + w) * pb.C + channel;
      }
      cp_async_16<true>(stage + Tile::at(col, kk), offset >= 0 ? src + offset : src, offset >= 0);
    }
  }
};

// ---- the main loop ------------------------------------------------------------------------------------

// One warp's share of a k step (k16 for fp16/bf16, k8 for TF32): `load` reads its A and B fragments from a
// stage into registers, `mma` issues its (WM/16) x (WN/8) tensor-core MMAs on them. With two sets of
// fragments (Cfg::FRAGMENT_BUFFERS) the main loop has the shared-memory loads of step k+1 in flight while the
// MMAs of step k run. The constructor computes, once, where in a stage this lane's first fragment rows are;
// every other address is that plus a k step (an XOR in the swizzled K-major layout) and a constant row offset.
template <typename T, typename Cfg, bool A_K_MAJOR, bool B_K_MAJOR>
struct WarpMma {
  using ATile = OperandTile<T, A_K_MAJOR, Cfg::BM>;
  using BTile = OperandTile<T, B_K_MAJOR, Cfg::BN>;
  static constexpr bool kTf32 = sizeof(T) == 4;
  static constexpr int KSTEP = kTf32 ? 8 : 16;
  static constexpr int KSTEPS = ImplicitGemmElement<T>::BK / KSTEP;  // k steps per reduction tile

  struct Fragments {
    uint32_t a[Cfg::MI][4], b[Cfg::NI][2];
  };

  int a_lane, b_lane;  // offsets within a stage of this lane's rows (mi = 0, nj = 0, k step 0)

  // The warp's tile starts at (wm0, wn0) of the block's.
  __device__ __forceinline__ WarpMma(int wm0, int wn0) {
    const int lane = threadIdx.x % 32;
    if constexpr (!kTf32) {
      const int j = lane / 8, i = lane % 8;  // ldmatrix: lane supplies row i of 8x8 matrix j
      // A matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) = a0..a3
      const int m = wm0 + (j % 2) * 8, ka = (j / 2) * 8;
      a_lane = A_K_MAJOR ? ATile::at(m + i, ka) : ATile::at(m, ka + i);
      // B matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of two n8 tiles
      const int n = wn0 + (j / 2) * 8, kb = (j % 2) * 8;
      b_lane = B_K_MAJOR ? BTile::at(n + i, kb) : BTile::at(n, kb + i);
    } else {
      const int g = lane / 4, t = lane % 4;  // TF32 fragments: a (g|g+8, t|t+4), b (t|t+4, g)
      a_lane = ATile::at(wm0 + g, t);
      b_lane = BTile::at(wn0 + g, t);
    }
  }

  // The warp's fragments over reduction indices [kk, kk + KSTEP) of the stage at As, Bs.
  __device__ __forceinline__ void load(Fragments& f, const T* As, const T* Bs, int kk) const {
    const int a_k = ATile::add_k(a_lane, kk), b_k = BTile::add_k(b_lane, kk);
    if constexpr (!kTf32) {
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) ldmatrix_x4<!A_K_MAJOR>(f.a[mi], As + ATile::add_rows(a_k, mi * 16));
#pragma unroll
      for (int nj = 0; nj < Cfg::NI; nj += 2) {
        uint32_t r[4];
        ldmatrix_x4<!B_K_MAJOR>(r, Bs + BTile::add_rows(b_k, nj * 8));
        f.b[nj][0] = r[0], f.b[nj][1] = r[1], f.b[nj + 1][0] = r[2], f.b[nj + 1][1] = r[3];
      }
    } else {
      const int a_k4 = ATile::add_k(a_lane, kk + 4), b_k4 = BTile::add_k(b_lane, kk + 4);
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) {
        f.a[mi][0] = to_tf32(load_shared_f32(As + ATile::add_rows(a_k, mi * 16)));
        f.a[mi][1] = to_tf32(load_shared_f32(As + ATile::add_rows(a_k, mi * 16 + 8)));
        f.a[mi][2] = to_tf32(load_shared_f32(As + ATile::add_rows(a_k4, mi * 16)));
        f.a[mi][3] = to_tf32(load_shared_f32(As + ATile::add_rows(a_k4, mi * 16 + 8)));
      }
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni) {
        f.b[ni][0] = to_tf32(load_shared_f32(Bs + BTile::add_rows(b_k, ni * 8)));
        f.b[ni][1] = to_tf32(load_shared_f32(Bs + BTile::add_rows(b_k4, ni * 8)));
      }
    }
  }

  __device__ __forceinline__ static void mma(float (&acc)[Cfg::MI][Cfg::NI][4], const Fragments& f) {
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni) mma_16x8<T>(acc[mi][ni], f.a[mi], f.b[ni]);
  }
};


// Split-K (fprop's small grids, wgrad): the reduction tiles [begin, end) of split `split` of `splits`, each
// ceil(k_tiles / splits) tiles but the last (the host's count leaves none empty: implicit_gemm_nonempty_splits).
__device__ __forceinline__ void split_tile_range(int64_t k_tiles, int64_t splits, int64_t split, int64_t& begin,
                                                 int64_t& end) {
  const int64_t per_split = (k_tiles + splits - 1) / splits;
  begin = split * per_split;
  end = begin + per_split < k_tiles ? begin + per_split : k_tiles;
}

// The block's accumulators over reduction tiles [kt_begin, kt_end) (each BK wide): the cp.async pipeline
// around WarpMma. `smem` holds STAGES stages of A then STAGES stages of B.
//
// Order within reduction tile t (stage st = t % STAGES), with two fragment sets (step 0's already loaded):
//   k step 0: load step 1's fragments, issue step 0's MMAs, then the copies of tile t + STAGES - 1 into the
//             stage tile t - 1 used (every warp finished reading it before the barrier that ended tile t - 1);
//   k step s: load step s + 1's fragments, issue step s's MMAs;
//   then wait for tile t + 1's copies, barrier, and load its first fragments.
// So the shared-memory loads of a step overlap the MMAs of the one before, the MMAs of the first step overlap
// the loaders' address arithmetic, and those of the last step the wait and the barrier. With one set, each
// step loads its own fragments just before its MMAs; the order is otherwise the same. (Volatile inline PTX
// keeps its order: the order written here is the order issued.)
template <typename T, typename Cfg, bool A_K_MAJOR, bool B_K_MAJOR, typename ALoader, typename BLoader>
__device__ __forceinline__ void implicit_gemm_mainloop(float (&acc)[Cfg::MI][Cfg::NI][4], T* smem, ALoader& a_loader,
                                                       BLoader& b_loader, int kt_begin, int kt_end) {
  using Mma = WarpMma<T, Cfg, A_K_MAJOR, B_K_MAJOR>;
  constexpr bool kDouble = Cfg::FRAGMENT_BUFFERS == 2;
  static_assert(Mma::KSTEPS % 2 == 0, "each tile ends on the fragment set it began with");
  constexpr int BK = ImplicitGemmElement<T>::BK;
  constexpr int A_ELEMS = Mma::ATile::ELEMS, B_ELEMS = Mma::BTile::ELEMS;
  T* As = smem;
  T* Bs = smem + Cfg::STAGES * A_ELEMS;
  const int warp = threadIdx.x / 32;
  const Mma warp_mma((warp / Cfg::WARPS_N) * Cfg::WM, (warp % Cfg::WARPS_N) * Cfg::WN);
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  const int tiles = kt_end - kt_begin;  // 32-bit: a reduction (R*S*C, or wgrad's N*P*Q) is below 2^31
  if (tiles <= 0) return;
  // Prologue: stages 0 .. STAGES-2 in flight. Every tile commits one group (empty past the end), so
  // "all but the newest STAGES-2 groups complete" always means "the stage about to be used has landed".
#pragma unroll
  for (int st = 0; st < Cfg::STAGES - 1; ++st) {
    if (st < tiles) {
      a_loader.load(As + st * A_ELEMS, (kt_begin + st) * BK);
      b_loader.load(Bs + st * B_ELEMS, (kt_begin + st) * BK);
    }
    cp_async_commit();
  }
  typename Mma::Fragments frag[Cfg::FRAGMENT_BUFFERS];
  cp_async_wait<Cfg::STAGES - 2>();
  __syncthreads();  // stage 0 is visible to all
  if constexpr (kDouble) warp_mma.load(frag[0], As, Bs, 0);
  for (int t = 0; t < tiles; ++t) {
    const T* A_stage = As + (t % Cfg::STAGES) * A_ELEMS;
    const T* B_stage = Bs + (t % Cfg::STAGES) * B_ELEMS;
#pragma unroll
    for (int ks = 0; ks < Mma::KSTEPS; ++ks) {
      if constexpr (kDouble) {
        if (ks + 1 < Mma::KSTEPS) warp_mma.load(frag[(ks + 1) % 2], A_stage, B_stage, (ks + 1) * Mma::KSTEP);
      } else {
        warp_mma.load(frag[0], A_stage, B_stage, ks * Mma::KSTEP);
      }
      Mma::mma(acc, frag[ks % Cfg::FRAGMENT_BUFFERS]);
      if (ks == 0) {
        const int next = t + Cfg::STAGES - 1;
        if (next < tiles) {
          const int nst = next % Cfg::STAGES;
          a_loader.load(As + nst * A_ELEMS, (kt_begin + next) * BK);
          b_loader.load(Bs + nst * B_ELEMS, (kt_begin + next) * BK);
        }
        cp_async_commit();
      }
    }
    if (t + 1 < tiles) {  // (uniform across the block: every thread reaches the barrier or none)
      cp_async_wait<Cfg::STAGES - 2>();
      __syncthreads();  // stage (t + 1) % STAGES is visible to all; every warp is done reading stage t % STAGES
      if constexpr (kDouble) {
        warp_mma.load(frag[0], As + ((t + 1) % Cfg::STAGES) * A_ELEMS, Bs + ((t + 1) % Cfg::STAGES) * B_ELEMS, 0);
      }
    }
  }
  cp_async_wait<0>();
}

// This thread's first accumulator in the block's tile, in the mma.sync C fragment layout: lane (g, t) of a warp
// holds rows g and g + 8, columns 2t and 2t + 1 of each of its 16 x 8 tiles; the warp's tiles start at (wm0, wn0).
struct AccumulatorOrigin {
  int row, col;
};
template <typename Cfg>
__device__ __forceinline__ AccumulatorOrigin accumulator_origin() {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return {(warp / Cfg::WARPS_N) * Cfg::WM + lane / 4, (warp % Cfg::WARPS_N) * Cfg::WN + 2 * (lane % 4)};
}

// Visits the accumulators with their tile coordinates: f(i, j, v0, v1) for the pair of columns (j, j + 1)
// of row i (i, j relative to the block's tile; accumulator_origin's layout).
template <typename Cfg, typename F>
__device__ __forceinline__ void for_each_accumulator_pair(const float (&acc)[Cfg::MI][Cfg::NI][4], F&& f) {
  const AccumulatorOrigin o = accumulator_origin<Cfg>();
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni) {
      const int i = o.row + mi * 16, j = o.col + ni * 8;
      f(i, j, acc[mi][ni][0], acc[mi][ni][1]);
      f(i + 8, j, acc[mi][ni][2], acc[mi][ni][3]);
    }
}

// ---- the block's tile -----------------------------------------------------------------------------------
//
// The grid's x walks the tiles of C in one dimension (y is unused; z counts groups and splits). fprop and dgrad
// walk N fastest: the blocks of one M tile (the same gathered activation rows, the large operand) run side by side,
// so those rows come from DRAM once and from L2 for the other N tiles, while the filters (B, a few MB at most)
// stay in L2 whatever the order. With M fastest (blockIdx.x along M, as before version 7), a layer of 256 filters
// in 128-wide tiles read its activations twice: once per N tile, a whole output's writes apart, by when L2 had
// evicted them. wgrad, whose operands are both activations, keeps M fastest.
// Each call reads blockIdx.x anew (reread_block_index): fprop and dgrad call it again for the epilogue.
template <typename Cfg, bool N_FASTEST>
__device__ __forceinline__ void implicit_gemm_block_tile(int64_t M, int64_t N, int64_t& m0, int64_t& n0) {
  const unsigned x = reread_block_index<false>();  // < tiles_m * tiles_n < 2^31 (implicit_gemm_grid)
  if constexpr (N_FASTEST) {
    const unsigned tiles_n = static_cast<unsigned>((N + Cfg::BN - 1) / Cfg::BN);
    m0 = static_cast<int64_t>(x / tiles_n) * Cfg::BM;
    n0 = static_cast<int64_t>(x % tiles_n) * Cfg::BN;
  } else {
    const unsigned tiles_m = static_cast<unsigned>((M + Cfg::BM - 1) / Cfg::BM);
    m0 = static_cast<int64_t>(x % tiles_m) * Cfg::BM;
    n0 = static_cast<int64_t>(x / tiles_m) * Cfg::BN;
  }
}

// ---- epilogue ----------------------------------------------------------------------------------------
//
// The accumulators leave through shared memory (version 8). In the mma.sync C layout (and wgmma's D layout) a
// lane holds 2 adjacent columns of a row, so a store straight from the registers writes 4 or 8 bytes per lane,
// and a warp's store instruction covers 8 rows x 16 bytes: eight half-used 32-byte sectors, 32 instructions per
// thread for tile 0, and the same pattern for the residual's loads. A 1x1 layer of 64 channels expanding to 256
// (ResNet-50's l1_1x1) moves 103 of its 128 MB through that epilogue. Instead each warp writes a 16-row slice of
// its tile to shared memory in fp32 and reads it back as whole 16-byte chunks: consecutive lanes own consecutive
// chunks of a row, so each store (and residual load) is 16 bytes per lane over whole sectors, 4x fewer
// instructions for fp16/bf16, and scale and shift are loaded once per thread as 16-byte vectors.
//
// The slice is 16 rows of WN floats padded to WN + 8 (WN a multiple of 32: the row stride is 8 banks mod 32), and
// swizzled: float column c of row r is stored at c ^ 4 when bit 0 of r and bit 5 of c differ (staged_column), which
// exchanges the two 16-byte quarters of an 8-column chunk in every other row.
//  - Writes are 8-byte pairs, served per half warp: lane (g, t) of a half warp hits slot 4g + (t or t ^ 2) of the
//    16 8-byte slots of a 128-byte line (+ 4 ni): all distinct.
//  - Reads are 16-byte quarters, served per 8 lanes, and a phase is 8 consecutive chunks: 2 rows of 4 (WN 32,
//    fp16/bf16), or 8 of one row. Quarter h of chunk c of row r lies in 16-byte group (2r + 2c + (h ^ flip)) mod 8
//    for fp16/bf16 (whose 16-byte output chunk is two quarters of floats), flip = (r ^ c / 4) & 1: the phase's two
//    rows, or its two halves of a row, read opposite parities, so all 8 groups; for fp32 (a chunk is one quarter)
//    the group is (2r + (c ^ flip)) mod 8 with flip = (r ^ c / 8) & 1, constant within a phase: distinct. Without the swizzle fp16/bf16 reads were 2-way
//    conflicted; with it both sides need no instruction in the loop (the swizzled offsets are per-lane constants).
// (tests/test_kernel_emulation.py checks both for conflicts.)
// The same fp32 arithmetic in the same order as before (acc * scale + shift + residual, ReLU, one rounding), so
// results are unchanged bit for bit.

// The staged epilogue's shared memory: per warp, 16 rows of WN + 8 floats.
template <typename Cfg>
__host__ __device__ constexpr int conv_epilogue_smem_bytes() {
  return Cfg::WARPS_M * Cfg::WARPS_N * 16 * (Cfg::WN + 8) * static_cast<int>(sizeof(float));
}

// Where float column `col` of row `row` of a staged slice is stored (see the top of this section).
__device__ __forceinline__ int staged_column(int row, int col) { return col ^ (((row ^ (col >> 5)) & 1) << 2); }

// Shared-memory accesses of the staged epilogue: an 8-byte store of an accumulator pair and a 16-byte load of
// four floats. Wrapped so that the kernel emulation can check their banks (tests/kernel_emulation, emu.h).
__device__ __forceinline__ void stage_store2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
#endif
}
__device__ __forceinline__ void stage_load4(float (&v)[4], const float* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
#endif
}

// 16 bytes of T (VEC elements): the staged epilogue's unit of global access, one uint4 loaded with __ldg or stored
// with st_global_16, and unpacked to (packed from) VEC floats.
template <typename T>
struct Chunk16 {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));
};
__device__ __forceinline__ void unpack_word(uint32_t w, float* v, float) { v[0] = __uint_as_float(w); }
__device__ __forceinline__ void unpack_word(uint32_t w, float* v, __half) {
  const float2 f = __half22float2(reinterpret_cast<const __half2&>(w));
  v[0] = f.x, v[1] = f.y;
}
__device__ __forceinline__ void unpack_word(uint32_t w, float* v, __nv_bfloat16) {
  const float2 f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(w));
  v[0] = f.x, v[1] = f.y;
}
__device__ __forceinline__ uint32_t pack_word(const float* v, float) { return __float_as_uint(v[0]); }
__device__ __forceinline__ uint32_t pack_word(const float* v, __half) {
  const __half2 h = __floats2half2_rn(v[0], v[1]);
  return reinterpret_cast<const uint32_t&>(h);
}
__device__ __forceinline__ uint32_t pack_word(const float* v, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v[0], v[1]);
  return reinterpret_cast<const uint32_t&>(h);
}
// The 16 bytes of p[0 .. VEC), or of p[e] for e < count and `fill` after; one 16-byte load when `whole` (count is VEC
// and p is aligned). Kept as raw words until used: half the registers of floats for fp16/bf16.
template <typename T>
__device__ __forceinline__ uint4 load_chunk_bits(const T* p, bool whole, int count, float fill) {
  if (whole) return __ldg(reinterpret_cast<const uint4*>(p));
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = __float_as_uint(e < count ? p[e] : fill);
  } else {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
    const T fill_t = from_float<T>(fill);
    const uint16_t fill_bits = reinterpret_cast<const uint16_t&>(fill_t);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = 2 * i < count ? bits[2 * i] : fill_bits, hi = 2 * i + 1 < count ? bits[2 * i + 1] : fill_bits;
      w[i] = lo | hi << 16;
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
template <typename T>
__device__ __forceinline__ void unpack_chunk(uint4 u, float (&v)[Chunk16<T>::VEC]) {
  constexpr int PER_WORD = 4 / static_cast<int>(sizeof(T));
  unpack_word(u.x, v, T()), unpack_word(u.y, v + PER_WORD, T());
  unpack_word(u.z, v + 2 * PER_WORD, T()), unpack_word(u.w, v + 3 * PER_WORD, T());
}
// A plain 16-byte global store (p 16-byte aligned). PTX, because nvcc turned a uint4 assignment into four 32-bit
// stores (merged with the element-wise path's), and __stwb into a strong store (STG.E.128.STRONG.SM) with a memory
// clobber. No clobber here: nothing the kernel reads afterwards aliases its output.
__device__ __forceinline__ void st_global_16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d));
#endif
}
// p[e] = v[e] rounded to T, as one 16-byte store (p aligned).
template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const float (&v)[Chunk16<T>::VEC]) {
  constexpr int PER_WORD = 4 / static_cast<int>(sizeof(T));
  st_global_16(p, pack_word(v, T()), pack_word(v + PER_WORD, T()), pack_word(v + 2 * PER_WORD, T()),
               pack_word(v + 3 * PER_WORD, T()));
}
// p[0] = a, p[1] = b rounded to T, as one 4-byte (fp16/bf16) or 8-byte (fp32) store (p aligned to that).
__device__ __forceinline__ void store_pair(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store_pair(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// The convolution epilogue of fprop and dgrad: for the block's tile at (m0, n0) of an M x Ncols GEMM whose
// C is the NHWC tensor out (row m at m * ldc, column n at channel col0 + n),
//     out = relu?(acc * scale[ch] + shift[ch] + residual[m, ch])     (ch = col0 + n)
// each term optional (null pointer): bias or a folded BatchNorm's shift, its scale, a ResNet shortcut added
// before the ReLU. Staged through `stage` (conv_epilogue_smem_bytes of the block's shared memory: the memory of the
// main loop's stages, reused once the barrier at the start has seen every warp finish reading them). Chunks go out
// as one 16-byte store when the channel offsets and every pointer keep them aligned; otherwise (channels per group
// not a multiple of 8, a pointer not 16-byte aligned) in column pairs where offsets are even, else element by
// element.
template <typename T, typename Cfg>
__device__ __forceinline__ void conv_epilogue(const float (&acc)[Cfg::MI][Cfg::NI][4], float* stage, int64_t m0,
                                              int64_t n0, int64_t M, int64_t Ncols, int64_t ldc, int64_t col0, T* out,
                                              const T* scale, const T* shift, const T* residual, bool relu) {
  constexpr int VEC = Chunk16<T>::VEC;
  constexpr int LD = Cfg::WN + 8;                   // floats per staged row
  constexpr int CHUNKS = Cfg::WN / VEC;             // 16-byte output chunks per row of the warp's tile
  static_assert(Cfg::WN % 32 == 0 && 32 % CHUNKS == 0, "a lane keeps its chunk column in every row it reads");
  constexpr int ROWS_PER_STEP = 32 / CHUNKS;        // rows the warp reads back per step
  static_assert(ROWS_PER_STEP % 2 == 0, "a lane keeps its rows' parity, hence its swizzled offsets");
  constexpr int STEPS = 16 / ROWS_PER_STEP;         // steps per 16-row slice
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
  float* slice = stage + warp * 16 * LD;
  // where this lane's accumulator pairs go (the C fragment layout: rows g and g + 8, columns 2t + 8 ni and + 1):
  // pair_at[h] + 8 ni for the ni whose columns have bit 5 equal to h, (ni / 4) % 2
  const int g = lane / 4, t = lane % 4;
  const int pair_at[2] = {g * LD + staged_column(g, 2 * t), g * LD + staged_column(g, 2 * t + 32) - 32};
  // the chunk this lane reads back: columns chunk * VEC .. + VEC - 1 of rows row_in + ROWS_PER_STEP * step, whose
  // parity is row_in's; read_at[q]: its quarter q (4 floats)
  const int chunk = lane % CHUNKS, row_in = lane / CHUNKS;
  int read_at[VEC / 4];
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) read_at[q] = row_in * LD + staged_column(row_in, chunk * VEC + 4 * q);

  const int64_t n = n0 + wn0 + chunk * VEC;         // the chunk's first column
  const int64_t ch = col0 + n;
  const int cols = n >= Ncols ? 0 : (Ncols - n < VEC ? static_cast<int>(Ncols - n) : VEC);
  const bool aligned = ldc % VEC == 0 && col0 % VEC == 0 && aligned16(out) &&
                       (scale == nullptr || aligned16(scale)) && (shift == nullptr || aligned16(shift)) &&
                       (residual == nullptr || aligned16(residual));
  const bool whole = aligned && cols == VEC;        // the chunk is one aligned 16-byte access
  // else, pairs of columns as one 4- or 8-byte store (what the epilogue before version 8 did everywhere)
  const bool paired = ldc % 2 == 0 && col0 % 2 == 0 && (reinterpret_cast<uintptr_t>(out) % (2 * sizeof(T))) == 0;
  // scale and shift of the chunk's channels, the same in every row (1 and 0 past the last channel)
  float scale_v[VEC], shift_v[VEC];
  unpack_chunk<T>(scale != nullptr ? load_chunk_bits(scale + ch, whole, cols, 1.f) : uint4{}, scale_v);
  unpack_chunk<T>(shift != nullptr ? load_chunk_bits(shift + ch, whole, cols, 0.f) : uint4{}, shift_v);

  __syncthreads();  // every warp has finished reading the main loop's stages, which the slices may overlap
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi) {
    const int64_t slice_m = m0 + wm0 + mi * 16;     // the slice's first row
    // the residual of the lane's chunk in read-back step s (raw words: half the registers of floats for fp16/bf16;
    // 0 where there is none to read). The next step's is loaded before this one is finished, and step 0's before
    // the slice is staged, so that the loads' latency overlaps other work.
    const auto residual_bits = [&](int step) {
      const int64_t m = slice_m + row_in + step * ROWS_PER_STEP;
      return residual != nullptr && m < M && cols > 0 ? load_chunk_bits(residual + m * ldc + ch, whole, cols, 0.f)
                                                       : uint4{};
    };
    uint4 residual_next = residual_bits(0);
    if (mi > 0) __syncwarp();  // the previous slice has been read back
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni) {
      float* pair = slice + pair_at[(ni / 4) % 2] + ni * 8;
      stage_store2(pair, acc[mi][ni][0], acc[mi][ni][1]);
      stage_store2(pair + 8 * LD, acc[mi][ni][2], acc[mi][ni][3]);
    }
    __syncwarp();
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
      const uint4 residual_now = residual_next;
      if (step + 1 < STEPS) residual_next = residual_bits(step + 1);
      float v[VEC];
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q) {
        float four[4];
        stage_load4(four, slice + read_at[q] + step * ROWS_PER_STEP * LD);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[4 * q + e] = four[e];
      }
      const int64_t m = slice_m + row_in + step * ROWS_PER_STEP;
      if (m >= M || cols == 0) continue;
      // v = relu?(acc * scale + shift + residual), the terms applied only when present (adding a zero shift would
      // turn -0 into +0)
      float residual_v[VEC];
      unpack_chunk<T>(residual_now, residual_v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (scale != nullptr) v[e] *= scale_v[e];
        if (shift != nullptr) v[e] += shift_v[e];
        if (residual != nullptr) v[e] += residual_v[e];
        if (relu && v[e] < 0.f) v[e] = 0.f;  // NaN passes, as torch's relu
      }
      T* dst = out + m * ldc + ch;
      if (whole) {
        store_chunk(dst, v);
      } else if (paired) {  // an even number of channels, or even offsets: pairs, then a last odd column
#pragma unroll
        for (int e = 0; e < VEC; e += 2) {
          if (e + 1 < cols) {
            store_pair(dst + e, v[e], v[e + 1]);
          } else if (e < cols) {
            dst[e] = from_float<T>(v[e]);
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (e < cols) dst[e] = from_float<T>(v[e]);
      }
    }
  }
}

#if !defined(__CUDACC_RTC__)  // host side: tile choice and launch helpers

// Dynamic shared memory of one block: STAGES stages of both operand tiles (or the staged epilogue, if larger).
template <typename T, typename Cfg, bool A_K_MAJOR, bool B_K_MAJOR>
constexpr int implicit_gemm_smem_bytes() {
  const int stages = Cfg::STAGES *
                     (OperandTile<T, A_K_MAJOR, Cfg::BM>::ELEMS + OperandTile<T, B_K_MAJOR, Cfg::BN>::ELEMS) *
                     static_cast<int>(sizeof(T));
  // (fprop and dgrad stage their epilogue in the same memory; it is smaller than the stages of every tile)
  return stages > conv_epilogue_smem_bytes<Cfg>() ? stages : conv_epilogue_smem_bytes<Cfg>();
}

// Calls f(Cfg{}) with the mma.sync tile configuration of index `tile` (0 .. kImplicitGemmMmaSyncTiles - 1).
template <typename F>
cudaError_t dispatch_implicit_gemm_tile(int tile, F&& f) {
  switch (tile) {
    case 0: return f(ImplicitGemmTile0{});
    case 1: return f(ImplicitGemmTile1{});
    case 2: return f(ImplicitGemmTile2{});
    case 3: return f(ImplicitGemmTile3{});
    case 4: return f(ImplicitGemmTile4{});
    case 5: return f(ImplicitGemmTile5{});
  }
  return cudaErrorInvalidValue;
}

// The block tile (BM x BN) of configuration `tile` (a wgmma tile's is its twin's).
inline void implicit_gemm_tile_extent(int tile, int* bm, int* bn) {
  dispatch_implicit_gemm_tile(implicit_gemm_mma_sync_twin(tile), [&](auto cfg) {
    *bm = decltype(cfg)::BM, *bn = decltype(cfg)::BN;
    return cudaSuccess;
  });
}

// The tile for `tile` = -1: the largest whose grid (over an M x N GEMM, `batches` times) still fills every
// SM; a 128-wide N tile only when N needs it. For 128 x 64, tile 3 rather than tile 1 (fp16/bf16 fprop: 4 blocks
// per SM against 3; elsewhere the two compile alike):
// the H200 run of b5fddeb timed tile 3 with 3 stages 3-8% ahead of tile 1 on conv1, l1_3x3 and l3, and the
// swizzled layout gives it tile 1's 4 stages (not yet measured on a GPU).
// A wgmma tile asked for explicitly comes back as its mma.sync twin: the tile the mma.sync kernels run (fprop
// launches wgmma tiles itself, before asking).
inline int implicit_gemm_pick_tile(int tile, int64_t M, int64_t N, int64_t batches) {
  if (tile >= 0) return implicit_gemm_mma_sync_twin(tile);
  const int64_t sms = multiprocessor_count();
  if (N > 64 && ceil_div(M, 128) * ceil_div(N, 128) * batches >= sms) return 0;
  if (ceil_div(M, 128) * ceil_div(N, 64) * batches >= sms) return 3;
  return 2;
}

// Split-K's count for a reduction of k_tiles tiles: at most `splits` ranges of whole tiles, as many as leave
// none empty (split_tile_range's ranges: every split gets ceil(k_tiles / splits) tiles except the last).
inline int implicit_gemm_nonempty_splits(int64_t k_tiles, int64_t splits) {
  if (k_tiles <= 1) return 1;
  const int64_t per_split = ceil_div(k_tiles, splits < k_tiles ? splits : k_tiles);
  return static_cast<int>(ceil_div(k_tiles, per_split));
}

// Split-K's count by size, for a grid of `blocks` blocks over a reduction of k_tiles tiles: about two blocks
// per SM, each split keeping at least 8 reduction tiles to amortise its prologue, at most max_splits.
inline int implicit_gemm_reduction_splits(int64_t blocks, int64_t k_tiles, int64_t max_splits) {
  int64_t want = ceil_div(2 * static_cast<int64_t>(multiprocessor_count()), blocks);
  want = std::min<int64_t>(want, std::max<int64_t>(k_tiles / 8, 1));
  return implicit_gemm_nonempty_splits(k_tiles, std::min<int64_t>(want, max_splits));
}

// Opts the kernel into `bytes` of dynamic shared memory (above the 48 KiB default). The attribute belongs to
// the current device, so it is set before every launch (a host-side call, no synchronisation).
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= kSharedMemoryBudgetBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// The grid over a tiles_m x tiles_n tile grid, `batches` times: x counts the tiles (implicit_gemm_block_tile
// orders them), z the batches (groups, splits). False where that exceeds CUDA's limits (x below 2^31, z at most
// 65535).
inline bool implicit_gemm_grid(int64_t tiles_m, int64_t tiles_n, int64_t batches, dim3* grid) {
  if (tiles_m < 1 || tiles_n < 1 || batches < 1 || batches > 65535 || tiles_m > 0x7fffffff / tiles_n) return false;
  *grid = dim3(static_cast<unsigned>(tiles_m * tiles_n), 1, static_cast<unsigned>(batches));
  return true;
}

#if defined(__CUDACC__)  // the <<<>>> launch is nvcc's (the kernel emulation compiles this header with g++)
// Launches `kernel` (Cfg's threads per block, `smem` bytes of dynamic shared memory) over the grid of a
// tiles_m x tiles_n x batches tile grid (implicit_gemm_grid), after checking it and opting into the shared memory.
template <typename Cfg, typename... Params, typename... Args>
cudaError_t launch_implicit_gemm(void (*kernel)(Params...), int smem, int64_t tiles_m, int64_t tiles_n,
                                 int64_t batches, cudaStream_t stream, Args... args) {
  dim3 grid;
  if (!implicit_gemm_grid(tiles_m, tiles_n, batches, &grid)) return cudaErrorInvalidConfiguration;
  const cudaError_t err = allow_shared_memory(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(args...);
  return cudaGetLastError();
}
#endif  // defined(__CUDACC__)

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
