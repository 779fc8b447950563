// CPU twin of the direct convolution: fprop, dgrad and wgrad as plain loops over the index math of
// conv2d_problem.h (the same functions the CUDA kernels call). Work is split over (image, channel) planes
// with at::parallel_for; each plane accumulates in a private buffer (float for fp16/bf16/fp32, double for
// fp64), so results do not depend on the thread count. Inputs are read as contiguous NCHW; the output is
// returned in the memory format torch's own conv2d would give.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../conv2d_args.h"

namespace fastconv {
namespace {

// y[n, k] = bias[k] + sum over c, r, s of w[k, c, r, s] * x[n, group(k) * Cg + c, input_row(p, r), input_col(q, s)]
template <typename scalar_t>
void fprop_cpu(const Conv2dProblem& pb, const scalar_t* x, const scalar_t* w, const scalar_t* bias, bool relu,
               scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), PQ = pb.P * pb.Q, HW = pb.H * pb.W;
  at::parallel_for(0, pb.N * pb.K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(PQ);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / pb.K, k = nk % pb.K, g = k / Kg;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c = 0; c < Cg; ++c) {
        const scalar_t* x_plane = x + (n * pb.C + g * Cg + c) * HW;
        const scalar_t* w_taps = w + (k * Cg + c) * pb.R * pb.S;
        for (int64_t r = 0; r < pb.R; ++r) {
          int64_t p0, p1;
          pb.valid_output_rows(r, &p0, &p1);
          for (int64_t s = 0; s < pb.S; ++s) {
            int64_t q0, q1;
            pb.valid_output_cols(s, &q0, &q1);
            const acc_t wv = static_cast<acc_t>(w_taps[r * pb.S + s]);
            for (int64_t p = p0; p < p1; ++p) {
              const scalar_t* x_row = x_plane + pb.input_row(p, r) * pb.W;
              acc_t* acc_row = acc.data() + p * pb.Q;
              for (int64_t q = q0; q < q1; ++q) acc_row[q] += wv * static_cast<acc_t>(x_row[pb.input_col(q, s)]);
            }
          }
        }
      }
      const acc_t b = bias ? static_cast<acc_t>(bias[k]) : acc_t(0);
      scalar_t* y_plane = y + nk * PQ;
      for (int64_t i = 0; i < PQ; ++i) {
        const acc_t v = acc[i] + b;
        y_plane[i] = static_cast<scalar_t>(relu && v < acc_t(0) ? acc_t(0) : v);  // NaN passes, as torch's relu
      }
    }
  });
}

// dx[n, c] = sum over the group's k and taps r, s of w[k, c % Cg, r, s] * dy[n, k, p, q], where (p, q) are
// the output positions that read (h, w) through tap (r, s): a scatter over valid (p, q), one plane per task.
template <typename scalar_t>
void dgrad_cpu(const Conv2dProblem& pb, const scalar_t* dy, const scalar_t* w, scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), PQ = pb.P * pb.Q, HW = pb.H * pb.W;
  at::parallel_for(0, pb.N * pb.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HW);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / pb.C, c = nc % pb.C, g = c / Cg, cg = c % Cg;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t kk = 0; kk < Kg; ++kk) {
        const int64_t k = g * Kg + kk;
        const scalar_t* dy_plane = dy + (n * pb.K + k) * PQ;
        const scalar_t* w_taps = w + (k * Cg + cg) * pb.R * pb.S;
        for (int64_t r = 0; r < pb.R; ++r) {
          int64_t p0, p1;
          pb.valid_output_rows(r, &p0, &p1);
          for (int64_t s = 0; s < pb.S; ++s) {
            int64_t q0, q1;
            pb.valid_output_cols(s, &q0, &q1);
            const acc_t wv = static_cast<acc_t>(w_taps[r * pb.S + s]);
            for (int64_t p = p0; p < p1; ++p) {
              acc_t* acc_row = acc.data() + pb.input_row(p, r) * pb.W;
              const scalar_t* dy_row = dy_plane + p * pb.Q;
              for (int64_t q = q0; q < q1; ++q) acc_row[pb.input_col(q, s)] += wv * static_cast<acc_t>(dy_row[q]);
            }
          }
        }
      }
      scalar_t* dx_plane = dx + nc * HW;
      for (int64_t i = 0; i < HW; ++i) dx_plane[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

// dw[k, c, r, s] = sum over n, p, q of dy[n, k, p, q] * x[n, group(k) * Cg + c, input_row(p, r), input_col(q, s)]
template <typename scalar_t>
void wgrad_cpu(const Conv2dProblem& pb, const scalar_t* dy, const scalar_t* x, scalar_t* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.C_per_group(), Kg = pb.K_per_group(), PQ = pb.P * pb.Q, HW = pb.H * pb.W;
  at::parallel_for(0, pb.K * Cg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / Cg, cg = kc % Cg, c = (k / Kg) * Cg + cg;
      for (int64_t r = 0; r < pb.R; ++r) {
        int64_t p0, p1;
        pb.valid_output_rows(r, &p0, &p1);
        for (int64_t s = 0; s < pb.S; ++s) {
          int64_t q0, q1;
          pb.valid_output_cols(s, &q0, &q1);
          acc_t acc = 0;
          for (int64_t n = 0; n < pb.N; ++n) {
            const scalar_t* dy_plane = dy + (n * pb.K + k) * PQ;
            const scalar_t* x_plane = x + (n * pb.C + c) * HW;
            for (int64_t p = p0; p < p1; ++p) {
              const scalar_t* x_row = x_plane + pb.input_row(p, r) * pb.W;
              const scalar_t* dy_row = dy_plane + p * pb.Q;
              for (int64_t q = q0; q < q1; ++q)
                acc += static_cast<acc_t>(dy_row[q]) * static_cast<acc_t>(x_row[pb.input_col(q, s)]);
            }
          }
          dw[(kc * pb.R + r) * pb.S + s] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

at::Tensor conv2d_direct_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups, bool relu) {
  const char* op = "fastconv::conv2d_direct";
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CPU, {{"input", &input}, {"weight", &weight}, {"bias", b}});
  const Conv2dProblem pb = check_conv2d_fprop(op, input, weight, bias, stride, padding, dilation, groups);
  at::Tensor y = at::empty({pb.N, pb.K, pb.P, pb.Q}, input.options());
  if (y.numel() > 0) {
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    const at::Tensor bc = b ? b->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_direct_cpu", [&] {
      fprop_cpu<scalar_t>(pb, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                          b ? bc.const_data_ptr<scalar_t>() : nullptr, relu, y.mutable_data_ptr<scalar_t>());
    });
  }
  return y.contiguous(conv2d_output_format(input, weight));
}

at::Tensor conv2d_direct_dgrad_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                   at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups) {
  const char* op = "fastconv::conv2d_direct_dgrad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"weight", &weight}});
  const Conv2dProblem pb =
      check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups);
  at::Tensor dx = at::empty({pb.N, pb.C, pb.H, pb.W}, grad_output.options());
  if (dx.numel() > 0) {
    const at::Tensor dy = grad_output.contiguous(), w = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "conv2d_direct_dgrad_cpu", [&] {
      dgrad_cpu<scalar_t>(pb, dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                          dx.mutable_data_ptr<scalar_t>());
    });
  }
  return dx.contiguous(conv2d_output_format(grad_output, weight));
}

at::Tensor conv2d_direct_wgrad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                   at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups) {
  const char* op = "fastconv::conv2d_direct_wgrad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"input", &input}});
  const Conv2dProblem pb =
      check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups);
  at::Tensor dw = at::empty(weight_size, grad_output.options());
  if (dw.numel() > 0) {
    const at::Tensor dy = grad_output.contiguous(), x = input.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "conv2d_direct_wgrad_cpu", [&] {
      wgrad_cpu<scalar_t>(pb, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                          dw.mutable_data_ptr<scalar_t>());
    });
  }
  return dw.contiguous(conv2d_output_format(grad_output, input));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d_direct", &conv2d_direct_cpu);
  m.impl("conv2d_direct_dgrad", &conv2d_direct_dgrad_cpu);
  m.impl("conv2d_direct_wgrad", &conv2d_direct_wgrad_cpu);
}

}  // namespace fastconv
