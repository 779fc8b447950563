// Host wrappers of the training-mode BatchNorm (+ ReLU) CUDA kernels: check, pick the device and the
// current stream, make the activations dense in the input's memory format (the kernels walk NCHW or
// NHWC memory directly), allocate outputs and the partials' workspace through torch's caching allocator,
// return early when empty, launch and check the launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../batch_norm_args.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

DenseActivation dense_activation(const at::Tensor& x, at::MemoryFormat format) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  // With one pixel per image or one channel NCHW and NHWC are the same memory: the NHWC walk is the
  // coalesced one for (N, C, 1, 1) (neighbouring channels are neighbouring addresses).
  const bool nhwc = format == at::MemoryFormat::ChannelsLast || HW == 1 || C == 1;
  return DenseActivation{x.size(0), C, HW, nhwc};
}

// Per-channel fp32 outputs: zeros for an empty input (the kernels write every entry otherwise).
at::Tensor channel_output(const at::Tensor& input) {
  const auto options = input.options().dtype(at::kFloat);
  return input.numel() == 0 ? at::zeros({input.size(1)}, options) : at::empty({input.size(1)}, options);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

at::Tensor workspace_for(const DenseActivation& a, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(batch_norm_workspace_bytes(a))}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(const at::Tensor& input,
                                                                    const c10::optional<at::Tensor>& weight,
                                                                    const c10::optional<at::Tensor>& bias, double eps,
                                                                    bool relu) {
  const char* op = "fastconv::batch_norm_relu";
  const NvtxRange nvtx_range(op);
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CUDA, {{"input", &input}, {"weight", w}, {"bias", b}});
  check_batch_norm_relu(op, input, w, b, eps);
  const DType dtype = cuda_dtype(op, input.scalar_type());  // (float64 raises here, even when empty)
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  at::Tensor mean = channel_output(input), var = channel_output(input);
  at::Tensor y = at::empty(input.sizes(), input.options().memory_format(format));
  if (y.numel() == 0) return {y, mean, var};
  const at::Tensor x = input.contiguous(format);
  const at::Tensor gamma = batch_norm_param(w, at::kFloat), beta = batch_norm_param(b, at::kFloat);
  const DenseActivation a = dense_activation(x, format);
  at::Tensor workspace = workspace_for(a, x);
  check_launch(op, launch_batch_norm_relu_forward(a, dtype, x.const_data_ptr(),
                                                  ptr_or_null(gamma), ptr_or_null(beta), static_cast<float>(eps), relu,
                                                  y.mutable_data_ptr(), mean.mutable_data_ptr<float>(),
                                                  var.mutable_data_ptr<float>(), workspace.mutable_data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream().stream()));
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  const char* op = "fastconv::batch_norm_relu_backward";
  const NvtxRange nvtx_range(op);
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CUDA,
                {{"grad_output", &grad_output}, {"input", &input}, {"mean", &mean}, {"var", &var}, {"weight", w},
                 {"bias", b}});
  check_batch_norm_relu_backward(op, grad_output, input, mean, var, w, b, eps);
  const DType dtype = cuda_dtype(op, input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  at::Tensor grad_gamma = channel_output(input), grad_beta = channel_output(input);
  at::Tensor dx = at::empty(input.sizes(), input.options().memory_format(format));
  if (dx.numel() == 0) return {dx, grad_gamma, grad_beta};
  const at::Tensor x = input.contiguous(format), dy = grad_output.contiguous(format);
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  const at::Tensor gamma = batch_norm_param(w, at::kFloat), beta = batch_norm_param(b, at::kFloat);
  const DenseActivation a = dense_activation(x, format);
  at::Tensor workspace = workspace_for(a, x);
  check_launch(op, launch_batch_norm_relu_backward(
                       a, dtype, dy.const_data_ptr(), x.const_data_ptr(),
                       m.const_data_ptr<float>(), v.const_data_ptr<float>(), ptr_or_null(gamma), ptr_or_null(beta),
                       static_cast<float>(eps), relu, dx.mutable_data_ptr(), grad_gamma.mutable_data_ptr<float>(),
                       grad_beta.mutable_data_ptr<float>(), workspace.mutable_data_ptr(),
                       c10::cuda::getCurrentCUDAStream().stream()));
  return {dx, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cuda);
}

}  // namespace fastconv
