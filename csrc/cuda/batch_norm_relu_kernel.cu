// Training-mode BatchNorm (+ ReLU), forward: the second half of a fused conv-BatchNorm-ReLU in training,
// run on the convolution's output (formulas in csrc/batch_norm_math.h).
//
// Kernels, in launch order (geometry: csrc/cuda/channel_grid.cuh):
// - batch_norm_stats_partials_kernel: one pass over x; each thread keeps a Welford (count, mean, M2) of
//   its channel's rows in fp32, the block merges its row lanes, and each (split, channel) partial goes to
//   the workspace. Welford rather than sum and sum of squares: conv outputs with a large mean and a small
//   spread would cancel catastrophically in fp32.
// - batch_norm_stats_finalize_kernel: one thread per channel merges that channel's partials in split
//   order into mean and biased var (the caller turns var into running_var's unbiased update).
// - batch_norm_relu_normalize_kernel: y = relu?((x - mean) * invstd * gamma + beta), one fused
//   multiply-add per element with the channel's constants in registers.
// x is read twice (statistics, then normalisation): a batch's statistics are needed before its first
// output, so a single pass would need a grid-wide barrier; the second read often hits L2 for small layers.
#include "../batch_norm_math.h"
#include "channel_grid.cuh"

namespace fastconv {
namespace {

template <typename T>
__global__ void __launch_bounds__(kChannelGridThreads)
batch_norm_stats_partials_kernel(ChannelGrid g, const T* __restrict__ x, Welford<float>* __restrict__ partials) {
  __shared__ Welford<float> scratch[kChannelGridThreads];
  const int64_t c = channel_grid_channel(g);
  Welford<float> acc{0.f, 0.f, 0.f};
  channel_grid_for_rows(g, c, [&](int64_t off) { acc.add(to_float(x[off])); });
  acc = channel_grid_merge_rows(g, acc, scratch);
  if (threadIdx.y == 0 && c < g.C) partials[blockIdx.y * g.C + c] = acc;
}

__global__ void batch_norm_stats_finalize_kernel(int64_t C, int64_t splits, const Welford<float>* __restrict__ partials,
                                                 float* __restrict__ mean, float* __restrict__ var) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Welford<float> total{0.f, 0.f, 0.f};
    for (int64_t s = 0; s < splits; ++s) total.merge(partials[s * C + c]);
    mean[c] = total.mean;
    var[c] = total.var();
  }
}

template <typename T>
__global__ void __launch_bounds__(kChannelGridThreads)
batch_norm_relu_normalize_kernel(ChannelGrid g, const T* __restrict__ x, const float* __restrict__ mean,
                                 const float* __restrict__ var, const float* __restrict__ gamma,
                                 const float* __restrict__ beta, float eps, bool relu, T* __restrict__ y) {
  const int64_t c = channel_grid_channel(g);
  if (c >= g.C) return;
  const BatchNormChannel<float> a = batch_norm_channel(mean, var, gamma, beta, eps, c);
  channel_grid_for_rows(g, c, [&](int64_t off) {
    const float z = batch_norm_affine(to_float(x[off]), a.mean, a.scale, a.shift);
    y[off] = from_float<T>(relu && z < 0.f ? 0.f : z);  // NaN passes, as torch's relu
  });
}

constexpr int kFinalizeThreads = 256;

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

size_t batch_norm_workspace_bytes(const DenseActivation& a) {
  const ChannelGrid g = make_channel_grid(a);
  // The forward's Welford partials are the larger of the two launches' (the backward keeps two sums).
  static_assert(sizeof(Welford<float>) >= sizeof(GradSums<float>), "workspace sized by the forward");
  return static_cast<size_t>(g.splits * g.C) * sizeof(Welford<float>);
}

cudaError_t launch_batch_norm_relu_forward(const DenseActivation& a, DType dtype, const void* x, const float* gamma,
                                           const float* beta, float eps, bool relu, void* y, float* mean, float* var,
                                           void* workspace, cudaStream_t stream) {
  const ChannelGrid g = make_channel_grid(a);
  auto* partials = static_cast<Welford<float>*>(workspace);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    batch_norm_stats_partials_kernel<T><<<channel_grid_blocks(g), channel_grid_threads(g), 0, stream>>>(
        g, static_cast<const T*>(x), partials);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    batch_norm_stats_finalize_kernel<<<grid_for(ceil_div(a.C, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(
        a.C, g.splits, partials, mean, var);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    batch_norm_relu_normalize_kernel<T><<<channel_grid_blocks(g), channel_grid_threads(g), 0, stream>>>(
        g, static_cast<const T*>(x), mean, var, gamma, beta, eps, relu, static_cast<T*>(y));
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
