// Implicit-GEMM fprop on Hopper's warpgroup MMAs (wgmma, sm_90a): the same GEMM, loaders, shared layout and
// fused epilogue as conv2d_implicit_gemm_fprop_kernel.cu (mma.sync), with the main loop of wgmma.cuh. fp16 and
// bf16; the ops' tiles 6 (128 x 128) and 7 (128 x 64).
//
// Built only into sm_90a code (TORCH_CUDA_ARCH_LIST "9.0a", setup.py's default for Hopper; elsewhere the kernel
// body is a trap and the launcher is never reached): implicit_gemm_wgmma_supported() says whether this build
// and GPU run it, and launch_conv2d_implicit_gemm_fprop falls back to the mma.sync twin of the tile otherwise
// (implicit_gemm_mma_sync_twin).
//
// Not yet verified on a GPU (2026-11-28): checked by the CPU emulation only. The size heuristic (tile -1) and
// the autotuner leave these tiles out until a device run has passed the GPU tests and timed them
// (fastconv.backends.wgmma_tiles).
#if !defined(__CUDACC_RTC__)
#include <atomic>
#endif

#include "wgmma.cuh"

namespace fastconv {
namespace {

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
conv2d_implicit_gemm_fprop_wgmma_kernel(Conv2dProblem pb, GatherDivisors gd, const T* __restrict__ x,
                                        const T* __restrict__ w, const T* __restrict__ scale,
                                        const T* __restrict__ shift, const T* __restrict__ residual, bool relu,
                                        T* __restrict__ y) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = wgmma_stages<T>(smem_bytes);
  const int64_t g = blockIdx.z;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();
  const int64_t M = pb.N * pb.P * pb.Q, Kred = pb.R * pb.S * Cg;
  int64_t m0, n0;
  implicit_gemm_block_tile<Cfg, true>(M, Kg, m0, n0);
  constexpr int BK = ImplicitGemmElement<T>::BK;
  ActivationKMajorLoader<T, Cfg::BM, Cfg::THREADS, false> a_loader(x, pb, gd, M, Kred, Cg, g * Cg, m0, 0);
  DenseKMajorLoader<T, Cfg::BN, Cfg::THREADS> b_loader(w + g * Kg * Kred, Kred, Kg, Kred, n0);
  float acc[1][Cfg::NI][4];
  wgmma_mainloop<T, Cfg>(acc, smem, a_loader, b_loader, static_cast<int>((Kred + BK - 1) / BK));
  // the block's tile and group's first channel, recomputed rather than kept live through the main loop
  // (reread_block_index)
  implicit_gemm_block_tile<Cfg, true>(M, Kg, m0, n0);
  conv_epilogue<T, Cfg>(acc, reinterpret_cast<float*>(smem), m0, n0, M, Kg, pb.K, reread_block_index<true>() * Kg, y,
                        scale, shift, residual, relu);
#else
  __trap();  // launched only where implicit_gemm_wgmma_supported()
#endif
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

bool implicit_gemm_wgmma_supported() {
#if defined(FASTCONV_WITH_SM90A)
  // per device, asked once (0 unknown, 1 no, 2 yes); a race only asks twice
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device >= 0 && device < kDevices && known[device].load(std::memory_order_relaxed) != 0)
    return known[device].load(std::memory_order_relaxed) == 2;
  int major = 0, minor = 0;
  const bool hopper = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
                      major == 9 && minor == 0;
  if (device >= 0 && device < kDevices) known[device].store(hopper ? 2 : 1, std::memory_order_relaxed);
  return hopper;
#else
  return false;  // no sm_90a code in this build
#endif
}

cudaError_t launch_conv2d_implicit_gemm_fprop_wgmma(const Conv2dProblem& pb, DType dtype, int tile, const void* x,
                                                    const void* w, const void* scale, const void* shift,
                                                    const void* residual, bool relu, void* y, cudaStream_t stream) {
  const int64_t M = pb.N * pb.P * pb.Q, Kg = pb.K_per_group();
  if (M == 0 || Kg == 0) return cudaSuccess;
  return dispatch_implicit_gemm_wgmma(dtype, tile, [&](auto tag, auto cfg) {
    using T = decltype(tag);
    using Cfg = decltype(cfg);
    constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, true, true>() + kWgmmaAlignmentSlack;
    return launch_implicit_gemm<Cfg>(conv2d_implicit_gemm_fprop_wgmma_kernel<T, Cfg>, smem, ceil_div(M, Cfg::BM),
                                     ceil_div(Kg, Cfg::BN), pb.groups, stream, pb, make_gather_divisors(pb, false),
                                     static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(scale),
                                     static_cast<const T*>(shift), static_cast<const T*>(residual), relu,
                                     static_cast<T*>(y));
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
