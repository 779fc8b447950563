// Operand preparation of the implicit-GEMM convolution (see implicit_gemm_operands.h).
#include "implicit_gemm_operands.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <vector>

namespace fastconv {
namespace {

// v rounded up to a multiple of kImplicitGemmChannelMultiple: the channels per group the kernels load.
int64_t round_up_to_vector(int64_t v) {
  return (v + kImplicitGemmChannelMultiple - 1) / kImplicitGemmChannelMultiple * kImplicitGemmChannelMultiple;
}

// A dense tensor as itself when its data starts 16-byte aligned, else a copy (a view that starts mid-way).
at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

// t (dense, channels last) with its last dimension read as `groups` blocks of channels, each block
// zero-padded to `padded` channels, as a new dense tensor; t itself when nothing needs padding.
// (Not at::constant_pad_nd: it keeps the memory format it suggests for its input, and a filter such as
// (C, R, 1, 1, 1) from a depthwise R x 1 conv reads as channels_last_3d there, so its result was not dense.)
at::Tensor pad_channel_groups(const at::Tensor& t, int64_t groups, int64_t padded) {
  const int64_t per_group = t.size(-1) / groups;
  if (per_group == padded) return t;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  shape.push_back(groups);
  shape.push_back(padded);
  at::Tensor out = at::zeros(shape, t.options());  // contiguous
  shape.back() = per_group;
  out.narrow(-1, 0, per_group).copy_(t.reshape(shape));
  shape.pop_back();
  shape.back() = groups * padded;
  return out.view(shape);
}

}  // namespace

at::Tensor dense_nhwc(const at::Tensor& t) { return aligned(t.permute({0, 2, 3, 1}).contiguous()); }

at::Tensor dense_aligned(const at::Tensor& t) { return aligned(t.contiguous()); }

ImplicitGemmFpropOperands implicit_gemm_fprop_operands(const Conv2dProblem& pb, const at::Tensor& input,
                                                        const at::Tensor& weight) {
  ImplicitGemmFpropOperands ops{pb, {}, {}};
  const int64_t Cg = round_up_to_vector(pb.C_per_group());
  ops.pb.C = Cg * pb.groups;
  ops.x = pad_channel_groups(dense_nhwc(input), pb.groups, Cg);
  ops.w = pad_channel_groups(dense_nhwc(weight), 1, Cg);  // KRSC, each filter's channels padded
  return ops;
}

ImplicitGemmDgradOperands implicit_gemm_dgrad_operands(const Conv2dProblem& pb, const at::Tensor& grad_output,
                                                        const at::Tensor& weight) {
  ImplicitGemmDgradOperands ops{pb, {}, {}};
  const int64_t Kg = round_up_to_vector(pb.K_per_group()), Cg = pb.C_per_group();
  ops.pb.K = Kg * pb.groups;
  ops.dy = pad_channel_groups(dense_nhwc(grad_output), pb.groups, Kg);
  // wt[g][c][r][s][k] = w[g * Kg + k][c][r][s], each (g, c, r, s) row's k padded
  ops.wt = pad_channel_groups(
      aligned(weight.reshape({pb.groups, pb.K_per_group(), Cg, pb.R, pb.S}).permute({0, 2, 3, 4, 1}).contiguous()), 1,
      Kg);
  return ops;
}

ImplicitGemmWgradOperands implicit_gemm_wgrad_operands(const Conv2dProblem& pb, const at::Tensor& grad_output,
                                                        const at::Tensor& input) {
  ImplicitGemmWgradOperands ops{pb, {}, {}};
  const int64_t Kg = round_up_to_vector(pb.K_per_group()), Cg = round_up_to_vector(pb.C_per_group());
  ops.pb.K = Kg * pb.groups;
  ops.pb.C = Cg * pb.groups;
  ops.dy = pad_channel_groups(dense_nhwc(grad_output), pb.groups, Kg);
  ops.x = pad_channel_groups(dense_nhwc(input), pb.groups, Cg);
  return ops;
}

at::Tensor implicit_gemm_unpad_wgrad(const at::Tensor& dw_padded, const Conv2dProblem& pb,
                                     const Conv2dProblem& padded) {
  const int64_t Kg = padded.K_per_group(), Cg = padded.C_per_group();
  if (Kg == pb.K_per_group() && Cg == pb.C_per_group()) return dw_padded;
  return dw_padded.reshape({pb.groups, Kg, pb.R, pb.S, Cg})
      .slice(1, 0, pb.K_per_group())
      .slice(4, 0, pb.C_per_group())
      .reshape({pb.K, pb.R, pb.S, pb.C_per_group()})
      .contiguous();  // dense KRSC (reshape copies, except where 1 x 1 filters let it return a view)
}

}  // namespace fastconv
