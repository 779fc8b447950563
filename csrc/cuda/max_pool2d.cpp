// Host wrappers of the max-pooling CUDA kernels (checks, device guard, current stream, empty early-out,
// launch check). The kernels index through strides: nothing is copied.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../max_pool2d_args.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "fastconv::max_pool2d";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"input", &input}});
  const Conv2dProblem pb = check_max_pool2d(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto options = input.options().memory_format(input.suggest_memory_format());
  at::Tensor y = at::empty({pb.N, pb.C, pb.P, pb.Q}, options);
  at::Tensor indices = at::empty({pb.N, pb.C, pb.P, pb.Q}, options.dtype(at::kLong));
  if (y.numel() == 0) return {y, indices};
  const bool channels_fastest = y.stride(1) == 1 && pb.C > 1;
  check_launch(op, launch_max_pool2d_forward(pb, cuda_dtype(op, input.scalar_type()), input.const_data_ptr(),
                                             strides_of(input), y.mutable_data_ptr(), strides_of(y),
                                             indices.mutable_data_ptr<int64_t>(), strides_of(indices),
                                             channels_fastest, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, indices};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                    at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastconv::max_pool2d_backward";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"indices", &indices}});
  const Conv2dProblem pb =
      check_max_pool2d_backward(op, grad_output, indices, input_size, kernel_size, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor dx = at::empty(input_size, grad_output.options().memory_format(grad_output.suggest_memory_format()));
  if (dx.numel() == 0) return dx;
  const bool channels_fastest = dx.stride(1) == 1 && pb.C > 1;
  check_launch(op, launch_max_pool2d_backward(pb, cuda_dtype(op, grad_output.scalar_type()),
                                              grad_output.const_data_ptr(), strides_of(grad_output),
                                              indices.const_data_ptr<int64_t>(), strides_of(indices),
                                              dx.mutable_data_ptr(), strides_of(dx), channels_fastest,
                                              c10::cuda::getCurrentCUDAStream().stream()));
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace fastconv
