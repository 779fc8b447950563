// FastDivmod: division by a divisor fixed ahead of time, as one 32 x 32 -> 64-bit multiply and a shift.
//
// The wgrad gather splits every pixel index it loads into (image, row, column): two divisions per 16-byte
// copy by P*Q and by Q, which a GPU otherwise runs as a ~20-instruction subroutine each. The divisor is known
// when the loader is built, so the quotient of any n < 2^31 is
//     n / d = (n * m) >> (31 + s),   s = ceil(log2 d),   m = ceil(2^(31 + s) / d)   (m < 2^32)
// exactly: m = 2^(31+s)/d + e with 0 <= e < 1, so n*m / 2^(31+s) = n/d + n*e / 2^(31+s), and the error term
// is below 1/d because n < 2^31 <= 2^(31+s) / d; it cannot carry the floor past the next multiple of 1/d.
// (The round-up method of Granlund and Montgomery, in the form CUTLASS's FastDivmod uses.)
//
// Plain C++ for nvcc, g++ and NVRTC; tests/cpp/index_math_test.cpp checks it against `/` and `%`.
#pragma once

#include "conv2d_problem.h"

namespace fastconv {

struct FastDivmod {
  uint32_t divisor, multiplier, shift;

  // d in [1, 2^31]
  FASTCONV_HD explicit FastDivmod(uint32_t d = 1) : divisor(d), multiplier(0), shift(0) {
    while (shift < 31 && (uint32_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + shift)) + d - 1) / d);
  }
  // n / divisor, for n < 2^31
  FASTCONV_HD uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> (31 + shift));
  }
  // n / divisor and n % divisor, for n < 2^31
  FASTCONV_HD void divmod(uint32_t n, uint32_t& quotient, uint32_t& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }
};

}  // namespace fastconv
