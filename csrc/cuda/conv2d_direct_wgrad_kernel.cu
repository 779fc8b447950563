// Direct convolution, gradient of the filter (wgrad):
//     dw[k, c, r, s] = sum over n, p, q of dy[n, k, p, q] * x[n, g * Cg + c, p * stride_h - pad_h + r * dil_h,
//                                                                           q * stride_w - pad_w + s * dil_w]
// The output is small (K x Cg x R x S) and each element reduces over N * P * Q, so a block owns one
// (k, c) pair and a chunk of TAPS filter taps: its 256 threads stride over the N * P * Q positions, each
// keeping TAPS partial sums in registers (one grad_output read feeds TAPS multiply-adds), then the block
// reduces each sum in a fixed order. No atomics: the result is bitwise reproducible.
//
// Depthwise filters (one input channel per group) have their own pair of kernels, further down.
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

// Depthwise wgrad (one input channel per group, any channel multiplier Kg):
//     dw[k, 0, r, s] = sum over n, p, q of dy[n, k, p, q] * x[n, k / Kg, p * stride_h - pad_h + r * dil_h,
//                                                               q * stride_w - pad_w + s * dil_w]
// The kernel above gives a block one filter and its threads all N * P * Q positions: 128 blocks for 128 channels,
// each thread reading dy elements K apart in a channels_last tensor (0.05x of torch on the H200, bf16, 128 channels
// of 56 x 56). Here a block takes k_lanes filters, a chunk of TAPS taps and one split of the positions. Each thread
// keeps one filter and the chunk's TAPS partial sums over every pixel_lanes-th position of the split: one dy read
// feeds TAPS multiply-adds, and positions whose whole filter window lies inside x skip the bounds tests. Threads
// are ordered by dy's layout (x has the same in every PyTorch use): channels_last, 32 filters x 8 positions, so a
// warp reads 32 consecutive channels of a pixel; NCHW, 8 filters x 32 positions, a warp reads consecutive columns.
// The block sums its position lanes per (filter, tap) through shared memory in a fixed order and writes
// partial[split][k][tap]; conv2d_depthwise_wgrad_reduce_kernel sums the splits in a fixed order and writes dw.
// No atomics: bitwise reproducible. 32-bit positions within an image and taps (depthwise_wgrad_kernel_fits);
// tensor offsets and the flat position 64-bit.
struct DepthwiseWgradPlan {
  int64_t split_pixels;  // positions (n, p, q) per split, the last split's fewer
  int k_lanes;           // filters per block: a power of two <= 32
  int pixel_lanes;       // threads per filter: kThreads / k_lanes
  int k_blocks, tap_chunks, splits;
  bool channels_fastest;  // the threads' order: filter fastest (dy channels_last), else position fastest
};

constexpr int kDepthwiseWgradTaps = 9;  // a 3x3 filter in one chunk; 5x5 in 3, 7x7 in 6
// The blocks the plan aims for: about 4 per SM of an H100 or H200 (132 SMs). A constant, not the device's count, so
// that the splits, and with them the result's bits, are the same on every GPU.
constexpr int kDepthwiseWgradTargetBlocks = 512;
constexpr int kLaneSumsStride = kThreads + kThreads / 32;  // a tap's row of lane sums, one float of skew per warp

template <typename T, int TAPS>
__global__ void __launch_bounds__(kThreads)
conv2d_depthwise_wgrad_kernel(Conv2dProblem pb, DepthwiseWgradPlan plan, const T* __restrict__ dy, Strides4 dys,
                              const T* __restrict__ x, Strides4 xs, float* __restrict__ partial) {
  extern __shared__ float4 smem_f4[];
  float* lane_sums = reinterpret_cast<float*>(smem_f4);  // [TAPS][kLaneSumsStride]
  // the block: filters kb * k_lanes.., taps chunk * TAPS.., positions of one split (filter blocks fastest: the
  // blocks that read one pixel's channels run side by side)
  const int kb = static_cast<int>(blockIdx.x % static_cast<unsigned>(plan.k_blocks));
  const int rest = static_cast<int>(blockIdx.x / static_cast<unsigned>(plan.k_blocks));
  const int chunk = rest % plan.tap_chunks, split = rest / plan.tap_chunks;
  const int tid = static_cast<int>(threadIdx.x);
  const int kl = plan.channels_fastest ? tid % plan.k_lanes : tid / plan.pixel_lanes;
  const int lane = plan.channels_fastest ? tid / plan.k_lanes : tid % plan.pixel_lanes;
  const int K = static_cast<int>(pb.K), k = kb * plan.k_lanes + kl;
  const int H = static_cast<int>(pb.H), W = static_cast<int>(pb.W), P = static_cast<int>(pb.P);
  const int Q = static_cast<int>(pb.Q), S = static_cast<int>(pb.S), RS = static_cast<int>(pb.R) * S;
  const int stride_h = static_cast<int>(pb.stride_h), stride_w = static_cast<int>(pb.stride_w);
  const int pad_h = static_cast<int>(pb.pad_h), pad_w = static_cast<int>(pb.pad_w);
  const int taps = RS - chunk * TAPS < TAPS ? RS - chunk * TAPS : TAPS;  // this chunk's taps

  int tap_h[TAPS], tap_w[TAPS];  // the taps' offsets from a position's window corner (r * dil_h, s * dil_w)
  int64_t tap_offset[TAPS];      // and the same in x's elements
  float acc[TAPS];
  int r = chunk * TAPS / S, s = chunk * TAPS - r * S;  // the chunk's first tap, then stepped
#pragma unroll
  for (int t = 0; t < TAPS; ++t) {
    // (taps past the filter's end are never read: 0, where r * dil_h could leave the 32 bits fits() bounds)
    tap_h[t] = t < taps ? r * static_cast<int>(pb.dil_h) : 0, tap_w[t] = t < taps ? s * static_cast<int>(pb.dil_w) : 0;
    tap_offset[t] = tap_h[t] * xs.h + tap_w[t] * xs.w;
    acc[t] = 0.f;
    if (++s == S) s = 0, ++r;
  }
  // window corners whose every tap lies inside x
  const int corner_h_last = H - 1 - static_cast<int>((pb.R - 1) * pb.dil_h);
  const int corner_w_last = W - 1 - static_cast<int>((pb.S - 1) * pb.dil_w);

  const int64_t PQ = static_cast<int64_t>(P) * Q, pixels = pb.N * PQ;
  int64_t m = split * plan.split_pixels + lane;
  const int64_t m_end = (split + 1) * plan.split_pixels < pixels ? (split + 1) * plan.split_pixels : pixels;
  if (k < K && m < m_end) {
    int64_t n = m / PQ;
    int p = static_cast<int>(m - n * PQ), q;
    q = p % Q, p /= Q;
    // pixel_lanes positions as (images, rows, columns), each below its extent but the images
    const int64_t step_n = plan.pixel_lanes / PQ;
    const int step_pq = static_cast<int>(plan.pixel_lanes - step_n * PQ), step_p = step_pq / Q;
    const int step_q = step_pq - step_p * Q;
    const T* dyk = dy + static_cast<int64_t>(k) * dys.c;
    const T* xc = x + static_cast<int64_t>(k / static_cast<int>(pb.K_per_group())) * xs.c;
    for (; m < m_end; m += plan.pixel_lanes) {
      const float g = to_float(dyk[n * dys.n + p * dys.h + q * dys.w]);
      const int h0 = p * stride_h - pad_h, w0 = q * stride_w - pad_w;  // the window's corner
      const int64_t corner = n * xs.n + h0 * xs.h + w0 * xs.w;          // (negative off the top or left edge)
      if (h0 >= 0 && h0 <= corner_h_last && w0 >= 0 && w0 <= corner_w_last) {
#pragma unroll
        for (int t = 0; t < TAPS; ++t)
          if (t < taps) acc[t] += g * to_float(xc[corner + tap_offset[t]]);
      } else {
#pragma unroll
        for (int t = 0; t < TAPS; ++t)
          if (t < taps && static_cast<unsigned>(h0 + tap_h[t]) < static_cast<unsigned>(H) &&
              static_cast<unsigned>(w0 + tap_w[t]) < static_cast<unsigned>(W))
            acc[t] += g * to_float(xc[corner + tap_offset[t]]);
      }
      q += step_q, p += step_p, n += step_n;
      if (q >= Q) q -= Q, ++p;
      if (p >= P) p -= P, ++n;
    }
  }

  // The block's sum per (filter, tap) over its position lanes, in lane order.
  const int slot = tid + tid / 32;
#pragma unroll
  for (int t = 0; t < TAPS; ++t) lane_sums[t * kLaneSumsStride + slot] = acc[t];
  __syncthreads();
  for (int o = tid; o < plan.k_lanes * TAPS; o += kThreads) {
    const int okl = o % plan.k_lanes, t = o / plan.k_lanes;
    const int ok = kb * plan.k_lanes + okl, rs = chunk * TAPS + t;
    if (ok >= K || t >= taps) continue;
    float sum = 0.f;
    for (int l = 0; l < plan.pixel_lanes; ++l) {
      const int from = plan.channels_fastest ? l * plan.k_lanes + okl : okl * plan.pixel_lanes + l;
      sum += lane_sums[t * kLaneSumsStride + from + from / 32];
    }
    partial[(static_cast<int64_t>(split) * K + ok) * RS + rs] = sum;
  }
}

// dw[k, 0, r, s] = the sum over splits of partial[split][k][r * S + s], in split order (8 running sums, split j in
// sum j % 8, added pairwise at the end: independent loads in flight, the same order every run).
template <typename T>
__global__ void __launch_bounds__(kThreads)
conv2d_depthwise_wgrad_reduce_kernel(Conv2dProblem pb, int splits, const float* __restrict__ partial,
                                     T* __restrict__ dw, Strides4 dws) {
  const int64_t outputs = pb.K * pb.R * pb.S;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < outputs;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sums[8] = {};
    for (int s0 = 0; s0 < splits; s0 += 8) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (s0 + j < splits) sums[j] += partial[(s0 + j) * outputs + o];
    }
    const float total = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
    const int64_t k = o / (pb.R * pb.S), rs = o - k * (pb.R * pb.S), r = rs / pb.S;
    dw[dws.offset(k, 0, r, rs - r * pb.S)] = from_float<T>(total);
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

// Whether conv2d_depthwise_wgrad_kernel's 32-bit indices hold: the filters, an image's positions, rows and columns
// (in x and dy, with the padding and the filter's reach), the strides, and the grid (at most K x tap chunks x
// kDepthwiseWgradTargetBlocks blocks, one per block index: the kernel has no grid-stride loop).
bool depthwise_wgrad_kernel_fits(const Conv2dProblem& pb) {
  const int64_t limit = int64_t{1} << 30;
  return pb.K * ceil_div(pb.R * pb.S, kDepthwiseWgradTaps) < limit / kDepthwiseWgradTargetBlocks &&
         pb.P * pb.Q < limit && pb.P * pb.stride_h + pb.H < limit && pb.Q * pb.stride_w + pb.W < limit &&
         pb.pad_h < limit && pb.pad_w < limit && (pb.R - 1) * pb.dil_h < limit && (pb.S - 1) * pb.dil_w < limit &&
         pb.R * pb.S < limit;
}

// About kDepthwiseWgradTargetBlocks blocks, each thread taking at least 16 positions (fewer splits mean fewer
// partial sums to add).
DepthwiseWgradPlan depthwise_wgrad_plan(const Conv2dProblem& pb, Strides4 dys) {
  DepthwiseWgradPlan plan{};
  plan.channels_fastest = dys.c == 1 && pb.K > 1;  // dy's layout (x's in every PyTorch use)
  plan.k_lanes = plan.channels_fastest ? pow2_at_least(pb.K, 32) : 8;
  plan.pixel_lanes = kThreads / plan.k_lanes;
  plan.k_blocks = static_cast<int>(ceil_div(pb.K, plan.k_lanes));
  plan.tap_chunks = static_cast<int>(ceil_div(pb.R * pb.S, kDepthwiseWgradTaps));
  const int64_t pixels = pb.N * pb.P * pb.Q, blocks_per_split = int64_t{plan.k_blocks} * plan.tap_chunks;
  int64_t splits = ceil_div(kDepthwiseWgradTargetBlocks, blocks_per_split);
  const int64_t most = ceil_div(pixels, 16 * int64_t{plan.pixel_lanes});  // 16 positions per thread at least
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;  // (no positions: one split of zeros)
  plan.split_pixels = pixels > splits ? ceil_div(pixels, splits) : 1;
  plan.splits = pixels > 0 ? static_cast<int>(ceil_div(pixels, plan.split_pixels)) : 1;
  return plan;
}

bool depthwise_wgrad(const Conv2dProblem& pb) { return pb.C_per_group() == 1 && depthwise_wgrad_kernel_fits(pb); }

#endif  // !defined(__CUDACC_RTC__)

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

int64_t conv2d_direct_wgrad_workspace_floats(const Conv2dProblem& pb, Strides4 dys) {
  if (!depthwise_wgrad(pb)) return 0;
  const DepthwiseWgradPlan plan = depthwise_wgrad_plan(pb, dys);
  return int64_t{plan.splits} * pb.K * pb.R * pb.S;
}

cudaError_t launch_conv2d_direct_wgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* x, Strides4 xs, void* dw, Strides4 dws, float* workspace,
                                       cudaStream_t stream) {
  // Depthwise: its own kernels, into the workspace. Otherwise 1x1 filters get one tap per block; everything else
  // chunks of 9 (a 3x3 filter in one pass).
  const bool depthwise = depthwise_wgrad(pb);
  if (depthwise && workspace == nullptr) return cudaErrorInvalidValue;
  const bool pointwise = pb.R * pb.S == 1;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    T* dwt = static_cast<T*>(dw);
    if (depthwise) {
      const DepthwiseWgradPlan plan = depthwise_wgrad_plan(pb, dys);
      const int64_t blocks = int64_t{plan.splits} * plan.tap_chunks * plan.k_blocks;
      constexpr size_t smem = kDepthwiseWgradTaps * kLaneSumsStride * sizeof(float);
      conv2d_depthwise_wgrad_kernel<T, kDepthwiseWgradTaps><<<grid_for(blocks), kThreads, smem, stream>>>(
          pb, plan, dyt, dys, xt, xs, workspace);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      conv2d_depthwise_wgrad_reduce_kernel<T><<<grid_for(ceil_div(pb.K * pb.R * pb.S, kThreads)), kThreads, 0,
                                                 stream>>>(pb, plan.splits, workspace, dwt, dws);
      return cudaGetLastError();
    }
    return pointwise ? launch_typed<T, 1>(pb, dyt, dys, xt, xs, dwt, dws, stream)
                     : launch_typed<T, 9>(pb, dyt, dys, xt, xs, dwt, dws, stream);
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
