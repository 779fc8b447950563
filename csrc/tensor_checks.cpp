#include "tensor_checks.h"

#include <c10/util/Exception.h>

#include <string>

namespace fastconv {

// Python's name of a dtype, so messages read the same from the C++ checks and the Python fakes.
std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  const bool cpu_ok = dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
  const bool cuda_ok = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
  TORCH_CHECK_TYPE(t.is_cuda() ? cuda_ok : cpu_ok, op, ": ", name, " has dtype ", py_dtype(dt),
                   "; supported dtypes are float32, float16, bfloat16", t.is_cuda() ? "" : " and float64",
                   " on ", t.device().type(), " (float64 is CPU-only)");
}

void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                      const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " (", py_dtype(a.scalar_type()), ") and ",
                   b_name, " (", py_dtype(b.scalar_type()), ") must have the same dtype");
}

void check_rank4(const char* op, const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": expected ", name, " to be 4-D ", layout, ", got a ", t.dim(),
                    "-D tensor of shape ", t.sizes());
}

void check_size4(const char* op, at::IntArrayRef size, const char* name) {
  TORCH_CHECK_VALUE(size.size() == 4, op, ": ", name, " must have 4 entries, got ", size);
  for (auto v : size) TORCH_CHECK_VALUE(v >= 0, op, ": ", name, " must be non-negative, got ", size);
}

void check_devices(const char* op, c10::DeviceType backend, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor* first = nullptr;
  for (const NamedTensor& t : tensors) {
    if (t.tensor == nullptr) continue;
    TORCH_CHECK_VALUE(t.tensor->device().type() == backend, op, ": ", t.name, " is on ", t.tensor->device(),
                      ", but this is the ", c10::DeviceTypeName(backend), " implementation: every tensor must be on ",
                      c10::DeviceTypeName(backend, /*lower_case=*/true));
    if (first == nullptr) {
      first = &t;
    } else {
      TORCH_CHECK_VALUE(t.tensor->device() == first->tensor->device(), op, ": ", first->name, " is on ",
                        first->tensor->device(), " but ", t.name, " is on ", t.tensor->device(),
                        "; every tensor must be on one device");
    }
  }
}

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace fastconv
