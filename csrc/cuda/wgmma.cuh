// Hopper (sm_90a) warpgroup MMAs for the implicit-GEMM fprop and dgrad
// (conv2d_implicit_gemm_{fprop,dgrad}_wgmma_kernel.cu).
//
// What changes against the mma.sync main loop of implicit_gemm.cuh, and why. On Hopper, mma.sync runs at
// about two thirds of the tensor cores' rate; wgmma.mma_async, issued by a warpgroup (4 warps, 128 threads),
// reaches the rest, and it reads both operands straight from shared memory: no ldmatrix, no fragment
// registers, no shared-memory load instructions in the main loop at all. A warpgroup's instruction is a
// 64 x N x 16 MMA (N = the block's BN: 64 or 128), so a block of BM = 128 rows is two warpgroups, each owning
// 64 rows and all BN columns.
//
// Operands. The loaders are implicit_gemm.cuh's (the activation gather and the filter rows, 16-byte cp.async
// copies, zero-fill at borders), and so is the shared layout: K-major rows of 64 bytes, chunk c of row i at
// chunk c ^ ((i / 2) % 4). That is, exactly, the 64-byte swizzle of wgmma's canonical K-major layout (the
// hardware XORs address bits [4, 6) with bits [7, 9) of the shared address), so a matrix descriptor can name
// a stage as it lies: start address, 512 bytes between groups of 8 rows, swizzle mode "64B". The swizzle is
// of the absolute address: every stage starts on a 512-byte boundary (the kernel aligns its shared memory).
// A k step (16 elements, 32 bytes) is the start address plus 32 bytes, as in the mma.sync loop's XOR.
//
// Pipeline. cp.async writes shared memory through the generic proxy, wgmma reads it through the async proxy:
// each thread fences (fence.proxy.async) after its copies land, then the block barrier. A warpgroup issues
// a tile's two k steps, commits them as one group and lets it run while the next copies are issued; it then
// waits for the group before (wait_group 1), so one tile's MMAs are in flight across the next barrier. A stage
// may be refilled only once both warpgroups' MMAs on it are complete: the copies issued in iteration t go to
// the stage of tile t - 2 (both warpgroups waited for it before the barrier of iteration t), so the copies
// run STAGES - 2 tiles ahead rather than mma.sync's STAGES - 1.
//
// Accumulators. wgmma's D layout, per warp of the warpgroup, is mma.sync's C layout repeated across N: warp
// w owns rows 16w .. 16w + 15, lane (g, t) holds rows g and g + 8, columns 8j + 2t and + 1 of every 8-column
// slice j. WgmmaTile therefore presents itself to implicit_gemm.cuh's epilogue as BM / 16 warps of 16 x BN
// mma.sync tiles, and conv_epilogue stores it unchanged.
//
// Status: never run on a GPU when written (2026-11-28). The CPU emulation (tests/kernel_emulation) checks it
// against the PTX ISA's descriptor and D-layout semantics; the device check runs the GPU tests on it.
#pragma once

#include "implicit_gemm.cuh"

namespace fastconv {

// A block of BM / 64 warpgroups (BM 64 or 128) computing BM x BN with STAGES-deep cp.async stages, built for
// MIN_BLOCKS blocks per SM (__launch_bounds__). The members below STAGES describe the accumulators in
// implicit_gemm.cuh's mma.sync terms (see the top), for for_each_accumulator_pair and conv_epilogue.
template <int BM_, int BN_, int STAGES_, int MIN_BLOCKS_>
struct WgmmaTile {
  static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int WARPGROUPS = BM / 64, THREADS = WARPGROUPS * 128;
  static constexpr int WARPS_M = BM / 16, WARPS_N = 1, WM = 16, WN = BN, MI = 1, NI = BN / 8;
  static_assert(BM % 64 == 0 && (BN == 64 || BN == 128), "64-row warpgroups; wgmma N of 64 or 128");
  static_assert(STAGES >= 3, "copies run STAGES - 2 tiles ahead");
};

// ---- PTX wrappers (sm_90a: __CUDA_ARCH_FEAT_SM90_ALL) ----------------------------------------------------

// The matrix descriptor of a K-major operand in the 64-byte-swizzled layout, starting at shared address
// `address` (a 512-byte boundary plus the k step's 32-byte offset), as two 32-bit halves. Low: the start address
// (bits 0-13, in 16-byte units) and the leading-dimension offset (bits 16-29: unused by swizzled K-major layouts
// whose k step fits within the swizzle, 1 by convention). High: the stride offset (bits 32-45: 512 bytes from one
// group of 8 rows to the next), base offset 0 (bits 49-51: the pattern starts at a 512-byte boundary), swizzle
// mode 64B (2, bits 62-63). Advancing the start address by b bytes (a stage, a k step) adds b / 16 to the low
// half, which stays below 2^14 within the 256 KiB shared window: no carry, so the main loop adds 32-bit values.
__host__ __device__ __forceinline__ constexpr uint32_t wgmma_sw64_descriptor_lo(uint32_t address) {
  return ((address & 0x3FFFF) >> 4) | (1u << 16);
}
constexpr uint32_t kWgmmaSw64DescriptorHi = (512 >> 4) | (2u << 30);
__host__ __device__ __forceinline__ constexpr uint64_t wgmma_sw64_descriptor(uint32_t lo) {
  return (static_cast<uint64_t>(kWgmmaSw64DescriptorHi) << 32) | lo;
}

// Makes this thread's completed generic-proxy writes to shared memory (its cp.async copies, once waited for)
// visible to the async proxy that wgmma reads through. Then a barrier publishes them to the other threads.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Orders this warpgroup's earlier register accesses before its next wgmma (required before the first wgmma
// and whenever the accumulators were touched by other instructions).
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N of this warpgroup's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// A compiler-only fence on one accumulator register: its reads and writes cannot move across this point (so
// none lands between a wgmma's issue and the wait_group that completes it).
__device__ __forceinline__ void wgmma_fence_operand(float& r) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("" : "+f"(r)::"memory");
#endif
}

#define FASTCONV_WGMMA_D4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define FASTCONV_WGMMA_D32                                                                              \
  FASTCONV_WGMMA_D4(0), FASTCONV_WGMMA_D4(1), FASTCONV_WGMMA_D4(2), FASTCONV_WGMMA_D4(3), FASTCONV_WGMMA_D4(4), \
      FASTCONV_WGMMA_D4(5), FASTCONV_WGMMA_D4(6), FASTCONV_WGMMA_D4(7)
#define FASTCONV_WGMMA_D64                                                                                 \
  FASTCONV_WGMMA_D32, FASTCONV_WGMMA_D4(8), FASTCONV_WGMMA_D4(9), FASTCONV_WGMMA_D4(10), FASTCONV_WGMMA_D4(11), \
      FASTCONV_WGMMA_D4(12), FASTCONV_WGMMA_D4(13), FASTCONV_WGMMA_D4(14), FASTCONV_WGMMA_D4(15)
#define FASTCONV_WGMMA_R32                                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTCONV_WGMMA_R64                                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// scale-d, a predicate, from the register operand `op` (1: accumulate)
#define FASTCONV_WGMMA_SCALE_D(op) "{\n.reg .pred p;\nsetp.ne.b32 p, " op ", 0;\n"
#define FASTCONV_WGMMA_N64(type)                                                                     \
  FASTCONV_WGMMA_SCALE_D("%34") "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " " \
      FASTCONV_WGMMA_R32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
#define FASTCONV_WGMMA_N128(type)                                                                     \
  FASTCONV_WGMMA_SCALE_D("%66") "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " " \
      FASTCONV_WGMMA_R64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"

// d += A * B for the warpgroup's 64 x N tile over one k step of 16: A (64 x 16) and B (N x 16), both K-major,
// named by descriptors; fp32 accumulators d in the layout described at the top (d[j][e]: 8-column slice j).
// scale-d (a predicate: false would overwrite d) is true, to accumulate (the main loop zeroes d first); the A and
// B scales are 1, neither operand is transposed (both K-major).
template <typename T, int N>
__device__ __forceinline__ void wgmma_64xNx16(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "the tiles' wgmma shapes");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (N == 64 && same_type<T, __half>::value) {
    asm volatile(FASTCONV_WGMMA_N64("f16") : FASTCONV_WGMMA_D32 : "l"(desc_a), "l"(desc_b), "r"(1));
  } else if constexpr (N == 64) {
    asm volatile(FASTCONV_WGMMA_N64("bf16") : FASTCONV_WGMMA_D32 : "l"(desc_a), "l"(desc_b), "r"(1));
  } else if constexpr (same_type<T, __half>::value) {
    asm volatile(FASTCONV_WGMMA_N128("f16") : FASTCONV_WGMMA_D64 : "l"(desc_a), "l"(desc_b), "r"(1));
  } else {
    asm volatile(FASTCONV_WGMMA_N128("bf16") : FASTCONV_WGMMA_D64 : "l"(desc_a), "l"(desc_b), "r"(1));
  }
#endif
}

// ---- the main loop ------------------------------------------------------------------------------------

// Where the stages start in the block's dynamic shared memory: the first 512-byte boundary of the shared address
// (the swizzle is a function of the address, not of the offset), so launches ask for kWgmmaAlignmentSlack bytes
// more than the stages take.
constexpr int kWgmmaAlignmentSlack = 512;
template <typename T>
__device__ __forceinline__ T* wgmma_stages(unsigned char* smem_bytes) {
  return reinterpret_cast<T*>(smem_bytes + (512 - smem_address(smem_bytes) % 512) % 512);
}

// The block's accumulators over reduction tiles [0, tiles) (each BK = 32 fp16/bf16 wide), in `smem`: STAGES
// stages of A (BM x 64 bytes each), then STAGES of B (BN x 64 bytes), the whole starting on a 512-byte
// boundary. Order within tile t (stage st = t % STAGES), every thread:
//   wait for its copies of tile t, fence them to the async proxy, barrier (tile t is visible to every
//   warpgroup, and every warpgroup has finished tile t - 2's MMAs);
//   fence the accumulators, issue tile t's two k steps on stage st, commit them as one group;
//   issue the copies of tile t + STAGES - 2 into the stage tile t - 2 used, commit;
//   wait until only tile t's group is pending (tile t - 1's MMAs are complete).
template <typename T, typename Cfg, typename ALoader, typename BLoader>
__device__ __forceinline__ void wgmma_mainloop(float (&acc)[1][Cfg::NI][4], T* smem, ALoader& a_loader,
                                               BLoader& b_loader, int tiles) {
  static_assert(sizeof(T) == 2, "wgmma tiles are fp16 / bf16");
  using ATile = OperandTile<T, true, Cfg::BM>;
  using BTile = OperandTile<T, true, Cfg::BN>;
  constexpr int BK = ImplicitGemmElement<T>::BK;
  constexpr int KSTEP = 16, KSTEPS = BK / KSTEP;
  constexpr uint32_t A_STAGE_BYTES = ATile::ELEMS * sizeof(T), B_STAGE_BYTES = BTile::ELEMS * sizeof(T);
  static_assert(A_STAGE_BYTES % 512 == 0 && B_STAGE_BYTES % 512 == 0, "stages keep the 512-byte alignment");
  T* As = smem;
  T* Bs = smem + Cfg::STAGES * ATile::ELEMS;
  // this warpgroup's 64 rows of A; all BN rows of B (descriptors' low halves at stage 0, k step 0)
  const int warpgroup = threadIdx.x / 128;
  const uint32_t a_desc = wgmma_sw64_descriptor_lo(smem_address(As + ATile::add_rows(0, 64 * warpgroup)));
  const uint32_t b_desc = wgmma_sw64_descriptor_lo(smem_address(Bs));

#pragma unroll
  for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][j][e] = 0.f;
  if (tiles <= 0) return;
  // Prologue: tiles 0 .. STAGES-3 in flight, one commit group each (empty past the end), so that "all but the
  // newest STAGES-3 groups complete" means "tile t has landed" in iteration t.
#pragma unroll
  for (int st = 0; st < Cfg::STAGES - 2; ++st) {
    if (st < tiles) {
      a_loader.load(As + st * ATile::ELEMS, st * BK);
      b_loader.load(Bs + st * BTile::ELEMS, st * BK);
    }
    cp_async_commit();
  }
  int st = 0, next_st = Cfg::STAGES - 2;  // the stages of tile t and of tile t + STAGES - 2 (counters, no modulo)
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<Cfg::STAGES - 3>();
    fence_proxy_async_shared();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) wgmma_fence_operand(acc[0][j][e]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      constexpr uint32_t kStepUnits = KSTEP * sizeof(T) / 16;  // the descriptors count 16-byte units
      wgmma_64xNx16<T, Cfg::BN>(acc[0], wgmma_sw64_descriptor(a_desc + st * (A_STAGE_BYTES / 16) + ks * kStepUnits),
                                wgmma_sw64_descriptor(b_desc + st * (B_STAGE_BYTES / 16) + ks * kStepUnits));
    }
    wgmma_commit();
    const int next = t + Cfg::STAGES - 2;
    if (next < tiles) {
      a_loader.load(As + next_st * ATile::ELEMS, next * BK);
      b_loader.load(Bs + next_st * BTile::ELEMS, next * BK);
    }
    cp_async_commit();
    wgmma_wait<1>();
    st = st + 1 == Cfg::STAGES ? 0 : st + 1;
    next_st = next_st + 1 == Cfg::STAGES ? 0 : next_st + 1;
  }
  wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) wgmma_fence_operand(acc[0][j][e]);
  cp_async_wait<0>();
}

// The wgmma tiles, the ops' tiles 6 and 7 (kImplicitGemmTiles). Shared memory per block: STAGES x (BM + BN) rows x
// 64 bytes, plus 512 for the alignment. 128 x 128: 64 accumulators per thread, 5 stages (80 KiB), 2 blocks per SM
// (ptxas: 118 registers); 128 x 64 (layers of 64 filters): 32 accumulators, 6 stages (72 KiB), 3 blocks per SM (80
// registers, no spills; with 2 it took 86 for the same main loop). Both keep the copies 3-4 tiles ahead of the MMAs.
// (Sizes chosen on paper, not yet timed.)
using ImplicitGemmWgmmaTile6 = WgmmaTile<128, 128, 5, 2>;
using ImplicitGemmWgmmaTile7 = WgmmaTile<128, 64, 6, 3>;
static_assert(kImplicitGemmTiles == 8 && kImplicitGemmMmaSyncTiles == 6, "tiles 6 and 7 are the wgmma tiles");

#if !defined(__CUDACC_RTC__)
// Calls f(Cfg{}) with the wgmma tile configuration of index `tile` (6 or 7).
template <typename F>
cudaError_t dispatch_implicit_gemm_wgmma_tile(int tile, F&& f) {
  switch (tile) {
    case 6: return f(ImplicitGemmWgmmaTile6{});
    case 7: return f(ImplicitGemmWgmmaTile7{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(T{}, Cfg{}) with the element type of `dtype` (fp16 or bf16) and the wgmma tile `tile`, where this build
// and GPU run the wgmma kernels: the launchers' common dispatch. cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t dispatch_implicit_gemm_wgmma(DType dtype, int tile, F&& f) {
  if (dtype == DType::Float32 || !implicit_gemm_wgmma_supported()) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    if constexpr (sizeof(tag) != 2) {
      return cudaErrorInvalidValue;
    } else {
      return dispatch_implicit_gemm_wgmma_tile(tile, [&](auto cfg) { return f(tag, cfg); });
    }
  });
}
#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
