// ResidualAddShape: the sizes of one residual add (plain C++, shared by the CPU twin and the kernels).
//     out[n, j, p, q] = relu?(residual[n, j, p, q] + (j < J ? shortcut[n, j, p * s, q * s] : 0))
// residual and out are (N, C, P, Q); the shortcut is (N, J, H, W) with J <= C, P = ceil(H / s) and
// Q = ceil(W / s): the strided, zero-padded identity shortcut of a ResNet block that changes resolution.
#pragma once

#include "portable_stdint.h"

namespace fastconv {

struct ResidualAddShape {
  int64_t N, C, P, Q;  // residual and output
  int64_t J, H, W;     // shortcut
  int64_t stride;
};

}  // namespace fastconv
