// CPU twin of the training-mode BatchNorm (+ ReLU) kernels (csrc/cuda/batch_norm_relu_kernel.cu and
// batch_norm_relu_backward_kernel.cu), on contiguous NCHW copies, one channel per task: Welford's
// single-pass statistics, the normalise + affine + ReLU, the backward's two per-channel sums and the
// input-gradient formula, all with the shared arithmetic of csrc/batch_norm_math.h. Statistics and sums
// are accumulated in float64, elementwise math runs in fp32 (fp64 for float64 input).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"

namespace fastconv {
namespace {

template <typename scalar_t, typename stat_t>
void forward_cpu(int64_t N, int64_t C, int64_t HW, const scalar_t* x, const stat_t* gamma, const stat_t* beta,
                 stat_t eps, bool relu, scalar_t* y, stat_t* mean, stat_t* var) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Welford<double> stats{0, 0, 0};
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* plane = x + (n * C + c) * HW;
        for (int64_t i = 0; i < HW; ++i) stats.add(static_cast<double>(plane[i]));
      }
      mean[c] = static_cast<stat_t>(stats.mean);
      var[c] = static_cast<stat_t>(stats.var());
      const BatchNormChannel<stat_t> a = batch_norm_channel(mean, var, gamma, beta, eps, c);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const stat_t z = batch_norm_affine<stat_t>(static_cast<stat_t>(x[o + i]), a.mean, a.scale, a.shift);
          y[o + i] = static_cast<scalar_t>(relu && z < stat_t(0) ? stat_t(0) : z);  // NaN passes
        }
      }
    }
  });
}

// g = dy where the forward's ReLU passed: blocked where its output, rounded to the dtype as the forward
// stored it, is <= 0 (torch's threshold_backward rule: a NaN output passes).
template <typename scalar_t, typename stat_t>
stat_t masked_grad(scalar_t dy, scalar_t x, const BatchNormChannel<stat_t>& a, bool relu) {
  if (relu) {
    const stat_t z = batch_norm_affine<stat_t>(static_cast<stat_t>(x), a.mean, a.scale, a.shift);
    if (static_cast<stat_t>(static_cast<scalar_t>(z)) <= stat_t(0)) return stat_t(0);
  }
  return static_cast<stat_t>(dy);
}

template <typename scalar_t, typename stat_t>
void backward_cpu(int64_t N, int64_t C, int64_t HW, const scalar_t* dy, const scalar_t* x, const stat_t* mean,
                  const stat_t* var, const stat_t* gamma, const stat_t* beta, stat_t eps, bool relu, scalar_t* dx,
                  stat_t* grad_gamma, stat_t* grad_beta) {
  const double M = static_cast<double>(N * HW);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const BatchNormChannel<stat_t> a = batch_norm_channel(mean, var, gamma, beta, eps, c);
      GradSums<double> sums{0, 0};
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const double g = masked_grad(dy[o + i], x[o + i], a, relu);
          sums.sum_g += g;
          sums.sum_g_xhat += g * (static_cast<double>(x[o + i]) - a.mean) * a.invstd;
        }
      }
      grad_gamma[c] = static_cast<stat_t>(sums.sum_g_xhat);
      grad_beta[c] = static_cast<stat_t>(sums.sum_g);
      const stat_t mean_g = static_cast<stat_t>(sums.sum_g / M), mean_g_xhat = static_cast<stat_t>(sums.sum_g_xhat / M);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const stat_t g = masked_grad(dy[o + i], x[o + i], a, relu);
          const stat_t xhat = (static_cast<stat_t>(x[o + i]) - a.mean) * a.invstd;
          dx[o + i] = static_cast<scalar_t>(a.scale * (g - mean_g - xhat * mean_g_xhat));
        }
      }
    }
  });
}

template <typename stat_t>
const stat_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<stat_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(const at::Tensor& input,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   const c10::optional<at::Tensor>& bias, double eps,
                                                                   bool relu) {
  const char* op = "fastconv::batch_norm_relu";
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CPU, {{"input", &input}, {"weight", w}, {"bias", b}});
  check_batch_norm_relu(op, input, w, b, eps);
  const auto stats = batch_norm_stats_type(input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  at::Tensor mean = at::zeros({C}, input.options().dtype(stats)), var = at::zeros({C}, input.options().dtype(stats));
  at::Tensor y = at::empty({N, C, input.size(2), input.size(3)}, input.options());
  if (y.numel() > 0) {
    const at::Tensor x = input.contiguous(), gamma = batch_norm_param(w, stats), beta = batch_norm_param(b, stats);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_cpu", [&] {
      using stat_t = at::opmath_type<scalar_t>;
      forward_cpu<scalar_t, stat_t>(N, C, HW, x.const_data_ptr<scalar_t>(), ptr_or_null<stat_t>(gamma),
                                    ptr_or_null<stat_t>(beta), static_cast<stat_t>(eps), relu,
                                    y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<stat_t>(),
                                    var.mutable_data_ptr<stat_t>());
    });
  }
  return {y.contiguous(input.suggest_memory_format()), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  const char* op = "fastconv::batch_norm_relu_backward";
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_devices(op, c10::DeviceType::CPU,
                {{"grad_output", &grad_output}, {"input", &input}, {"mean", &mean}, {"var", &var}, {"weight", w},
                 {"bias", b}});
  check_batch_norm_relu_backward(op, grad_output, input, mean, var, w, b, eps);
  const auto stats = batch_norm_stats_type(input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  at::Tensor grad_gamma = at::zeros({C}, input.options().dtype(stats));
  at::Tensor grad_beta = at::zeros({C}, input.options().dtype(stats));
  at::Tensor dx = at::empty(input.sizes(), input.options());
  if (dx.numel() > 0) {
    const at::Tensor x = input.contiguous(), dy = grad_output.contiguous();
    const at::Tensor m = mean.contiguous(), v = var.contiguous();
    const at::Tensor gamma = batch_norm_param(w, stats), beta = batch_norm_param(b, stats);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_backward_cpu", [&] {
      using stat_t = at::opmath_type<scalar_t>;
      backward_cpu<scalar_t, stat_t>(N, C, HW, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     m.const_data_ptr<stat_t>(), v.const_data_ptr<stat_t>(), ptr_or_null<stat_t>(gamma),
                                     ptr_or_null<stat_t>(beta), static_cast<stat_t>(eps), relu,
                                     dx.mutable_data_ptr<scalar_t>(), grad_gamma.mutable_data_ptr<stat_t>(),
                                     grad_beta.mutable_data_ptr<stat_t>());
    });
  }
  return {dx.contiguous(input.suggest_memory_format()), grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

}  // namespace fastconv
