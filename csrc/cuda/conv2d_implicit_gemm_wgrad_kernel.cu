// Implicit-GEMM wgrad on tensor cores, split-K: dw = sum over the batch of dy^T * im2col(x).
//
//   GEMM per group g: M = Kg filters, N = R*S*Cg filter elements, K = N*P*Q output pixels.
//   A = dy read MN-major (DenseMNMajorLoader: a reduction row is one pixel's Kg channels), B = x gathered
//       MN-major (ActivationMNMajorLoader: a thread's column, hence its (r, s, c), is fixed; its rows are
//       pixels). Both tiles are stored pixel-major, so fragments come from ldmatrix.trans.
//
// The reduction N*P*Q is long and M x N small (a filter), so the grid alone would leave most SMs idle:
// the reduction is split into `splits` ranges of whole BK tiles (grid z = groups x splits), each writing
// an fp32 partial filter to its slice of the workspace; a second kernel sums the slices in a fixed order
// and converts, so the result is deterministic (no atomics). Requires Kg and Cg multiples of the copy
// width (the wrapper pads) and N*P*Q < 2^31 (32-bit pixel split in the loader; the wrapper checks).
#include "implicit_gemm.cuh"

namespace fastconv {
namespace {

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS)
conv2d_implicit_gemm_wgrad_kernel(Conv2dProblem pb, int splits, const T* __restrict__ dy, const T* __restrict__ x,
                                  float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int64_t g = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();
  const int64_t Ncols = pb.R * pb.S * Cg, Kred = pb.N * pb.P * pb.Q;
  int64_t m0, n0;
  implicit_gemm_block_tile<Cfg, false>(Kg, Ncols, m0, n0);
  constexpr int BK = ImplicitGemmElement<T>::BK;
  int64_t kt_begin = 0, kt_end = 0;
  split_tile_range((Kred + BK - 1) / BK, splits, split, kt_begin, kt_end);
  DenseMNMajorLoader<T, Cfg::BM, Cfg::THREADS> a_loader(dy + g * Kg, pb.K, Kg, Kred, m0);
  ActivationMNMajorLoader<T, Cfg::BN, Cfg::THREADS> b_loader(x, pb, Ncols, Kred, Cg, g * Cg, n0);
  float acc[Cfg::MI][Cfg::NI][4];
  implicit_gemm_mainloop<T, Cfg, false, false>(acc, smem, a_loader, b_loader, static_cast<int>(kt_begin),
                                               static_cast<int>(kt_end));  // N*P*Q < 2^31: the host checks
  // this split's partial filter: rows g*Kg + m of the (K, R*S*Cg) slice `split` of the workspace
  float* out = partial + split * pb.K * Ncols + g * Kg * Ncols;
  for_each_accumulator_pair<Cfg>(acc, [&](int i, int j, float v0, float v1) {
    const int64_t m = m0 + i, n = n0 + j;
    if (m >= Kg || n >= Ncols) return;
    out[m * Ncols + n] = v0;
    if (n + 1 < Ncols) out[m * Ncols + n + 1] = v1;
  });
#else
  __trap();  // never launched below sm_80 (implicit_gemm_device_supported)
#endif
}

// dw[i] = sum over s of partial[s * count + i], s in order, rounded once to T.
template <typename T>
__global__ void conv2d_implicit_gemm_wgrad_reduce_kernel(const float* __restrict__ partial, int64_t count, int splits,
                                                         T* __restrict__ dw) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * count + i];
    dw[i] = from_float<T>(v);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

namespace {
int wgrad_tile(const Conv2dProblem& pb, int tile) {
  return implicit_gemm_pick_tile(tile, pb.K_per_group(), pb.R * pb.S * pb.C_per_group(), pb.groups);
}
}  // namespace

int conv2d_implicit_gemm_wgrad_splits(const Conv2dProblem& pb, DType dtype, int tile, int splits) {
  const int64_t Kred = pb.N * pb.P * pb.Q;
  const int bk = dtype == DType::Float32 ? ImplicitGemmElement<float>::BK : ImplicitGemmElement<__half>::BK;
  const int64_t k_tiles = ceil_div(Kred, bk);
  if (k_tiles <= 1) return 1;
  if (splits > 0) return implicit_gemm_nonempty_splits(k_tiles, splits);
  tile = wgrad_tile(pb, tile);
  int bm = 0, bn = 0;
  implicit_gemm_tile_extent(tile, &bm, &bn);
  const int64_t blocks = ceil_div(pb.K_per_group(), bm) * ceil_div(pb.R * pb.S * pb.C_per_group(), bn) * pb.groups;
  return implicit_gemm_reduction_splits(blocks, k_tiles, 64);
}

cudaError_t launch_conv2d_implicit_gemm_wgrad(const Conv2dProblem& pb, DType dtype, int tile, int splits,
                                              const void* dy, const void* x, float* partial, void* dw,
                                              cudaStream_t stream) {
  const int64_t Kg = pb.K_per_group(), Ncols = pb.R * pb.S * pb.C_per_group(), count = pb.K * Ncols;
  if (count == 0) return cudaSuccess;
  tile = wgrad_tile(pb, tile);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaError_t gemm = dispatch_implicit_gemm_tile(tile, [&](auto cfg) {
      using Cfg = decltype(cfg);
      return launch_implicit_gemm<Cfg>(conv2d_implicit_gemm_wgrad_kernel<T, Cfg>,
                                       implicit_gemm_smem_bytes<T, Cfg, false, false>(), ceil_div(Kg, Cfg::BM),
                                       ceil_div(Ncols, Cfg::BN), pb.groups * splits, stream, pb, splits,
                                       static_cast<const T*>(dy), static_cast<const T*>(x), partial);
    });
    if (gemm != cudaSuccess) return gemm;
    constexpr int kThreads = 256;
    conv2d_implicit_gemm_wgrad_reduce_kernel<T><<<elementwise_blocks(count, kThreads), kThreads, 0, stream>>>(
        partial, count, splits, static_cast<T*>(dw));
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
