// Residual add (the skip connection of a ResNet block), forward and backward, each one kernel:
//     out[n, j, p, q] = relu?(residual[n, j, p, q] + shortcut~[n, j, p, q]),
//     shortcut~[n, j, p, q] = shortcut[n, j, p * s, q * s] for j < J, 0 for J <= j < C
// (the strided, zero-padded identity shortcut of He et al.'s CIFAR ResNets; s = 1 and J = C is a plain add).
//
// Versions:
// - flat: stride 1, equal shapes, all tensors dense in one layout. A grid-stride loop over 16-byte
//   vectors (4 fp32 or 8 fp16/bf16 per load) when every pointer is 16-byte aligned, then a scalar tail.
//   Memory-bound: 3 (forward) or 4 (backward: grad, output, two grads) streams of the tensor's bytes.
// - strided: any stride, channel padding and layout, one thread per element through 64-bit strides,
//   channel-fastest for channels_last so the accesses stay coalesced.
// Arithmetic is in fp32 with one rounding, so fp16/bf16 results equal torch's add (+ relu) bit for bit.
// Backward writes grad_residual = grad_output * (output > 0 if relu) and scatters it to grad_shortcut's
// strided positions; grad_shortcut is zero elsewhere. Every element is written by exactly one thread.
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// torch's ReLU: NaN passes through.
template <bool RELU>
__device__ __forceinline__ float activate(float v) {
  return (RELU && v < 0.f) ? 0.f : v;
}

// torch's ReLU gradient from the output: 0 where output <= 0, grad elsewhere (NaN outputs included).
template <typename T>
__device__ __forceinline__ T relu_grad(T grad, T output) {
  return to_float(output) <= 0.f ? from_float<T>(0.f) : grad;
}
template <typename T>
__device__ __forceinline__ T relu_grad(T grad, const T* output, int64_t o) {
  return output == nullptr ? grad : relu_grad(grad, output[o]);
}

template <typename T, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads)
residual_add_flat_kernel(const T* __restrict__ r, const T* __restrict__ s, T* __restrict__ out, int64_t numel) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t vectors = numel / VEC;
  for (int64_t i = first; i < vectors; i += step) {
    const Vec<T, VEC> a = reinterpret_cast<const Vec<T, VEC>*>(r)[i];
    const Vec<T, VEC> b = reinterpret_cast<const Vec<T, VEC>*>(s)[i];
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(activate<RELU>(to_float(a.v[j]) + to_float(b.v[j])));
    reinterpret_cast<Vec<T, VEC>*>(out)[i] = o;
  }
  for (int64_t i = vectors * VEC + first; i < numel; i += step)
    out[i] = from_float<T>(activate<RELU>(to_float(r[i]) + to_float(s[i])));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
residual_add_backward_flat_kernel(const T* __restrict__ g, const T* __restrict__ out, T* __restrict__ gr,
                                  T* __restrict__ gs, int64_t numel) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t vectors = numel / VEC;
  for (int64_t i = first; i < vectors; i += step) {
    Vec<T, VEC> v = reinterpret_cast<const Vec<T, VEC>*>(g)[i];
    if (out != nullptr) {
      const Vec<T, VEC> o = reinterpret_cast<const Vec<T, VEC>*>(out)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = relu_grad(v.v[j], o.v[j]);
    }
    reinterpret_cast<Vec<T, VEC>*>(gr)[i] = v;
    reinterpret_cast<Vec<T, VEC>*>(gs)[i] = v;
  }
  for (int64_t i = vectors * VEC + first; i < numel; i += step) gr[i] = gs[i] = relu_grad(g[i], out, i);
}

template <typename T, bool RELU>
__global__ void __launch_bounds__(kThreads)
residual_add_strided_kernel(ResidualAddShape sh, bool channels_fastest, bool fits_32bit, const T* __restrict__ r,
                            Strides4 rs, const T* __restrict__ s, Strides4 ss, T* __restrict__ out, Strides4 os) {
  const int64_t total = sh.N * sh.C * sh.P * sh.Q;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Nchw o = split_nchw(i, sh.C, sh.P, sh.Q, channels_fastest, fits_32bit);
    const int64_t n = o.n, j = o.c, p = o.h, q = o.w;
    float v = to_float(r[rs.offset(n, j, p, q)]);
    // (the padded channels add a zero too, as torch's r + pad(s) does: -0.0 becomes +0.0)
    v += j < sh.J ? to_float(s[ss.offset(n, j, p * sh.stride, q * sh.stride)]) : 0.f;
    out[os.offset(n, j, p, q)] = from_float<T>(activate<RELU>(v));
  }
}

// Elements [0, N*J*H*W) are grad_shortcut's (each on-grid one also writes its grad_residual element);
// elements after that are grad_residual's zero-padded channels J <= j < C, which no shortcut element maps to.
template <typename T>
__global__ void __launch_bounds__(kThreads)
residual_add_backward_strided_kernel(ResidualAddShape sh, bool channels_fastest, bool fits_32bit,
                                     const T* __restrict__ g, Strides4 gos, const T* __restrict__ out, Strides4 os,
                                     T* __restrict__ gr, Strides4 grs, T* __restrict__ gs, Strides4 gss) {
  const int64_t shortcut_total = sh.N * sh.J * sh.H * sh.W;
  const int64_t padded_total = sh.N * (sh.C - sh.J) * sh.P * sh.Q;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < shortcut_total + padded_total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < shortcut_total) {
      const Nchw e = split_nchw(i, sh.J, sh.H, sh.W, channels_fastest, fits_32bit);
      const int64_t n = e.n, j = e.c, h = e.h, w = e.w;
      const Split hp = split_index(h, sh.stride, fits_32bit), wq = split_index(w, sh.stride, fits_32bit);
      T v = from_float<T>(0.f);
      if (hp.inner == 0 && wq.inner == 0) {
        v = relu_grad(g[gos.offset(n, j, hp.outer, wq.outer)], out, os.offset(n, j, hp.outer, wq.outer));
        gr[grs.offset(n, j, hp.outer, wq.outer)] = v;
      }
      gs[gss.offset(n, j, h, w)] = v;
    } else {
      const int64_t k = i - shortcut_total, pad_channels = sh.C - sh.J;
      const Nchw o = split_nchw(k, pad_channels, sh.P, sh.Q, channels_fastest, fits_32bit);
      const int64_t n = o.n, j = sh.J + o.c, p = o.h, q = o.w;
      gr[grs.offset(n, j, p, q)] = relu_grad(g[gos.offset(n, j, p, q)], out, os.offset(n, j, p, q));
    }
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_residual_add_flat(DType dtype, const void* residual, const void* shortcut, void* out,
                                     int64_t numel, bool relu, cudaStream_t stream) {
  const bool vector = aligned16(residual) && aligned16(shortcut) && aligned16(out);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const unsigned blocks = elementwise_blocks(ceil_div(numel, vector ? kVec : 1), kThreads);
    const T* r = static_cast<const T*>(residual);
    const T* s = static_cast<const T*>(shortcut);
    T* o = static_cast<T*>(out);
    if (vector && relu) residual_add_flat_kernel<T, kVec, true><<<blocks, kThreads, 0, stream>>>(r, s, o, numel);
    if (vector && !relu) residual_add_flat_kernel<T, kVec, false><<<blocks, kThreads, 0, stream>>>(r, s, o, numel);
    if (!vector && relu) residual_add_flat_kernel<T, 1, true><<<blocks, kThreads, 0, stream>>>(r, s, o, numel);
    if (!vector && !relu) residual_add_flat_kernel<T, 1, false><<<blocks, kThreads, 0, stream>>>(r, s, o, numel);
    return cudaGetLastError();
  });
}

cudaError_t launch_residual_add_strided(const ResidualAddShape& shape, DType dtype, const void* residual,
                                        Strides4 rs, const void* shortcut, Strides4 ss, void* out, Strides4 os,
                                        bool relu, cudaStream_t stream) {
  const int64_t total = shape.N * shape.C * shape.P * shape.Q;
  const bool fits_32bit = total <= 0xffffffffLL && shape.N * shape.J * shape.H * shape.W <= 0xffffffffLL;
  const bool channels_fastest = os.c == 1 && shape.C > 1;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = elementwise_blocks(total, kThreads);
    const T* r = static_cast<const T*>(residual);
    const T* s = static_cast<const T*>(shortcut);
    T* o = static_cast<T*>(out);
    if (relu) {
      residual_add_strided_kernel<T, true><<<blocks, kThreads, 0, stream>>>(shape, channels_fastest, fits_32bit, r, rs,
                                                                           s, ss, o, os);
    } else {
      residual_add_strided_kernel<T, false><<<blocks, kThreads, 0, stream>>>(shape, channels_fastest, fits_32bit, r,
                                                                            rs, s, ss, o, os);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_residual_add_backward_flat(DType dtype, const void* grad_output, const void* output,
                                              void* grad_residual, void* grad_shortcut, int64_t numel,
                                              cudaStream_t stream) {
  const bool vector = aligned16(grad_output) && (output == nullptr || aligned16(output)) && aligned16(grad_residual) &&
                      aligned16(grad_shortcut);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const unsigned blocks = elementwise_blocks(ceil_div(numel, vector ? kVec : 1), kThreads);
    const T* g = static_cast<const T*>(grad_output);
    const T* o = static_cast<const T*>(output);
    T* gr = static_cast<T*>(grad_residual);
    T* gs = static_cast<T*>(grad_shortcut);
    if (vector) {
      residual_add_backward_flat_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(g, o, gr, gs, numel);
    } else {
      residual_add_backward_flat_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(g, o, gr, gs, numel);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_residual_add_backward_strided(const ResidualAddShape& shape, DType dtype, const void* grad_output,
                                                 Strides4 gos, const void* output, Strides4 os, void* grad_residual,
                                                 Strides4 grs, void* grad_shortcut, Strides4 gss,
                                                 cudaStream_t stream) {
  const int64_t total = shape.N * shape.J * shape.H * shape.W + shape.N * (shape.C - shape.J) * shape.P * shape.Q;
  const bool fits_32bit = total <= 0xffffffffLL && shape.stride <= 0xffffffffLL;
  const bool channels_fastest = gss.c == 1 && shape.J > 1;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    residual_add_backward_strided_kernel<T><<<elementwise_blocks(total, kThreads), kThreads, 0, stream>>>(
        shape, channels_fastest, fits_32bit, static_cast<const T*>(grad_output), gos, static_cast<const T*>(output), os,
        static_cast<T*>(grad_residual), grs, static_cast<T*>(grad_shortcut), gss);
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
