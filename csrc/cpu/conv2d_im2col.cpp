// CPU twin of the im2col + GEMM convolution: the same chunking (csrc/conv2d_im2col_plan.h) and the same
// col layout as the CUDA path, with im2col/col2im as loops over the shared index math and the matrix
// products through at::mm (BLAS). fp16/bf16 inputs are computed in fp32 and rounded once at the end.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv2d_args.h"
#include "../conv2d_im2col_plan.h"

namespace fastconv {
namespace {

// col[m, (c, r, s)] for rows m = (n - n0, p, q), from a contiguous NCHW activation.
template <typename scalar_t>
void im2col_cpu(const Conv2dProblem& pb, const scalar_t* x, int64_t n0, int64_t images, scalar_t* col) {
  const int64_t CRS = pb.C * pb.R * pb.S, PQ = pb.P * pb.Q, HW = pb.H * pb.W;
  at::parallel_for(0, images * PQ, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = n0 + m / PQ, p = (m % PQ) / pb.Q, q = m % pb.Q;
      scalar_t* row = col + m * CRS;
      for (int64_t c = 0; c < pb.C; ++c) {
        const scalar_t* plane = x + (n * pb.C + c) * HW;
        for (int64_t r = 0; r < pb.R; ++r) {
          const int64_t h = pb.input_row(p, r);
          for (int64_t s = 0; s < pb.S; ++s) {
            const int64_t w = pb.input_col(q, s);
            const bool inside = h >= 0 && h < pb.H && w >= 0 && w < pb.W;
            row[(c * pb.R + r) * pb.S + s] = inside ? plane[h * pb.W + w] : scalar_t(0);
          }
        }
      }
    }
  });
}

// dx[n, c] (contiguous NCHW) = sum of the col entries copied from each element: gathered per plane.
template <typename scalar_t>
void col2im_cpu(const Conv2dProblem& pb, const scalar_t* col, int64_t n0, int64_t images, scalar_t* dx) {
  const int64_t CRS = pb.C * pb.R * pb.S, PQ = pb.P * pb.Q, HW = pb.H * pb.W;
  at::parallel_for(0, images * pb.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / pb.C, c = plane % pb.C;
      scalar_t* out = dx + ((n0 + n) * pb.C + c) * HW;
      for (int64_t h = 0; h < pb.H; ++h) {
        for (int64_t w = 0; w < pb.W; ++w) {
          scalar_t acc = 0;
          for (int64_t r = 0; r < pb.R; ++r) {
            const int64_t p = pb.output_row(h, r);
            if (p < 0) continue;
            for (int64_t s = 0; s < pb.S; ++s) {
              const int64_t q = pb.output_col(w, s);
              if (q >= 0) acc += col[(n * PQ + p * pb.Q + q) * CRS + (c * pb.R + r) * pb.S + s];
            }
          }
          out[h * pb.W + w] = acc;
        }
      }
    }
  });
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The op's result in `dtype` and `format`, never a view of a temporary: when the conversion and the layout
// change are both no-ops (a 1x1 output, fp32) `.to().contiguous()` would hand back a view, and an op's
// output must not be one (autograd would refuse in-place updates of it).
at::Tensor owned_result(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
  return as_owned(t.to(dtype).contiguous(format));
}

// A (N, C, H, W) tensor as the (N * H * W) x C matrix of its pixels.
at::Tensor pixel_matrix(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

at::Tensor im2col_chunk(const Conv2dProblem& pb, const at::Tensor& x, int64_t n0, int64_t images, at::Tensor& buffer) {
  at::Tensor col = buffer.narrow(0, 0, images * pb.P * pb.Q);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "im2col_cpu", [&] {
    im2col_cpu<scalar_t>(pb, x.const_data_ptr<scalar_t>(), n0, images, col.mutable_data_ptr<scalar_t>());
  });
  return col;
}

at::Tensor conv2d_im2col_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             int64_t workspace_bytes, bool relu) {
  const char* op = "fastconv::conv2d_im2col";
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CPU, {{"input", &input}, {"weight", &weight}, {"bias", b}});
  const Conv2dProblem pb = check_conv2d_fprop(op, input, weight, bias, stride, padding, dilation, groups);
  const int64_t chunk = check_im2col_workspace(op, pb, input.scalar_type(), workspace_bytes);
  const auto format = conv2d_output_format(input, weight);
  if (pb.N * pb.K == 0) return at::empty({pb.N, pb.K, pb.P, pb.Q}, input.options().memory_format(format));
  const auto ct = compute_type(input.scalar_type());
  const int64_t Kg = pb.K_per_group(), CgRS = pb.C_per_group() * pb.R * pb.S, PQ = pb.P * pb.Q;
  const at::Tensor x = input.to(ct).contiguous();
  const at::Tensor w = weight.to(ct).reshape({pb.K, CgRS});
  at::Tensor y = at::empty({pb.N * PQ, pb.K}, x.options());  // (n, p, q) x k
  const bool pointwise = im2col_is_pointwise(pb);
  at::Tensor buffer = pointwise ? at::Tensor() : at::empty({chunk * PQ, pb.C * pb.R * pb.S}, x.options());
  for (int64_t n0 = 0; n0 < pb.N; n0 += chunk) {
    const int64_t images = std::min(chunk, pb.N - n0);
    const at::Tensor col = pointwise ? pixel_matrix(x.narrow(0, n0, images)) : im2col_chunk(pb, x, n0, images, buffer);
    at::Tensor y_rows = y.narrow(0, n0 * PQ, images * PQ);
    for (int64_t g = 0; g < pb.groups; ++g)
      y_rows.narrow(1, g * Kg, Kg).copy_(at::mm(col.narrow(1, g * CgRS, CgRS), w.narrow(0, g * Kg, Kg).t()));
  }
  if (b) y.add_(b->to(ct));
  if (relu) y.clamp_min_(0);  // the epilogue's ReLU, before the one rounding (NaN passes)
  return owned_result(y.view({pb.N, pb.P, pb.Q, pb.K}).permute({0, 3, 1, 2}), input.scalar_type(), format);
}

at::Tensor conv2d_im2col_dgrad_cpu(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, int64_t workspace_bytes) {
  const char* op = "fastconv::conv2d_im2col_dgrad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"weight", &weight}});
  const Conv2dProblem pb = check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups);
  const int64_t chunk = check_im2col_workspace(op, pb, grad_output.scalar_type(), workspace_bytes);
  const auto format = conv2d_output_format(grad_output, weight);
  if (pb.N * pb.C == 0) return at::empty(input_size, grad_output.options().memory_format(format));
  const auto ct = compute_type(grad_output.scalar_type());
  const int64_t Kg = pb.K_per_group(), CgRS = pb.C_per_group() * pb.R * pb.S, PQ = pb.P * pb.Q;
  const at::Tensor dy = pixel_matrix(grad_output.to(ct));  // (n, p, q) x k
  const at::Tensor w = weight.to(ct).reshape({pb.K, CgRS});
  at::Tensor dx;
  if (im2col_is_pointwise(pb)) {  // dcol is dx's pixel matrix
    at::Tensor dx_rows = at::empty({pb.N * PQ, pb.C}, dy.options());
    for (int64_t g = 0; g < pb.groups; ++g)
      dx_rows.narrow(1, g * CgRS, CgRS).copy_(at::mm(dy.narrow(1, g * Kg, Kg), w.narrow(0, g * Kg, Kg)));
    dx = dx_rows.view({pb.N, pb.H, pb.W, pb.C}).permute({0, 3, 1, 2});
  } else {
    dx = at::empty(input_size, dy.options());
    at::Tensor dcol = at::empty({chunk * PQ, pb.C * pb.R * pb.S}, dy.options());
    for (int64_t n0 = 0; n0 < pb.N; n0 += chunk) {
      const int64_t images = std::min(chunk, pb.N - n0);
      at::Tensor rows = dcol.narrow(0, 0, images * PQ);
      const at::Tensor dy_rows = dy.narrow(0, n0 * PQ, images * PQ);
      for (int64_t g = 0; g < pb.groups; ++g)
        rows.narrow(1, g * CgRS, CgRS).copy_(at::mm(dy_rows.narrow(1, g * Kg, Kg), w.narrow(0, g * Kg, Kg)));
      AT_DISPATCH_FLOATING_TYPES(ct, "col2im_cpu", [&] {
        col2im_cpu<scalar_t>(pb, rows.const_data_ptr<scalar_t>(), n0, images, dx.mutable_data_ptr<scalar_t>());
      });
    }
  }
  return owned_result(dx, grad_output.scalar_type(), format);
}

at::Tensor conv2d_im2col_wgrad_cpu(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, int64_t workspace_bytes) {
  const char* op = "fastconv::conv2d_im2col_wgrad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"input", &input}});
  const Conv2dProblem pb = check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups);
  const int64_t chunk = check_im2col_workspace(op, pb, input.scalar_type(), workspace_bytes);
  const auto ct = compute_type(grad_output.scalar_type());
  const int64_t Kg = pb.K_per_group(), CgRS = pb.C_per_group() * pb.R * pb.S, PQ = pb.P * pb.Q;
  at::Tensor dw = at::zeros({pb.K, CgRS}, grad_output.options().dtype(ct));
  if (dw.numel() > 0 && pb.N > 0) {
    const at::Tensor dy = pixel_matrix(grad_output.to(ct));
    const at::Tensor x = input.to(ct).contiguous();
    const bool pointwise = im2col_is_pointwise(pb);
    at::Tensor buffer = pointwise ? at::Tensor() : at::empty({chunk * PQ, pb.C * pb.R * pb.S}, x.options());
    for (int64_t n0 = 0; n0 < pb.N; n0 += chunk) {  // chunks summed in a fixed order
      const int64_t images = std::min(chunk, pb.N - n0);
      const at::Tensor col = pointwise ? pixel_matrix(x.narrow(0, n0, images)) : im2col_chunk(pb, x, n0, images, buffer);
      const at::Tensor dy_rows = dy.narrow(0, n0 * PQ, images * PQ);
      for (int64_t g = 0; g < pb.groups; ++g)
        dw.narrow(0, g * Kg, Kg).add_(at::mm(dy_rows.narrow(1, g * Kg, Kg).t(), col.narrow(1, g * CgRS, CgRS)));
    }
  }
  return owned_result(dw.view(weight_size), grad_output.scalar_type(), conv2d_output_format(grad_output, input));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d_im2col", &conv2d_im2col_cpu);
  m.impl("conv2d_im2col_dgrad", &conv2d_im2col_dgrad_cpu);
  m.impl("conv2d_im2col_wgrad", &conv2d_im2col_wgrad_cpu);
}

}  // namespace fastconv
