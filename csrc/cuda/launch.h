// The interface between fastconv's torch-facing host wrappers (csrc/cuda/*.cpp, compiled by the host
// compiler with torch headers) and its kernels (csrc/cuda/*.cu, compiled by nvcc without any torch
// header, which keeps nvcc's work small on a 2-core build machine). Launchers take raw pointers, element
// strides and the problem struct, launch on the given stream and return the launch's cudaError_t.
//
// The argument types (DType, Conv2dProblem, GemmProblem, DenseActivation, ...) come first and are plain
// C++ that NVRTC accepts too, for the .cu files' device code compiled alone (fastconv.cupy); the launcher
// declarations after them are host-only.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime_api.h>
#endif

#include "../conv2d_problem.h"
#include "../implicit_gemm_problem.h"
#include "../residual_add_shape.h"

namespace fastconv {

// Element types the CUDA kernels are built for; all of them accumulate in fp32.
enum class DType { Float32, Float16, BFloat16 };

// Shared memory a block may use without opting in: every kernel fits its tiles into this.
constexpr int kSharedMemoryBudgetBytes = 48 * 1024;

// The direct kernels stage R*S filter taps (for at least one channel pair) in shared memory.
constexpr int64_t kMaxDirectFilterTaps = kSharedMemoryBudgetBytes / sizeof(float);

// A dense (N, C, H, W) activation: NCHW, or channels_last (NHWC) in memory; HW = H * W.
struct DenseActivation {
  int64_t N, C, HW;
  bool channels_last;
};

// A batched matrix product through element strides: for every batch (outer, inner),
//     C[m, n] (+)= sum over k of A[m, k] * B[k, n]  (+ bias[n])
// A is M x K, B is K x N, C is M x N; each matrix is offset by outer * *_bo + inner * *_bi and bias by
// inner * bias_bi. Strides let one kernel serve the NN, NT and TN products of fprop, dgrad and wgrad and
// read or write NCHW and channels_last tensors in place. Accumulation is in fp32; fp16/bf16 use tensor
// cores (WMMA) on sm_80+.
struct GemmProblem {
  int64_t M, N, K;
  int64_t a_m, a_k, b_k, b_n, c_m, c_n;
  int64_t batch_outer, batch_inner;
  int64_t a_bo, a_bi, b_bo, b_bi, c_bo, c_bi, bias_bi;
  bool accumulate;  // C += A B (C already holds a partial sum) instead of C = A B
  bool relu;        // C = max(C, 0) after the bias (and the accumulation): the fused conv + ReLU epilogue
};

#if !defined(__CUDACC_RTC__)  // the launchers: host code

// relu: y = max(y, 0) in the epilogue, after the bias (NaN passes, as torch's relu).
cudaError_t launch_conv2d_direct_fprop(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs,
                                       const void* w, Strides4 ws, const void* bias, bool relu, void* y,
                                       Strides4 ys, cudaStream_t stream);

cudaError_t launch_conv2d_direct_dgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* w, Strides4 ws, void* dx, Strides4 dxs, cudaStream_t stream);

// workspace: conv2d_direct_wgrad_workspace_floats(pb, dys) floats (the depthwise kernel's partial sums per split;
// none, and nullptr allowed, for other convolutions).
int64_t conv2d_direct_wgrad_workspace_floats(const Conv2dProblem& pb, Strides4 dys);
cudaError_t launch_conv2d_direct_wgrad(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const void* x, Strides4 xs, void* dw, Strides4 dws, float* workspace,
                                       cudaStream_t stream);

// db[k] = sum over n, p, q of dy[n, k, p, q] for a (N, K, P, Q) grad_output with the given strides.
cudaError_t launch_conv2d_bias_grad(int64_t N, int64_t K, int64_t P, int64_t Q, DType dtype, const void* dy,
                                    Strides4 dys, void* db, cudaStream_t stream);

// Max pooling over the window geometry of `pb` (K = C = groups, R x S the window). indices hold the
// flat h * W + w position of each maximum in its plane, as torch's do.
cudaError_t launch_max_pool2d_forward(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs, void* y,
                                      Strides4 ys, int64_t* indices, Strides4 is, bool channels_fastest,
                                      cudaStream_t stream);
cudaError_t launch_max_pool2d_backward(const Conv2dProblem& pb, DType dtype, const void* dy, Strides4 dys,
                                       const int64_t* indices, Strides4 is, void* dx, Strides4 dxs,
                                       bool channels_fastest, cudaStream_t stream);

// Flat fast path: stride 1, equal shapes and one dense layout for all tensors; 16-byte vectors when every
// pointer is 16-byte aligned, a scalar tail otherwise.
cudaError_t launch_residual_add_flat(DType dtype, const void* residual, const void* shortcut, void* out,
                                     int64_t numel, bool relu, cudaStream_t stream);
cudaError_t launch_residual_add_strided(const ResidualAddShape& shape, DType dtype, const void* residual,
                                        Strides4 rs, const void* shortcut, Strides4 ss, void* out, Strides4 os,
                                        bool relu, cudaStream_t stream);
// Backward, in one kernel: grad_residual = grad_output * (output > 0 when `output` is given, i.e. the
// forward had relu), grad_shortcut = that at the strided positions of the first J channels, 0 elsewhere.
cudaError_t launch_residual_add_backward_flat(DType dtype, const void* grad_output, const void* output,
                                              void* grad_residual, void* grad_shortcut, int64_t numel,
                                              cudaStream_t stream);
cudaError_t launch_residual_add_backward_strided(const ResidualAddShape& shape, DType dtype, const void* grad_output,
                                                 Strides4 gos, const void* output, Strides4 os, void* grad_residual,
                                                 Strides4 grs, void* grad_shortcut, Strides4 gss,
                                                 cudaStream_t stream);

// Training-mode BatchNorm (+ ReLU) over the batch's statistics (formulas in csrc/batch_norm_math.h). x, y,
// dy and dx are dense in the layout of `a`; gamma and beta (null: 1 and 0) and the statistics are fp32
// vectors of C. Both launches need batch_norm_workspace_bytes(a) bytes of scratch (per-block partial
// results), merged in a fixed order: results are bitwise reproducible.
size_t batch_norm_workspace_bytes(const DenseActivation& a);
// Three kernels: per-block Welford partials, their merge into mean and (biased) var, then
// y = relu?((x - mean) * invstd * gamma + beta).
cudaError_t launch_batch_norm_relu_forward(const DenseActivation& a, DType dtype, const void* x, const float* gamma,
                                           const float* beta, float eps, bool relu, void* y, float* mean, float* var,
                                           void* workspace, cudaStream_t stream);
// Three kernels: per-block partials of sum(g) and sum(g * xhat) (g: dy masked by the ReLU recomputed from
// x), their merge into grad_beta and grad_gamma, then the input gradient.
cudaError_t launch_batch_norm_relu_backward(const DenseActivation& a, DType dtype, const void* dy, const void* x,
                                            const float* mean, const float* var, const float* gamma,
                                            const float* beta, float eps, bool relu, void* dx, float* grad_gamma,
                                            float* grad_beta, void* workspace, cudaStream_t stream);

// A, B and bias have element type `dtype`; C has it too, or is fp32 when c_fp32 (wgrad accumulating over
// batch chunks keeps its sum in fp32).
cudaError_t launch_gemm(const GemmProblem& g, DType dtype, bool c_fp32, const void* A, const void* B,
                        const void* bias, void* C, cudaStream_t stream);
// Split-K for a GEMM whose M x N (x batch_inner) output is too few tiles to fill the GPU: how many slices to
// cut a reduction of length K into (1: none), each then summed into its own partial output.
int64_t gemm_reduction_splits(const GemmProblem& g, int64_t K);

// im2col for images [n0, n0 + images) of the activation: col[m, k] with m = (n - n0, p, q) and
// k = (c, r, s), row-major (M = images * P * Q rows of C * R * S), zero where the tap reads padding.
cudaError_t launch_im2col(const Conv2dProblem& pb, DType dtype, const void* x, Strides4 xs, int64_t n0,
                          int64_t images, void* col, cudaStream_t stream);
// col2im, the adjoint: dx[n, c, h, w] = sum of the col entries that im2col copied from (h, w), gathered
// (no atomics) for images [n0, n0 + images); col is fp32 (dgrad's GEMM output), dx of type `dtype` is
// written through its strides.
cudaError_t launch_col2im(const Conv2dProblem& pb, DType dtype, const float* col, int64_t n0, int64_t images,
                          void* dx, Strides4 dxs, cudaStream_t stream);

// Implicit-GEMM convolution on tensor cores (sm_80+; csrc/implicit_gemm_problem.h has the GEMM of each
// pass). Activations are dense NHWC, filters dense KRSC; the channels each pass loads as 16-byte vectors
// must be multiples of 8 (fprop: C / groups; dgrad: K / groups; wgrad: both), which the host wrapper
// ensures by zero padding. `tile` picks one of kImplicitGemmTiles configurations (-1: by problem size).
bool implicit_gemm_device_supported();
// fprop splits its reduction (R*S*C/groups) into this many ranges when the grid would leave SMs without a
// block (1 otherwise); with more than one, the launch needs a workspace of splits * M * K fp32 values.
int conv2d_implicit_gemm_fprop_splits(const Conv2dProblem& pb, DType dtype, int tile);
// fprop with its fused epilogue y = relu?(conv(x, w) * scale[k] + shift[k] + residual): scale, shift
// (length K) and residual (NHWC like y) are optional (null), all of the element type. `partial`: the
// split-K workspace (null with one split).
cudaError_t launch_conv2d_implicit_gemm_fprop(const Conv2dProblem& pb, DType dtype, int tile, int splits,
                                              const void* x, const void* w, const void* scale, const void* shift,
                                              const void* residual, bool relu, float* partial, void* y,
                                              cudaStream_t stream);
// Can this build and GPU run the wgmma tiles (6, 7: sm_90a code, a compute capability 9.0 GPU)?
bool implicit_gemm_wgmma_supported();
// fprop on a wgmma tile (6 or 7; fp16/bf16, no split-K), when implicit_gemm_wgmma_supported(); the arguments as
// launch_conv2d_implicit_gemm_fprop's. launch_conv2d_implicit_gemm_fprop calls it for those tiles.
cudaError_t launch_conv2d_implicit_gemm_fprop_wgmma(const Conv2dProblem& pb, DType dtype, int tile, const void* x,
                                                    const void* w, const void* scale, const void* shift,
                                                    const void* residual, bool relu, void* y, cudaStream_t stream);
// dgrad reads the filter transposed per group: wt[g][c][r][s][k] = w[g * Kg + k][r][s][c].
cudaError_t launch_conv2d_implicit_gemm_dgrad(const Conv2dProblem& pb, DType dtype, int tile, const void* dy,
                                              const void* wt, void* dx, cudaStream_t stream);
// dgrad on a wgmma tile (6 or 7; fp16/bf16), when implicit_gemm_wgmma_supported(); launch_conv2d_implicit_gemm_dgrad
// calls it for those tiles.
cudaError_t launch_conv2d_implicit_gemm_dgrad_wgmma(const Conv2dProblem& pb, DType dtype, int tile, const void* dy,
                                                    const void* wt, void* dx, cudaStream_t stream);
// wgrad splits the reduction over N*P*Q into this many ranges (splits <= 0: chosen from the grid's size);
// the returned count is what the launch uses, and the workspace holds that many fp32 filters.
int conv2d_implicit_gemm_wgrad_splits(const Conv2dProblem& pb, DType dtype, int tile, int splits);
// dw (KRSC, element type) = the sum of the `splits` fp32 partial filters the GEMM writes to `partial`.
cudaError_t launch_conv2d_implicit_gemm_wgrad(const Conv2dProblem& pb, DType dtype, int tile, int splits,
                                              const void* dy, const void* x, float* partial, void* dw,
                                              cudaStream_t stream);

#endif  // !defined(__CUDACC_RTC__)

}  // namespace fastconv
