// An NVTX range around every fastconv CUDA op, named after the op ("fastconv::conv2d_im2col_dgrad"), so
// Nsight Systems shows which op launched which kernels and Nsight Compute can select an op's kernels
// (`ncu --nvtx --nvtx-include "fastconv::conv2d_im2col/"`). NVTX 3 is header-only (it ships with the CUDA
// toolkit) and, when no tool is attached, a push or pop is a test of a null function pointer.
#pragma once

#include <nvtx3/nvToolsExt.h>

namespace fastconv {

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace fastconv
