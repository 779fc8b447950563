// torch.autocast for fastconv's ops, registered with the dispatcher (AutocastCPU and AutocastCUDA keys),
// so that a model whose convolutions were swapped by fastconv.convert runs under AMP exactly as it did on
// torch's ops, eager or compiled. The rules are torch's own lists:
// - every convolution op (fprop, dgrad, wgrad of each algorithm) is a "lower precision" op, as aten::conv2d
//   is: its floating-point tensor arguments are cast to the autocast dtype (float16 or bfloat16; float64
//   stays float64), through autocast's weight cast cache;
// - residual_add promotes, as the ops of torch's "promote" list do: both inputs to the wider dtype;
// - the BatchNorm ops, max pooling and the bias gradient run in their inputs' dtypes (BatchNorm accepts
//   float32 gamma/beta with a low-precision input and keeps its statistics in float32).
// The casts are recorded by autograd like any others, so gradients flow back to float32 parameters.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace fastconv {
namespace {

// The op's arguments on the stack: the last `n` entries.
c10::IValue* arguments(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  return stack->data() + (stack->size() - op.schema().arguments().size());
}

template <c10::DeviceType device, c10::DispatchKey key>
void lower_precision(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  c10::IValue* args = arguments(op, stack);
  for (size_t i = 0; i < op.schema().arguments().size(); ++i) {
    if (args[i].isTensor()) args[i] = at::autocast::cached_cast(dtype, args[i].toTensor(), device);
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  op.callBoxed(stack);
}

template <c10::DeviceType device, c10::DispatchKey key>
void promote(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::IValue* args = arguments(op, stack);
  const size_t n = op.schema().arguments().size();
  c10::optional<at::ScalarType> widest;
  for (size_t i = 0; i < n; ++i) {
    if (args[i].isTensor() && args[i].toTensor().is_floating_point() && args[i].toTensor().device().type() == device) {
      const at::ScalarType t = args[i].toTensor().scalar_type();
      widest = widest ? at::promote_types(*widest, t) : t;
    }
  }
  for (size_t i = 0; widest && i < n; ++i) {
    if (args[i].isTensor() && args[i].toTensor().is_floating_point() && args[i].toTensor().device().type() == device)
      args[i] = args[i].toTensor().to(*widest);
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  op.callBoxed(stack);
}

constexpr const char* kConvOps[] = {"conv2d_direct", "conv2d_direct_dgrad", "conv2d_direct_wgrad",
                                    "conv2d_im2col", "conv2d_im2col_dgrad", "conv2d_im2col_wgrad",
                                    "conv2d_implicit_gemm", "conv2d_implicit_gemm_dgrad",
                                    "conv2d_implicit_gemm_wgrad", "conv2d_implicit_gemm_fused"};

template <c10::DeviceType device, c10::DispatchKey key>
void register_autocast(torch::Library& m) {
  for (const char* name : kConvOps)
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&lower_precision<device, key>>());
  m.impl("residual_add", torch::CppFunction::makeFromBoxedFunction<&promote<device, key>>());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>(m);
}

TORCH_LIBRARY_IMPL(fastconv, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>(m);
}

}  // namespace fastconv
