// Max pooling, forward and backward.
//
// Forward: one thread per output element (grid-stride loop) scans its window, rows outer and columns
// inner as torch does, keeping the first maximum or the last NaN (NaN propagates like torch's), and
// writes the value (copied, never rounded) and its flat index h * W + w in the plane. Padding never wins.
// Backward gathers instead of scattering: one thread per input element visits the windows that can
// contain it (Conv2dProblem::output_row/col, the same inverse as conv dgrad) and sums the gradients of
// those whose recorded index is its own. No atomics, so overlapping windows stay deterministic.
//
// Threads walk the elements channel-fastest for channels_last tensors and column-fastest for NCHW, so
// neighbouring threads touch neighbouring addresses either way; all offsets are 64-bit (Strides4).
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
max_pool2d_forward_kernel(Conv2dProblem pb, bool channels_fastest, bool fits_32bit, const T* __restrict__ x,
                          Strides4 xs, T* __restrict__ y, Strides4 ys, int64_t* __restrict__ indices, Strides4 is) {
  const int64_t total = pb.N * pb.C * pb.P * pb.Q;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Nchw o = split_nchw(i, pb.C, pb.P, pb.Q, channels_fastest, fits_32bit);
    const int64_t n = o.n, c = o.c, p = o.h, q = o.w;
    int64_t best = -1;
    float best_val = __int_as_float(0xff800000);  // -inf
    T best_raw = from_float<T>(best_val);
    for (int64_t r = 0; r < pb.R; ++r) {
      const int64_t h = pb.input_row(p, r);
      if (h < 0 || h >= pb.H) continue;
      for (int64_t s = 0; s < pb.S; ++s) {
        const int64_t w = pb.input_col(q, s);
        if (w < 0 || w >= pb.W) continue;
        const T raw = x[xs.offset(n, c, h, w)];
        const float v = to_float(raw);
        if (best < 0 || v > best_val || isnan(v)) {
          best_val = v;
          best_raw = raw;
          best = h * pb.W + w;
        }
      }
    }
    y[ys.offset(n, c, p, q)] = best_raw;
    indices[is.offset(n, c, p, q)] = best;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
max_pool2d_backward_kernel(Conv2dProblem pb, bool channels_fastest, bool fits_32bit, const T* __restrict__ dy,
                           Strides4 dys, const int64_t* __restrict__ indices, Strides4 is, T* __restrict__ dx,
                           Strides4 dxs) {
  const int64_t total = pb.N * pb.C * pb.H * pb.W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Nchw e = split_nchw(i, pb.C, pb.H, pb.W, channels_fastest, fits_32bit);
    const int64_t n = e.n, c = e.c, h = e.h, w = e.w;
    const int64_t me = h * pb.W + w;
    float acc = 0.f;
    for (int64_t r = 0; r < pb.R; ++r) {
      const int64_t p = pb.output_row(h, r);
      if (p < 0) continue;
      for (int64_t s = 0; s < pb.S; ++s) {
        const int64_t q = pb.output_col(w, s);
        if (q >= 0 && indices[is.offset(n, c, p, q)] == me) acc += to_float(dy[dys.offset(n, c, p, q)]);
      }
    }
    dx[dxs.offset(n, c, h, w)] = from_float<T>(acc);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_max_pool2d_forward(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs, void* y,
                                      Strides4 ys, int64_t* indices, Strides4 is, bool channels_fastest,
                                      cudaStream_t stream) {
  const int64_t total = pb.N * pb.C * pb.P * pb.Q;
  const bool fits_32bit = total <= 0xffffffffLL;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    max_pool2d_forward_kernel<T><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
        pb, channels_fastest, fits_32bit, static_cast<const T*>(x), xs, static_cast<T*>(y), ys, indices, is);
    return cudaGetLastError();
  });
}

cudaError_t launch_max_pool2d_backward(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const int64_t* indices, Strides4 is, void* dx, Strides4 dxs,
                                       bool channels_fastest, cudaStream_t stream) {
  const int64_t total = pb.N * pb.C * pb.H * pb.W;
  const bool fits_32bit = total <= 0xffffffffLL;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    max_pool2d_backward_kernel<T><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
        pb, channels_fastest, fits_32bit, static_cast<const T*>(dy), dys, indices, is, static_cast<T*>(dx), dxs);
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
