// Conv2dProblem: the sizes of one 2-D convolution and the index math every fastconv kernel shares.
//
// Names follow CUTLASS: activation N x C x H x W, filter K x (C/groups) x R x S, output N x K x P x Q.
// Output position (p, q) reads, through filter tap (r, s), the input position
//     h = p * stride_h - pad_h + r * dil_h,    w = q * stride_w - pad_w + s * dil_w
// and positions outside [0, H) x [0, W) read zero (the padding).
//
// This header is plain C++ that nvcc, g++ and NVRTC all accept (no torch headers): the CPU twins and the
// CUDA kernels call the same functions, so the CPU tests exercise the index math the GPU runs.
#pragma once

#include "portable_stdint.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTCONV_HD __host__ __device__ __forceinline__
#else
#define FASTCONV_HD inline
#endif

namespace fastconv {

// Element strides of a 4-D tensor in (n, c, h, w) order, whatever its memory format. Offsets are 64-bit:
// a channels_last activation of a few GiB already has offsets beyond 2^31.
struct Strides4 {
  int64_t n, c, h, w;
  FASTCONV_HD int64_t offset(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// Output extent of one spatial dimension (the formula of torch.nn.Conv2d's documentation).
FASTCONV_HD int64_t conv_output_extent(int64_t in, int64_t pad, int64_t dil, int64_t taps, int64_t stride) {
  return (in + 2 * pad - dil * (taps - 1) - 1) / stride + 1;
}

// Floor division for a possibly negative numerator and a positive denominator.
FASTCONV_HD int64_t floor_div(int64_t a, int64_t b) {
  return (a >= 0) ? a / b : -((-a + b - 1) / b);
}

// Output extent of one spatial dimension of a pooling window (torch's rule): with ceil_mode the last
// window may hang over the end, but it must start inside the input or its left padding.
FASTCONV_HD int64_t pool_output_extent(int64_t in, int64_t pad, int64_t dil, int64_t taps, int64_t stride,
                                       bool ceil_mode) {
  const int64_t span = in + 2 * pad - dil * (taps - 1) - 1;
  int64_t out = floor_div(span + (ceil_mode ? stride - 1 : 0), stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// The first tap of a window at or after 0, from the window's start and its dilation: where torch's max pooling
// begins its scan (it steps a start in the padding forward by the dilation), so its index for a window with no
// element inside the input (dilation can put every tap in the padding or past the end).
FASTCONV_HD int64_t pool_first_tap_from_zero(int64_t start, int64_t dil) {
  return start >= 0 ? start : start + (-start + dil - 1) / dil * dil;
}

// Also the geometry of a pooling window (max_pool2d): K = C, groups = C, R x S the window, no filter.
struct Conv2dProblem {
  int64_t N, C, H, W;  // activation
  int64_t K, R, S;     // filter: K output channels of C / groups input channels, R x S taps
  int64_t P, Q;        // output
  int64_t pad_h, pad_w;
  int64_t stride_h, stride_w;
  int64_t dil_h, dil_w;
  int64_t groups;

  FASTCONV_HD int64_t C_per_group() const { return groups == 1 ? C : C / groups; }  // (a kernel skips a division)
  FASTCONV_HD int64_t K_per_group() const { return groups == 1 ? K : K / groups; }

  // Input row / column read by output row p (column q) through tap r (s); may lie in the padding.
  FASTCONV_HD int64_t input_row(int64_t p, int64_t r) const { return p * stride_h - pad_h + r * dil_h; }
  FASTCONV_HD int64_t input_col(int64_t q, int64_t s) const { return q * stride_w - pad_w + s * dil_w; }
  // torch's max-pooling index of output (p, q) when its window has no element inside the input (the value is
  // -inf): h * W + w of the first taps at or after row and column 0, which may lie past the end (or alias another
  // element). Backward gathers only over the elements a window covers, so such a window passes no gradient.
  FASTCONV_HD int64_t pool_empty_window_index(int64_t p, int64_t q) const {
    return pool_first_tap_from_zero(input_row(p, 0), dil_h) * W + pool_first_tap_from_zero(input_col(q, 0), dil_w);
  }

  // The taps r in [*begin, *end) through which output row p reads a row inside the input (likewise columns). Max
  // pooling scans only these, so a huge window over a small input costs its overlap, not its size.
  FASTCONV_HD void taps_inside_rows(int64_t p, int64_t* begin, int64_t* end) const {
    taps_inside(input_row(p, 0), dil_h, R, H, begin, end);
  }
  FASTCONV_HD void taps_inside_cols(int64_t q, int64_t* begin, int64_t* end) const {
    taps_inside(input_col(q, 0), dil_w, S, W, begin, end);
  }
  // The taps r in [*begin, *end) through which some output row can read input row h (output_row(h, r) may still
  // be -1 within them: between strides). Max pooling's backward visits only these.
  FASTCONV_HD void taps_reaching_row(int64_t h, int64_t* begin, int64_t* end) const {
    taps_reaching(h + pad_h, dil_h, stride_h, P, R, begin, end);
  }
  FASTCONV_HD void taps_reaching_col(int64_t w, int64_t* begin, int64_t* end) const {
    taps_reaching(w + pad_w, dil_w, stride_w, Q, S, begin, end);
  }

  // dgrad's inverse: the output row that reads input row h through tap r, or -1 if none does (the tap
  // falls between strides or outside the output).
  FASTCONV_HD int64_t output_row(int64_t h, int64_t r) const {
    return inverse_tap(h + pad_h - r * dil_h, stride_h, P);
  }
  FASTCONV_HD int64_t output_col(int64_t w, int64_t s) const {
    return inverse_tap(w + pad_w - s * dil_w, stride_w, Q);
  }

  // The output rows p in [*begin, *end) whose tap r reads a row inside the input (not padding). The CPU
  // twins loop over exactly these rows, so their inner loops need no bounds checks.
  FASTCONV_HD void valid_output_rows(int64_t r, int64_t* begin, int64_t* end) const {
    valid_range(r * dil_h - pad_h, stride_h, H, P, begin, end);
  }
  FASTCONV_HD void valid_output_cols(int64_t s, int64_t* begin, int64_t* end) const {
    valid_range(s * dil_w - pad_w, stride_w, W, Q, begin, end);
  }

  // Multiply-adds of the forward pass (each is two floating-point operations).
  FASTCONV_HD int64_t macs() const { return N * K * P * Q * C_per_group() * R * S; }

 private:
  FASTCONV_HD static int64_t inverse_tap(int64_t t, int64_t stride, int64_t extent) {
    if (t < 0) return -1;
    int64_t o;
    if (t <= 0x7fffffff && stride <= 0x7fffffff) {
      // 32-bit division: a GPU has no 64-bit divide instruction, and this runs once per filter tap.
      o = static_cast<uint32_t>(t) / static_cast<uint32_t>(stride);
    } else {
      o = t / stride;
    }
    if (o * stride != t) return -1;
    return o < extent ? o : -1;
  }
  // Taps t in [0, taps) with 0 <= start + t * dil < extent.
  FASTCONV_HD static void taps_inside(int64_t start, int64_t dil, int64_t taps, int64_t extent, int64_t* begin,
                                      int64_t* end) {
    int64_t lo = start >= 0 ? 0 : (-start + dil - 1) / dil;
    int64_t hi = start >= extent ? 0 : (extent - 1 - start) / dil + 1;
    if (hi > taps) hi = taps;
    if (lo > hi) lo = hi;
    *begin = lo;
    *end = hi;
  }
  // Taps t in [0, taps) with 0 <= offset - t * dil <= (out - 1) * stride, for offset >= 0.
  FASTCONV_HD static void taps_reaching(int64_t offset, int64_t dil, int64_t stride, int64_t out, int64_t taps,
                                        int64_t* begin, int64_t* end) {
    const int64_t beyond = offset - (out - 1) * stride;  // t * dil must reach at least this far back
    int64_t lo = beyond <= 0 ? 0 : (beyond + dil - 1) / dil;
    int64_t hi = offset / dil + 1;
    if (hi > taps) hi = taps;
    if (lo > hi) lo = hi;
    *begin = lo;
    *end = hi;
  }
  // Solve 0 <= o * stride + offset < in for o in [0, out).
  FASTCONV_HD static void valid_range(int64_t offset, int64_t stride, int64_t in, int64_t out,
                                      int64_t* begin, int64_t* end) {
    int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int64_t hi = floor_div(in - 1 - offset, stride) + 1;
    if (hi > out) hi = out;
    if (lo > hi) lo = hi;
    *begin = lo;
    *end = hi;
  }
};

}  // namespace fastconv
