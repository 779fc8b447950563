#include "residual_add_args.h"

#include <c10/util/Exception.h>

namespace fastconv {
namespace {

ResidualAddShape make_shape(const char* op, at::IntArrayRef residual, at::IntArrayRef shortcut, int64_t stride) {
  TORCH_CHECK_VALUE(stride > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(residual[0] == shortcut[0], op, ": residual has batch size ", residual[0],
                    " but shortcut has ", shortcut[0]);
  TORCH_CHECK_VALUE(shortcut[1] <= residual[1], op, ": shortcut has ", shortcut[1],
                    " channels, more than the residual's ", residual[1], " (the shortcut is zero-padded, never cut)");
  const int64_t P = (shortcut[2] + stride - 1) / stride, Q = (shortcut[3] + stride - 1) / stride;
  TORCH_CHECK_VALUE(residual[2] == P && residual[3] == Q, op, ": residual is ", residual[2], " x ", residual[3],
                    " but a shortcut of ", shortcut[2], " x ", shortcut[3], " subsampled with stride ", stride,
                    " is ", P, " x ", Q);
  return ResidualAddShape{residual[0], residual[1], P, Q, shortcut[1], shortcut[2], shortcut[3], stride};
}

}  // namespace

ResidualAddShape check_residual_add(const char* op, const at::Tensor& residual, const at::Tensor& shortcut,
                                    int64_t stride) {
  check_rank4(op, residual, "residual", "(N, C, P, Q)");
  check_rank4(op, shortcut, "shortcut", "(N, J, H, W)");
  check_floating(op, residual, "residual");
  check_same_dtype(op, residual, "residual", shortcut, "shortcut");
  return make_shape(op, residual.sizes(), shortcut.sizes(), stride);
}

ResidualAddShape check_residual_add_backward(const char* op, const at::Tensor& grad_output, const at::Tensor* output,
                                             at::IntArrayRef shortcut_size, int64_t stride) {
  check_rank4(op, grad_output, "grad_output", "(N, C, P, Q)");
  check_floating(op, grad_output, "grad_output");
  if (output != nullptr) {
    check_same_dtype(op, grad_output, "grad_output", *output, "output");
    TORCH_CHECK_VALUE(output->sizes() == grad_output.sizes(), op, ": output has shape ", output->sizes(),
                      " but grad_output has shape ", grad_output.sizes());
  }
  check_size4(op, shortcut_size, "shortcut_size");
  return make_shape(op, grad_output.sizes(), shortcut_size, stride);
}

bool residual_add_is_flat(const ResidualAddShape& shape, at::MemoryFormat format,
                          std::initializer_list<const at::Tensor*> tensors) {
  if (shape.stride != 1 || shape.J != shape.C) return false;
  for (const at::Tensor* t : tensors) {
    if (t != nullptr && !t->is_contiguous(format)) return false;
  }
  return true;
}

}  // namespace fastconv
