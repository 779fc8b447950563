// Direct convolution, forward (fprop): y[n, k, p, q] = bias[k] + sum over c, r, s of
//     w[k, c, r, s] * x[n, g * Cg + c, p * stride_h - pad_h + r * dil_h, q * stride_w - pad_w + s * dil_w]
// computed in place, with no im2col matrix; with `relu` the epilogue also clamps y at 0 (conv + bias +
// ReLU in one launch: the fused path of a conv-BatchNorm-ReLU whose BatchNorm is folded into w and bias).
//
// Tiling. A block owns one image n, one group g, a tile of tile_p x tile_q output positions and KB output
// channels of that group. Its threads are tile_p * tile_q spatial lanes times k_lanes channel lanes; each
// thread computes one output position for KPT consecutive output channels (register blocking: every input
// value read from shared memory feeds KPT multiply-adds). The block walks its group's input channels in
// steps of c_tile; per step it stages
//   - the filter slice w[k-block, c-step, :, :] in shared memory as [c][r][s][k], so each thread reads its
//     KPT weights as one or two 16-byte broadcasts, and
//   - the input patch its output tile reads, (tile_p - 1) * stride + (R - 1) * dil + 1 rows by as many
//     columns, zero-filled where the patch lies in the padding, so the inner loop has no bounds checks.
// When even one channel's patch does not fit in shared memory (very large dilation or stride), the
// STAGE_INPUT=false variant reads the input straight from global memory with bounds checks instead.
//
// Every layout works: the kernel indexes through (n, c, h, w) element strides, and stages the patch
// channel-fastest when the input is channels_last so the global reads stay coalesced either way.
// Blocks run a grid-stride loop over the logical blocks, so any problem size fits in one launch.
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTile = 16;      // output rows or columns per block
constexpr int kMaxChannelStep = 16;

struct FpropTiling {
  int tile_p, tile_q;    // output tile per block
  int k_lanes;           // thread lanes over output channels; the block covers KB = k_lanes * KPT channels
  int c_tile;            // input channels staged per step
  int patch_h, patch_w;  // staged input patch (unused when STAGE_INPUT is false)
  bool channels_fastest; // stage the patch channel-fastest (channels_last input)
  int64_t tiles_p, tiles_q, k_blocks, total_blocks;
};

template <typename T, int KPT, bool STAGE_INPUT>
__global__ void __launch_bounds__(kThreads)
conv2d_direct_fprop_kernel(Conv2dProblem pb, FpropTiling tl, const T* __restrict__ x, Strides4 xs,
                           const T* __restrict__ w, Strides4 ws, const T* __restrict__ bias, bool relu,
                           T* __restrict__ y, Strides4 ys) {
  extern __shared__ float4 smem_f4[];  // float4 so that the filter slice is 16-byte aligned
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int KB = tl.k_lanes * KPT;
  const int S = static_cast<int>(pb.S), RS = static_cast<int>(pb.R) * S;  // R*S fits: it is staged
  float* s_w = smem;                          // [c_tile][R][S][KB]
  float* s_x = smem + tl.c_tile * RS * KB;    // [c_tile][patch_h][patch_w]

  const int spatial = tl.tile_p * tl.tile_q;
  const int lane_sp = threadIdx.x % spatial, lane_k = threadIdx.x / spatial;
  const int tp = lane_sp / tl.tile_q, tq = lane_sp % tl.tile_q;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();
  const int sh = static_cast<int>(pb.stride_h), sw = static_cast<int>(pb.stride_w);
  const int dh = static_cast<int>(pb.dil_h), dw = static_cast<int>(pb.dil_w);

  for (int64_t blk = blockIdx.x; blk < tl.total_blocks; blk += gridDim.x) {
    // Output tiles vary fastest, so blocks running together share one filter slice in L2.
    int64_t rest = blk;
    const int64_t tile_q_idx = rest % tl.tiles_q;
    rest /= tl.tiles_q;
    const int64_t tile_p_idx = rest % tl.tiles_p;
    rest /= tl.tiles_p;
    const int64_t k_block = rest % tl.k_blocks;
    rest /= tl.k_blocks;
    const int64_t g = rest % pb.groups, n = rest / pb.groups;

    const int64_t p0 = tile_p_idx * tl.tile_p, q0 = tile_q_idx * tl.tile_q;
    const int64_t p = p0 + tp, q = q0 + tq;
    const int64_t k_first = k_block * KB;  // first output channel of the block, within the group
    const int64_t h0 = pb.input_row(p0, 0), w0 = pb.input_col(q0, 0);  // patch origin in the input

    float acc[KPT];
#pragma unroll
    for (int j = 0; j < KPT; ++j) acc[j] = 0.f;

    for (int64_t c0 = 0; c0 < Cg; c0 += tl.c_tile) {
      const int c_count = static_cast<int>(Cg - c0 < tl.c_tile ? Cg - c0 : tl.c_tile);
      for (int i = threadIdx.x; i < tl.c_tile * RS * KB; i += blockDim.x) {
        const int kk = i % KB, rs = (i / KB) % RS, c = i / (KB * RS);
        const int64_t k = k_first + kk;
        float v = 0.f;
        if (k < Kg && c < c_count) v = to_float(w[ws.offset(g * Kg + k, c0 + c, rs / S, rs % S)]);
        s_w[i] = v;
      }
      if constexpr (STAGE_INPUT) {
        const int patch = tl.patch_h * tl.patch_w;
        for (int i = threadIdx.x; i < tl.c_tile * patch; i += blockDim.x) {
          int c, hw;
          if (tl.channels_fastest) {
            c = i % tl.c_tile;
            hw = i / tl.c_tile;
          } else {
            c = i / patch;
            hw = i % patch;
          }
          const int ph = hw / tl.patch_w, pw = hw % tl.patch_w;
          const int64_t h = h0 + ph, ww = w0 + pw;
          float v = 0.f;
          if (c < c_count && h >= 0 && h < pb.H && ww >= 0 && ww < pb.W)
            v = to_float(x[xs.offset(n, g * Cg + c0 + c, h, ww)]);
          s_x[c * patch + hw] = v;
        }
      }
      __syncthreads();

      if (p < pb.P && q < pb.Q) {
        for (int c = 0; c < c_count; ++c) {
          for (int r = 0; r < pb.R; ++r) {
            for (int s = 0; s < pb.S; ++s) {
              float v;
              if constexpr (STAGE_INPUT) {
                v = s_x[(c * tl.patch_h + tp * sh + r * dh) * tl.patch_w + tq * sw + s * dw];
              } else {
                const int64_t h = pb.input_row(p, r), ww = pb.input_col(q, s);
                v = (h >= 0 && h < pb.H && ww >= 0 && ww < pb.W)
                        ? to_float(x[xs.offset(n, g * Cg + c0 + c, h, ww)])
                        : 0.f;
              }
              fma_row<KPT>(acc, v, s_w + ((c * RS) + r * S + s) * KB + lane_k * KPT);
            }
          }
        }
      }
      __syncthreads();  // the next step overwrites the staged tiles
    }

    if (p < pb.P && q < pb.Q) {
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        const int64_t k = k_first + lane_k * KPT + j;
        if (k < Kg) {
          const float b = bias != nullptr ? to_float(bias[g * Kg + k]) : 0.f;
          const float v = acc[j] + b;
          y[ys.offset(n, g * Kg + k, p, q)] = from_float<T>(relu && v < 0.f ? 0.f : v);  // NaN passes
        }
      }
    }
  }
}

// Depthwise convolution (one input channel per group, any channel multiplier Kg = K / C):
//     y[n, k, p, q] = bias[k] + sum over r, s of w[k, 0, r, s] * x[n, k / Kg, input_row(p, r), input_col(q, s)]
// The tiled kernel above stages one input channel's patch per step and spreads its channel lanes over a group's
// filters: with one channel and one filter per group, that is 256 threads on one channel's 16 x 16 tile, whose
// staging reads in a channels_last input are C elements apart (a 2-byte element per 32-byte sector). It measured
// 0.05x of torch (H200, bf16 channels_last, 128 channels of 56 x 56). Here every thread computes whole outputs on
// its own, and the threads are ordered by x's layout: channel fastest when x is channels_last (k = j % K), column
// fastest otherwise, so a warp's reads of each tap are contiguous (NCHW: at stride 1; with y in x's layout, its
// writes too), and the R x S re-reads of an input element come from L1 and L2. Block b takes output rows (n, p) = b,
// b + gridDim.x, ... (BlockRows); its threads the row's Q x K outputs (Q * K below 2^31 - kThreads: the launcher
// checks).
template <typename T>
__global__ void __launch_bounds__(kThreads)
conv2d_depthwise_fprop_kernel(Conv2dProblem pb, const T* __restrict__ x, Strides4 xs, const T* __restrict__ w,
                              Strides4 ws, const T* __restrict__ bias, bool relu, T* __restrict__ y, Strides4 ys,
                              bool channels_fastest) {
  const int Q = static_cast<int>(pb.Q), K = static_cast<int>(pb.K), Kg = static_cast<int>(pb.K_per_group());
  const int R = static_cast<int>(pb.R), S = static_cast<int>(pb.S), H = static_cast<int>(pb.H);
  const int W = static_cast<int>(pb.W);  // (every tap's row and column fits int: depthwise_kernel_fits)
  const int stride_w = static_cast<int>(pb.stride_w), pad_w = static_cast<int>(pb.pad_w);
  const int dil_h = static_cast<int>(pb.dil_h), dil_w = static_cast<int>(pb.dil_w);
  const int64_t tap_row = pb.dil_h * xs.h, tap_col = pb.dil_w * xs.w;  // element steps between taps
  const int row_outputs = Q * K;
  for (BlockRows it(static_cast<int>(pb.P)); it.n < pb.N; it.next()) {
    const int64_t n = it.n;
    const int p = it.row;
    const int h0 = static_cast<int>(pb.input_row(p, 0));
    for (int j = threadIdx.x; j < row_outputs; j += blockDim.x) {
      const int k = channels_fastest ? j % K : j / Q, q = channels_fastest ? j / K : j % Q;
      const int64_t c = Kg == 1 ? k : k / Kg;
      const int w0 = q * stride_w - pad_w;
      const T* xp = x + n * xs.n + c * xs.c + h0 * xs.h + w0 * xs.w;  // tap (0, 0), maybe in the padding
      const T* wp = w + k * ws.n;
      float acc = 0.f;
      for (int r = 0; r < R; ++r, xp += tap_row) {
        if (static_cast<unsigned>(h0 + r * dil_h) >= static_cast<unsigned>(H)) continue;
        for (int s = 0; s < S; ++s) {
          if (static_cast<unsigned>(w0 + s * dil_w) >= static_cast<unsigned>(W)) continue;
          acc += to_float(wp[r * ws.h + s * ws.w]) * to_float(xp[s * tap_col]);
        }
      }
      const float v = acc + (bias != nullptr ? to_float(bias[k]) : 0.f);
      y[ys.offset(n, k, p, q)] = from_float<T>(relu && v < 0.f ? 0.f : v);  // NaN passes
    }
  }
}

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)
// Whether conv2d_depthwise_fprop_kernel's 32-bit indices hold: a row's Q x K outputs with room for the thread
// loop's last step, and every tap's input row and column (padding included).
bool depthwise_kernel_fits(const Conv2dProblem& pb) {
  const int64_t limit = int64_t{1} << 30;
  return pb.Q * pb.K <= 0x7fffffff - kThreads && pb.H + 2 * pb.pad_h + (pb.R - 1) * pb.dil_h < limit &&
         pb.W + 2 * pb.pad_w + (pb.S - 1) * pb.dil_w < limit && pb.P * pb.stride_h < limit &&
         pb.Q * pb.stride_w < limit;
}

// Chooses the tile for one problem: the largest output tile up to 16 x 16 that the output fills, the rest
// of the 256 threads over output channels, then as many input channels per step as shared memory holds.
template <int KPT>
FpropTiling choose_tiling(const Conv2dProblem& pb, bool channels_fastest, bool* stage_input) {
  FpropTiling tl{};
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), RS = pb.R * pb.S;
  tl.tile_q = pow2_at_least(pb.Q, kMaxTile);
  tl.tile_p = pow2_at_least(pb.P, kMaxTile);
  const int spatial = tl.tile_p * tl.tile_q;
  const int64_t k_lanes_wanted = ceil_div(Kg, KPT);
  tl.k_lanes = static_cast<int>(k_lanes_wanted < kThreads / spatial ? k_lanes_wanted : kThreads / spatial);
  const int64_t patch_h = (tl.tile_p - 1) * pb.stride_h + (pb.R - 1) * pb.dil_h + 1;
  const int64_t patch_w = (tl.tile_q - 1) * pb.stride_w + (pb.S - 1) * pb.dil_w + 1;
  const int64_t budget = kSharedMemoryBudgetBytes / sizeof(float);
  // Fewer channel lanes until one channel's filter slice fits (the wrapper guarantees R*S*KPT <= budget
  // or falls back to KPT = 1).
  while (tl.k_lanes > 1 && RS * tl.k_lanes * KPT > budget) tl.k_lanes /= 2;
  const int64_t filter_per_c = RS * tl.k_lanes * KPT;
  const int64_t staged_per_c = filter_per_c + patch_h * patch_w;
  int64_t c_tile;
  if (staged_per_c <= budget) {
    *stage_input = true;
    c_tile = budget / staged_per_c;
    tl.patch_h = static_cast<int>(patch_h);
    tl.patch_w = static_cast<int>(patch_w);
  } else {
    *stage_input = false;
    c_tile = budget / filter_per_c;
  }
  if (c_tile > kMaxChannelStep) c_tile = kMaxChannelStep;
  if (c_tile > Cg) c_tile = Cg;
  tl.c_tile = static_cast<int>(c_tile < 1 ? 1 : c_tile);
  tl.channels_fastest = channels_fastest;
  tl.tiles_p = ceil_div(pb.P, tl.tile_p);
  tl.tiles_q = ceil_div(pb.Q, tl.tile_q);
  tl.k_blocks = ceil_div(Kg, static_cast<int64_t>(tl.k_lanes) * KPT);
  tl.total_blocks = pb.N * pb.groups * tl.k_blocks * tl.tiles_p * tl.tiles_q;
  return tl;
}

template <typename T, int KPT>
cudaError_t launch_typed(const Conv2dProblem& pb, const T* x, Strides4 xs, const T* w, Strides4 ws, const T* bias,
                         bool relu, T* y, Strides4 ys, cudaStream_t stream) {
  bool stage_input = false;
  const bool channels_fastest = xs.c == 1 && pb.C > 1;
  const FpropTiling tl = choose_tiling<KPT>(pb, channels_fastest, &stage_input);
  const int threads = tl.tile_p * tl.tile_q * tl.k_lanes;
  const int64_t RS = pb.R * pb.S;
  size_t smem = static_cast<size_t>(tl.c_tile) * RS * tl.k_lanes * KPT;
  if (stage_input) smem += static_cast<size_t>(tl.c_tile) * tl.patch_h * tl.patch_w;
  smem *= sizeof(float);
  const unsigned grid = grid_for(tl.total_blocks);
  if (stage_input) {
    conv2d_direct_fprop_kernel<T, KPT, true><<<grid, threads, smem, stream>>>(pb, tl, x, xs, w, ws, bias, relu, y, ys);
  } else {
    conv2d_direct_fprop_kernel<T, KPT, false><<<grid, threads, smem, stream>>>(pb, tl, x, xs, w, ws, bias, relu, y, ys);
  }
  return cudaGetLastError();
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_conv2d_direct_fprop(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs,
                                       const void* w, Strides4 ws, const void* bias, bool relu, void* y,
                                       Strides4 ys, cudaStream_t stream) {
  // Depthwise: its own kernel. Otherwise eight output channels per thread when the group has them, one for thin
  // groups.
  const bool depthwise = pb.C_per_group() == 1 && depthwise_kernel_fits(pb);
  const bool wide = pb.K_per_group() >= 8 && pb.R * pb.S * 8 <= kMaxDirectFilterTaps;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* wt = static_cast<const T*>(w);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (depthwise) {
      const bool channels_fastest = xs.c == 1 && pb.C > 1;  // x's layout: the R x S reads, not the one write
      conv2d_depthwise_fprop_kernel<T><<<grid_for(pb.N * pb.P), kThreads, 0, stream>>>(
          pb, xt, xs, wt, ws, bt, relu, yt, ys, channels_fastest);
      return cudaGetLastError();
    }
    return wide ? launch_typed<T, 8>(pb, xt, xs, wt, ws, bt, relu, yt, ys, stream)
                : launch_typed<T, 1>(pb, xt, xs, wt, ws, bt, relu, yt, ys, stream);
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
