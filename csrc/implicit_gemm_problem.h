// The implicit-GEMM view of a convolution: which GEMM each pass is, and where each operand element lives.
//
// All tensors are dense and channels-last: activations NHWC (x: N,H,W,C; dy: N,P,Q,K), the filter KRSC
// (K rows of R*S*Cg, the channel fastest). Per group g (channels [g*Cg, (g+1)*Cg) of the input and
// [g*Kg, (g+1)*Kg) of the output), each pass is one GEMM C[m, n] = sum over k of A[m, k] * B[k, n]:
//
//   pass   M          N          K (reduction)   A[m, k]                         B[k, n]
//   fprop  N*P*Q      Kg         R*S*Cg          x gathered at (n,p,q),(r,s,c)   w[g*Kg + n][k]
//   dgrad  N*H*W      Cg         R*S*Kg          dy gathered at (n,h,w),(r,s,k)  wt[g][n][k] (w transposed)
//   wgrad  Kg         R*S*Cg     N*P*Q           dy[k][g*Kg + m]                 x gathered at (n,p,q),(r,s,c)
//
// "Gathered" means A (or B) is never materialised: its element is read from the activation at the
// position the filter tap selects, or is zero in the padding (and, for dgrad, where the tap falls between
// strides). The reduction index of a gathered operand is (r, s, c) with c fastest, the filter's own order,
// so runs of consecutive k are consecutive channels of one pixel: the GPU loads them as 16-byte vectors.
//
// Plain C++ (nvcc, g++ and NVRTC): the CPU twin (csrc/cpu/conv2d_implicit_gemm.cpp) computes every element
// through these functions, so the CPU tests exercise the GPU kernels' index math.
#pragma once

#include "conv2d_problem.h"
#include "fast_divmod.h"

namespace fastconv {

// Tile configurations of the CUDA kernels; the ops' `tile` argument is an index below kImplicitGemmTiles, or -1
// for the kernels' own choice. Tiles 0-5 run mma.sync (csrc/cuda/implicit_gemm.cuh), any pass and element type on
// sm_80 and later; tiles 6 and 7 are Hopper's wgmma (csrc/cuda/wgmma.cuh): fp16/bf16 fprop and dgrad on sm_90a.
// Elsewhere (wgrad, fp32, another GPU, a build without sm_90a) a wgmma tile runs as its mma.sync twin, the tile of
// the same block shape.
constexpr int kImplicitGemmTiles = 8;
constexpr int kImplicitGemmMmaSyncTiles = 6;
FASTCONV_HD constexpr bool implicit_gemm_is_wgmma_tile(int tile) { return tile >= kImplicitGemmMmaSyncTiles; }
FASTCONV_HD constexpr int implicit_gemm_mma_sync_twin(int tile) { return tile == 6 ? 0 : tile == 7 ? 3 : tile; }

// Reduction index k of a gathered operand split into filter tap (r, s) and channel c within the group.
struct TapChannel {
  int64_t r, s, c;
};
FASTCONV_HD TapChannel split_tap_channel(int64_t k, int64_t channels, int64_t S) {
  const int64_t rs = k / channels;
  return {rs / S, rs % S, k - rs * channels};
}

// A GEMM row or column index over output (or input) pixels split into (image, row, column).
struct Pixel {
  int64_t n, y, x;
};
FASTCONV_HD Pixel split_pixel(int64_t m, int64_t height, int64_t width) {
  const int64_t plane = height * width;
  const int64_t n = m / plane, rest = m - n * plane;
  return {n, rest / width, rest % width};
}

// The divisions that set up a K-major activation gather (csrc/cuda/implicit_gemm.cuh's ActivationKMajorLoader), by
// divisors fixed per launch. The host builds them, because FastDivmod's constructor itself divides, and passes them
// to the kernel. A block's prologue then splits its rows' pixel indices and its first reduction index by multiplies.
// Otherwise they are 64-bit divisions, about 25 instructions each even on their 32-bit path: 2 per row and 2 for the
// tap, 6 to 18 per thread (2 to 8 rows) before its first copy. `fast` is false where a row index may reach 2^31
// (FastDivmod's range); the loader then divides.
struct GatherDivisors {
  FastDivmod plane, width;     // the rows' pixel grid: height * width and width (fprop: P*Q, Q; dgrad: H*W, W)
  FastDivmod channels, taps_s;  // the reduction index (r, s, c): the channels per tap, and S
  bool fast;
};
FASTCONV_HD GatherDivisors make_gather_divisors(const Conv2dProblem& pb, bool dgrad) {
  const int64_t height = dgrad ? pb.H : pb.P, width = dgrad ? pb.W : pb.Q;
  const int64_t channels = dgrad ? pb.K_per_group() : pb.C_per_group();
  constexpr int64_t kRange = int64_t{1} << 31;
  // rows reach M + a tile (the last block's rows past the end); the reduction is below 2^31 (the host checks)
  const bool fast = pb.N * height * width < kRange - 1024 && height * width <= kRange && channels <= kRange &&
                    pb.S <= kRange;
  GatherDivisors d;
  d.fast = fast;
  if (fast && height * width > 0 && channels > 0 && pb.S > 0) {  // (an empty grid loads nothing)
    d.plane = FastDivmod(static_cast<uint32_t>(height * width));
    d.width = FastDivmod(static_cast<uint32_t>(width));
    d.channels = FastDivmod(static_cast<uint32_t>(channels));
    d.taps_s = FastDivmod(static_cast<uint32_t>(pb.S));
  }
  return d;
}

// split_pixel and split_tap_channel by a gather's divisors, for indices below 2^31 (GatherDivisors::fast): the
// kernels' setup, and tests/cpp/index_math_test.cpp checks them against the dividing versions.
FASTCONV_HD Pixel split_pixel(uint32_t m, const GatherDivisors& d) {
  uint32_t n, rest, y, x;
  d.plane.divmod(m, n, rest);
  d.width.divmod(rest, y, x);
  return {n, y, x};
}
FASTCONV_HD TapChannel split_tap_channel(uint32_t k, const GatherDivisors& d) {
  uint32_t rs, c, r, s;
  d.channels.divmod(k, rs, c);
  d.taps_s.divmod(rs, r, s);
  return {r, s, c};
}

// fprop's and wgrad's gather: the NHWC offset of x[n, h, w, channel] that output pixel (n, p, q) reads
// through tap (r, s), or -1 in the padding. `channel` is absolute (group offset included).
FASTCONV_HD int64_t fprop_gather_offset(const Conv2dProblem& pb, const Pixel& out, int64_t r, int64_t s,
                                        int64_t channel) {
  const int64_t h = pb.input_row(out.y, r), w = pb.input_col(out.x, s);
  if (h < 0 || h >= pb.H || w < 0 || w >= pb.W) return -1;
  return ((out.n * pb.H + h) * pb.W + w) * pb.C + channel;
}

// dgrad's gather: the NHWC offset of dy[n, p, q, channel] whose tap (r, s) reads input pixel (n, h, w), or
// -1 when no output does (the tap falls between strides or outside the output).
FASTCONV_HD int64_t dgrad_gather_offset(const Conv2dProblem& pb, const Pixel& in, int64_t r, int64_t s,
                                        int64_t channel) {
  const int64_t p = pb.output_row(in.y, r), q = pb.output_col(in.x, s);
  if (p < 0 || q < 0) return -1;
  return ((in.n * pb.P + p) * pb.Q + q) * pb.K + channel;
}

}  // namespace fastconv
