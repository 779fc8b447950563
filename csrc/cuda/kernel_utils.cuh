// Small device helpers shared by fastconv's kernels: element conversion to and from the fp32 in which
// every kernel accumulates, tile-size arithmetic, and a deterministic block reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace fastconv {

// Whether p starts on a 16-byte boundary (the kernels' vector loads and stores; the host's vector-path choices).
__host__ __device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// acc[j] += v * w[j] for j < N: one input value against N consecutive staged weights (register blocking).
// w must be 16-byte aligned when N is a multiple of 4: the weights are then read as float4 broadcasts.
template <int N>
__device__ __forceinline__ void fma_row(float (&acc)[N], float v, const float* w) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      const float4 w4 = *reinterpret_cast<const float4*>(w + j);
      acc[j] += v * w4.x;
      acc[j + 1] += v * w4.y;
      acc[j + 2] += v * w4.z;
      acc[j + 3] += v * w4.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] += v * w[j];
  }
}

#if !defined(__CUDACC_RTC__)  // host-side launch arithmetic (NVRTC compiles the device code alone)
// Smallest power of two >= v, capped at `cap` (a power of two).
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid for a kernel that loops over `blocks` logical blocks with a grid-stride loop.
inline unsigned grid_for(int64_t blocks) {
  const int64_t cap = 0x7fffffff;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

// SMs of the current device (108, an A100's, if it cannot be asked): grids sized to fill it.
inline int multiprocessor_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    return 108;
  return sms;
}
#endif

// Splits a flat index over an (outer, inner) grid: 32-bit division when the index fits (a GPU has no
// 64-bit divide instruction; the 64-bit path is a call of dozens of instructions).
struct Split {
  int64_t outer, inner;
};
__device__ __forceinline__ Split split_index(int64_t i, int64_t inner_extent, bool fits_32bit) {
  if (fits_32bit) {
    const uint32_t ii = static_cast<uint32_t>(i), e = static_cast<uint32_t>(inner_extent);
    const uint32_t o = ii / e;
    return {o, ii - o * e};
  }
  return {i / inner_extent, i % inner_extent};
}

// The rows (image n, row r) of images of `rows` rows each that this block takes in a grid-stride loop over rows
// n * rows + r: blockIdx.x, + gridDim.x, ... The first and the stride are split into (image, row) once, in 32 bits,
// and advanced by adds (a 64-bit division per row made ptxas spill around its call).
//     for (BlockRows it(rows); it.n < N; it.next()) { ... it.n, it.row ... }
struct BlockRows {
  int64_t n, step_images;
  int row, rows, step_rows;
  __device__ __forceinline__ explicit BlockRows(int rows_) : rows(rows_) {
    n = blockIdx.x / static_cast<unsigned>(rows), row = static_cast<int>(blockIdx.x % static_cast<unsigned>(rows));
    step_images = gridDim.x / static_cast<unsigned>(rows);
    step_rows = static_cast<int>(gridDim.x % static_cast<unsigned>(rows));
  }
  __device__ __forceinline__ void next() {
    n += step_images, row += step_rows;
    if (row >= rows) row -= rows, ++n;
  }
};

// (a, b, c, d) of flat index i over extents (*, B, C, D), d fastest.
struct Index4 {
  int64_t a, b, c, d;
};
__device__ __forceinline__ Index4 split_index4(int64_t i, int64_t B, int64_t C, int64_t D, bool fits_32bit) {
  const Split s1 = split_index(i, D, fits_32bit);
  const Split s2 = split_index(s1.outer, C, fits_32bit);
  const Split s3 = split_index(s2.outer, B, fits_32bit);
  return {s3.outer, s3.inner, s2.inner, s1.inner};
}

// (n, c, h, w) of the i-th element when walking an (N, C, H, W) tensor channel-fastest (channels_last
// memory order) or column-fastest (NCHW memory order): neighbouring threads then touch neighbouring addresses.
struct Nchw {
  int64_t n, c, h, w;
};
__device__ __forceinline__ Nchw split_nchw(int64_t i, int64_t C, int64_t H, int64_t W, bool channels_fastest,
                                           bool fits_32bit) {
  if (channels_fastest) {
    const Index4 t = split_index4(i, H, W, C, fits_32bit);
    return {t.a, t.d, t.b, t.c};
  }
  const Index4 t = split_index4(i, C, H, W, fits_32bit);
  return {t.a, t.b, t.c, t.d};
}

#if !defined(__CUDACC_RTC__)
// Blocks for a grid-stride loop over `total` elements with `threads` per block: enough to fill any GPU,
// few enough that each thread does several elements.
inline unsigned elementwise_blocks(int64_t total, int threads) {
  const int64_t blocks = ceil_div(total, threads);
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}
#endif

// Sum of v over the block, returned to every thread. `scratch` holds one float per warp. The order of
// additions is fixed, so results are bitwise reproducible. Every thread of the block must call it, and
// blockDim.x must be a multiple of 32 (full-warp shuffles).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < warps; ++i) total += scratch[i];
  return total;
}

// Whether two types are the same (std::is_same without <type_traits>, which NVRTC lacks).
template <typename A, typename B>
struct same_type {
  static constexpr bool value = false;
};
template <typename A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

#if !defined(__CUDACC_RTC__)
// Calls body.template operator()<T>() with the CUDA element type for `dtype`.
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::Float32: return body(float{});
    case DType::Float16: return body(__half{});
    case DType::BFloat16: return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}
#endif

}  // namespace fastconv
