// Argument checks of the max_pool2d ops (shared by the CPU and CUDA wrappers; fastconv/_checks.py has
// their Python twins for the fakes). The window geometry is returned as a Conv2dProblem with K = C,
// groups = C and R x S the window: pooling is a depthwise window op, and shares the conv index math.
#pragma once

#include <ATen/core/Tensor.h>

#include "conv2d_problem.h"
#include "tensor_checks.h"

namespace fastconv {

Conv2dProblem check_max_pool2d(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool ceil_mode);

// grad_output and indices have the forward output's shape; input_size is the forward input's.
Conv2dProblem check_max_pool2d_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& indices,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace fastconv
