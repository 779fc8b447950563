// Hand-written batched GEMM for the im2col convolution (see GemmProblem in launch.h).
//
// Versions:
// - gemm_simt_kernel (fp32, and any dtype on GPUs older than sm_80): a block computes a 64 x 64 tile of C
//   with 256 threads, each owning a 4 x 4 register block. Per step of 16 along K the block stages a
//   64 x 16 tile of A (transposed, so a thread's 4 rows are one 16-byte read) and a 16 x 64 tile of B in
//   shared memory; each pair of 16-byte reads then feeds 16 FMAs.
// - gemm_wmma_kernel (fp16, bf16 on sm_80+): the same 64 x 64 tile on tensor cores. Four warps each own
//   32 x 32 of C as 2 x 2 WMMA 16x16x16 fragments with fp32 accumulators; per step of 32 along K the block
//   stages A (64 x 32) and B (32 x 64) as half/bf16 in shared memory (rows padded by 8 elements against
//   bank conflicts), then the accumulators go through shared memory to the epilogue.
// Tiles are loaded through the element strides with bounds checks (zero fill), the threads walking the
// unit-stride dimension when there is one so global reads coalesce; the epilogue adds bias, the previous
// C when accumulating, applies the ReLU when asked, converts and stores through C's strides. Blocks loop over (batch, tile) pairs, so
// any batch count fits one launch.
#include <mma.h>

#if !defined(__CUDACC_RTC__)
#include <algorithm>
#include <atomic>
#endif

#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kTile = 64;  // C tile per block, both dimensions

template <typename OutT>
__device__ __forceinline__ void store_c(const GemmProblem& g, OutT* C, int64_t c_off, const float* bias_row,
                                        int64_t m, int64_t n, float v) {
  if (m >= g.M || n >= g.N) return;
  OutT* dst = C + c_off + m * g.c_m + n * g.c_n;
  if (bias_row != nullptr) v += bias_row[0];
  if (g.accumulate) v += to_float(*dst);
  if (g.relu && v < 0.f) v = 0.f;  // NaN passes, as torch's relu
  *dst = from_float<OutT>(v);
}

// Stages rows x cols of a strided matrix (element (i, j) at src[i * s_i + j * s_j]) into shared memory as
// dst[i * ld + j] (or dst[j * ld + i] when TRANSPOSE), zero outside `extent_i` x `extent_j`.
template <typename T, typename S, bool TRANSPOSE>
__device__ __forceinline__ void stage_tile(S* dst, int ld, const T* src, int64_t s_i, int64_t s_j, int64_t i0,
                                           int64_t j0, int64_t extent_i, int64_t extent_j, int rows, int cols) {
  const bool j_fastest = s_j == 1 || s_i != 1;  // walk the unit-stride dimension when there is one
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int i = j_fastest ? e / cols : e % rows;
    const int j = j_fastest ? e % cols : e / rows;
    const int64_t gi = i0 + i, gj = j0 + j;
    S v = from_float<S>(0.f);
    if (gi < extent_i && gj < extent_j) {
      if constexpr (same_type<S, T>::value) {
        v = src[gi * s_i + gj * s_j];  // staged as is (tensor-core tiles)
      } else {
        v = from_float<S>(to_float(src[gi * s_i + gj * s_j]));
      }
    }
    dst[TRANSPOSE ? j * ld + i : i * ld + j] = v;
  }
}

struct TileIndex {
  int64_t outer, inner, tile_m, tile_n;
};

__device__ __forceinline__ TileIndex tile_of(const GemmProblem& g, int64_t blk, int64_t tiles_m, int64_t tiles_n) {
  TileIndex t;
  t.tile_n = blk % tiles_n;
  blk /= tiles_n;
  t.tile_m = blk % tiles_m;
  blk /= tiles_m;
  t.inner = blk % g.batch_inner;
  t.outer = blk / g.batch_inner;
  return t;
}

constexpr int kSimtK = 16, kSimtThreads = 256;

template <typename T, typename OutT>
__global__ void __launch_bounds__(kSimtThreads)
gemm_simt_kernel(GemmProblem g, int64_t tiles_m, int64_t tiles_n, const T* __restrict__ A, const T* __restrict__ B,
                 const T* __restrict__ bias, OutT* __restrict__ C) {
  __shared__ __align__(16) float As[kSimtK][kTile + 4];  // A tile transposed: As[k][m]
  __shared__ __align__(16) float Bs[kSimtK][kTile + 4];  // Bs[k][n]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t total = g.batch_outer * g.batch_inner * tiles_m * tiles_n;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const TileIndex t = tile_of(g, blk, tiles_m, tiles_n);
    const T* a = A + t.outer * g.a_bo + t.inner * g.a_bi;
    const T* b = B + t.outer * g.b_bo + t.inner * g.b_bi;
    const int64_t m0 = t.tile_m * kTile, n0 = t.tile_n * kTile;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < g.K; k0 += kSimtK) {
      // A tile: rows m0.., cols k0.. -> As[k][m]; B tile: rows k0.., cols n0.. -> Bs[k][n].
      stage_tile<T, float, true>(&As[0][0], kTile + 4, a, g.a_m, g.a_k, m0, k0, g.M, g.K, kTile, kSimtK);
      stage_tile<T, float, false>(&Bs[0][0], kTile + 4, b, g.b_k, g.b_n, k0, n0, g.K, g.N, kSimtK, kTile);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kSimtK; ++k) {
        const float4 av = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
        const float4 bv = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
        const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += ar[i] * br[j];
      }
      __syncthreads();
    }
    const int64_t c_off = t.outer * g.c_bo + t.inner * g.c_bi;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
        float bias_v = 0.f;
        if (bias != nullptr && n < g.N) bias_v = to_float(bias[t.inner * g.bias_bi + n]);
        store_c(g, C, c_off, bias != nullptr ? &bias_v : nullptr, m, n, acc[i][j]);
      }
    }
  }
}

constexpr int kWmmaK = 32, kWmmaThreads = 128, kPad = 8;

template <typename T, typename OutT>
__global__ void __launch_bounds__(kWmmaThreads)
gemm_wmma_kernel(GemmProblem g, int64_t tiles_m, int64_t tiles_n, const T* __restrict__ A, const T* __restrict__ B,
                 const T* __restrict__ bias, OutT* __restrict__ C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) T As[kTile][kWmmaK + kPad];   // As[m][k]
  __shared__ __align__(32) T Bs[kWmmaK][kTile + kPad];   // Bs[k][n]
  __shared__ __align__(32) float Cs[kTile][kTile + 4];
  const int warp = threadIdx.x / 32, warp_m = warp / 2, warp_n = warp % 2;
  const int64_t total = g.batch_outer * g.batch_inner * tiles_m * tiles_n;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const TileIndex t = tile_of(g, blk, tiles_m, tiles_n);
    const T* a = A + t.outer * g.a_bo + t.inner * g.a_bi;
    const T* b = B + t.outer * g.b_bo + t.inner * g.b_bi;
    const int64_t m0 = t.tile_m * kTile, n0 = t.tile_n * kTile;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int64_t k0 = 0; k0 < g.K; k0 += kWmmaK) {
      stage_tile<T, T, false>(&As[0][0], kWmmaK + kPad, a, g.a_m, g.a_k, m0, k0, g.M, g.K, kTile, kWmmaK);
      stage_tile<T, T, false>(&Bs[0][0], kTile + kPad, b, g.b_k, g.b_n, k0, n0, g.K, g.N, kWmmaK, kTile);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kWmmaK; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], &As[warp_m * 32 + i * 16][k], kWmmaK + kPad);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], &Bs[k][warp_n * 32 + j * 16], kTile + kPad);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], kTile + 4,
                                wmma::mem_row_major);
    __syncthreads();
    const int64_t c_off = t.outer * g.c_bo + t.inner * g.c_bi;
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int i = g.c_n == 1 ? e / kTile : e % kTile;  // walk C's unit-stride dimension
      const int j = g.c_n == 1 ? e % kTile : e / kTile;
      const int64_t m = m0 + i, n = n0 + j;
      float bias_v = 0.f;
      if (bias != nullptr && n < g.N) bias_v = to_float(bias[t.inner * g.bias_bi + n]);
      store_c(g, C, c_off, bias != nullptr ? &bias_v : nullptr, m, n, Cs[i][j]);
    }
    __syncthreads();  // Cs is rewritten by the next tile
  }
#else
  __trap();  // never launched below sm_80 (tensor_cores_available); fail loudly rather than return garbage
#endif
}

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)
// Whether the current device runs the WMMA kernel (bf16 WMMA needs sm_80), cached per device.
bool tensor_cores_available() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < kMaxDevices && cached[device].load() != 0) return cached[device].load() == 2;
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
  if (device < kMaxDevices) cached[device].store(yes ? 2 : 1);
  return yes;
}

template <typename T, typename OutT>
cudaError_t launch_typed(const GemmProblem& g, const T* A, const T* B, const T* bias, OutT* C, cudaStream_t stream) {
  const int64_t tiles_m = ceil_div(g.M, kTile), tiles_n = ceil_div(g.N, kTile);
  const unsigned grid = grid_for(g.batch_outer * g.batch_inner * tiles_m * tiles_n);
  if constexpr (!same_type<T, float>::value) {
    if (tensor_cores_available()) {
      gemm_wmma_kernel<T, OutT><<<grid, kWmmaThreads, 0, stream>>>(g, tiles_m, tiles_n, A, B, bias, C);
      return cudaGetLastError();
    }
  }
  gemm_simt_kernel<T, OutT><<<grid, kSimtThreads, 0, stream>>>(g, tiles_m, tiles_n, A, B, bias, C);
  return cudaGetLastError();
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

int64_t gemm_reduction_splits(const GemmProblem& g, int64_t K) {
  // enough blocks for two waves, each slice at least 4096 long so a block's partial is worth its store and sum
  constexpr int64_t kMinSlice = 4096;
  const int64_t blocks = ceil_div(g.M, kTile) * ceil_div(g.N, kTile) * g.batch_inner;
  const int64_t want = ceil_div(2 * static_cast<int64_t>(multiprocessor_count()), blocks);
  return std::max<int64_t>(1, std::min(want, K / kMinSlice));
}

cudaError_t launch_gemm(const GemmProblem& g, DType dtype, bool c_fp32, const void* A, const void* B,
                        const void* bias, void* C, cudaStream_t stream) {
  if (g.M == 0 || g.N == 0 || g.batch_outer == 0 || g.batch_inner == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* a = static_cast<const T*>(A);
    const T* b = static_cast<const T*>(B);
    const T* bs = static_cast<const T*>(bias);
    if (c_fp32 || same_type<T, float>::value) return launch_typed<T, float>(g, a, b, bs, static_cast<float*>(C), stream);
    return launch_typed<T, T>(g, a, b, bs, static_cast<T*>(C), stream);
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
