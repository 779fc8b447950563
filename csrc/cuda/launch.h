// The interface between fastconv's torch-facing host wrappers (csrc/cuda/*.cpp, compiled by the host
// compiler with torch headers) and its kernels (csrc/cuda/*.cu, compiled by nvcc without any torch
// header, which keeps nvcc's work small on a 2-core build machine). Launchers take raw pointers, element
// strides and the problem struct, launch on the given stream and return the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include "../conv2d_problem.h"

namespace fastconv {

// Element types the CUDA kernels are built for; all of them accumulate in fp32.
enum class DType { Float32, Float16, BFloat16 };

// Shared memory a block may use without opting in: every kernel fits its tiles into this.
constexpr int kSharedMemoryBudgetBytes = 48 * 1024;

// The direct kernels stage R*S filter taps (for at least one channel pair) in shared memory.
constexpr int64_t kMaxDirectFilterTaps = kSharedMemoryBudgetBytes / sizeof(float);

cudaError_t launch_conv2d_direct_fprop(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs,
                                       const void* w, Strides4 ws, const void* bias, void* y, Strides4 ys,
                                       cudaStream_t stream);

cudaError_t launch_conv2d_direct_dgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* w, Strides4 ws, void* dx, Strides4 dxs, cudaStream_t stream);

cudaError_t launch_conv2d_direct_wgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* x, Strides4 xs, void* dw, Strides4 dws, cudaStream_t stream);

// db[k] = sum over n, p, q of dy[n, k, p, q] for a (N, K, P, Q) grad_output with the given strides.
cudaError_t launch_conv2d_bias_grad(int64_t N, int64_t K, int64_t P, int64_t Q, DType dtype, const void* dy,
                                    Strides4 dys, void* db, cudaStream_t stream);

}  // namespace fastconv
