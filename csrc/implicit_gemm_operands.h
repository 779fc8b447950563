// The operands of the implicit-GEMM kernels, prepared by the host: dense channels-last activations, KRSC
// filters (dgrad: the filter transposed per group), and the channel counts the kernels load as 16-byte
// vectors zero-padded to a multiple of kImplicitGemmChannelMultiple (the RGB stem's 3 channels, a grouped
// conv's 4, a depthwise conv's 1). Zero channels change no sum. Shared by the CUDA wrappers and the CPU twin
// (csrc/cpu/conv2d_implicit_gemm.cpp), which computes on the same padded operands, so the CPU tests check
// this preparation too.
#pragma once

#include <ATen/core/Tensor.h>

#include "conv2d_problem.h"

namespace fastconv {

// Channels per 16-byte vector of fp16/bf16 (two vectors of fp32).
constexpr int64_t kImplicitGemmChannelMultiple = 8;

// A (N, C, H, W) tensor (or KCRS filter) as a dense NHWC (KRSC) array whose data starts 16-byte aligned
// (cp.async copies 16 bytes). Free when it is channels_last, dense and aligned already.
at::Tensor dense_nhwc(const at::Tensor& t);

// t contiguous, its data 16-byte aligned (a copy otherwise): the fused epilogue's per-channel scale and shift, which
// it reads as 16-byte vectors.
at::Tensor dense_aligned(const at::Tensor& t);

// fprop: x (N, H, W, groups * Cg') and w (K, R, S, Cg') with Cg' the padded channels per group; pb.C = groups * Cg'.
struct ImplicitGemmFpropOperands {
  Conv2dProblem pb;
  at::Tensor x, w;
};
ImplicitGemmFpropOperands implicit_gemm_fprop_operands(const Conv2dProblem& pb, const at::Tensor& input,
                                                        const at::Tensor& weight);

// dgrad: dy (N, P, Q, groups * Kg') and wt (groups, Cg, R, S, Kg'), wt[g][c][r][s][k] = w[g * Kg + k][c][r][s];
// Kg' the padded filters per group, pb.K = groups * Kg'.
struct ImplicitGemmDgradOperands {
  Conv2dProblem pb;
  at::Tensor dy, wt;
};
ImplicitGemmDgradOperands implicit_gemm_dgrad_operands(const Conv2dProblem& pb, const at::Tensor& grad_output,
                                                        const at::Tensor& weight);

// wgrad: dy (N, P, Q, groups * Kg') and x (N, H, W, groups * Cg'), both padded; the kernels' dw is then
// (groups * Kg', R, S, Cg'), which implicit_gemm_unpad_wgrad cuts back to (K, R, S, Cg).
struct ImplicitGemmWgradOperands {
  Conv2dProblem pb;
  at::Tensor dy, x;
};
ImplicitGemmWgradOperands implicit_gemm_wgrad_operands(const Conv2dProblem& pb, const at::Tensor& grad_output,
                                                        const at::Tensor& input);
at::Tensor implicit_gemm_unpad_wgrad(const at::Tensor& dw_padded, const Conv2dProblem& pb,
                                     const Conv2dProblem& padded);

}  // namespace fastconv
