// Implicit-GEMM dgrad on tensor cores: dx = the adjoint of the convolution applied to dy.
//
//   GEMM per group g: M = N*H*W input pixels, N = Cg input channels, K = R*S*Kg (taps x filters).
//   A = dy gathered K-major (ActivationKMajorLoader<DGRAD>): input pixel (n, h, w) reads, through tap
//       (r, s), the output pixel p = (h + pad - r*dil) / stride when that division is exact and in range,
//       zero otherwise. B = the filter transposed per group to [Cg][R][S][Kg] (by the host wrapper, a
//       small copy), so it is K-major like fprop's. Grid: (tiles, N fastest; groups): implicit_gemm_block_tile.
//
// Strided convolutions would waste work here (for stride 2, three taps in four zero-filled and still sent
// through the tensor cores), so the wrapper runs those as one stride-1 fprop per stride phase instead
// (csrc/conv2d_dgrad_phases.h, CUTLASS's strided-dgrad decomposition); this kernel gets stride 1 and the
// dilated strided cases. Requires NHWC dy, Kg a multiple of the copy width (the wrapper pads).
#include "implicit_gemm.cuh"

namespace fastconv {
namespace {

// Register budget: the 256-thread tile 0 in fp16/bf16 asks for 2 blocks per SM (128 registers, no spills):
// asking for 1 block gave it 138 and 1 block, and the H200 run of f7f4e25 timed the 3x3 dgrads of ResNet-50's
// layer 3 and AlexNet 1.3-1.4x slower (with no minimum ptxas chose 128 until the swizzled layout, then 140).
// The others ask for 1 block (up to 255 registers): with no minimum, tile 1 spilled in the extension build
// and fp32 tile 0 spilled at 128.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, sizeof(T) == 2 && Cfg::THREADS == 256 ? 2 : 1)
conv2d_implicit_gemm_dgrad_kernel(Conv2dProblem pb, GatherDivisors gd, const T* __restrict__ dy,
                                  const T* __restrict__ wt, T* __restrict__ dx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int64_t g = blockIdx.z;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();
  const int64_t M = pb.N * pb.H * pb.W, Kred = pb.R * pb.S * Kg;
  int64_t m0, n0;
  implicit_gemm_block_tile<Cfg, true>(M, Cg, m0, n0);
  ActivationKMajorLoader<T, Cfg::BM, Cfg::THREADS, true> a_loader(dy, pb, gd, M, Kred, Kg, g * Kg, m0, 0);
  DenseKMajorLoader<T, Cfg::BN, Cfg::THREADS> b_loader(wt + g * Cg * Kred, Kred, Cg, Kred, n0);
  float acc[Cfg::MI][Cfg::NI][4];
  const int64_t k_tiles = (Kred + ImplicitGemmElement<T>::BK - 1) / ImplicitGemmElement<T>::BK;
  implicit_gemm_mainloop<T, Cfg, true, true>(acc, smem, a_loader, b_loader, 0, static_cast<int>(k_tiles));
  // the block's tile and group's first channel, recomputed rather than kept live through the main loop
  // (reread_block_index)
  implicit_gemm_block_tile<Cfg, true>(M, Cg, m0, n0);
  conv_epilogue<T, Cfg>(acc, reinterpret_cast<float*>(smem), m0, n0, M, Cg, pb.C, reread_block_index<true>() * Cg, dx,
                        nullptr, nullptr, nullptr, false);
#else
  __trap();  // never launched below sm_80 (implicit_gemm_device_supported)
#endif
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_conv2d_implicit_gemm_dgrad(const Conv2dProblem& pb, DType dtype, int tile, const void* dy,
                                              const void* wt, void* dx, cudaStream_t stream) {
  const int64_t M = pb.N * pb.H * pb.W, Cg = pb.C_per_group();
  if (M == 0 || Cg == 0) return cudaSuccess;
  if (implicit_gemm_is_wgmma_tile(tile) && dtype != DType::Float32 && implicit_gemm_wgmma_supported())
    return launch_conv2d_implicit_gemm_dgrad_wgmma(pb, dtype, tile, dy, wt, dx, stream);
  tile = implicit_gemm_pick_tile(tile, M, Cg, pb.groups);  // (a wgmma tile elsewhere: its mma.sync twin)
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_implicit_gemm_tile(tile, [&](auto cfg) {
      using Cfg = decltype(cfg);
      return launch_implicit_gemm<Cfg>(conv2d_implicit_gemm_dgrad_kernel<T, Cfg>,
                                       implicit_gemm_smem_bytes<T, Cfg, true, true>(), ceil_div(M, Cfg::BM),
                                       ceil_div(Cg, Cfg::BN), pb.groups, stream, pb, make_gather_divisors(pb, true),
                                       static_cast<const T*>(dy), static_cast<const T*>(wt), static_cast<T*>(dx));
    });
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
