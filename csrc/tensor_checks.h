// Checks every fastconv host wrapper makes of its tensors (device, dtype, rank), with messages that read
// the same as the Python fakes' (fastconv/_checks.py): ValueError for sizes and devices, TypeError for
// dtypes, dtypes named as Python names them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <initializer_list>
#include <string>

#include "conv2d_problem.h"

namespace fastconv {

// Python's name of a dtype ("torch.float32").
std::string py_dtype(at::ScalarType t);

// float32, float16, bfloat16 on any device, and float64 on the CPU.
void check_floating(const char* op, const at::Tensor& t, const char* name);
void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                      const char* b_name);
void check_rank4(const char* op, const at::Tensor& t, const char* name, const char* layout);
// A size argument (input_size, weight_size): 4 non-negative entries.
void check_size4(const char* op, at::IntArrayRef size, const char* name);

// Every named tensor on one device, of the kind the op's backend serves (a CUDA op reached with a CPU
// tensor raises here, before any launch). Null entries (an absent bias) are skipped.
struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;
};
void check_devices(const char* op, c10::DeviceType backend, std::initializer_list<NamedTensor> tensors);

Strides4 strides_of(const at::Tensor& t);

}  // namespace fastconv
