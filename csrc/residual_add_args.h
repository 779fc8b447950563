// Argument checks of the residual_add ops (CPU and CUDA wrappers; Python twins in fastconv/_checks.py).
#pragma once

#include <ATen/core/Tensor.h>

#include "residual_add_shape.h"
#include "tensor_checks.h"

namespace fastconv {

ResidualAddShape check_residual_add(const char* op, const at::Tensor& residual, const at::Tensor& shortcut,
                                    int64_t stride);

// `output` (the forward's, for the ReLU mask) is optional; shortcut_size is the forward shortcut's shape.
ResidualAddShape check_residual_add_backward(const char* op, const at::Tensor& grad_output, const at::Tensor* output,
                                             at::IntArrayRef shortcut_size, int64_t stride);

// Whether the flat (elementwise, vectorised) path applies: stride 1, equal shapes, and every tensor dense
// in the memory format `format`.
bool residual_add_is_flat(const ResidualAddShape& shape, at::MemoryFormat format,
                          std::initializer_list<const at::Tensor*> tensors);

}  // namespace fastconv
