// Host wrappers of the implicit-GEMM convolution on CUDA (kernels: conv2d_implicit_gemm_*_kernel.cu).
//
// The kernels want dense NHWC activations and KRSC filters whose loaded channel counts are multiples of 8
// (one 16-byte vector of fp16/bf16). The wrappers bring any input into that form: a channels_last tensor
// is used in place; an NCHW one is copied once; a group whose channel count is not a multiple of 8 (the RGB
// stem's 3, a grouped conv's 4) is zero-padded, which changes no sum. Outputs are channels_last, or NCHW
// when torch's rule says so (one copy). fp32 runs on tensor cores as TF32 when
// torch.backends.cudnn.allow_tf32 (torch's switch for its own convolutions) allows it; when it does not,
// the op keeps its promise of full fp32 precision through the exact fp32 direct kernels (slower), as
// torch's convolutions do under the same switch.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../conv2d_args.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

constexpr int64_t kChannelMultiple = 8;  // channels per 16-byte vector of fp16/bf16 (two vectors of fp32)

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A dense tensor whose data starts 16-byte aligned (cp.async copies 16 bytes): a view that starts mid-way
// (a storage offset) is copied.
at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

at::Tensor nhwc(const at::Tensor& t) { return aligned(t.permute({0, 2, 3, 1}).contiguous()); }

// t (dense, channels last) with its last dimension read as `groups` blocks of channels, each block
// zero-padded to `padded` channels. No copy when nothing needs padding.
at::Tensor pad_channel_groups(const at::Tensor& t, int64_t groups, int64_t padded) {
  const int64_t per_group = t.size(-1) / groups;
  if (per_group == padded) return t;  // (already aligned: nhwc())
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  shape.push_back(groups);
  shape.push_back(per_group);
  const at::Tensor v = at::constant_pad_nd(t.reshape(shape), {0, padded - per_group}, 0);
  shape.pop_back();
  shape.back() = groups * padded;
  return v.reshape(shape);
}

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
  Conv2dProblem padded = pb;
  const int64_t Cg = round_up(pb.C_per_group(), kChannelMultiple);
  padded.C = Cg * pb.groups;
  const at::Tensor x = pad_channel_groups(nhwc(input), pb.groups, Cg);
  const at::Tensor w = pad_channel_groups(nhwc(weight), 1, Cg);  // KRSC, each filter's channels padded
  const at::Tensor sc = scale ? scale->contiguous() : at::Tensor(), sh = shift ? shift->contiguous() : at::Tensor();
  const at::Tensor res = residual ? nhwc(*residual) : at::Tensor();  // read in aligned pairs
  check_launch(op, launch_conv2d_implicit_gemm_fprop(padded, cuda_dtype(op, input.scalar_type()), static_cast<int>(tile),
                                                     x.const_data_ptr(), w.const_data_ptr(), data_or_null(sc),
                                                     data_or_null(sh), data_or_null(res), relu, y.mutable_data_ptr(),
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
  // dgrad loads dy's channels (the filters of a group) as vectors: pad K per group
  Conv2dProblem padded = pb;
  const int64_t Kg = round_up(pb.K_per_group(), kChannelMultiple), Cg = pb.C_per_group();
  padded.K = Kg * pb.groups;
  const at::Tensor dy = pad_channel_groups(nhwc(grad_output), pb.groups, Kg);
  // wt[g][c][r][s][k] = w[g * Kg + k][c][r][s], each (g, c) row's k padded
  const at::Tensor wt = pad_channel_groups(
      aligned(weight.reshape({pb.groups, pb.K_per_group(), Cg, pb.R, pb.S}).permute({0, 2, 3, 4, 1}).contiguous()), 1,
      Kg);
  check_launch(op, launch_conv2d_implicit_gemm_dgrad(padded, cuda_dtype(op, grad_output.scalar_type()),
                                                     static_cast<int>(tile), dy.const_data_ptr(), wt.const_data_ptr(),
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
  TORCH_CHECK_VALUE(pixels < (int64_t{1} << 31), op, ": N * P * Q = ", pixels,
                    " output pixels exceed the kernel's 32-bit pixel index; use algo='im2col' or 'direct'");
  // wgrad loads dy's channels (A) and x's channels (B) as vectors: pad both per group
  Conv2dProblem padded = pb;
  const int64_t Kg = round_up(pb.K_per_group(), kChannelMultiple), Cg = round_up(pb.C_per_group(), kChannelMultiple);
  padded.K = Kg * pb.groups;
  padded.C = Cg * pb.groups;
  const at::Tensor dy = pad_channel_groups(nhwc(grad_output), pb.groups, Kg);
  const at::Tensor x = pad_channel_groups(nhwc(input), pb.groups, Cg);
  const DType dt = cuda_dtype(op, grad_output.scalar_type());
  const int splits = conv2d_implicit_gemm_wgrad_splits(padded, dt, static_cast<int>(tile), 0);
  at::Tensor partial = at::empty({splits * padded.K * pb.R * pb.S * Cg}, grad_output.options().dtype(at::kFloat));
  at::Tensor dw = at::empty({padded.K, pb.R, pb.S, Cg}, grad_output.options());  // KRSC, padded
  check_launch(op, launch_conv2d_implicit_gemm_wgrad(padded, dt, static_cast<int>(tile), splits, dy.const_data_ptr(),
                                                     x.const_data_ptr(), partial.mutable_data_ptr<float>(),
                                                     dw.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  if (Kg != pb.K_per_group() || Cg != pb.C_per_group()) {
    dw = dw.reshape({pb.groups, Kg, pb.R, pb.S, Cg})
             .slice(1, 0, pb.K_per_group())
             .slice(4, 0, pb.C_per_group())
             .reshape({pb.K, pb.R, pb.S, pb.C_per_group()});  // copies the kept part, dense KRSC
  }
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
