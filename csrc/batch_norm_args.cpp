#include "batch_norm_args.h"

#include <c10/util/Exception.h>

namespace fastconv {
namespace {

void check_channel_vector(const char* op, const at::Tensor& input, const at::Tensor& t, const char* name,
                          bool stats) {
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must be 1-D with ", C,
                    " elements (one per channel), got shape ", t.sizes());
  const at::ScalarType want = batch_norm_stats_type(input.scalar_type());
  const bool ok = stats ? t.scalar_type() == want : (t.scalar_type() == input.scalar_type() || t.scalar_type() == want);
  TORCH_CHECK_TYPE(ok, op, ": ", name, " has dtype ", py_dtype(t.scalar_type()), "; expected ", py_dtype(want),
                   stats ? "" : " or the input's dtype", " for a ", py_dtype(input.scalar_type()), " input");
}

}  // namespace

at::ScalarType batch_norm_stats_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor batch_norm_param(const at::Tensor* t, at::ScalarType dtype) {
  return t ? t->to(dtype).contiguous() : at::Tensor();
}

void check_batch_norm_relu(const char* op, const at::Tensor& input, const at::Tensor* weight, const at::Tensor* bias,
                           double eps) {
  check_rank4(op, input, "input", "(N, C, H, W)");
  check_floating(op, input, "input");
  const int64_t values = input.size(0) * input.size(2) * input.size(3);
  TORCH_CHECK_VALUE(values != 1 || input.size(1) == 0, op,
                    ": expected more than 1 value per channel when training, got input of shape ", input.sizes());
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", eps);
  if (weight != nullptr) check_channel_vector(op, input, *weight, "weight", false);
  if (bias != nullptr) check_channel_vector(op, input, *bias, "bias", false);
}

void check_batch_norm_relu_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& mean, const at::Tensor& var, const at::Tensor* weight,
                                    const at::Tensor* bias, double eps) {
  check_rank4(op, input, "input", "(N, C, H, W)");
  check_floating(op, input, "input");
  check_same_dtype(op, grad_output, "grad_output", input, "input");
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
                    " but input has shape ", input.sizes());
  check_channel_vector(op, input, mean, "mean", true);
  check_channel_vector(op, input, var, "var", true);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", eps);
  if (weight != nullptr) check_channel_vector(op, input, *weight, "weight", false);
  if (bias != nullptr) check_channel_vector(op, input, *bias, "bias", false);
}

}  // namespace fastconv
