// CPU twin of max pooling. Forward: each output scans its window (rows outer, columns inner, as torch
// does) and keeps the first maximum, or the last NaN (NaN propagates, as in torch), recording the flat
// h * W + w index in its plane; padding never wins (it acts as -inf; a window wholly in the padding gives -inf and
// torch's index, Conv2dProblem::pool_empty_window_index). Backward gathers: each input
// element sums the gradients of the windows whose recorded index is its own, so no two tasks write one
// element and the result does not depend on the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../max_pool2d_args.h"

namespace fastconv {
namespace {

template <typename scalar_t>
void max_pool2d_cpu_kernel(const Conv2dProblem& pb, const scalar_t* x, scalar_t* y, int64_t* indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = pb.H * pb.W, PQ = pb.P * pb.Q;
  at::parallel_for(0, pb.N * pb.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* x_plane = x + plane * HW;
      for (int64_t p = 0; p < pb.P; ++p) {
        for (int64_t q = 0; q < pb.Q; ++q) {
          int64_t best = -1;
          acc_t best_val = -std::numeric_limits<acc_t>::infinity();
          int64_t r_begin, r_end, s_begin, s_end;  // the taps inside x
          pb.taps_inside_rows(p, &r_begin, &r_end);
          pb.taps_inside_cols(q, &s_begin, &s_end);
          for (int64_t r = r_begin; r < r_end; ++r) {
            const int64_t h = pb.input_row(p, r);
            for (int64_t s = s_begin; s < s_end; ++s) {
              const int64_t w = pb.input_col(q, s);
              const acc_t v = static_cast<acc_t>(x_plane[h * pb.W + w]);
              if (best < 0 || v > best_val || std::isnan(v)) {
                best_val = v;
                best = h * pb.W + w;
              }
            }
          }
          const int64_t o = plane * PQ + p * pb.Q + q;
          y[o] = best >= 0 ? x_plane[best] : static_cast<scalar_t>(-std::numeric_limits<acc_t>::infinity());
          indices[o] = best >= 0 ? best : pb.pool_empty_window_index(p, q);
        }
      }
    }
  });
}

template <typename scalar_t>
void max_pool2d_backward_cpu_kernel(const Conv2dProblem& pb, const scalar_t* dy, const int64_t* indices,
                                    scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = pb.H * pb.W, PQ = pb.P * pb.Q;
  at::parallel_for(0, pb.N * pb.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* dy_plane = dy + plane * PQ;
      const int64_t* idx_plane = indices + plane * PQ;
      for (int64_t h = 0; h < pb.H; ++h) {
        for (int64_t w = 0; w < pb.W; ++w) {
          acc_t acc = 0;
          int64_t r_begin, r_end, s_begin, s_end;  // the taps through which some window can reach (h, w)
          pb.taps_reaching_row(h, &r_begin, &r_end);
          pb.taps_reaching_col(w, &s_begin, &s_end);
          for (int64_t r = r_begin; r < r_end; ++r) {
            const int64_t p = pb.output_row(h, r);
            if (p < 0) continue;
            for (int64_t s = s_begin; s < s_end; ++s) {
              const int64_t q = pb.output_col(w, s);
              if (q >= 0 && idx_plane[p * pb.Q + q] == h * pb.W + w) acc += static_cast<acc_t>(dy_plane[p * pb.Q + q]);
            }
          }
          dx[plane * HW + h * pb.W + w] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "fastconv::max_pool2d";
  check_devices(op, c10::DeviceType::CPU, {{"input", &input}});
  const Conv2dProblem pb = check_max_pool2d(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  at::Tensor y = at::empty({pb.N, pb.C, pb.P, pb.Q}, input.options());
  at::Tensor indices = at::empty({pb.N, pb.C, pb.P, pb.Q}, input.options().dtype(at::kLong));
  if (y.numel() > 0) {
    const at::Tensor x = input.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cpu", [&] {
      max_pool2d_cpu_kernel<scalar_t>(pb, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                      indices.mutable_data_ptr<int64_t>());
    });
  }
  const auto format = input.suggest_memory_format();
  return {y.contiguous(format), indices.contiguous(format)};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                   at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastconv::max_pool2d_backward";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"indices", &indices}});
  const Conv2dProblem pb =
      check_max_pool2d_backward(op, grad_output, indices, input_size, kernel_size, stride, padding, dilation);
  at::Tensor dx = at::empty(input_size, grad_output.options());
  if (dx.numel() > 0) {
    const at::Tensor dy = grad_output.contiguous(), idx = indices.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "max_pool2d_backward_cpu", [&] {
      max_pool2d_backward_cpu_kernel<scalar_t>(pb, dy.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                               dx.mutable_data_ptr<scalar_t>());
    });
  }
  return dx.contiguous(grad_output.suggest_memory_format());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace fastconv
