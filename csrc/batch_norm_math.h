// The per-element and per-channel arithmetic of fastconv's training-mode BatchNorm (+ ReLU), shared by
// the CUDA kernels and their CPU twins so that both make the same decisions. Plain C++ (no torch
// headers) that nvcc, g++ and NVRTC accept.
//
// Forward, per channel c over the M = N * H * W values of the batch:
//     mean = sum(x) / M,  var = sum((x - mean)^2) / M (biased, as torch normalises),  invstd = 1 / sqrt(var + eps)
// (the ops save mean and var; running_var's unbiased update is var * M / (M - 1), done by the caller)
//     z = (x - mean) * (invstd * gamma) + beta,   y = relu ? max(z, 0) : z
// Backward, with g = dy where the ReLU passed (recomputed from x, nothing else saved) and xhat = (x - mean) * invstd:
//     dbeta = sum(g),  dgamma = sum(g * xhat),  dx = invstd * gamma * (g - dbeta / M - xhat * dgamma / M)
#pragma once

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

#include "conv2d_problem.h"  // FASTCONV_HD

namespace fastconv {

// z = (x - mean) * scale + shift with scale = invstd * gamma and shift = beta. On the GPU one explicit
// fused multiply-add, so the forward and the backward (which recomputes z for the ReLU mask) round alike.
template <typename acc_t>
FASTCONV_HD acc_t batch_norm_affine(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
#if defined(__CUDA_ARCH__)
  return fma(x - mean, scale, shift);
#else
  return (x - mean) * scale + shift;
#endif
}

// invstd = 1 / sqrt(var + eps), computed from the saved biased variance wherever it is needed (forward
// and backward compute it alike, and the variance itself is kept exact for the running statistics).
template <typename acc_t>
FASTCONV_HD acc_t batch_norm_invstd(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);
}

// One channel's constants of the affine map: z = batch_norm_affine(x, mean, scale, shift) with
// scale = invstd * gamma and shift = beta (gamma and beta null: 1 and 0). The forward, the backward and the
// CPU twin all take them from here, so the backward's recomputed ReLU mask is the forward's decision.
template <typename acc_t>
struct BatchNormChannel {
  acc_t mean, invstd, scale, shift;
};

template <typename acc_t>
FASTCONV_HD BatchNormChannel<acc_t> batch_norm_channel(const acc_t* mean, const acc_t* var, const acc_t* gamma,
                                                       const acc_t* beta, acc_t eps, int64_t c) {
  const acc_t invstd = batch_norm_invstd<acc_t>(var[c], eps);
  return {mean[c], invstd, invstd * (gamma ? gamma[c] : acc_t(1)), beta ? beta[c] : acc_t(0)};
}

// Welford's running (count, mean, M2) for one channel: numerically safe where sum and sum of squares
// would cancel; `merge` is Chan et al.'s combination of two partial results. fp32 on the GPU, fp64 in
// the CPU twin.
template <typename acc_t>
struct Welford {
  acc_t count, mean, m2;

  FASTCONV_HD void add(acc_t x) {
    count += acc_t(1);
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }
  FASTCONV_HD void merge(const Welford& o) {
    if (o.count == acc_t(0)) return;
    if (count == acc_t(0)) {
      *this = o;
      return;
    }
    const acc_t total = count + o.count, delta = o.mean - mean, w = o.count / total;
    mean += delta * w;
    m2 += o.m2 + delta * delta * count * w;
    count = total;
  }
  // The biased variance (0 for no values).
  FASTCONV_HD acc_t var() const { return count > acc_t(0) ? m2 / count : acc_t(0); }
};

// The two per-channel sums of the backward: sum(g) and sum(g * xhat).
template <typename acc_t>
struct GradSums {
  acc_t sum_g, sum_g_xhat;

  FASTCONV_HD void merge(const GradSums& o) {
    sum_g += o.sum_g;
    sum_g_xhat += o.sum_g_xhat;
  }
};

}  // namespace fastconv
