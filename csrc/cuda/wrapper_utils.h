// Helpers for the CUDA host wrappers (host compiler only: these include torch headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include "launch.h"
#include "nvtx_range.h"

namespace fastconv {

inline DType cuda_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": no CUDA kernel for dtype ", t);
  }
}

// Turns a failed launch into a Python RuntimeError naming the op.
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fastconv
