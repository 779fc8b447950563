// A launch geometry for per-channel work on a dense (N, C, H, W) activation, NCHW or channels_last: the
// batch-norm kernels reduce or transform the M = N * H * W values of each channel.
//
// A block is cx channel lanes x ry row lanes (threadIdx.x, threadIdx.y; cx * ry = 256). Each thread owns
// one channel, so the per-channel constants (mean, scale, shift) live in registers, and walks rows
// m = (n, h, w) of one split of the M rows, ry apart. The mapping keeps global accesses coalesced:
//   - channels_last (NHWC): cx = 32 neighbouring channels are neighbouring addresses (cx shrinks to the
//     next power of two >= C for thin layers);
//   - NCHW: cx = 1 and the ry = 256 row lanes read neighbouring pixels of one channel's plane. (With
//     H * W == 1 or C == 1 the two layouts are the same memory; the caller then picks the NHWC walk.)
// Grid: x over channel groups, y over splits of the rows; reductions write one partial result per
// (split, channel), which a second kernel merges in a fixed order (deterministic, no atomics).
#pragma once

#include "kernel_utils.cuh"

namespace fastconv {

struct ChannelGrid {
  int64_t C, HW, M;  // channels, pixels per image, rows per channel (N * HW)
  bool channels_last;
  int cx, ry;                     // block shape
  int64_t splits, rows_per_split; // grid.y and the rows each split covers
};

constexpr int kChannelGridThreads = 256;

#if !defined(__CUDACC_RTC__)
// Enough blocks to fill any GPU several times over, and at least this many rows per thread so that a
// reduction's partials stay few.
inline ChannelGrid make_channel_grid(const DenseActivation& a) {
  constexpr int64_t kTargetBlocks = 2048, kMinRowsPerThread = 8, kMaxSplits = 65535;
  ChannelGrid g{};
  g.C = a.C;
  g.HW = a.HW;
  g.M = a.N * a.HW;
  g.channels_last = a.channels_last;
  g.cx = a.channels_last ? pow2_at_least(a.C, 32) : 1;
  g.ry = kChannelGridThreads / g.cx;
  const int64_t channel_blocks = ceil_div(a.C, g.cx);
  int64_t splits = ceil_div(g.M, g.ry * kMinRowsPerThread);
  const int64_t cap = ceil_div(kTargetBlocks, channel_blocks);
  if (splits > cap) splits = cap;
  if (splits > kMaxSplits) splits = kMaxSplits;
  g.splits = splits < 1 ? 1 : splits;
  g.rows_per_split = ceil_div(g.M, g.splits);
  return g;
}

inline dim3 channel_grid_blocks(const ChannelGrid& g) {
  return dim3(static_cast<unsigned>(ceil_div(g.C, g.cx)), static_cast<unsigned>(g.splits));
}
inline dim3 channel_grid_threads(const ChannelGrid& g) { return dim3(g.cx, g.ry); }
#endif

// This thread's channel (may be >= C in the last channel group: such threads walk no rows).
__device__ __forceinline__ int64_t channel_grid_channel(const ChannelGrid& g) {
  return static_cast<int64_t>(blockIdx.x) * g.cx + threadIdx.x;
}

// Calls f(offset) for the element offset of every row this thread walks in channel c.
template <typename F>
__device__ __forceinline__ void channel_grid_for_rows(const ChannelGrid& g, int64_t c, F&& f) {
  if (c >= g.C) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * g.rows_per_split;
  const int64_t end = begin + g.rows_per_split < g.M ? begin + g.rows_per_split : g.M;
  int64_t m = begin + threadIdx.y;
  if (m >= end) return;
  if (g.channels_last) {
    const int64_t step = static_cast<int64_t>(g.ry) * g.C;
    for (int64_t off = m * g.C + c; m < end; m += g.ry, off += step) f(off);
  } else {
    // (n, hw) of row m, advanced incrementally: divisions once per thread, not per element. A step of ry
    // rows is q whole images (q planes of C * HW) plus r pixels, which may cross into one more image.
    const int64_t n = m / g.HW;
    int64_t hw = m - n * g.HW;
    int64_t off = (n * g.C + c) * g.HW + hw;
    const int64_t q = g.ry / g.HW, r = g.ry - q * g.HW;
    const int64_t whole_images = q * g.C * g.HW, next_image = (g.C - 1) * g.HW;
    for (; m < end; m += g.ry) {
      f(off);
      hw += r;
      off += r + whole_images;
      if (hw >= g.HW) {
        hw -= g.HW;
        off += next_image;  // from past the end of this image's plane to the next image's
      }
    }
  }
}

// Merges the ry row lanes' partial results of each channel lane in shared memory, in a fixed tree order,
// and returns the block's result to the threads with threadIdx.y == 0. `scratch` holds cx * ry values.
template <typename Acc>
__device__ __forceinline__ Acc channel_grid_merge_rows(const ChannelGrid& g, Acc acc, Acc* scratch) {
  const int lane = threadIdx.y * g.cx + threadIdx.x;
  scratch[lane] = acc;
  __syncthreads();
  for (int half = g.ry / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) scratch[lane].merge(scratch[lane + half * g.cx]);
    __syncthreads();
  }
  return scratch[threadIdx.x];
}

}  // namespace fastconv
