// Training-mode BatchNorm (+ ReLU), backward (formulas in csrc/batch_norm_math.h). Nothing but the
// forward's input x and its per-channel mean and var is saved: the ReLU mask is recomputed from x with the
// forward's own arithmetic (z rounded to the dtype as the forward stored it; the gradient is blocked where
// that is <= 0, torch's threshold_backward rule, so a NaN output passes its gradient as in torch).
//
// Kernels, in launch order (geometry: csrc/cuda/channel_grid.cuh):
// - batch_norm_relu_grad_partials_kernel: one pass over dy and x; per (split, channel) the partial sums
//   of g and g * xhat in fp32 (each thread sums a strided subset, the block merges in a fixed tree).
// - batch_norm_relu_grad_finalize_kernel: one thread per channel adds its partials in split order:
//   grad_beta = sum(g), grad_gamma = sum(g * xhat).
// - batch_norm_relu_grad_input_kernel: dx = invstd * gamma * (g - grad_beta / M - xhat * grad_gamma / M),
//   a second pass over dy and x.
#include "../batch_norm_math.h"
#include "channel_grid.cuh"

namespace fastconv {
namespace {

template <typename T>
__device__ __forceinline__ float masked_grad(T dy, float x, const BatchNormChannel<float>& a, bool relu) {
  if (relu) {
    const float z = batch_norm_affine(x, a.mean, a.scale, a.shift);
    if (to_float(from_float<T>(z)) <= 0.f) return 0.f;  // torch's mask: blocked where output <= 0 (NaN passes)
  }
  return to_float(dy);
}

template <typename T>
__global__ void __launch_bounds__(kChannelGridThreads)
batch_norm_relu_grad_partials_kernel(ChannelGrid g, const T* __restrict__ dy, const T* __restrict__ x,
                                     const float* __restrict__ mean, const float* __restrict__ var,
                                     const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                                     bool relu, GradSums<float>* __restrict__ partials) {
  __shared__ GradSums<float> scratch[kChannelGridThreads];
  const int64_t c = channel_grid_channel(g);
  GradSums<float> acc{0.f, 0.f};
  if (c < g.C) {
    const BatchNormChannel<float> a = batch_norm_channel(mean, var, gamma, beta, eps, c);
    channel_grid_for_rows(g, c, [&](int64_t off) {
      const float xv = to_float(x[off]);
      const float gv = masked_grad(dy[off], xv, a, relu);
      acc.sum_g += gv;
      acc.sum_g_xhat += gv * ((xv - a.mean) * a.invstd);
    });
  }
  acc = channel_grid_merge_rows(g, acc, scratch);
  if (threadIdx.y == 0 && c < g.C) partials[blockIdx.y * g.C + c] = acc;
}

__global__ void batch_norm_relu_grad_finalize_kernel(int64_t C, int64_t splits,
                                                     const GradSums<float>* __restrict__ partials,
                                                     float* __restrict__ grad_gamma, float* __restrict__ grad_beta) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    GradSums<float> total{0.f, 0.f};
    for (int64_t s = 0; s < splits; ++s) total.merge(partials[s * C + c]);
    grad_gamma[c] = total.sum_g_xhat;
    grad_beta[c] = total.sum_g;
  }
}

template <typename T>
__global__ void __launch_bounds__(kChannelGridThreads)
batch_norm_relu_grad_input_kernel(ChannelGrid g, const T* __restrict__ dy, const T* __restrict__ x,
                                  const float* __restrict__ mean, const float* __restrict__ var,
                                  const float* __restrict__ gamma, const float* __restrict__ beta, float eps, bool relu,
                                  const float* __restrict__ grad_gamma, const float* __restrict__ grad_beta,
                                  T* __restrict__ dx) {
  const int64_t c = channel_grid_channel(g);
  if (c >= g.C) return;
  const BatchNormChannel<float> a = batch_norm_channel(mean, var, gamma, beta, eps, c);
  const float inv_m = 1.f / static_cast<float>(g.M);
  const float mean_g = grad_beta[c] * inv_m, mean_g_xhat = grad_gamma[c] * inv_m;
  channel_grid_for_rows(g, c, [&](int64_t off) {
    const float xv = to_float(x[off]);
    const float gv = masked_grad(dy[off], xv, a, relu);
    const float xhat = (xv - a.mean) * a.invstd;
    dx[off] = from_float<T>(a.scale * (gv - mean_g - xhat * mean_g_xhat));
  });
}

constexpr int kFinalizeThreads = 256;

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_batch_norm_relu_backward(const DenseActivation& a, DType dtype, const void* dy, const void* x,
                                            const float* mean, const float* var, const float* gamma,
                                            const float* beta, float eps, bool relu, void* dx, float* grad_gamma,
                                            float* grad_beta, void* workspace, cudaStream_t stream) {
  const ChannelGrid g = make_channel_grid(a);
  auto* partials = static_cast<GradSums<float>*>(workspace);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    batch_norm_relu_grad_partials_kernel<T><<<channel_grid_blocks(g), channel_grid_threads(g), 0, stream>>>(
        g, dyt, xt, mean, var, gamma, beta, eps, relu, partials);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    batch_norm_relu_grad_finalize_kernel<<<grid_for(ceil_div(a.C, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(
        a.C, g.splits, partials, grad_gamma, grad_beta);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    batch_norm_relu_grad_input_kernel<T><<<channel_grid_blocks(g), channel_grid_threads(g), 0, stream>>>(
        g, dyt, xt, mean, var, gamma, beta, eps, relu, grad_gamma, grad_beta, static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
