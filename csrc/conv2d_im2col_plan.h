// How the im2col convolution splits a batch (plain C++, shared by the CPU twin and the CUDA wrapper).
//
// The col matrix has N * P * Q rows of C * R * S elements, which for a large batch is far larger than the
// activation. The batch is processed in chunks of whole images so that col never exceeds the workspace
// limit; the results do not depend on the chunking (each image's rows are computed alike, and wgrad sums
// the chunks in a fixed order in fp32).
#pragma once

#include "portable_stdint.h"

#include "conv2d_problem.h"

namespace fastconv {

// 1x1 filters with stride 1 and no padding read each input element once, in place: the activation
// already is the col matrix, so fprop and dgrad skip im2col/col2im.
inline bool im2col_is_pointwise(const Conv2dProblem& pb) {
  return pb.R == 1 && pb.S == 1 && pb.stride_h == 1 && pb.stride_w == 1 && pb.pad_h == 0 && pb.pad_w == 0;
}

inline int64_t im2col_elements_per_image(const Conv2dProblem& pb) { return pb.P * pb.Q * pb.C * pb.R * pb.S; }

// Images per chunk so that the col buffer stays within workspace_bytes; 0 when one image alone does not fit.
inline int64_t im2col_images_per_chunk(const Conv2dProblem& pb, int64_t element_bytes, int64_t workspace_bytes) {
  const int64_t per_image = im2col_elements_per_image(pb) * element_bytes;
  if (per_image == 0) return pb.N > 0 ? pb.N : 1;
  const int64_t images = workspace_bytes / per_image;
  return images < pb.N ? images : (pb.N > 0 ? pb.N : 1);
}

}  // namespace fastconv
