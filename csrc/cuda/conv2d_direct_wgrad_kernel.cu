// Direct convolution, gradient of the filter (wgrad):
//     dw[k, c, r, s] = sum over n, p, q of dy[n, k, p, q] * x[n, g * Cg + c, p * stride_h - pad_h + r * dil_h,
//                                                                           q * stride_w - pad_w + s * dil_w]
// The output is small (K x Cg x R x S) and each element reduces over N * P * Q, so a block owns one
// (k, c) pair and a chunk of TAPS filter taps: its 256 threads stride over the N * P * Q positions, each
// keeping TAPS partial sums in registers (one grad_output read feeds TAPS multiply-adds), then the block
// reduces each sum in a fixed order. No atomics: the result is bitwise reproducible.
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

struct OutputIndex {
  int64_t n, p, q;
};

template <typename T, int TAPS>
__global__ void __launch_bounds__(kThreads)
conv2d_direct_wgrad_kernel(Conv2dProblem pb, int64_t tap_chunks, int64_t total_blocks, const T* __restrict__ dy,
                           Strides4 dys, const T* __restrict__ x, Strides4 xs, T* __restrict__ dw, Strides4 dws) {
  __shared__ float scratch[kThreads / 32];
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), RS = pb.R * pb.S;
  const int64_t positions = pb.N * pb.P * pb.Q;
  const bool fits_32bit = positions <= 0xffffffffLL;

  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
    const int64_t chunk = blk % tap_chunks, kc = blk / tap_chunks;
    const int64_t k = kc / Cg, cg = kc % Cg, c = (k / Kg) * Cg + cg;
    int64_t tap_r[TAPS], tap_s[TAPS];
    bool tap_valid[TAPS];
    float acc[TAPS];
#pragma unroll
    for (int t = 0; t < TAPS; ++t) {
      const int64_t rs = chunk * TAPS + t;
      tap_valid[t] = rs < RS;
      tap_r[t] = rs / pb.S;
      tap_s[t] = rs % pb.S;
      acc[t] = 0.f;
    }

    for (int64_t m = threadIdx.x; m < positions; m += blockDim.x) {
      const Split n_pq = split_index(m, pb.P * pb.Q, fits_32bit);
      const Split p_q = split_index(n_pq.inner, pb.Q, fits_32bit);
      const OutputIndex o{n_pq.outer, p_q.outer, p_q.inner};
      const float g = to_float(dy[dys.offset(o.n, k, o.p, o.q)]);
#pragma unroll
      for (int t = 0; t < TAPS; ++t) {
        const int64_t h = pb.input_row(o.p, tap_r[t]), w = pb.input_col(o.q, tap_s[t]);
        if (tap_valid[t] && h >= 0 && h < pb.H && w >= 0 && w < pb.W)
          acc[t] += g * to_float(x[xs.offset(o.n, c, h, w)]);
      }
    }

#pragma unroll
    for (int t = 0; t < TAPS; ++t) {
      const float total = block_sum(acc[t], scratch);
      if (threadIdx.x == 0 && tap_valid[t]) dw[dws.offset(k, cg, tap_r[t], tap_s[t])] = from_float<T>(total);
    }
  }
}

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)
template <typename T, int TAPS>
cudaError_t launch_typed(const Conv2dProblem& pb, const T* dy, Strides4 dys, const T* x, Strides4 xs, T* dw,
                         Strides4 dws, cudaStream_t stream) {
  const int64_t tap_chunks = ceil_div(pb.R * pb.S, TAPS);
  const int64_t total_blocks = pb.K * pb.C_per_group() * tap_chunks;
  conv2d_direct_wgrad_kernel<T, TAPS><<<grid_for(total_blocks), kThreads, 0, stream>>>(pb, tap_chunks, total_blocks,
                                                                                       dy, dys, x, xs, dw, dws);
  return cudaGetLastError();
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_conv2d_direct_wgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* x, Strides4 xs, void* dw, Strides4 dws, cudaStream_t stream) {
  // 1x1 filters get one tap per block; everything else chunks of 9 (a 3x3 filter in one pass).
  const bool pointwise = pb.R * pb.S == 1;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    T* dwt = static_cast<T*>(dw);
    return pointwise ? launch_typed<T, 1>(pb, dyt, dys, xt, xs, dwt, dws, stream)
                     : launch_typed<T, 9>(pb, dyt, dys, xt, xs, dwt, dws, stream);
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
