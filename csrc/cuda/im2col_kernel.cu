// im2col and col2im for a chunk of images (see launch.h for the layouts).
//
// im2col: one thread per col element, k = (c, r, s) fastest, so the writes of a warp are contiguous and
// the reads gather along the input rows the filter taps touch; taps in the padding write 0.
// col2im: the adjoint, gathered rather than scattered (col is dgrad's fp32 GEMM output, so the taps are
// summed before the one rounding to the output dtype): one thread per input element sums the col entries
// (one per filter tap whose output position exists, Conv2dProblem::output_row/col) that copied it. No
// atomics, so dgrad is deterministic. Elements are split with 32-bit divisions when the counts fit.
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
im2col_kernel(Conv2dProblem pb, const T* __restrict__ x, Strides4 xs, int64_t n0, int64_t images, bool fits_32bit,
              T* __restrict__ col) {
  const int64_t RS = pb.R * pb.S, CRS = pb.C * RS, PQ = pb.P * pb.Q;
  const int64_t total = images * PQ * CRS;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Split m_k = split_index(i, CRS, fits_32bit);
    const Split c_rs = split_index(m_k.inner, RS, fits_32bit);
    const Split r_s = split_index(c_rs.inner, pb.S, fits_32bit);
    const Split n_pq = split_index(m_k.outer, PQ, fits_32bit);
    const Split p_q = split_index(n_pq.inner, pb.Q, fits_32bit);
    const int64_t h = pb.input_row(p_q.outer, r_s.outer), w = pb.input_col(p_q.inner, r_s.inner);
    T v = from_float<T>(0.f);
    if (h >= 0 && h < pb.H && w >= 0 && w < pb.W) v = x[xs.offset(n0 + n_pq.outer, c_rs.outer, h, w)];
    col[i] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
col2im_kernel(Conv2dProblem pb, const float* __restrict__ col, int64_t n0, int64_t images, bool fits_32bit,
              T* __restrict__ dx, Strides4 dxs) {
  const int64_t RS = pb.R * pb.S, CRS = pb.C * RS, PQ = pb.P * pb.Q;
  const int64_t total = images * pb.C * pb.H * pb.W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Index4 e = split_index4(i, pb.C, pb.H, pb.W, fits_32bit);  // (n, c, h, w), w fastest
    float acc = 0.f;
    for (int64_t r = 0; r < pb.R; ++r) {
      const int64_t p = pb.output_row(e.c, r);
      if (p < 0) continue;
      for (int64_t s = 0; s < pb.S; ++s) {
        const int64_t q = pb.output_col(e.d, s);
        if (q < 0) continue;
        acc += col[(e.a * PQ + p * pb.Q + q) * CRS + (e.b * pb.R + r) * pb.S + s];
      }
    }
    dx[dxs.offset(n0 + e.a, e.b, e.c, e.d)] = from_float<T>(acc);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_im2col(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs, int64_t n0,
                          int64_t images, void* col, cudaStream_t stream) {
  const int64_t total = images * pb.P * pb.Q * pb.C * pb.R * pb.S;
  if (total == 0) return cudaSuccess;
  const bool fits_32bit = total <= 0xffffffffLL;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    im2col_kernel<T><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
        pb, static_cast<const T*>(x), xs, n0, images, fits_32bit, static_cast<T*>(col));
    return cudaGetLastError();
  });
}

cudaError_t launch_col2im(const Conv2dProblem& pb, DType dtype, const float* col, int64_t n0, int64_t images,
                          void* dx, Strides4 dxs, cudaStream_t stream) {
  const int64_t total = images * pb.C * pb.H * pb.W;
  if (total == 0) return cudaSuccess;
  const bool fits_32bit = total <= 0xffffffffLL;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    col2im_kernel<T><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
        pb, col, n0, images, fits_32bit, static_cast<T*>(dx), dxs);
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
