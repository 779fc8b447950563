// Bias gradient: db[k] = sum over n, p, q of dy[n, k, p, q]. One block per output channel strides over
// its N * P * Q values and reduces them in a fixed order (bitwise reproducible, fp32 accumulation).
#include "kernel_utils.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
conv2d_bias_grad_kernel(int64_t N, int64_t K, int64_t P, int64_t Q, const T* __restrict__ dy, Strides4 dys,
                        T* __restrict__ db) {
  __shared__ float scratch[kThreads / 32];
  const int64_t PQ = P * Q;
  const bool fits_32bit = PQ <= 0xffffffffLL;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    float acc = 0.f;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t pq = threadIdx.x; pq < PQ; pq += blockDim.x) {
        const Split p_q = split_index(pq, Q, fits_32bit);
        acc += to_float(dy[dys.offset(n, k, p_q.outer, p_q.inner)]);
      }
    }
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) db[k] = from_float<T>(total);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // host code: launch configuration and launchers (NVRTC compiles the kernels alone)

cudaError_t launch_conv2d_bias_grad(int64_t N, int64_t K, int64_t P, int64_t Q, DType dtype, const void* dy,
                                    Strides4 dys, void* db, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    conv2d_bias_grad_kernel<T><<<grid_for(K), kThreads, 0, stream>>>(N, K, P, Q, static_cast<const T*>(dy), dys,
                                                                     static_cast<T*>(db));
    return cudaGetLastError();
  });
}

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
