// CPU twin of the bias gradient: db[k] = sum over n, p, q of dy[n, k, p, q], one channel per task,
// accumulated in float (fp16/bf16/fp32) or double (fp64).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv2d_args.h"

namespace fastconv {
namespace {

template <typename scalar_t>
void bias_grad_cpu(int64_t N, int64_t K, int64_t PQ, const scalar_t* dy, scalar_t* db) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* plane = dy + (n * K + k) * PQ;
        for (int64_t i = 0; i < PQ; ++i) acc += static_cast<acc_t>(plane[i]);
      }
      db[k] = static_cast<scalar_t>(acc);
    }
  });
}

at::Tensor conv2d_bias_grad_cpu(const at::Tensor& grad_output) {
  const char* op = "fastconv::conv2d_bias_grad";
  check_devices(op, c10::DeviceType::CPU, {{"grad_output", &grad_output}});
  check_bias_grad(op, grad_output);
  const int64_t N = grad_output.size(0), K = grad_output.size(1);
  const int64_t PQ = grad_output.size(2) * grad_output.size(3);
  at::Tensor db = at::empty({K}, grad_output.options());
  if (K > 0) {
    const at::Tensor dy = grad_output.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "conv2d_bias_grad_cpu", [&] {
      bias_grad_cpu<scalar_t>(N, K, PQ, dy.const_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>());
    });
  }
  return db;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d_bias_grad", &conv2d_bias_grad_cpu);
}

}  // namespace fastconv
