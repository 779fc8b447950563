// Host wrappers of the im2col + GEMM convolution on CUDA: fprop = im2col then GEMM with the filter
// matrix (bias in the GEMM epilogue); dgrad = GEMM then col2im; wgrad = GEMM of the output gradient with
// the im2col matrix. Groups are the inner batch of every GEMM; the batch is processed in chunks of whole
// images so that the col workspace stays under the limit (csrc/conv2d_im2col_plan.h). 1x1 stride-1
// unpadded filters skip im2col: fprop and dgrad read and write the activations in place, wgrad reads the
// input's pixel matrix (a transposing copy for NCHW, free for channels_last). No cuDNN/cuBLAS: the GEMM is csrc/cuda/gemm_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../conv2d_args.h"
#include "../conv2d_im2col_plan.h"
#include "launch.h"
#include "wrapper_utils.h"

namespace fastconv {
namespace {

// A dense (N, C, H, W) tensor in its own memory format: the GEMMs walk (h, w) as one pixel index
// m = h * W + w with a single stride, pixel_stride(t).
at::Tensor dense(const at::Tensor& t) { return t.contiguous(t.suggest_memory_format()); }

// The stride of the pixel index m = h * W + w of a dense tensor. torch ignores the strides of size-1
// dimensions when it calls a tensor contiguous, so when W == 1 stride(3) may be anything: use stride(2).
int64_t pixel_stride(const at::Tensor& t) { return t.size(3) == 1 ? t.stride(2) : t.stride(3); }

const char* data(const at::Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
}
char* mutable_data(at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.mutable_data_ptr()) + offset * t.element_size();
}

at::Tensor conv2d_im2col_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              int64_t workspace_bytes, bool relu) {
  const char* op = "fastconv::conv2d_im2col";
  const NvtxRange nvtx_range(op);
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CUDA, {{"input", &input}, {"weight", &weight}, {"bias", b}});
  const Conv2dProblem pb = check_conv2d_fprop(op, input, weight, bias, stride, padding, dilation, groups);
  const int64_t chunk = check_im2col_workspace(op, pb, input.scalar_type(), workspace_bytes);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor y = at::empty({pb.N, pb.K, pb.P, pb.Q}, input.options().memory_format(conv2d_output_format(input, weight)));
  if (y.numel() == 0) return y;
  const DType dt = cuda_dtype(op, input.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor w = weight.contiguous();
  const at::Tensor bias_c = b ? b->contiguous() : at::Tensor();
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), CgRS = Cg * pb.R * pb.S, CRS = pb.C * pb.R * pb.S;

  // y_g[(p, q), k] = sum over (c, r, s) of col_g[(p, q), (c, r, s)] * w_g[k, (c, r, s)], per image and group.
  GemmProblem g{};
  g.M = pb.P * pb.Q;
  g.N = Kg;
  g.K = CgRS;
  g.b_k = 1, g.b_n = CgRS, g.b_bo = 0, g.b_bi = Kg * CgRS;
  g.c_m = pixel_stride(y), g.c_n = y.stride(1), g.c_bo = y.stride(0), g.c_bi = Kg * y.stride(1);
  g.bias_bi = Kg;
  g.batch_inner = pb.groups;
  g.relu = relu;
  const void* bias_ptr = b ? bias_c.const_data_ptr() : nullptr;
  if (im2col_is_pointwise(pb)) {
    const at::Tensor x = dense(input);  // the activation is the col matrix
    g.a_m = pixel_stride(x), g.a_k = x.stride(1), g.a_bo = x.stride(0), g.a_bi = Cg * x.stride(1);
    g.batch_outer = pb.N;
    check_launch(op, launch_gemm(g, dt, false, x.const_data_ptr(), w.const_data_ptr(), bias_ptr, y.mutable_data_ptr(),
                                 stream));
    return y;
  }
  at::Tensor col = at::empty({chunk * im2col_elements_per_image(pb)}, input.options());
  g.a_m = CRS, g.a_k = 1, g.a_bo = pb.P * pb.Q * CRS, g.a_bi = CgRS;
  for (int64_t n0 = 0; n0 < pb.N; n0 += chunk) {
    const int64_t images = std::min(chunk, pb.N - n0);
    check_launch(op, launch_im2col(pb, dt, input.const_data_ptr(), strides_of(input), n0, images, col.mutable_data_ptr(),
                                   stream));
    g.batch_outer = images;
    check_launch(op, launch_gemm(g, dt, false, col.const_data_ptr(), w.const_data_ptr(), bias_ptr,
                                 mutable_data(y, n0 * y.stride(0)), stream));
  }
  return y;
}

at::Tensor conv2d_im2col_dgrad_cuda(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, int64_t workspace_bytes) {
  const char* op = "fastconv::conv2d_im2col_dgrad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"weight", &weight}});
  const Conv2dProblem pb = check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups);
  // dcol is fp32 whatever the dtype, so col2im sums the taps before the one rounding to the output dtype.
  const int64_t chunk = check_im2col_workspace(op, pb, grad_output.scalar_type(), workspace_bytes);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor dx = at::empty(input_size, grad_output.options().memory_format(conv2d_output_format(grad_output, weight)));
  if (dx.numel() == 0) return dx;
  const DType dt = cuda_dtype(op, grad_output.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor w = weight.contiguous(), dy = dense(grad_output);
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), CgRS = Cg * pb.R * pb.S, CRS = pb.C * pb.R * pb.S;

  // dcol_g[(p, q), (c, r, s)] = sum over k of dy_g[(p, q), k] * w_g[k, (c, r, s)], per image and group.
  GemmProblem g{};
  g.M = pb.P * pb.Q;
  g.N = CgRS;
  g.K = Kg;
  g.a_m = pixel_stride(dy), g.a_k = dy.stride(1), g.a_bo = dy.stride(0), g.a_bi = Kg * dy.stride(1);
  g.b_k = CgRS, g.b_n = 1, g.b_bo = 0, g.b_bi = Kg * CgRS;
  g.batch_inner = pb.groups;
  if (im2col_is_pointwise(pb)) {  // dcol is dx itself
    g.c_m = pixel_stride(dx), g.c_n = dx.stride(1), g.c_bo = dx.stride(0), g.c_bi = Cg * dx.stride(1);
    g.batch_outer = pb.N;
    check_launch(op, launch_gemm(g, dt, false, dy.const_data_ptr(), w.const_data_ptr(), nullptr, dx.mutable_data_ptr(),
                                 stream));
    return dx;
  }
  at::Tensor dcol = at::empty({chunk * im2col_elements_per_image(pb)}, grad_output.options().dtype(at::kFloat));
  g.c_m = CRS, g.c_n = 1, g.c_bo = pb.P * pb.Q * CRS, g.c_bi = CgRS;
  for (int64_t n0 = 0; n0 < pb.N; n0 += chunk) {
    const int64_t images = std::min(chunk, pb.N - n0);
    g.batch_outer = images;
    check_launch(op, launch_gemm(g, dt, true, data(dy, n0 * dy.stride(0)), w.const_data_ptr(), nullptr,
                                 dcol.mutable_data_ptr(), stream));
    check_launch(op, launch_col2im(pb, dt, dcol.const_data_ptr<float>(), n0, images, dx.mutable_data_ptr(),
                                   strides_of(dx), stream));
  }
  return dx;
}

at::Tensor conv2d_im2col_wgrad_cuda(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, int64_t workspace_bytes) {
  const char* op = "fastconv::conv2d_im2col_wgrad";
  const NvtxRange nvtx_range(op);
  check_devices(op, c10::DeviceType::CUDA, {{"grad_output", &grad_output}, {"input", &input}});
  const Conv2dProblem pb = check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups);
  const int64_t chunk = check_im2col_workspace(op, pb, input.scalar_type(), workspace_bytes);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto format = conv2d_output_format(grad_output, input);
  if (pb.N == 0 || pb.K == 0 || pb.C == 0 || pb.R == 0 || pb.S == 0 || pb.P == 0 || pb.Q == 0) {
    return at::zeros(weight_size, grad_output.options()).contiguous(format);
  }
  const DType dt = cuda_dtype(op, grad_output.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t Kg = pb.K_per_group(), CgRS = pb.C_per_group() * pb.R * pb.S, CRS = pb.C * pb.R * pb.S;
  const int64_t PQ = pb.P * pb.Q;
  // grad_output as an (N * P * Q) x K row-major matrix (free when it is channels_last already).
  const at::Tensor dy = grad_output.permute({0, 2, 3, 1}).contiguous();
  // For 1x1 stride-1 filters the col matrix is the activation's pixel matrix (free when channels_last).
  const bool pointwise = im2col_is_pointwise(pb);
  at::Tensor col = pointwise ? input.permute({0, 2, 3, 1}).contiguous()
                             : at::empty({chunk * im2col_elements_per_image(pb)}, input.options());

  // Split-K: the output is small (K x C*R*S / groups, often a handful of 64 x 64 tiles) and the reduction
  // over the batch's pixels long (802,816 rows for ResNet-50's conv1 at batch 64), so the rows are cut into
  // `splits` slices, each its own GEMM of the batch (outer index) summing into its own fp32 partial; the
  // partials are then summed in a fixed order (deterministic). Without it conv1's wgrad ran in 3 blocks
  // (357 ms on an H200, bench/results/2026-11-28-h200-b5fddeb).
  //
  // partial_j[g][k, (c, r, s)] += sum over the rows m of slice j of dy[m, g * Kg + k] * col[m, g * CgRS + (c, r, s)].
  GemmProblem g{};
  g.M = Kg;
  g.N = CgRS;
  g.batch_inner = pb.groups;
  const int64_t rows_per_chunk = chunk * PQ;
  const int64_t splits = gemm_reduction_splits(g, rows_per_chunk);
  const int64_t slice = (rows_per_chunk + splits - 1) / splits;
  at::Tensor partial = at::zeros({splits, pb.groups * Kg * CgRS}, grad_output.options().dtype(at::kFloat));
  g.a_m = 1, g.a_k = pb.K, g.a_bo = slice * pb.K, g.a_bi = Kg;
  g.b_k = CRS, g.b_n = 1, g.b_bo = slice * CRS, g.b_bi = CgRS;
  g.c_m = CgRS, g.c_n = 1, g.c_bo = pb.groups * Kg * CgRS, g.c_bi = Kg * CgRS;
  g.accumulate = true;  // onto the zeroed partials, and across batch chunks
  for (int64_t n0 = 0; n0 < pb.N; n0 += chunk) {
    const int64_t images = std::min(chunk, pb.N - n0), rows = images * PQ;
    if (!pointwise) {
      check_launch(op, launch_im2col(pb, dt, input.const_data_ptr(), strides_of(input), n0, images,
                                     col.mutable_data_ptr(), stream));
    }
    // the chunk's first row in dy and in col (col holds this chunk only, unless it is the whole input's)
    const int64_t dy_row = n0 * PQ, col_row = pointwise ? n0 * PQ : 0;
    // the whole slices in one launch (slice j at batch index j), the short last one in a second
    const int64_t whole = rows / slice, rest = rows - whole * slice;
    if (whole > 0) {
      g.K = slice;
      g.batch_outer = whole;
      check_launch(op, launch_gemm(g, dt, true, data(dy, dy_row * pb.K), data(col, col_row * CRS), nullptr,
                                   partial.mutable_data_ptr(), stream));
    }
    if (rest > 0) {
      g.K = rest;
      g.batch_outer = 1;
      check_launch(op, launch_gemm(g, dt, true, data(dy, (dy_row + whole * slice) * pb.K),
                                   data(col, (col_row + whole * slice) * CRS), nullptr,
                                   mutable_data(partial, whole * partial.size(1)), stream));
    }
  }
  const at::Tensor dw32 = partial.sum(0).view(weight_size);
  return as_owned(dw32.to(grad_output.scalar_type()).contiguous(format));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("conv2d_im2col", &conv2d_im2col_cuda);
  m.impl("conv2d_im2col_dgrad", &conv2d_im2col_dgrad_cuda);
  m.impl("conv2d_im2col_wgrad", &conv2d_im2col_wgrad_cuda);
}

}  // namespace fastconv
