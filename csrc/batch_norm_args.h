// Argument checks of the batch_norm_relu ops (training-mode BatchNorm with the batch's statistics, then an
// optional ReLU), shared by the CPU and CUDA wrappers; the Python fakes mirror them (fastconv/_checks.py).
#pragma once

#include <ATen/core/Tensor.h>

#include "tensor_checks.h"

namespace fastconv {

// The per-channel statistics (mean and biased variance) and the affine gradients are kept in this type: float64 for
// float64 inputs, else float32 (fp16/bf16 inputs are reduced in fp32).
at::ScalarType batch_norm_stats_type(at::ScalarType input);

// input (N, C, H, W) with more than one value per channel unless it is empty; weight and bias (gamma,
// beta) optional 1-D of C elements, in the input's dtype or float32; eps >= 0.
void check_batch_norm_relu(const char* op, const at::Tensor& input, const at::Tensor* weight, const at::Tensor* bias,
                           double eps);

// gamma or beta as the contiguous vector of `dtype` the kernels read (an undefined tensor when absent).
at::Tensor batch_norm_param(const at::Tensor* t, at::ScalarType dtype);

// grad_output like input; mean and var 1-D of C elements in batch_norm_stats_type; eps >= 0.
void check_batch_norm_relu_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& mean, const at::Tensor& var, const at::Tensor* weight,
                                    const at::Tensor* bias, double eps);

}  // namespace fastconv
