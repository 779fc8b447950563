// Host wrapper of the bias-gradient CUDA kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../conv2d_args.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

at::Tensor conv2d_bias_grad_cuda(const at::Tensor& grad_output) {
  const char* op = "fastconv::conv2d_bias_grad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}});
  check_bias_grad(op, grad_output);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t N = grad_output.size(0), K = grad_output.size(1), P = grad_output.size(2), Q = grad_output.size(3);
  at::Tensor db = at::empty({K}, grad_output.options());
  if (K == 0) return db;
  check_launch(op, launch_conv2d_bias_grad(N, K, P, Q, cuda_dtype(op, grad_output.scalar_type()),
                                           grad_output.const_data_ptr(), strides_of(grad_output),
                                           db.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return db;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("conv2d_bias_grad", &conv2d_bias_grad_cuda);
}

}  // namespace fastconv
