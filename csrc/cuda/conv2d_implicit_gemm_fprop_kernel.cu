// Implicit-GEMM fprop on tensor cores: y = conv(x, w) with the fused epilogue (scale, shift, residual,
// ReLU). One kernel, templated on the element type and the tile configuration (implicit_gemm.cuh):
//
//   GEMM per group g: M = N*P*Q output pixels, N = Kg filters, K = R*S*Cg (taps x channels).
//   A = x gathered K-major (ActivationKMajorLoader: each row's (n, p, q) decoded once per block, the
//       (r, s, c) of the thread's 16-byte chunk advanced per reduction tile), B = the KRSC filter rows of
//       the group (DenseKMajorLoader). Grid: (tiles, N fastest: implicit_gemm_block_tile; groups x splits).
//
// Split-K, for grids too small to give every SM a block (small batches, the 7x7 layers): the reduction is
// cut into `splits` ranges of whole BK tiles, each block writes its fp32 partial tile to its slice of a
// workspace, and a second kernel sums the slices in a fixed order and applies the epilogue (deterministic,
// no atomics; wgrad splits the same way). With one split the block applies the epilogue itself.
//
// Requires NHWC x, KRSC w, Cg a multiple of the copy width (8 fp16/bf16 channels, 4 fp32): the host
// wrapper zero-pads the channels of other shapes. fp32 runs as TF32.
#if !defined(__CUDACC_RTC__)
#include <type_traits>
#endif

#include "implicit_gemm.cuh"

namespace fastconv {
namespace {

// fp16/bf16 are held to the tile's MIN_BLOCKS (register budget, implicit_gemm.cuh). fp32 is not: its TF32
// fragments are scalar loads plus conversions, which spill within that budget. (Nor are dgrad and wgrad,
// whose loaders hold more state: within the budget they spill too.)
//
// SPLIT: the split-K variant (grid z = groups x splits, fp32 partials to `partial`), built for
// kImplicitGemmSplitTile only. A separate instantiation because the split's bookkeeping, live through the
// main loop, made tile 0 spill within its 128 registers; without SPLIT the kernel is the plain one.
template <typename T, typename Cfg, bool SPLIT>
__global__ void __launch_bounds__(Cfg::THREADS, sizeof(T) == 2 ? Cfg::MIN_BLOCKS : 1)
conv2d_implicit_gemm_fprop_kernel(Conv2dProblem pb, GatherDivisors gd, int splits, const T* __restrict__ x,
                                  const T* __restrict__ w, const T* __restrict__ scale, const T* __restrict__ shift,
                                  const T* __restrict__ residual, bool relu, T* __restrict__ y,
                                  float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int64_t g = SPLIT ? blockIdx.z / splits : blockIdx.z;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();
  const int64_t M = pb.N * pb.P * pb.Q, Kred = pb.R * pb.S * Cg;
  int64_t m0, n0;
  implicit_gemm_block_tile<Cfg, true>(M, Kg, m0, n0);
  constexpr int BK = ImplicitGemmElement<T>::BK;
  const int64_t k_tiles = (Kred + BK - 1) / BK;
  int64_t kt_begin = 0, kt_end = k_tiles;
  if constexpr (SPLIT) split_tile_range(k_tiles, splits, blockIdx.z % splits, kt_begin, kt_end);
  // The loaders see the split's range as a reduction of its own, from 0 (so that no offset stays live through
  // the main loop): the filter rows start at k_begin, the gather's taps and channels too.
  const int64_t k_begin = kt_begin * BK;
  ActivationKMajorLoader<T, Cfg::BM, Cfg::THREADS, false> a_loader(x, pb, gd, M, Kred - k_begin, Cg, g * Cg, m0,
                                                                   k_begin);
  DenseKMajorLoader<T, Cfg::BN, Cfg::THREADS> b_loader(w + g * Kg * Kred + k_begin, Kred, Kg, Kred - k_begin, n0);
  float acc[Cfg::MI][Cfg::NI][4];
  implicit_gemm_mainloop<T, Cfg, true, true>(acc, smem, a_loader, b_loader, 0, static_cast<int>(kt_end - kt_begin));
  // the block's tile and group's first channel, recomputed rather than kept live through the main loop
  // (reread_block_index)
  implicit_gemm_block_tile<Cfg, true>(M, Kg, m0, n0);
  if constexpr (!SPLIT) {
    conv_epilogue<T, Cfg>(acc, reinterpret_cast<float*>(smem), m0, n0, M, Kg, pb.K, reread_block_index<true>() * Kg, y,
                          scale, shift, residual, relu);
  } else {
    // this split's partial tile: row m, channel g * Kg + n of the M x K slice `split` of the workspace
    float* out = partial + (blockIdx.z % splits) * M * pb.K + g * Kg;
    for_each_accumulator_pair<Cfg>(acc, [&](int i, int j, float v0, float v1) {
      const int64_t m = m0 + i, n = n0 + j;
      if (m >= M || n >= Kg) return;
      out[m * pb.K + n] = v0;
      if (n + 1 < Kg) out[m * pb.K + n + 1] = v1;
    });
  }
#else
  __trap();  // never launched below sm_80 (implicit_gemm_device_supported)
#endif
}

// Split-K's second kernel: y[i] = relu?(sum over s of partial[s * count + i] (s in order) * scale[ch] + shift[ch]
// + residual[i]) for the count = M x K outputs (ch = i % K), each term optional: conv_epilogue's arithmetic, in
// its order.
template <typename T>
__global__ void conv2d_implicit_gemm_fprop_reduce_kernel(const float* __restrict__ partial, int64_t count, int64_t K,
                                                         int splits, const T* __restrict__ scale,
                                                         const T* __restrict__ shift, const T* __restrict__ residual,
                                                         bool relu, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * count + i];
    const int64_t ch = i % K;
    if (scale != nullptr) v *= to_float(scale[ch]);
    if (shift != nullptr) v += to_float(shift[ch]);
    if (residual != nullptr) v += to_float(residual[i]);
    if (relu && v < 0.f) v = 0.f;  // NaN passes, as torch's relu
    y[i] = from_float<T>(v);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

bool implicit_gemm_device_supported() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
}

int conv2d_implicit_gemm_fprop_splits(const Conv2dProblem& pb, DType dtype, int tile) {
  const int64_t M = pb.N * pb.P * pb.Q, Kg = pb.K_per_group();
  const int bk = dtype == DType::Float32 ? ImplicitGemmElement<float>::BK : ImplicitGemmElement<__half>::BK;
  const int64_t k_tiles = ceil_div(pb.R * pb.S * pb.C_per_group(), bk);
  if (M == 0 || Kg == 0 || k_tiles <= 1) return 1;
  // (the size heuristic takes the split tile, 64 x 64, exactly when the larger tiles' grids leave SMs idle)
  if (implicit_gemm_pick_tile(tile, M, Kg, pb.groups) != kImplicitGemmSplitTile) return 1;
  const int64_t blocks = ceil_div(M, ImplicitGemmSplitTile::BM) * ceil_div(Kg, ImplicitGemmSplitTile::BN) * pb.groups;
  // every SM has a block: splitting would only add the partials' traffic
  if (blocks >= multiprocessor_count()) return 1;
  return implicit_gemm_reduction_splits(blocks, k_tiles, 16);
}

cudaError_t launch_conv2d_implicit_gemm_fprop(const Conv2dProblem& pb, DType dtype, int tile, int splits,
                                              const void* x, const void* w, const void* scale, const void* shift,
                                              const void* residual, bool relu, float* partial, void* y,
                                              cudaStream_t stream) {
  const int64_t M = pb.N * pb.P * pb.Q, Kg = pb.K_per_group();
  if (M == 0 || Kg == 0) return cudaSuccess;
  if (implicit_gemm_is_wgmma_tile(tile) && dtype != DType::Float32 && implicit_gemm_wgmma_supported()) {
    if (splits != 1) return cudaErrorInvalidValue;  // (conv2d_implicit_gemm_fprop_splits gives these tiles one)
    return launch_conv2d_implicit_gemm_fprop_wgmma(pb, dtype, tile, x, w, scale, shift, residual, relu, y, stream);
  }
  tile = implicit_gemm_pick_tile(tile, M, Kg, pb.groups);  // (a wgmma tile elsewhere: its mma.sync twin)
  if (splits < 1 || (splits > 1 && (partial == nullptr || tile != kImplicitGemmSplitTile))) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto cfg, auto split) {
      using Cfg = decltype(cfg);
      return launch_implicit_gemm<Cfg>(conv2d_implicit_gemm_fprop_kernel<T, Cfg, decltype(split)::value>,
                                       implicit_gemm_smem_bytes<T, Cfg, true, true>(), ceil_div(M, Cfg::BM),
                                       ceil_div(Kg, Cfg::BN), pb.groups * splits, stream, pb,
                                       make_gather_divisors(pb, false), splits,
                                       static_cast<const T*>(x), static_cast<const T*>(w),
                                       static_cast<const T*>(scale), static_cast<const T*>(shift),
                                       static_cast<const T*>(residual), relu, static_cast<T*>(y), partial);
    };
    const cudaError_t gemm =
        splits > 1 ? launch(ImplicitGemmSplitTile{}, std::true_type{})
                   : dispatch_implicit_gemm_tile(tile, [&](auto cfg) { return launch(cfg, std::false_type{}); });
    if (gemm != cudaSuccess || splits == 1) return gemm;
    const int64_t count = M * pb.K;
    constexpr int kThreads = 256;
    conv2d_implicit_gemm_fprop_reduce_kernel<T><<<elementwise_blocks(count, kThreads), kThreads, 0, stream>>>(
        partial, count, pb.K, splits, static_cast<const T*>(scale), static_cast<const T*>(shift),
        static_cast<const T*>(residual), relu, static_cast<T*>(y));
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
