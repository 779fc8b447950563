// Host wrappers of the residual-add CUDA kernels: the flat vectorised kernel when stride is 1, the shapes
// match and every tensor is dense in one layout; the strided kernel otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../residual_add_args.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

at::Tensor residual_add_cuda(const at::Tensor& residual, const at::Tensor& shortcut, int64_t stride, bool relu) {
  const char* op = "fastconv::residual_add";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"residual", &residual}, {"shortcut", &shortcut}});
  const ResidualAddShape sh = check_residual_add(op, residual, shortcut, stride);
  const c10::cuda::CUDAGuard guard(residual.device());
  const auto format = residual.suggest_memory_format();
  at::Tensor out = at::empty({sh.N, sh.C, sh.P, sh.Q}, residual.options().memory_format(format));
  if (out.numel() == 0) return out;
  const DType dtype = cuda_dtype(op, residual.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (residual_add_is_flat(sh, format, {&residual, &shortcut})) {
    check_launch(op, launch_residual_add_flat(dtype, residual.const_data_ptr(), shortcut.const_data_ptr(),
                                              out.mutable_data_ptr(), out.numel(), relu, stream));
  } else {
    check_launch(op, launch_residual_add_strided(sh, dtype, residual.const_data_ptr(), strides_of(residual),
                                                 shortcut.const_data_ptr(), strides_of(shortcut),
                                                 out.mutable_data_ptr(), strides_of(out), relu, stream));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> residual_add_backward_cuda(const at::Tensor& grad_output,
                                                              const c10::optional<at::Tensor>& output,
                                                              at::IntArrayRef shortcut_size, int64_t stride) {
  const char* op = "fastconv::residual_add_backward";
  const NvtxRange nvtx_range(op);
  const at::Tensor* out = output.has_value() ? &*output : nullptr;
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"output", out}});
  const ResidualAddShape sh = check_residual_add_backward(op, grad_output, out, shortcut_size, stride);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto options = grad_output.options().memory_format(grad_output.suggest_memory_format());
  at::Tensor gr = at::empty(grad_output.sizes(), options);
  at::Tensor gs = at::empty(shortcut_size, options);
  if (gr.numel() == 0 && gs.numel() == 0) return {gr, gs};
  const DType dtype = cuda_dtype(op, grad_output.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (residual_add_is_flat(sh, grad_output.suggest_memory_format(), {&grad_output, out})) {
    check_launch(op, launch_residual_add_backward_flat(dtype, grad_output.const_data_ptr(),
                                                       out ? out->const_data_ptr() : nullptr, gr.mutable_data_ptr(),
                                                       gs.mutable_data_ptr(), gr.numel(), stream));
  } else {
    const Strides4 os = out ? strides_of(*out) : Strides4{0, 0, 0, 0};
    check_launch(op, launch_residual_add_backward_strided(sh, dtype, grad_output.const_data_ptr(),
                                                          strides_of(grad_output), out ? out->const_data_ptr() : nullptr,
                                                          os, gr.mutable_data_ptr(), strides_of(gr),
                                                          gs.mutable_data_ptr(), strides_of(gs), stream));
  }
  return {gr, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("residual_add", &residual_add_cuda);
  m.impl("residual_add_backward", &residual_add_backward_cuda);
}

}  // namespace fastconv
