// Implicit-GEMM dgrad on Hopper's warpgroup MMAs (wgmma, sm_90a): conv2d_implicit_gemm_dgrad_kernel.cu's GEMM,
// loaders and epilogue (dy gathered K-major through the negated taps, the filter transposed per group), with the
// main loop of wgmma.cuh. fp16 and bf16; the ops' tiles 6 (128 x 128) and 7 (128 x 64). Stride 1, and strided
// dilated dgrad (the gather's exact-division branch); other strided dgrad runs as stride-1 fprops
// (csrc/conv2d_dgrad_phases.h), which take the wgmma fprop kernel.
//
// Built only into sm_90a code, launched where implicit_gemm_wgmma_supported(); elsewhere these tiles run as their
// mma.sync twins. Not yet verified on a GPU (2026-11-28): checked by the CPU emulation only.
#include "wgmma.cuh"

namespace fastconv {
namespace {

// At most 2 blocks per SM: the dgrad gather (its strided-dilated branch too) holds more state than fprop's, and
// tile 7's 3 blocks (80 registers) spilled; with 2 it takes no spill.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS < 2 ? Cfg::MIN_BLOCKS : 2)
conv2d_implicit_gemm_dgrad_wgmma_kernel(Conv2dProblem pb, GatherDivisors gd, const T* __restrict__ dy,
                                        const T* __restrict__ wt, T* __restrict__ dx) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = wgmma_stages<T>(smem_bytes);
  const int64_t g = blockIdx.z;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();
  const int64_t M = pb.N * pb.H * pb.W, Kred = pb.R * pb.S * Kg;
  int64_t m0, n0;
  implicit_gemm_block_tile<Cfg, true>(M, Cg, m0, n0);
  constexpr int BK = ImplicitGemmElement<T>::BK;
  ActivationKMajorLoader<T, Cfg::BM, Cfg::THREADS, true> a_loader(dy, pb, gd, M, Kred, Kg, g * Kg, m0, 0);
  DenseKMajorLoader<T, Cfg::BN, Cfg::THREADS> b_loader(wt + g * Cg * Kred, Kred, Cg, Kred, n0);
  float acc[1][Cfg::NI][4];
  wgmma_mainloop<T, Cfg>(acc, smem, a_loader, b_loader, static_cast<int>((Kred + BK - 1) / BK));
  // the block's tile and group's first channel, recomputed rather than kept live through the main loop
  // (reread_block_index)
  implicit_gemm_block_tile<Cfg, true>(M, Cg, m0, n0);
  conv_epilogue<T, Cfg>(acc, reinterpret_cast<float*>(smem), m0, n0, M, Cg, pb.C, reread_block_index<true>() * Cg, dx,
                        nullptr, nullptr, nullptr, false);
#else
  __trap();  // launched only where implicit_gemm_wgmma_supported()
#endif
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_conv2d_implicit_gemm_dgrad_wgmma(const Conv2dProblem& pb, DType dtype, int tile, const void* dy,
                                                    const void* wt, void* dx, cudaStream_t stream) {
  const int64_t M = pb.N * pb.H * pb.W, Cg = pb.C_per_group();
  if (M == 0 || Cg == 0) return cudaSuccess;
  return dispatch_implicit_gemm_wgmma(dtype, tile, [&](auto tag, auto cfg) {
    using T = decltype(tag);
    using Cfg = decltype(cfg);
    constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, true, true>() + kWgmmaAlignmentSlack;
    return launch_implicit_gemm<Cfg>(conv2d_implicit_gemm_dgrad_wgmma_kernel<T, Cfg>, smem, ceil_div(M, Cfg::BM),
                                     ceil_div(Cg, Cfg::BN), pb.groups, stream, pb, make_gather_divisors(pb, true),
                                     static_cast<const T*>(dy), static_cast<const T*>(wt), static_cast<T*>(dx));
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
