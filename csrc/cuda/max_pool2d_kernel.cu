// Max pooling, forward and backward.
//
// Forward: one thread per output element (grid-stride loop) scans its window, rows outer and columns
// inner as torch does, keeping the first maximum or the last NaN (NaN propagates like torch's), and
// writes the value (copied, never rounded) and its flat index h * W + w in the plane. Padding never wins; a window
// with no tap inside x writes -inf and torch's index for it (Conv2dProblem::pool_empty_window_index).
// Backward gathers instead of scattering: one thread per input element visits the windows that can
// contain it (Conv2dProblem::output_row/col, the same inverse as conv dgrad) and sums the gradients of
// those whose recorded index is its own. No atomics, so overlapping windows stay deterministic.
//
// Threads walk the elements channel-fastest for channels_last tensors and column-fastest for NCHW, so
// neighbouring threads touch neighbouring addresses either way; all offsets are 64-bit (Strides4).
//
// Windows of up to kSmallWindow taps (3x3, 2x2, ...: every CNN's) take an unrolled path that issues all of a
// thread's loads before it compares the first (forward: the window's elements; backward: the candidate windows'
// indices, then the matching gradients). The runtime loop of the other windows waits for each load in turn: the
// H200 run of f7f4e25 timed ResNet-50's 3x3 max pool at 0.43 ms forward against torch's 0.21, and 2.4 ms forward
// and backward against 0.81. The order of the comparisons and of the sums is the loop's, so the results are too.
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;
constexpr int kSmallWindow = 9;
// Blocks per SM the kernels are compiled for: 3 (at most 80 registers). Without a minimum, CUDA 13's ptxas held the
// backward to 64 registers and spilled; with 1 the forward took up to 132, one block per SM.
constexpr int kMinBlocks = 3;

// Whether the unrolled path takes the window: at most kSmallWindow taps, planes whose flat positions (the indices)
// fit in 31 bits, and windows whose corners and taps do too (within 2^30 of the plane; every unrolled tap's row is
// computed, past R too).
__device__ __forceinline__ bool small_window(const Conv2dProblem& pb) {
  const int64_t limit = int64_t{1} << 30;
  return pb.R * pb.S <= kSmallWindow && pb.H * pb.W <= 0x7fffffff && pb.P < limit && pb.Q < limit &&
         pb.P * pb.stride_h < limit && pb.Q * pb.stride_w < limit && pb.pad_h < limit && pb.pad_w < limit &&
         kSmallWindow * pb.dil_h < limit && kSmallWindow * pb.dil_w < limit;
}

// One window element, in scan order: keeps the first maximum, or the last NaN.
template <typename T>
__device__ __forceinline__ void take_max(T raw, int64_t at, float& best_val, T& best_raw, int64_t& best) {
  const float v = to_float(raw);
  if (best < 0 || v > best_val || isnan(v)) {
    best_val = v;
    best_raw = raw;
    best = at;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
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
    if (small_window(pb)) {
      // every in-bounds element loaded first (padding is skipped, never a candidate), then compared in order
      // (32-bit rows and columns: small_window bounds them)
      const int H = static_cast<int>(pb.H), W = static_cast<int>(pb.W), S = static_cast<int>(pb.S);
      const int dil_h = static_cast<int>(pb.dil_h), dil_w = static_cast<int>(pb.dil_w);
      const int h0 = static_cast<int>(pb.input_row(p, 0)), w0 = static_cast<int>(pb.input_col(q, 0));
      const T* xc = x + n * xs.n + c * xs.c;
      const int64_t corner = h0 * xs.h + w0 * xs.w;  // the window's first tap, maybe in the padding (negative)
      const int64_t row_step = dil_h * xs.h, col_step = dil_w * xs.w;
      T raw[kSmallWindow];
      unsigned inside = 0;  // bit t: tap t is in the window and inside x
      int r = 0, s = 0;     // (R, S <= kSmallWindow)
#pragma unroll
      for (int t = 0; t < kSmallWindow; ++t) {
        const int h = h0 + r * dil_h, w = w0 + s * dil_w;
        const bool in = t < pb.R * pb.S && static_cast<unsigned>(h) < static_cast<unsigned>(H) &&
                        static_cast<unsigned>(w) < static_cast<unsigned>(W);
        inside |= static_cast<unsigned>(in) << t;
        raw[t] = in ? xc[corner + r * row_step + s * col_step] : T{};
        if (++s == S) s = 0, ++r;
      }
      r = 0, s = 0;
#pragma unroll
      for (int t = 0; t < kSmallWindow; ++t) {
        // (the plane fits in 31 bits: h * W + w in 32)
        if ((inside >> t) & 1u) take_max(raw[t], (h0 + r * dil_h) * W + w0 + s * dil_w, best_val, best_raw, best);
        if (++s == S) s = 0, ++r;
      }
    } else {
      int64_t r_begin, r_end, s_begin, s_end;  // the taps inside x
      pb.taps_inside_rows(p, &r_begin, &r_end);
      pb.taps_inside_cols(q, &s_begin, &s_end);
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t h = pb.input_row(p, r);
        for (int64_t s = s_begin; s < s_end; ++s) {
          const int64_t w = pb.input_col(q, s);
          take_max(x[xs.offset(n, c, h, w)], h * pb.W + w, best_val, best_raw, best);
        }
      }
    }
    y[ys.offset(n, c, p, q)] = best_raw;
    indices[is.offset(n, c, p, q)] = best >= 0 ? best : pb.pool_empty_window_index(p, q);  // (no tap inside x)
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
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
    if (small_window(pb)) {
      // the candidate windows' recorded indices loaded first, then the gradients of those that chose this element
      int p_of[kSmallWindow], q_of[kSmallWindow];  // the window's output position, or -1 (none, or past the taps)
      bool chose[kSmallWindow];
      int r = 0, s = 0;  // (R, S <= kSmallWindow)
#pragma unroll
      for (int t = 0; t < kSmallWindow; ++t) {
        p_of[t] = t < pb.R * pb.S ? static_cast<int>(pb.output_row(h, r)) : -1;
        q_of[t] = t < pb.R * pb.S ? static_cast<int>(pb.output_col(w, s)) : -1;
        chose[t] = p_of[t] >= 0 && q_of[t] >= 0 && indices[is.offset(n, c, p_of[t], q_of[t])] == me;
        if (++s == static_cast<int>(pb.S)) s = 0, ++r;
      }
      float g[kSmallWindow];
#pragma unroll
      for (int t = 0; t < kSmallWindow; ++t) g[t] = chose[t] ? to_float(dy[dys.offset(n, c, p_of[t], q_of[t])]) : 0.f;
#pragma unroll
      for (int t = 0; t < kSmallWindow; ++t)
        if (chose[t]) acc += g[t];
    } else {
      int64_t r_begin, r_end, s_begin, s_end;  // the taps through which some window can reach (h, w)
      pb.taps_reaching_row(h, &r_begin, &r_end);
      pb.taps_reaching_col(w, &s_begin, &s_end);
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t p = pb.output_row(h, r);
        if (p < 0) continue;
        for (int64_t s = s_begin; s < s_end; ++s) {
          const int64_t q = pb.output_col(w, s);
          if (q >= 0 && indices[is.offset(n, c, p, q)] == me) acc += to_float(dy[dys.offset(n, c, p, q)]);
        }
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
