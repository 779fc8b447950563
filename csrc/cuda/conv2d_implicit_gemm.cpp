// Host wrappers of the implicit-GEMM convolution on CUDA (kernels: conv2d_implicit_gemm_*_kernel.cu).
//
// The kernels want dense NHWC activations and KRSC filters whose loaded channel counts are multiples of 8
// (one 16-byte vector of fp16/bf16): ../implicit_gemm_operands.h prepares them (a channels_last tensor is
// used in place, an NCHW one copied once, a group of 3 or 4 channels zero-padded), the same preparation the
// CPU twin computes on, so the CPU tests check it. Outputs are channels_last, or NCHW
// when torch's rule says so (one copy). fp32 runs on tensor cores as TF32 when
// torch.backends.cudnn.allow_tf32 (torch's switch for its own convolutions) allows it; when it does not,
// the op keeps its promise of full fp32 precision through the exact fp32 direct kernels (slower), as
// torch's convolutions do under the same switch.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../conv2d_args.h"
#include "../conv2d_dgrad_phases.h"
#include "../implicit_gemm_operands.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

// Can this GPU run the kernels at all? (Checked after the arguments, before any launch.)
void check_runnable(const char* op) {
  TORCH_CHECK(implicit_gemm_device_supported(), op,
              ": needs tensor cores of compute capability 8.0 or newer (mma.sync with bf16); use algo='im2col' or "
              "'direct' on this GPU");
}

// fp32 while torch.backends.cudnn.allow_tf32 is False: TF32 tensor cores are not allowed.
bool exact_fp32_requested(at::ScalarType dtype) {
  return dtype == at::kFloat && !at::globalContext().allowTF32CuDNN();
}

// The direct algorithm's ops (exact fp32), for exact_fp32_requested.
at::Tensor direct_fprop(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastconv::conv2d_direct", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, at::IntArrayRef,
                 at::IntArrayRef, at::IntArrayRef, int64_t, bool)>();
  return op.call(x, w, c10::nullopt, stride, padding, dilation, groups, false);
}
at::Tensor direct_backward(const char* name, const at::Tensor& a, const at::Tensor& b, at::IntArrayRef size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                 at::IntArrayRef, int64_t)>();
  return op.call(a, b, c10::fromIntArrayRefSlow(size), stride, padding, dilation, groups);
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// The kernels index the reduction (R*S*C/groups for fprop, R*S*K/groups for dgrad, N*P*Q for wgrad) in 32 bits,
// with a reduction tile of headroom.
void check_reduction_fits(const char* op, int64_t extent, const char* what) {
  TORCH_CHECK_VALUE(extent < (int64_t{1} << 31) - 64, op, ": ", what, " = ", extent,
                    " exceeds the kernel's 32-bit reduction index; use algo='im2col' or 'direct'");
}

at::Tensor fused_cuda(const char* op, const at::Tensor& input, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                      const c10::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups, int64_t tile, bool relu, bool shift_is_bias) {
  const NvtxRange nvtx_range(op);
  const Conv2dProblem pb = check_conv2d_implicit_gemm_fprop(op, c10::DeviceType::CUDA, input, weight, scale, shift,
                                                            residual, stride, padding, dilation, groups, tile,
                                                            shift_is_bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = conv2d_output_format(input, weight);
  at::Tensor y = at::empty({pb.N, pb.P, pb.Q, pb.K}, input.options());
  if (y.numel() == 0) return conv2d_output_from_nhwc(y, format);
  check_runnable(op);
  if (exact_fp32_requested(input.scalar_type())) {
    at::Tensor out = direct_fprop(input, weight, stride, padding, dilation, groups);  // torch's output format
    if (scale) out.mul_(scale->view({1, -1, 1, 1}));
    if (shift) out.add_(shift->view({1, -1, 1, 1}));
    if (residual) out.add_(*residual);
    if (relu) out.relu_();  // NaN passes
    return out;
  }
  const ImplicitGemmFpropOperands ops = implicit_gemm_fprop_operands(pb, input, weight);
  check_reduction_fits(op, ops.pb.R * ops.pb.S * ops.pb.C_per_group(), "R * S * C / groups (padded)");
  // (read in aligned 16-byte chunks: an unaligned pointer sends the epilogue down its element-by-element path)
  const at::Tensor sc = scale ? dense_aligned(*scale) : at::Tensor(), sh = shift ? dense_aligned(*shift) : at::Tensor();
  const at::Tensor res = residual ? dense_nhwc(*residual) : at::Tensor();
  const DType dtype = cuda_dtype(op, input.scalar_type());
  const int splits = conv2d_implicit_gemm_fprop_splits(ops.pb, dtype, static_cast<int>(tile));
  const at::Tensor partial =
      splits > 1 ? at::empty({splits, pb.N * pb.P * pb.Q, pb.K}, input.options().dtype(at::kFloat)) : at::Tensor();
  check_launch(op, launch_conv2d_implicit_gemm_fprop(
                       ops.pb, dtype, static_cast<int>(tile), splits, ops.x.const_data_ptr(), ops.w.const_data_ptr(),
                       data_or_null(sc), data_or_null(sh), data_or_null(res), relu,
                       splits > 1 ? partial.mutable_data_ptr<float>() : nullptr, y.mutable_data_ptr(),
                       c10::cuda::getCurrentCUDAStream().stream()));
  return conv2d_output_from_nhwc(y, format);
}

at::Tensor conv2d_implicit_gemm_cuda(const at::Tensor& input, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t tile,
                                     bool relu) {
  return fused_cuda("fastconv::conv2d_implicit_gemm", input, weight, c10::nullopt, bias, c10::nullopt, stride,
                    padding, dilation, groups, tile, relu, /*shift_is_bias=*/true);
}

at::Tensor conv2d_implicit_gemm_fused_cuda(const at::Tensor& input, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& scale,
                                           const c10::optional<at::Tensor>& shift,
                                           const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                           int64_t tile, bool relu) {
  return fused_cuda("fastconv::conv2d_implicit_gemm_fused", input, weight, scale, shift, residual, stride, padding,
                    dilation, groups, tile, relu, /*shift_is_bias=*/false);
}

at::Tensor conv2d_implicit_gemm_dgrad_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                                           at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, int64_t tile) {
  const char* op = "fastconv::conv2d_implicit_gemm_dgrad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"weight", &weight}});
  const Conv2dProblem pb = check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups);
  check_implicit_gemm_tile(op, tile);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto format = conv2d_output_format(grad_output, weight);
  at::Tensor dx = at::empty({pb.N, pb.H, pb.W, pb.C}, grad_output.options());
  if (dx.numel() == 0) return conv2d_output_from_nhwc(dx, format);
  check_runnable(op);
  if (exact_fp32_requested(grad_output.scalar_type())) {
    return direct_backward("fastconv::conv2d_direct_dgrad", grad_output, weight, input_size, stride, padding, dilation,
                           groups);
  }
  if (dgrad_by_phases_applies(pb)) {
    // strided: one stride-1 fprop per stride phase over that phase's taps, instead of a dgrad whose gather
    // zero-fills all but 1 / (stride_h * stride_w) of them
    dgrad_by_phases(pb, grad_output.permute({0, 2, 3, 1}), weight, dx, [&](const at::Tensor& x, const at::Tensor& w) {
      return fused_cuda(op, x, w, c10::nullopt, c10::nullopt, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, pb.groups, tile,
                        false, /*shift_is_bias=*/true);
    });
    return conv2d_output_from_nhwc(dx, format);
  }
  const ImplicitGemmDgradOperands ops = implicit_gemm_dgrad_operands(pb, grad_output, weight);
  check_reduction_fits(op, ops.pb.R * ops.pb.S * ops.pb.K_per_group(), "R * S * K / groups (padded)");
  check_launch(op, launch_conv2d_implicit_gemm_dgrad(ops.pb, cuda_dtype(op, grad_output.scalar_type()),
                                                     static_cast<int>(tile), ops.dy.const_data_ptr(), ops.wt.const_data_ptr(),
                                                     dx.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return conv2d_output_from_nhwc(dx, format);
}

at::Tensor conv2d_implicit_gemm_wgrad_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                           at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, int64_t tile) {
  const char* op = "fastconv::conv2d_implicit_gemm_wgrad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"input", &input}});
  const Conv2dProblem pb = check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups);
  check_implicit_gemm_tile(op, tile);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto format = conv2d_output_format(grad_output, input);
  const int64_t pixels = pb.N * pb.P * pb.Q;
  if (pb.K * pb.C_per_group() == 0 || pixels == 0) {
    return conv2d_output_from_nhwc(at::zeros({pb.K, pb.R, pb.S, pb.C_per_group()}, grad_output.options()), format);
  }
  check_runnable(op);
  if (exact_fp32_requested(grad_output.scalar_type())) {
    return direct_backward("fastconv::conv2d_direct_wgrad", grad_output, input, weight_size, stride, padding, dilation,
                           groups);
  }
  check_reduction_fits(op, pixels, "N * P * Q");
  const ImplicitGemmWgradOperands ops = implicit_gemm_wgrad_operands(pb, grad_output, input);
  const Conv2dProblem& padded = ops.pb;
  const DType dt = cuda_dtype(op, grad_output.scalar_type());
  const int splits = conv2d_implicit_gemm_wgrad_splits(padded, dt, static_cast<int>(tile), 0);
  const int64_t Cg = padded.C_per_group();
  at::Tensor partial = at::empty({splits * padded.K * pb.R * pb.S * Cg}, grad_output.options().dtype(at::kFloat));
  at::Tensor dw = at::empty({padded.K, pb.R, pb.S, Cg}, grad_output.options());  // KRSC, padded
  check_launch(op, launch_conv2d_implicit_gemm_wgrad(padded, dt, static_cast<int>(tile), splits, ops.dy.const_data_ptr(),
                                                     ops.x.const_data_ptr(), partial.mutable_data_ptr<float>(),
                                                     dw.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  dw = implicit_gemm_unpad_wgrad(dw, pb, padded);
  return conv2d_output_from_nhwc(dw, format);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("conv2d_implicit_gemm", &conv2d_implicit_gemm_cuda);
  m.impl("conv2d_implicit_gemm_dgrad", &conv2d_implicit_gemm_dgrad_cuda);
  m.impl("conv2d_implicit_gemm_wgrad", &conv2d_implicit_gemm_wgrad_cuda);
  m.impl("conv2d_implicit_gemm_fused", &conv2d_implicit_gemm_fused_cuda);
}

}  // namespace fastconv
