// Host wrappers of the direct-convolution CUDA kernels: check the arguments, pick the device and the
// current stream, allocate the output in torch's memory format, return early when it is empty, launch and
// check the launch. The kernels index through element strides, so no input is copied.
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

void check_filter_fits(const char* op, const Conv2dProblem& pb) {
  TORCH_CHECK_VALUE(pb.R * pb.S <= kMaxDirectFilterTaps, op, ": a ", pb.R, "x", pb.S,
                    " filter has more taps than the direct CUDA kernels stage in shared memory (",
                    kMaxDirectFilterTaps, ")");
}

at::Tensor conv2d_direct_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, bool relu) {
  const char* op = "fastconv::conv2d_direct";
  const NvtxRange nvtx_range(op);
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CUDA, {{"input", &input}, {"weight", &weight}, {"bias", b}});
  const Conv2dProblem pb = check_conv2d_fprop(op, input, weight, bias, stride, padding, dilation, groups);
  check_filter_fits(op, pb);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor y = at::empty({pb.N, pb.K, pb.P, pb.Q},
                           input.options().memory_format(conv2d_output_format(input, weight)));
  if (y.numel() == 0) return y;
  const at::Tensor bias_c = b ? b->contiguous() : at::Tensor();  // the kernel reads bias[k] unstrided
  check_launch(op, launch_conv2d_direct_fprop(pb, cuda_dtype(op, input.scalar_type()), input.const_data_ptr(),
                                              strides_of(input), weight.const_data_ptr(), strides_of(weight),
                                              b ? bias_c.const_data_ptr() : nullptr, relu, y.mutable_data_ptr(),
                                              strides_of(y), c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor conv2d_direct_dgrad_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "fastconv::conv2d_direct_dgrad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"weight", &weight}});
  const Conv2dProblem pb =
      check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups);
  check_filter_fits(op, pb);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor dx = at::empty(input_size, grad_output.options().memory_format(conv2d_output_format(grad_output, weight)));
  if (dx.numel() == 0) return dx;
  check_launch(op, launch_conv2d_direct_dgrad(pb, cuda_dtype(op, grad_output.scalar_type()),
                                              grad_output.const_data_ptr(), strides_of(grad_output),
                                              weight.const_data_ptr(), strides_of(weight), dx.mutable_data_ptr(),
                                              strides_of(dx), c10::cuda::getCurrentCUDAStream().stream()));
  return dx;
}

at::Tensor conv2d_direct_wgrad_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "fastconv::conv2d_direct_wgrad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"input", &input}});
  const Conv2dProblem pb =
      check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor dw = at::empty(weight_size, grad_output.options().memory_format(conv2d_output_format(grad_output, input)));
  if (dw.numel() == 0) return dw;
  const Strides4 dys = strides_of(grad_output);
  const int64_t workspace_floats = conv2d_direct_wgrad_workspace_floats(pb, dys);
  // (the depthwise kernels' partial sums; no allocation for the others)
  at::Tensor workspace;
  if (workspace_floats > 0) workspace = at::empty({workspace_floats}, grad_output.options().dtype(at::kFloat));
  check_launch(op, launch_conv2d_direct_wgrad(pb, cuda_dtype(op, grad_output.scalar_type()),
                                              grad_output.const_data_ptr(), dys, input.const_data_ptr(),
                                              strides_of(input), dw.mutable_data_ptr(), strides_of(dw),
                                              workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr,
                                              c10::cuda::getCurrentCUDAStream().stream()));
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("conv2d_direct", &conv2d_direct_cuda);
  m.impl("conv2d_direct_dgrad", &conv2d_direct_dgrad_cuda);
  m.impl("conv2d_direct_wgrad", &conv2d_direct_wgrad_cuda);
}

}  // namespace fastconv
