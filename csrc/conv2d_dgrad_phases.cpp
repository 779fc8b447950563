// Strided dgrad, one stride-1 convolution per stride phase: see conv2d_dgrad_phases.h.
#include "conv2d_dgrad_phases.h"

#include <ATen/ops/zeros.h>

#include <algorithm>

namespace fastconv {
namespace {

// One spatial dimension of one phase a (0 <= a < stride): its input rows h = first + stride * j for j < rows,
// its taps r = a + stride * t for t < taps, and base, the output row that row j = 0 reads through tap t = 0.
struct PhaseExtent {
  int64_t first, rows, taps, base;
};

PhaseExtent phase_extent(int64_t in, int64_t pad, int64_t stride, int64_t filter, int64_t a) {
  PhaseExtent e{};
  e.first = ((a - pad) % stride + stride) % stride;  // the first h with (h + pad) mod stride == a
  e.rows = e.first < in ? (in - e.first + stride - 1) / stride : 0;
  e.taps = a < filter ? (filter - a + stride - 1) / stride : 0;
  e.base = (e.first + pad - a) / stride;  // exact: (first + pad - a) is a multiple of stride, and >= 0
  return e;
}

// dy's rows as the phase's correlation reads them: row i of the result is dy's row i + base - (taps - 1), zero
// where that lies outside dy (length rows + taps - 1).
struct Window {
  int64_t length, offset;
};
Window correlation_window(const PhaseExtent& e) { return {e.rows + e.taps - 1, e.base - (e.taps - 1)}; }

}  // namespace

bool dgrad_by_phases_applies(const Conv2dProblem& pb) {
  return (pb.stride_h > 1 || pb.stride_w > 1) && pb.dil_h == 1 && pb.dil_w == 1;
}

void dgrad_by_phases(const Conv2dProblem& pb, const at::Tensor& dy_nhwc, const at::Tensor& weight,
                     const at::Tensor& dx_nhwc, const PhaseFprop& fprop) {
  const int64_t groups = pb.groups, Kg = pb.K_per_group(), Cg = pb.C_per_group();
  for (int64_t ah = 0; ah < pb.stride_h; ++ah) {
    for (int64_t aw = 0; aw < pb.stride_w; ++aw) {
      const PhaseExtent eh = phase_extent(pb.H, pb.pad_h, pb.stride_h, pb.R, ah);
      const PhaseExtent ew = phase_extent(pb.W, pb.pad_w, pb.stride_w, pb.S, aw);
      if (eh.rows == 0 || ew.rows == 0) continue;  // no input pixel in this phase
      at::Tensor out = dx_nhwc.slice(1, eh.first, pb.H, pb.stride_h).slice(2, ew.first, pb.W, pb.stride_w);
      if (eh.taps == 0 || ew.taps == 0) {  // no tap reaches these pixels (stride larger than the filter)
        out.zero_();
        continue;
      }
      // dy shifted and zero-extended to the correlation's window, dense NHWC
      const Window wh = correlation_window(eh), ww = correlation_window(ew);
      at::Tensor window = at::zeros({pb.N, wh.length, ww.length, pb.K}, dy_nhwc.options());
      const int64_t h_lo = std::max<int64_t>(0, wh.offset), h_hi = std::min(pb.P, wh.offset + wh.length);
      const int64_t w_lo = std::max<int64_t>(0, ww.offset), w_hi = std::min(pb.Q, ww.offset + ww.length);
      if (h_lo < h_hi && w_lo < w_hi) {
        window.slice(1, h_lo - wh.offset, h_hi - wh.offset).slice(2, w_lo - ww.offset, w_hi - ww.offset)
            .copy_(dy_nhwc.slice(1, h_lo, h_hi).slice(2, w_lo, w_hi));
      }
      // the phase's taps, flipped (the correlation runs them backwards), K and C swapped within each group:
      // [g * Cg + c][k][u_h][u_w] = weight[g * Kg + k][c][ah + stride_h * (taps_h - 1 - u_h)][...]
      const at::Tensor w = weight.slice(2, ah, pb.R, pb.stride_h)
                               .slice(3, aw, pb.S, pb.stride_w)
                               .flip({2, 3})
                               .reshape({groups, Kg, Cg, eh.taps, ew.taps})
                               .transpose(1, 2)
                               .reshape({groups * Cg, Kg, eh.taps, ew.taps});
      const at::Tensor y = fprop(window.permute({0, 3, 1, 2}), w);  // (N, C, rows_h, rows_w)
      out.copy_(y.permute({0, 2, 3, 1}));
    }
  }
}

}  // namespace fastconv
