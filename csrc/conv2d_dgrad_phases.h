// Strided dgrad as one stride-1 convolution per stride phase (the decomposition CUTLASS's strided dgrad uses),
// shared by the implicit-GEMM dgrad's CUDA wrapper and its CPU twin.
//
// dx[h] = sum over taps r and output rows p with p * stride - pad + r = h of dy[p] w[r]. Split the input rows by
// phase a = (h + pad) mod stride: the rows h = h0 + stride * j of phase a are reached only through the taps
// r = a + stride * t, from the output rows p = base + j - t. For each phase that is a stride-1 correlation of dy
// (shifted by base, zero-extended) with those taps flipped and the filter's K and C roles swapped: an fprop
// GEMM over 1 / (stride_h * stride_w) of the taps, where a dgrad gathering every tap would send
// (1 - 1 / (stride_h * stride_w)) of its tensor-core work to zero-filled operands.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

#include "conv2d_problem.h"

namespace fastconv {

// Whether dgrad_by_phases handles the problem: a stride above 1 and no dilation.
bool dgrad_by_phases_applies(const Conv2dProblem& pb);

// The stride-1, unpadded, pb.groups-grouped convolution of an (N, Kin, H, W) input (a view of a dense NHWC
// tensor) with an (Kout, Kin / groups, R, S) filter, returning (N, Kout, P, Q) in any memory format.
using PhaseFprop = std::function<at::Tensor(const at::Tensor& input, const at::Tensor& weight)>;

// Writes every element of dx_nhwc (N, H, W, C) from dy_nhwc (N, P, Q, K, any strides: each phase copies the window
// it reads into a dense tensor) and weight (K, C / groups, R, S).
void dgrad_by_phases(const Conv2dProblem& pb, const at::Tensor& dy_nhwc, const at::Tensor& weight,
                     const at::Tensor& dx_nhwc, const PhaseFprop& fprop);

}  // namespace fastconv
