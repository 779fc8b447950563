// fastconv's operator schemas, all in one place, and the Python module that loads them.
//
// Each convolution algorithm is an op family: a forward op (fprop) and one op per backward step (dgrad: gradient of
// the input; wgrad: gradient of the filter), with explicit shape arguments so that each is usable and
// testable alone. The bias gradient is shared by every algorithm. CPU and CUDA implementations register
// themselves in csrc/cpu/ and csrc/cuda/; fake (meta) implementations and autograd live in fastconv/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastconv, m) {
  // Every fprop takes `relu` last: the ReLU is then applied in the kernel's epilogue, after the bias
  // (conv + bias + ReLU in one launch; a folded BatchNorm's scale and shift are the weight and the bias).
  //
  // Direct convolution: every output is the sum over input channels and filter taps, computed in place.
  m.def(
      "conv2d_direct(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool relu=False) -> Tensor");
  m.def(
      "conv2d_direct_dgrad(Tensor grad_output, Tensor weight, SymInt[4] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_direct_wgrad(Tensor grad_output, Tensor input, SymInt[4] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // im2col + GEMM: the convolution as a matrix product, the batch processed in chunks whose im2col matrix
  // stays within workspace_bytes (results do not depend on the chunking).
  m.def(
      "conv2d_im2col(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int workspace_bytes, bool relu=False) -> Tensor");
  m.def(
      "conv2d_im2col_dgrad(Tensor grad_output, Tensor weight, SymInt[4] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int workspace_bytes) -> Tensor");
  m.def(
      "conv2d_im2col_wgrad(Tensor grad_output, Tensor input, SymInt[4] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int workspace_bytes) -> Tensor");

  // Implicit GEMM on tensor cores: the convolution as a GEMM whose activation operand is gathered on the fly
  // (never materialised), channels_last activations and KRSC filters; fp16/bf16, and fp32 as TF32 when
  // torch.backends.cudnn.allow_tf32 allows it (otherwise exactly, through the direct kernels). `tile` picks the kernel's tile configuration (-1: by size;
  // fastconv.backends' autotuner times them). The CPU twin computes the same GEMMs in the accumulation
  // precision.
  m.def(
      "conv2d_implicit_gemm(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int tile=-1, bool relu=False) -> Tensor");
  m.def(
      "conv2d_implicit_gemm_dgrad(Tensor grad_output, Tensor weight, SymInt[4] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int tile=-1) -> Tensor");
  m.def(
      "conv2d_implicit_gemm_wgrad(Tensor grad_output, Tensor input, SymInt[4] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int tile=-1) -> Tensor");
  // Its fused epilogue in full: relu?(conv(input, weight) * scale[k] + shift[k] + residual), every term
  // optional. scale and shift are a folded BatchNorm's (or shift a bias); residual, shaped like the output,
  // is a ResNet shortcut added before the ReLU, so a block's last conv + BN + add + ReLU is one kernel.
  m.def(
      "conv2d_implicit_gemm_fused(Tensor input, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int tile=-1, bool relu=False) -> Tensor");

  // Sum of grad_output over batch and space: the gradient of a per-channel bias.
  m.def("conv2d_bias_grad(Tensor grad_output) -> Tensor");

  // Max pooling: the output and the flat h * W + w index of each maximum in its plane (torch's convention).
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[4] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");

  // Training-mode BatchNorm with the batch's statistics, then an optional ReLU (the second half of a
  // fused conv-BatchNorm-ReLU; eval mode folds BatchNorm into the conv instead). Returns the output and the
  // per-channel mean and biased variance (float32; float64 for float64 input), from which the caller
  // updates the running statistics. weight and bias are BatchNorm's gamma and beta.
  m.def(
      "batch_norm_relu(Tensor input, Tensor? weight, Tensor? bias, float eps, bool relu) "
      "-> (Tensor output, Tensor mean, Tensor var)");
  // Its backward: grad_input and the per-channel sums grad_weight = sum(g * xhat), grad_bias = sum(g) (in
  // the statistics' dtype), g being grad_output where the ReLU passed (recomputed from input).
  m.def(
      "batch_norm_relu_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, bool relu) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Residual add: relu?(residual + the shortcut subsampled by `stride` and zero-padded in channels).
  m.def("residual_add(Tensor residual, Tensor shortcut, int stride, bool relu) -> Tensor");
  // `output` is the forward's when it applied a ReLU (its mask), else None.
  m.def(
      "residual_add_backward(Tensor grad_output, Tensor? output, SymInt[4] shortcut_size, int stride) "
      "-> (Tensor, Tensor)");
}

// A plain extension module (no pybind11: it only has to exist so that `import fastconv._C` loads the
// library and runs the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastconv operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTCONV_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef FASTCONV_WITH_SM90A
  const long with_sm90a = 1;  // the Hopper wgmma kernels (implicit-GEMM tiles 6, 7) were built (setup.py: 9.0a)
#else
  const long with_sm90a = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddIntConstant(module, "WITH_SM90A", with_sm90a) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
