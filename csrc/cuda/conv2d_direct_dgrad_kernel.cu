// Direct convolution, gradient of the input (dgrad):
//     dx[n, c, h, w] = sum over the group's k and taps r, s of w[k, c % Cg, r, s] * dy[n, k, p, q]
// where (p, q) is the output position that read (h, w) through tap (r, s): h + pad_h - r * dil_h must be a
// non-negative multiple of stride_h below P * stride_h (Conv2dProblem::output_row), and likewise for w.
// Each dx element is gathered by one thread (no atomics), so results are deterministic.
//
// Tiling mirrors fprop with the roles of input and output swapped: a block owns one image, one group, a
// tile of up to 16 x 16 input positions and CB input channels; each thread computes one position for CPT
// consecutive channels. The block walks the group's output channels in steps of k_tile and stages the
// filter slice w[k-step, c-block, :, :] in shared memory as [k][r][s][c] (CPT weights per 16-byte read).
// grad_output values are read from global memory (neighbouring threads read neighbouring q, so the reads
// coalesce for NCHW; the L1 serves the R * S re-reads). Staging a dy patch too is left for later: with
// stride > 1 most taps fall between strides, and the im2col/implicit-GEMM paths are where speed lives.
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTile = 16;
constexpr int kMaxChannelStep = 16;

struct DgradTiling {
  int tile_h, tile_w;  // input-gradient tile per block
  int c_lanes;         // thread lanes over input channels; the block covers CB = c_lanes * CPT channels
  int k_tile;          // output channels staged per step
  int64_t tiles_h, tiles_w, c_blocks, total_blocks;
};

template <typename T, int CPT>
__global__ void __launch_bounds__(kThreads)
conv2d_direct_dgrad_kernel(Conv2dProblem pb, DgradTiling tl, const T* __restrict__ dy, Strides4 dys,
                           const T* __restrict__ w, Strides4 ws, T* __restrict__ dx, Strides4 dxs) {
  extern __shared__ float4 smem_f4[];
  float* s_w = reinterpret_cast<float*>(smem_f4);  // [k_tile][R][S][CB]
  const int CB = tl.c_lanes * CPT;
  const int S = static_cast<int>(pb.S), RS = static_cast<int>(pb.R) * S;  // R*S fits: it is staged
  const int spatial = tl.tile_h * tl.tile_w;
  const int lane_sp = threadIdx.x % spatial, lane_c = threadIdx.x / spatial;
  const int th = lane_sp / tl.tile_w, tw = lane_sp % tl.tile_w;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group();

  for (int64_t blk = blockIdx.x; blk < tl.total_blocks; blk += gridDim.x) {
    int64_t rest = blk;
    const int64_t tile_w_idx = rest % tl.tiles_w;
    rest /= tl.tiles_w;
    const int64_t tile_h_idx = rest % tl.tiles_h;
    rest /= tl.tiles_h;
    const int64_t c_block = rest % tl.c_blocks;
    rest /= tl.c_blocks;
    const int64_t g = rest % pb.groups, n = rest / pb.groups;
    const int64_t h = tile_h_idx * tl.tile_h + th, wcol = tile_w_idx * tl.tile_w + tw;
    const int64_t c_first = c_block * CB;  // within the group
    const bool active = h < pb.H && wcol < pb.W;

    float acc[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[j] = 0.f;

    for (int64_t k0 = 0; k0 < Kg; k0 += tl.k_tile) {
      const int k_count = static_cast<int>(Kg - k0 < tl.k_tile ? Kg - k0 : tl.k_tile);
      for (int i = threadIdx.x; i < tl.k_tile * RS * CB; i += blockDim.x) {
        const int cc = i % CB, rs = (i / CB) % RS, kk = i / (CB * RS);
        const int64_t c = c_first + cc;
        float v = 0.f;
        if (c < Cg && kk < k_count) v = to_float(w[ws.offset(g * Kg + k0 + kk, c, rs / S, rs % S)]);
        s_w[i] = v;
      }
      __syncthreads();

      if (active) {
        for (int r = 0; r < pb.R; ++r) {
          const int64_t p = pb.output_row(h, r);
          if (p < 0) continue;
          for (int s = 0; s < pb.S; ++s) {
            const int64_t q = pb.output_col(wcol, s);
            if (q < 0) continue;
            const T* dy_pq = dy + dys.offset(n, g * Kg + k0, p, q);
            for (int kk = 0; kk < k_count; ++kk) {
              const float v = to_float(dy_pq[kk * dys.c]);
              fma_row<CPT>(acc, v, s_w + ((kk * RS) + r * S + s) * CB + lane_c * CPT);
            }
          }
        }
      }
      __syncthreads();
    }

    if (active) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t c = c_first + lane_c * CPT + j;
        if (c < Cg) dx[dxs.offset(n, g * Cg + c, h, wcol)] = from_float<T>(acc[j]);
      }
    }
  }
}

// Depthwise dgrad (one input channel per group, Kg = K / C filters each):
//     dx[n, c, h, w] = sum over m < Kg and taps r, s of w[k, 0, r, s] * dy[n, k, p, q]    (k = c * Kg + m)
// with (p, q) the output position that read (h, w) through tap (r, s), taps between strides or outside dy skipped.
// The tiled kernel above gives a block one group's 16 x 16 tile and spreads its channel lanes over the group's
// input channels: with one per group, each thread gathers 9 products, from dy elements K apart in a channels_last
// dy (0.04x of torch on the H200, bf16, 128 channels of 56 x 56). As the depthwise fprop kernel
// (conv2d_direct_fprop_kernel.cu): a thread per dx element, threads ordered by dy's layout (channel fastest when dy
// is channels_last, column fastest otherwise), so a warp's reads of each tap are contiguous (NCHW: at stride 1); a
// block per input row (n, h), its threads over the row's W x C elements. A tap's output row and column are found
// once for the group's Kg filters. 32-bit positions within a row and taps (depthwise_dgrad_kernel_fits); tensor offsets
// 64-bit. Deterministic: each element is one thread's sum in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
conv2d_depthwise_dgrad_kernel(Conv2dProblem pb, const T* __restrict__ dy, Strides4 dys, const T* __restrict__ w,
                              Strides4 ws, T* __restrict__ dx, Strides4 dxs, bool channels_fastest) {
  const int W = static_cast<int>(pb.W), C = static_cast<int>(pb.C), Kg = static_cast<int>(pb.K_per_group());
  const int R = static_cast<int>(pb.R), S = static_cast<int>(pb.S), P = static_cast<int>(pb.P);
  const int Q = static_cast<int>(pb.Q);
  const int stride_h = static_cast<int>(pb.stride_h), stride_w = static_cast<int>(pb.stride_w);
  const int dil_h = static_cast<int>(pb.dil_h), dil_w = static_cast<int>(pb.dil_w);
  const int pad_h = static_cast<int>(pb.pad_h), pad_w = static_cast<int>(pb.pad_w);
  const int row_inputs = W * C;
  for (BlockRows it(static_cast<int>(pb.H)); it.n < pb.N; it.next()) {
    const int64_t n = it.n;
    const int h = it.row;
    for (int j = threadIdx.x; j < row_inputs; j += blockDim.x) {
      const int c = channels_fastest ? j % C : j / W, x = channels_fastest ? j / C : j % W;
      const T* dyc = dy + n * dys.n + static_cast<int64_t>(c) * Kg * dys.c;  // the group's first filter
      const T* wc = w + static_cast<int64_t>(c) * Kg * ws.n;
      float acc = 0.f;
      for (int r = 0; r < R; ++r) {
        int p = h + pad_h - r * dil_h;  // p * stride_h, if tap r reads row h from an output row
        if (stride_h != 1) {
          if (p < 0 || p % stride_h != 0) continue;
          p /= stride_h;
        }
        if (static_cast<unsigned>(p) >= static_cast<unsigned>(P)) continue;
        for (int s = 0; s < S; ++s) {
          int q = x + pad_w - s * dil_w;
          if (stride_w != 1) {
            if (q < 0 || q % stride_w != 0) continue;
            q /= stride_w;
          }
          if (static_cast<unsigned>(q) >= static_cast<unsigned>(Q)) continue;
          const T* dyt = dyc + p * dys.h + q * dys.w;
          const T* wt = wc + r * ws.h + s * ws.w;
          for (int m = 0; m < Kg; ++m) acc += to_float(wt[m * ws.n]) * to_float(dyt[m * dys.c]);
        }
      }
      dx[dxs.offset(n, c, h, x)] = from_float<T>(acc);
    }
  }
}

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)
// Whether conv2d_depthwise_dgrad_kernel's 32-bit indices hold: a row's W x C elements with room for the thread
// loop's last step, every tap's h + pad_h - r * dil_h (and the columns'), dy's extents and the strides.
bool depthwise_dgrad_kernel_fits(const Conv2dProblem& pb) {
  const int64_t limit = int64_t{1} << 30;
  return pb.W * pb.C <= 0x7fffffff - kThreads && pb.H + pb.pad_h + (pb.R - 1) * pb.dil_h < limit &&
         pb.W + pb.pad_w + (pb.S - 1) * pb.dil_w < limit && pb.K_per_group() < limit && pb.P < limit &&
         pb.Q < limit && pb.stride_h < limit && pb.stride_w < limit;
}

template <int CPT>
DgradTiling choose_tiling(const Conv2dProblem& pb) {
  DgradTiling tl{};
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), RS = pb.R * pb.S;
  tl.tile_w = pow2_at_least(pb.W, kMaxTile);
  tl.tile_h = pow2_at_least(pb.H, kMaxTile);
  const int spatial = tl.tile_h * tl.tile_w;
  const int64_t c_lanes_wanted = ceil_div(Cg, CPT);
  tl.c_lanes = static_cast<int>(c_lanes_wanted < kThreads / spatial ? c_lanes_wanted : kThreads / spatial);
  const int64_t budget = kSharedMemoryBudgetBytes / sizeof(float);
  while (tl.c_lanes > 1 && RS * tl.c_lanes * CPT > budget) tl.c_lanes /= 2;
  int64_t k_tile = budget / (RS * tl.c_lanes * CPT);
  if (k_tile > kMaxChannelStep) k_tile = kMaxChannelStep;
  if (k_tile > Kg) k_tile = Kg;
  tl.k_tile = static_cast<int>(k_tile < 1 ? 1 : k_tile);
  tl.tiles_h = ceil_div(pb.H, tl.tile_h);
  tl.tiles_w = ceil_div(pb.W, tl.tile_w);
  tl.c_blocks = ceil_div(Cg, static_cast<int64_t>(tl.c_lanes) * CPT);
  tl.total_blocks = pb.N * pb.groups * tl.c_blocks * tl.tiles_h * tl.tiles_w;
  return tl;
}

template <typename T, int CPT>
cudaError_t launch_typed(const Conv2dProblem& pb, const T* dy, Strides4 dys, const T* w, Strides4 ws, T* dx,
                         Strides4 dxs, cudaStream_t stream) {
  const DgradTiling tl = choose_tiling<CPT>(pb);
  const int threads = tl.tile_h * tl.tile_w * tl.c_lanes;
  const size_t smem = static_cast<size_t>(tl.k_tile) * pb.R * pb.S * tl.c_lanes * CPT * sizeof(float);
  conv2d_direct_dgrad_kernel<T, CPT><<<grid_for(tl.total_blocks), threads, smem, stream>>>(pb, tl, dy, dys, w, ws,
                                                                                          dx, dxs);
  return cudaGetLastError();
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_conv2d_direct_dgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* w, Strides4 ws, void* dx, Strides4 dxs, cudaStream_t stream) {
  // Depthwise: its own kernel. Otherwise eight input channels per thread when the group has them, one for thin
  // groups.
  const bool depthwise = pb.C_per_group() == 1 && depthwise_dgrad_kernel_fits(pb);
  const bool wide = pb.C_per_group() >= 8 && pb.R * pb.S * 8 <= kMaxDirectFilterTaps;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyt = static_cast<const T*>(dy);
    const T* wt = static_cast<const T*>(w);
    T* dxt = static_cast<T*>(dx);
    if (depthwise) {
      const bool channels_fastest = dys.c == 1 && pb.K > 1;  // dy's layout: the R x S reads, not the one write
      conv2d_depthwise_dgrad_kernel<T><<<grid_for(pb.N * pb.H), kThreads, 0, stream>>>(pb, dyt, dys, wt, ws, dxt, dxs,
                                                                                       channels_fastest);
      return cudaGetLastError();
    }
    return wide ? launch_typed<T, 8>(pb, dyt, dys, wt, ws, dxt, dxs, stream)
                : launch_typed<T, 1>(pb, dyt, dys, wt, ws, dxt, dxs, stream);
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
