// Implicit-GEMM fprop on tensor cores: y = conv(x, w) with the fused epilogue (scale, shift, residual,
// ReLU). One kernel, templated on the element type and the tile configuration (implicit_gemm.cuh):
//
//   GEMM per group g: M = N*P*Q output pixels, N = Kg filters, K = R*S*Cg (taps x channels).
//   A = x gathered K-major (ActivationKMajorLoader: each row's (n, p, q) decoded once per block, the
//       (r, s, c) of the thread's 16-byte chunk advanced per reduction tile), B = the KRSC filter rows of
//       the group (DenseKMajorLoader). Grid: (M tiles, N tiles, groups).
//
// Requires NHWC x, KRSC w, Cg a multiple of the copy width (8 fp16/bf16 channels, 4 fp32): the host
// wrapper zero-pads the channels of other shapes. fp32 runs as TF32.
#include "implicit_gemm.cuh"

namespace fastconv {
namespace {

// fp16/bf16 are held to the tile's MIN_BLOCKS (register budget, implicit_gemm.cuh). fp32 is not: its TF32
// fragments are scalar loads plus conversions, which spill within that budget. (Nor are dgrad and wgrad,
// whose loaders hold more state: within the budget they spill too.)
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, sizeof(T) == 2 ? Cfg::MIN_BLOCKS : 1)
conv2d_implicit_gemm_fprop_kernel(Conv2dProblem pb, const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ scale, const T* __restrict__ shift,
                                  const T* __restrict__ residual, bool relu, T* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int64_t g = blockIdx.z;
  const int64_t Cg = pb.C / pb.groups, Kg = pb.K / pb.groups;
  const int64_t M = pb.N * pb.P * pb.Q, Kred = pb.R * pb.S * Cg;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Cfg::BM, n0 = static_cast<int64_t>(blockIdx.y) * Cfg::BN;
  ActivationKMajorLoader<T, Cfg::BM, Cfg::THREADS, false> a_loader(x, pb, M, Kred, Cg, g * Cg, m0, 0);
  DenseKMajorLoader<T, Cfg::BN, Cfg::THREADS> b_loader(w + g * Kg * Kred, Kred, Kg, Kred, n0);
  float acc[Cfg::MI][Cfg::NI][4];
  const int64_t k_tiles = (Kred + ImplicitGemmElement<T>::BK - 1) / ImplicitGemmElement<T>::BK;
  implicit_gemm_mainloop<T, Cfg, true, true>(acc, smem, a_loader, b_loader, 0, static_cast<int>(k_tiles));
  conv_epilogue<T, Cfg>(acc, m0, n0, M, Kg, pb.K, g * Kg, y, scale, shift, residual, relu);
#else
  __trap();  // never launched below sm_80 (implicit_gemm_device_supported)
#endif
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

bool implicit_gemm_device_supported() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
}

cudaError_t launch_conv2d_implicit_gemm_fprop(const Conv2dProblem& pb, DType dtype, int tile, const void* x,
                                              const void* w, const void* scale, const void* shift,
                                              const void* residual, bool relu, void* y, cudaStream_t stream) {
  const int64_t M = pb.N * pb.P * pb.Q, Kg = pb.K_per_group();
  if (M == 0 || Kg == 0) return cudaSuccess;
  tile = implicit_gemm_pick_tile(tile, M, Kg, pb.groups);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_implicit_gemm_tile(tile, [&](auto cfg) {
      using Cfg = decltype(cfg);
      return launch_implicit_gemm<Cfg>(conv2d_implicit_gemm_fprop_kernel<T, Cfg>,
                                       implicit_gemm_smem_bytes<T, Cfg, true, true>(), ceil_div(M, Cfg::BM),
                                       ceil_div(Kg, Cfg::BN), pb.groups, stream, pb, static_cast<const T*>(x),
                                       static_cast<const T*>(w), static_cast<const T*>(scale),
                                       static_cast<const T*>(shift), static_cast<const T*>(residual), relu,
                                       static_cast<T*>(y));
    });
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
