// CPU twin of the residual add and its backward (see csrc/cuda/residual_add_kernel.cu for the formula),
// one (image, channel) plane per task on contiguous NCHW copies; fp32 (fp64) arithmetic, one rounding.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../residual_add_args.h"

namespace fastconv {
namespace {

template <typename scalar_t>
void residual_add_cpu_kernel(const ResidualAddShape& sh, const scalar_t* r, const scalar_t* s, scalar_t* out,
                             bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t PQ = sh.P * sh.Q, HW = sh.H * sh.W;
  at::parallel_for(0, sh.N * sh.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / sh.C, j = plane % sh.C;
      const scalar_t* s_plane = j < sh.J ? s + (n * sh.J + j) * HW : nullptr;
      for (int64_t p = 0; p < sh.P; ++p) {
        for (int64_t q = 0; q < sh.Q; ++q) {
          acc_t v = static_cast<acc_t>(r[plane * PQ + p * sh.Q + q]);
          // (the padded channels add a zero too, as torch's r + pad(s) does: -0.0 becomes +0.0)
          v += s_plane ? static_cast<acc_t>(s_plane[p * sh.stride * sh.W + q * sh.stride]) : acc_t(0);
          out[plane * PQ + p * sh.Q + q] = static_cast<scalar_t>(relu && v < 0 ? acc_t(0) : v);  // NaN passes, as torch's
        }
      }
    }
  });
}

template <typename scalar_t>
void residual_add_backward_cpu_kernel(const ResidualAddShape& sh, const scalar_t* g, const scalar_t* out,
                                      scalar_t* gr, scalar_t* gs) {
  const int64_t PQ = sh.P * sh.Q, HW = sh.H * sh.W;
  at::parallel_for(0, sh.N * sh.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      for (int64_t i = 0; i < PQ; ++i) {
        const int64_t o = plane * PQ + i;
        gr[o] = (out != nullptr && static_cast<float>(out[o]) <= 0) ? scalar_t(0) : g[o];  // torch's ReLU mask
      }
      const int64_t n = plane / sh.C, j = plane % sh.C;
      if (j >= sh.J) continue;
      scalar_t* gs_plane = gs + (n * sh.J + j) * HW;
      for (int64_t i = 0; i < HW; ++i) gs_plane[i] = scalar_t(0);
      for (int64_t p = 0; p < sh.P; ++p)
        for (int64_t q = 0; q < sh.Q; ++q) gs_plane[p * sh.stride * sh.W + q * sh.stride] = gr[plane * PQ + p * sh.Q + q];
    }
  });
}

at::Tensor residual_add_cpu(const at::Tensor& residual, const at::Tensor& shortcut, int64_t stride, bool relu) {
  const char* op = "fastconv::residual_add";
  check_devices(op, c10::DeviceType::CPU, {{"residual", &residual}, {"shortcut", &shortcut}});
  const ResidualAddShape sh = check_residual_add(op, residual, shortcut, stride);
  at::Tensor out = at::empty({sh.N, sh.C, sh.P, sh.Q}, residual.options());
  if (out.numel() > 0) {
    const at::Tensor r = residual.contiguous(), s = shortcut.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "residual_add_cpu", [&] {
      residual_add_cpu_kernel<scalar_t>(sh, r.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                        out.mutable_data_ptr<scalar_t>(), relu);
    });
  }
  return out.contiguous(residual.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor> residual_add_backward_cpu(const at::Tensor& grad_output,
                                                             const c10::optional<at::Tensor>& output,
                                                             at::IntArrayRef shortcut_size, int64_t stride) {
  const char* op = "fastconv::residual_add_backward";
  const at::Tensor* out = output.has_value() ? &*output : nullptr;
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}, {"output", out}});
  const ResidualAddShape sh = check_residual_add_backward(op, grad_output, out, shortcut_size, stride);
  at::Tensor gr = at::empty_like(grad_output, at::MemoryFormat::Contiguous);
  at::Tensor gs = at::empty(shortcut_size, grad_output.options());
  if (gr.numel() > 0 || gs.numel() > 0) {
    const at::Tensor g = grad_output.contiguous();
    const at::Tensor o = out ? out->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "residual_add_backward_cpu", [&] {
      residual_add_backward_cpu_kernel<scalar_t>(sh, g.const_data_ptr<scalar_t>(),
                                                 out ? o.const_data_ptr<scalar_t>() : nullptr,
                                                 gr.mutable_data_ptr<scalar_t>(), gs.mutable_data_ptr<scalar_t>());
    });
  }
  const auto format = grad_output.suggest_memory_format();
  return {gr.contiguous(format), gs.contiguous(format)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("residual_add", &residual_add_cpu);
  m.impl("residual_add_backward", &residual_add_backward_cpu);
}

}  // namespace fastconv
