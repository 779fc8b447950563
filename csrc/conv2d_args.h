// Argument checks shared by the CPU and CUDA host wrappers of every conv2d op: each validates its
// arguments here and gets back the Conv2dProblem its kernels run. Errors are Python ValueError /
// TypeError with a message naming the problem (the Python fakes in fastconv/ops.py raise the same).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "conv2d_problem.h"
#include "tensor_checks.h"

namespace fastconv {

// Forward: input (N, C, H, W), weight (K, C / groups, R, S), optional bias (K).
Conv2dProblem check_conv2d_fprop(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// dgrad: grad_output (N, K, P, Q) and weight; input_size is the (N, C, H, W) of the forward input.
Conv2dProblem check_conv2d_dgrad(const char* op, const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups);

// wgrad: grad_output (N, K, P, Q) and input; weight_size is the (K, C / groups, R, S) of the filter.
Conv2dProblem check_conv2d_wgrad(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                 at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups);

void check_bias_grad(const char* op, const at::Tensor& grad_output);

// The im2col ops' extra argument: the workspace limit in bytes, and whether one image's col matrix fits it
// (a clear error naming the sizes otherwise). Returns images per chunk (the whole batch for 1x1 stride-1
// unpadded filters, which use the activation itself as the matrix). Workspace elements are counted at
// the accumulation width (4 bytes, 8 for float64) whatever the dtype: the CPU twin's col and the CUDA
// dgrad's dcol are fp32, so every op of the family chunks alike and fits the limit.
int64_t check_im2col_workspace(const char* op, const Conv2dProblem& pb, at::ScalarType dtype, int64_t workspace_bytes);

// The implicit-GEMM ops' extra argument: a tile configuration index in [0, kImplicitGemmTiles), or -1.
void check_implicit_gemm_tile(const char* op, int64_t tile);
// The implicit-GEMM fprop ops (plain and fused), on one backend: the conv's arguments, the epilogue's
// optional operands (scale and shift of shape (K), residual of the output's shape (N, K, P, Q), all of the
// input's dtype and device) and the tile. The plain op's bias is passed as `shift` and checked and named as
// a bias (shift_is_bias).
Conv2dProblem check_conv2d_implicit_gemm_fprop(const char* op, c10::DeviceType backend, const at::Tensor& input,
                                               const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                                               const c10::optional<at::Tensor>& shift,
                                               const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t tile, bool shift_is_bias);
// A dense (N, H, W, C) result as the (N, C, H, W) tensor torch's conv returns in `format` (the same memory when
// that is channels_last, one copy otherwise; never a view): the implicit-GEMM twins compute channels-last.
at::Tensor conv2d_output_from_nhwc(const at::Tensor& nhwc, at::MemoryFormat format);
// `t`, or where it is a view, a tensor of its own on the same memory with the same sizes and strides. An op must
// not return a view: in eager mode autograd would refuse in-place updates of it, which the op's fake (a fresh
// tensor) allows under torch.compile.
at::Tensor as_owned(const at::Tensor& t);

// channels_last if any of the tensors suggests it (torch's rule for its own conv outputs), else NCHW.
at::MemoryFormat conv2d_output_format(const at::Tensor& a, const at::Tensor& b);

}  // namespace fastconv
