// CPU twin of the implicit-GEMM convolution: the same three GEMMs over the same gathered operands as the
// CUDA kernels (csrc/implicit_gemm_problem.h), on channels-last activations and KRSC filters, every gathered
// element located by the shared functions (fprop_gather_offset, dgrad_gather_offset). Each output element
// is one dot product in the accumulation type (fp32 for fp16/bf16/fp32, fp64 for fp64), then the fused
// epilogue and one rounding. No tiling (the GPU's business), but the GPU's operands: the twin computes on
// what ../implicit_gemm_operands.h prepares for the kernels (channels padded to the vector width, dgrad's
// filter transposed), so the CPU tests check that preparation as well as the index math.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../conv2d_args.h"
#include "../conv2d_dgrad_phases.h"
#include "../implicit_gemm_operands.h"
#include "../implicit_gemm_problem.h"

namespace fastconv {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + t.numel());
}

template <typename scalar_t>
void fprop_cpu(const Conv2dProblem& pb, const scalar_t* x, const at::Tensor& w_krsc, const scalar_t* scale,
               const scalar_t* shift, const scalar_t* residual, bool relu, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), Kred = pb.R * pb.S * Cg;
  const std::vector<acc_t> w = to_acc<scalar_t>(w_krsc);
  at::parallel_for(0, pb.N * pb.P * pb.Q, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(Kred);  // one gathered row of A
    for (int64_t m = begin; m < end; ++m) {
      const Pixel px = split_pixel(m, pb.P, pb.Q);
      for (int64_t g = 0; g < pb.groups; ++g) {
        for (int64_t r = 0; r < pb.R; ++r)
          for (int64_t s = 0; s < pb.S; ++s) {
            const int64_t offset = fprop_gather_offset(pb, px, r, s, g * Cg);
            acc_t* row = a.data() + (r * pb.S + s) * Cg;
            for (int64_t c = 0; c < Cg; ++c) row[c] = offset < 0 ? acc_t(0) : acc_t(x[offset + c]);
          }
        for (int64_t n = 0; n < Kg; ++n) {
          const int64_t ch = g * Kg + n;
          const acc_t* b = w.data() + ch * Kred;
          acc_t v = 0;
          for (int64_t k = 0; k < Kred; ++k) v += a[k] * b[k];
          if (scale) v *= acc_t(scale[ch]);
          if (shift) v += acc_t(shift[ch]);
          if (residual) v += acc_t(residual[m * pb.K + ch]);
          if (relu && v < 0) v = 0;  // NaN passes, as torch's relu
          y[m * pb.K + ch] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

// wt_gcrsk: B, the filter transposed per group, wt[g][c][(r, s, k)] = w[g * Kg + k][(r, s, c)]
template <typename scalar_t>
void dgrad_cpu(const Conv2dProblem& pb, const scalar_t* dy, const at::Tensor& wt_gcrsk, scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), RS = pb.R * pb.S, Kred = RS * Kg;
  const std::vector<acc_t> wt = to_acc<scalar_t>(wt_gcrsk);
  at::parallel_for(0, pb.N * pb.H * pb.W, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(Kred);
    for (int64_t m = begin; m < end; ++m) {
      const Pixel px = split_pixel(m, pb.H, pb.W);
      for (int64_t g = 0; g < pb.groups; ++g) {
        for (int64_t r = 0; r < pb.R; ++r)
          for (int64_t s = 0; s < pb.S; ++s) {
            const int64_t offset = dgrad_gather_offset(pb, px, r, s, g * Kg);
            acc_t* row = a.data() + (r * pb.S + s) * Kg;
            for (int64_t k = 0; k < Kg; ++k) row[k] = offset < 0 ? acc_t(0) : acc_t(dy[offset + k]);
          }
        for (int64_t n = 0; n < Cg; ++n) {
          const acc_t* b = wt.data() + (g * Cg + n) * Kred;
          acc_t v = 0;
          for (int64_t k = 0; k < Kred; ++k) v += a[k] * b[k];
          dx[m * pb.C + g * Cg + n] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

template <typename scalar_t>
void wgrad_cpu(const Conv2dProblem& pb, const scalar_t* dy, const scalar_t* x, scalar_t* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), Ncols = pb.R * pb.S * Cg;
  const int64_t pixels = pb.N * pb.P * pb.Q;
  // one filter row (output channel) per task: its sum over pixels runs in a fixed order whatever the threads
  at::parallel_for(0, pb.K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(Ncols);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / Kg;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < pixels; ++k) {
        const acc_t a = acc_t(dy[k * pb.K + row]);
        const Pixel px = split_pixel(k, pb.P, pb.Q);
        for (int64_t r = 0; r < pb.R; ++r)
          for (int64_t s = 0; s < pb.S; ++s) {
            const int64_t offset = fprop_gather_offset(pb, px, r, s, g * Cg);
            if (offset < 0) continue;  // padding: B is zero there
            acc_t* out = acc.data() + (r * pb.S + s) * Cg;
            for (int64_t c = 0; c < Cg; ++c) out[c] += a * acc_t(x[offset + c]);
          }
      }
      for (int64_t j = 0; j < Ncols; ++j) dw[row * Ncols + j] = static_cast<scalar_t>(acc[j]);
    }
  });
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

at::Tensor fused_cpu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                     const c10::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, int64_t tile, bool relu, bool shift_is_bias) {
  const Conv2dProblem pb = check_conv2d_implicit_gemm_fprop(op, c10::DeviceType::CPU, input, weight, scale, shift,
                                                            residual, stride, padding, dilation, groups, tile,
                                                            shift_is_bias);
  at::Tensor y = at::empty({pb.N, pb.P, pb.Q, pb.K}, input.options());
  if (y.numel() > 0) {
    const ImplicitGemmFpropOperands ops = implicit_gemm_fprop_operands(pb, input, weight);
    const at::Tensor sc = scale ? scale->contiguous() : at::Tensor(), sh = shift ? shift->contiguous() : at::Tensor();
    const at::Tensor res = residual ? dense_nhwc(*residual) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_implicit_gemm_cpu", [&] {
      fprop_cpu<scalar_t>(ops.pb, ops.x.const_data_ptr<scalar_t>(), ops.w, data_or_null<scalar_t>(sc), data_or_null<scalar_t>(sh),
                          data_or_null<scalar_t>(res), relu, y.mutable_data_ptr<scalar_t>());
    });
  }
  return conv2d_output_from_nhwc(y, conv2d_output_format(input, weight));
}

at::Tensor conv2d_implicit_gemm_cpu(const at::Tensor& input, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t tile,
                                    bool relu) {
  return fused_cpu("fastconv::conv2d_implicit_gemm", input, weight, c10::nullopt, bias, c10::nullopt, stride, padding,
                   dilation, groups, tile, relu, /*shift_is_bias=*/true);
}

at::Tensor conv2d_implicit_gemm_fused_cpu(const at::Tensor& input, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& scale,
                                          const c10::optional<at::Tensor>& shift,
                                          const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                          int64_t tile, bool relu) {
  return fused_cpu("fastconv::conv2d_implicit_gemm_fused", input, weight, scale, shift, residual, stride, padding,
                   dilation, groups, tile, relu, /*shift_is_bias=*/false);
}

at::Tensor conv2d_implicit_gemm_dgrad_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                          at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, int64_t groups, int64_t tile) {
  const char* op = "fastconv::conv2d_implicit_gemm_dgrad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"weight", &weight}});
  const Conv2dProblem pb = check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups);
  check_implicit_gemm_tile(op, tile);
  at::Tensor dx = at::empty({pb.N, pb.H, pb.W, pb.C}, grad_output.options());
  const auto format = conv2d_output_format(grad_output, weight);
  if (dx.numel() == 0) return conv2d_output_from_nhwc(dx, format);
  if (dgrad_by_phases_applies(pb)) {  // as the CUDA wrapper: one stride-1 fprop per phase
    dgrad_by_phases(pb, grad_output.permute({0, 2, 3, 1}), weight, dx, [&](const at::Tensor& x, const at::Tensor& w) {
      return fused_cpu(op, x, w, c10::nullopt, c10::nullopt, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, pb.groups, tile,
                       false, /*shift_is_bias=*/true);
    });
  } else {
    const ImplicitGemmDgradOperands ops = implicit_gemm_dgrad_operands(pb, grad_output, weight);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "conv2d_implicit_gemm_dgrad_cpu",
                                    [&] {
                                      dgrad_cpu<scalar_t>(ops.pb, ops.dy.const_data_ptr<scalar_t>(), ops.wt,
                                                          dx.mutable_data_ptr<scalar_t>());
                                    });
  }
  return conv2d_output_from_nhwc(dx, format);
}

at::Tensor conv2d_implicit_gemm_wgrad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                          at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, int64_t groups, int64_t tile) {
  const char* op = "fastconv::conv2d_implicit_gemm_wgrad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"input", &input}});
  const Conv2dProblem pb = check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups);
  check_implicit_gemm_tile(op, tile);
  at::Tensor dw = at::empty({pb.K, pb.R, pb.S, pb.C_per_group()}, grad_output.options());  // KRSC
  if (dw.numel() > 0) {
    const ImplicitGemmWgradOperands ops = implicit_gemm_wgrad_operands(pb, grad_output, input);
    at::Tensor dw_padded = at::empty({ops.pb.K, pb.R, pb.S, ops.pb.C_per_group()}, grad_output.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "conv2d_implicit_gemm_wgrad_cpu",
                                    [&] {
                                      wgrad_cpu<scalar_t>(ops.pb, ops.dy.const_data_ptr<scalar_t>(),
                                                          ops.x.const_data_ptr<scalar_t>(),
                                                          dw_padded.mutable_data_ptr<scalar_t>());
                                    });
    dw = implicit_gemm_unpad_wgrad(dw_padded, pb, ops.pb);
  }
  return conv2d_output_from_nhwc(dw, conv2d_output_format(grad_output, input));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d_implicit_gemm", &conv2d_implicit_gemm_cpu);
  m.impl("conv2d_implicit_gemm_dgrad", &conv2d_implicit_gemm_dgrad_cpu);
  m.impl("conv2d_implicit_gemm_wgrad", &conv2d_implicit_gemm_wgrad_cpu);
  m.impl("conv2d_implicit_gemm_fused", &conv2d_implicit_gemm_fused_cpu);
}

}  // namespace fastconv
