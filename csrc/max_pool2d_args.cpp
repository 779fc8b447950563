#include "max_pool2d_args.h"

#include <c10/util/Exception.h>

namespace fastconv {
namespace {

// Window geometry from sizes, P and Q from the pooling formula (floor or ceil mode). Backward checks them itself.
Conv2dProblem make_pool_problem(const char* op, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool ceil_mode, bool check_output = true) {
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    op, ": kernel_size, stride, padding and dilation must have 2 entries each, got ", kernel_size,
                    ", ", stride, ", ", padding, ", ", dilation);
  // torch takes these as 32-bit ints; within that, the window arithmetic below cannot overflow 64 bits
  constexpr int64_t kMax = 0x7fffffff;
  for (at::IntArrayRef arg : {kernel_size, stride, padding, dilation})
    for (auto v : arg)
      TORCH_CHECK_VALUE(v <= kMax, op, ": kernel_size, stride, padding and dilation must fit in 32 bits, got ",
                        kernel_size, ", ", stride, ", ", padding, ", ", dilation);
  for (auto v : kernel_size) TORCH_CHECK_VALUE(v > 0, op, ": kernel_size must be positive, got ", kernel_size);
  for (auto v : stride) TORCH_CHECK_VALUE(v > 0, op, ": stride must be positive, got ", stride);
  for (auto v : dilation) TORCH_CHECK_VALUE(v > 0, op, ": dilation must be positive, got ", dilation);
  for (auto v : padding) TORCH_CHECK_VALUE(v >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
                    ": padding must be at most half the kernel size, got padding ", padding, " for kernel_size ",
                    kernel_size);
  TORCH_CHECK_VALUE(input_size[1] > 0 && input_size[2] > 0 && input_size[3] > 0, op,
                    ": input must have non-zero channels, height and width (only the batch may be empty), got ",
                    input_size);
  Conv2dProblem pb{};
  pb.N = input_size[0];
  pb.C = pb.K = pb.groups = input_size[1];
  pb.H = input_size[2];
  pb.W = input_size[3];
  pb.R = kernel_size[0];
  pb.S = kernel_size[1];
  pb.stride_h = stride[0];
  pb.stride_w = stride[1];
  pb.pad_h = padding[0];
  pb.pad_w = padding[1];
  pb.dil_h = dilation[0];
  pb.dil_w = dilation[1];
  pb.P = pool_output_extent(pb.H, pb.pad_h, pb.dil_h, pb.R, pb.stride_h, ceil_mode);
  pb.Q = pool_output_extent(pb.W, pb.pad_w, pb.dil_w, pb.S, pb.stride_w, ceil_mode);
  TORCH_CHECK_VALUE(!check_output || (pb.P > 0 && pb.Q > 0), op, ": output size is too small: input ", pb.H, " x ",
                    pb.W, " gives ", pb.P, " x ", pb.Q, " windows");
  return pb;
}

}  // namespace

Conv2dProblem check_max_pool2d(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool ceil_mode) {
  check_rank4(op, input, "input", "(N, C, H, W)");
  check_floating(op, input, "input");
  return make_pool_problem(op, input.sizes(), kernel_size, stride, padding, dilation, ceil_mode);
}

Conv2dProblem check_max_pool2d_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& indices,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_rank4(op, grad_output, "grad_output", "(N, C, P, Q)");
  check_floating(op, grad_output, "grad_output");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be torch.int64, got ",
                   py_dtype(indices.scalar_type()));
  TORCH_CHECK_VALUE(indices.sizes() == grad_output.sizes(), op, ": indices has shape ", indices.sizes(),
                    " but grad_output has shape ", grad_output.sizes());
  check_size4(op, input_size, "input_size");
  // The forward may have used ceil_mode: grad_output's extents are the floor or the ceil mode's (the floor mode's may
  // be 0 where the ceil mode's is not: a 3 x 3 window of stride 2 over 2 x 2).
  Conv2dProblem pb = make_pool_problem(op, input_size, kernel_size, stride, padding, dilation, false, false);
  const Conv2dProblem ceil = make_pool_problem(op, input_size, kernel_size, stride, padding, dilation, true, false);
  const int64_t P = grad_output.size(2), Q = grad_output.size(3);
  TORCH_CHECK_VALUE(grad_output.size(0) == pb.N && grad_output.size(1) == pb.C && P > 0 && Q > 0 &&
                        (P == pb.P || P == ceil.P) && (Q == pb.Q || Q == ceil.Q),
                    op, ": grad_output of shape ", grad_output.sizes(), " does not fit input_size ", input_size);
  pb.P = P;
  pb.Q = Q;
  return pb;
}

}  // namespace fastconv
