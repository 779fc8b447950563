#include "conv2d_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

#include "conv2d_im2col_plan.h"
#include "implicit_gemm_problem.h"
#include "tensor_checks.h"

namespace fastconv {
namespace {

void check_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups) {
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must have 2 entries each, got ", stride, ", ", padding,
                    ", ", dilation);
  for (auto v : stride) TORCH_CHECK_VALUE(v > 0, op, ": stride must be positive, got ", stride);
  for (auto v : padding) TORCH_CHECK_VALUE(v >= 0, op, ": padding must be non-negative, got ", padding);
  for (auto v : dilation) TORCH_CHECK_VALUE(v > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(groups > 0, op, ": groups must be positive, got ", groups);
}

// Fills every field of the problem from the activation and filter sizes and checks their consistency.
Conv2dProblem make_problem(const char* op, at::IntArrayRef input_size, at::IntArrayRef weight_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups) {
  check_params(op, stride, padding, dilation, groups);
  Conv2dProblem pb{};
  pb.N = input_size[0];
  pb.C = input_size[1];
  pb.H = input_size[2];
  pb.W = input_size[3];
  pb.K = weight_size[0];
  pb.R = weight_size[2];
  pb.S = weight_size[3];
  pb.stride_h = stride[0];
  pb.stride_w = stride[1];
  pb.pad_h = padding[0];
  pb.pad_w = padding[1];
  pb.dil_h = dilation[0];
  pb.dil_w = dilation[1];
  pb.groups = groups;
  TORCH_CHECK_VALUE(pb.C % groups == 0, op, ": groups (", groups, ") must divide the input channels (", pb.C,
                    ")");
  TORCH_CHECK_VALUE(pb.K % groups == 0, op, ": groups (", groups, ") must divide the output channels (", pb.K,
                    ")");
  TORCH_CHECK_VALUE(weight_size[1] * groups == pb.C, op, ": weight of shape ", weight_size, " with groups=",
                    groups, " expects ", weight_size[1] * groups, " input channels, but the input has ", pb.C);
  TORCH_CHECK_VALUE(pb.R > 0 && pb.S > 0, op, ": the filter must have at least one tap, got shape ",
                    weight_size);
  TORCH_CHECK_VALUE(pb.K > 0, op, ": the weight must have at least one output channel, got shape ", weight_size);
  const int64_t eff_r = pb.dil_h * (pb.R - 1) + 1, eff_s = pb.dil_w * (pb.S - 1) + 1;
  TORCH_CHECK_VALUE(pb.H + 2 * pb.pad_h >= eff_r && pb.W + 2 * pb.pad_w >= eff_s, op,
                    ": padded input (", pb.H + 2 * pb.pad_h, " x ", pb.W + 2 * pb.pad_w,
                    ") is smaller than the dilated kernel (", eff_r, " x ", eff_s, ")");
  pb.P = conv_output_extent(pb.H, pb.pad_h, pb.dil_h, pb.R, pb.stride_h);
  pb.Q = conv_output_extent(pb.W, pb.pad_w, pb.dil_w, pb.S, pb.stride_w);
  return pb;
}

void check_output_shape(const char* op, const Conv2dProblem& pb, const at::Tensor& grad_output) {
  const std::vector<int64_t> expected{pb.N, pb.K, pb.P, pb.Q};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), op, ": grad_output has shape ",
                    grad_output.sizes(), " but the convolution's output shape is ", at::IntArrayRef(expected));
}

}  // namespace

Conv2dProblem check_conv2d_fprop(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_rank4(op, input, "input", "(N, C, H, W)");
  check_rank4(op, weight, "weight", "(K, C / groups, R, S)");
  check_floating(op, input, "input");
  check_same_dtype(op, input, "input", weight, "weight");
  Conv2dProblem pb = make_problem(op, input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_same_dtype(op, input, "input", b, "bias");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == pb.K, op, ": bias must be 1-D with ", pb.K,
                      " elements (one per output channel), got shape ", b.sizes());
  }
  return pb;
}

Conv2dProblem check_conv2d_dgrad(const char* op, const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  check_rank4(op, grad_output, "grad_output", "(N, K, P, Q)");
  check_rank4(op, weight, "weight", "(K, C / groups, R, S)");
  check_floating(op, grad_output, "grad_output");
  check_same_dtype(op, grad_output, "grad_output", weight, "weight");
  check_size4(op, input_size, "input_size");
  Conv2dProblem pb = make_problem(op, input_size, weight.sizes(), stride, padding, dilation, groups);
  check_output_shape(op, pb, grad_output);
  return pb;
}

Conv2dProblem check_conv2d_wgrad(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                 at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  check_rank4(op, grad_output, "grad_output", "(N, K, P, Q)");
  check_rank4(op, input, "input", "(N, C, H, W)");
  check_floating(op, grad_output, "grad_output");
  check_same_dtype(op, grad_output, "grad_output", input, "input");
  check_size4(op, weight_size, "weight_size");
  Conv2dProblem pb = make_problem(op, input.sizes(), weight_size, stride, padding, dilation, groups);
  check_output_shape(op, pb, grad_output);
  return pb;
}

void check_bias_grad(const char* op, const at::Tensor& grad_output) {
  check_rank4(op, grad_output, "grad_output", "(N, K, P, Q)");
  check_floating(op, grad_output, "grad_output");
}

int64_t check_im2col_workspace(const char* op, const Conv2dProblem& pb, at::ScalarType dtype,
                               int64_t workspace_bytes) {
  const int64_t element_bytes = dtype == at::kDouble ? 8 : 4;
  TORCH_CHECK_VALUE(workspace_bytes > 0, op, ": workspace_bytes must be positive, got ", workspace_bytes);
  if (im2col_is_pointwise(pb)) return pb.N > 0 ? pb.N : 1;  // the activation is the matrix: no workspace
  const int64_t images = im2col_images_per_chunk(pb, element_bytes, workspace_bytes);
  TORCH_CHECK_VALUE(images > 0, op, ": one image's im2col matrix needs ", im2col_elements_per_image(pb) * element_bytes,
                    " bytes, more than the workspace limit of ", workspace_bytes,
                    " bytes; raise it (fastconv.backends.set_workspace_limit) or use algo='direct'");
  return images;
}

void check_implicit_gemm_tile(const char* op, int64_t tile) {
  TORCH_CHECK_VALUE(tile >= -1 && tile < kImplicitGemmTiles, op, ": tile must be -1 (chosen by size) or a ",
                    "configuration index below ", kImplicitGemmTiles, ", got ", tile);
}

namespace {
void check_conv2d_epilogue(const char* op, const Conv2dProblem& pb, const at::Tensor& input,
                           const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                           const c10::optional<at::Tensor>& residual) {
  for (const auto& [name, t] : {std::pair<const char*, const c10::optional<at::Tensor>*>{"scale", &scale},
                                {"shift", &shift}}) {
    if (!t->has_value()) continue;
    check_same_dtype(op, input, "input", **t, name);
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == pb.K, op, ": ", name, " must be 1-D with ", pb.K,
                      " elements (one per output channel), got shape ", (*t)->sizes());
  }
  if (residual.has_value()) {
    check_same_dtype(op, input, "input", *residual, "residual");
    const std::vector<int64_t> expected{pb.N, pb.K, pb.P, pb.Q};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(expected), op, ": residual must have the output's shape ",
                      at::IntArrayRef(expected), ", got ", residual->sizes());
  }
}
}  // namespace

Conv2dProblem check_conv2d_implicit_gemm_fprop(const char* op, c10::DeviceType backend, const at::Tensor& input,
                                               const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                                               const c10::optional<at::Tensor>& shift,
                                               const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t tile, bool shift_is_bias) {
  check_devices(op, backend,
                {{"input", &input}, {"weight", &weight}, {"scale", scale ? &*scale : nullptr},
                 {shift_is_bias ? "bias" : "shift", shift ? &*shift : nullptr},
                 {"residual", residual ? &*residual : nullptr}});
  const Conv2dProblem pb =
      check_conv2d_fprop(op, input, weight, shift_is_bias ? shift : c10::nullopt, stride, padding, dilation, groups);
  check_conv2d_epilogue(op, pb, input, scale, shift, residual);
  check_implicit_gemm_tile(op, tile);
  return pb;
}

at::Tensor conv2d_output_from_nhwc(const at::Tensor& nhwc, at::MemoryFormat format) {
  const at::Tensor v = nhwc.permute({0, 3, 1, 2});  // channels_last strides
  // (.contiguous() hands the view back when it is already contiguous: one output channel, or one pixel)
  return as_owned(format == at::MemoryFormat::ChannelsLast ? v : v.contiguous());
}

at::Tensor as_owned(const at::Tensor& t) {
  if (!t.is_view()) return t;
  at::Tensor out = at::empty({0}, t.options());
  out.set_(t.storage(), t.storage_offset(), t.sizes(), t.strides());
  return out;
}

at::MemoryFormat conv2d_output_format(const at::Tensor& a, const at::Tensor& b) {
  const bool cl = a.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                  b.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}


}  // namespace fastconv
