// Unit test of the index helpers every kernel and CPU twin shares (csrc/conv2d_problem.h), at sizes past
// 2^31 where 32-bit arithmetic would wrap. Built and run by tests/test_production.py with the host compiler;
// prints "ok" or the failing checks.
#include <stdint.h>
#include <stdio.h>

#include "conv2d_problem.h"
#include "fast_divmod.h"
#include "implicit_gemm_problem.h"

using fastconv::Conv2dProblem;
using fastconv::Strides4;

static int failures = 0;
#define CHECK_EQ(a, b)                                                                                     \
  do {                                                                                                     \
    const long long va = (long long)(a), vb = (long long)(b);                                              \
    if (va != vb) {                                                                                        \
      printf("FAIL %s:%d: %s = %lld, expected %lld\n", __FILE__, __LINE__, #a, va, vb);                    \
      ++failures;                                                                                          \
    }                                                                                                      \
  } while (0)

int main() {
  // A channels_last activation of 128 x 512 x 256 x 256 elements (2^32): its last element's offset.
  const int64_t N = 128, C = 512, H = 256, W = 256;
  const Strides4 nhwc{H * W * C, 1, W * C, C};
  CHECK_EQ(nhwc.offset(N - 1, C - 1, H - 1, W - 1), N * C * H * W - 1);
  CHECK_EQ(nhwc.offset(N - 1, 0, 0, 0), (int64_t)127 << 25);
  const Strides4 nchw{C * H * W, H * W, W, 1};
  CHECK_EQ(nchw.offset(100, 3, 7, 9), 100LL * 512 * 65536 + 3 * 65536 + 7 * 256 + 9);

  // One tall image of 3e9 rows: rows, taps and their inverses beyond 2^31.
  Conv2dProblem pb{};
  pb.N = 1, pb.C = 1, pb.H = 3000000000LL, pb.W = 4, pb.K = 1, pb.R = 3, pb.S = 3;
  pb.pad_h = 1, pb.pad_w = 1, pb.stride_h = 2, pb.stride_w = 1, pb.dil_h = 5, pb.dil_w = 1, pb.groups = 1;
  pb.P = fastconv::conv_output_extent(pb.H, pb.pad_h, pb.dil_h, pb.R, pb.stride_h);
  pb.Q = fastconv::conv_output_extent(pb.W, pb.pad_w, pb.dil_w, pb.S, pb.stride_w);
  CHECK_EQ(pb.P, (3000000000LL + 2 - 10 - 1) / 2 + 1);
  const int64_t p = 1400000000LL;  // p * stride_h > 2^31
  CHECK_EQ(pb.input_row(p, 2), 2800000000LL - 1 + 10);
  CHECK_EQ(pb.output_row(pb.input_row(p, 2), 2), p);
  CHECK_EQ(pb.output_row(pb.input_row(p, 2) + 1, 2), -1);  // between strides
  CHECK_EQ(pb.output_row(pb.input_row(pb.P - 1, 0), 0), pb.P - 1);
  int64_t begin, end;
  pb.valid_output_rows(0, &begin, &end);  // tap 0 reads row 2p - 1: valid from p = 1
  CHECK_EQ(begin, 1);
  CHECK_EQ(end, pb.P);
  pb.valid_output_rows(2, &begin, &end);  // tap 2 reads row 2p + 9 < H
  CHECK_EQ(begin, 0);
  CHECK_EQ(end, (pb.H - 1 - 9) / 2 + 1 < pb.P ? (pb.H - 1 - 9) / 2 + 1 : pb.P);
  CHECK_EQ(pb.macs(), pb.P * pb.Q * 9);

  // Pooling extents past 2^31, with ceil_mode's last-window rule.
  CHECK_EQ(fastconv::pool_output_extent(4294967301LL, 0, 1, 3, 2, false), (4294967301LL - 3) / 2 + 1);
  CHECK_EQ(fastconv::pool_output_extent(4294967301LL, 0, 1, 3, 2, true), (4294967301LL - 3 + 1) / 2 + 1);
  CHECK_EQ(fastconv::floor_div(-4294967297LL, 2), -2147483649LL);

  // FastDivmod against / and %: every divisor up to 3000, powers of two and their neighbours up to 2^31, and
  // pseudo-random ones; dividends at 0, around multiples of the divisor, at the top of the range (2^31 - 1),
  // and pseudo-random. (The check stops counting after the first few failures.)
  {
    uint64_t state = 12345;
    const auto next = [&state]() {  // 64-bit LCG, high bits
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      return (uint32_t)(state >> 33);
    };
    const auto check_divisor = [&](uint32_t d) {
      const fastconv::FastDivmod f(d);
      uint32_t ns[64];
      int count = 0;
      const uint32_t top = 0x7fffffffu;
      ns[count++] = 0, ns[count++] = top, ns[count++] = top - 1, ns[count++] = d - 1 <= top ? d - 1 : 0;
      ns[count++] = d <= top ? d : 0, ns[count++] = top / d * d, ns[count++] = top / d * d - (top >= d ? 1 : 0);
      for (int i = 0; i < 16 && count < 64; ++i) {
        const uint32_t k = next() % (top / d + 1);  // a multiple of d, and its neighbours
        const uint64_t m = (uint64_t)k * d;
        if (m <= top) ns[count++] = (uint32_t)m;
        if (m >= 1 && m - 1 <= top) ns[count++] = (uint32_t)(m - 1);
        if (m + 1 <= top) ns[count++] = (uint32_t)(m + 1);
      }
      while (count < 64) ns[count++] = next();
      for (int i = 0; i < count && failures < 8; ++i) {
        uint32_t q = 0, r = 0;
        f.divmod(ns[i], q, r);
        CHECK_EQ(q, ns[i] / d);
        CHECK_EQ(r, ns[i] % d);
      }
    };
    for (uint32_t d = 1; d <= 3000; ++d) check_divisor(d);
    for (int b = 1; b <= 31; ++b) {
      const uint32_t p2 = 1u << b;
      check_divisor(p2);
      check_divisor(p2 - 1);
      if (b < 31) check_divisor(p2 + 1);
    }
    for (int i = 0; i < 2000; ++i) check_divisor(next() % 0x7fffffffu + 1);
  }

  // GatherDivisors (the implicit-GEMM gather's setup by multiplies) against the dividing splits, for fprop and dgrad
  // views of problems whose row count sits just below the limit of its fast path, and `fast` off just past it.
  {
    const auto make = [](int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s, int64_t stride,
                         int64_t groups) {
      Conv2dProblem q{};
      q.N = n, q.C = c, q.H = h, q.W = w, q.K = k, q.R = r, q.S = s, q.groups = groups;
      q.pad_h = q.pad_w = r / 2, q.stride_h = q.stride_w = stride, q.dil_h = q.dil_w = 1;
      q.P = fastconv::conv_output_extent(h, q.pad_h, 1, r, stride);
      q.Q = fastconv::conv_output_extent(w, q.pad_w, 1, s, stride);
      return q;
    };
    const int64_t kLimit = (int64_t{1} << 31) - 1024;  // rows below this (and a tile past them) take the fast path
    const Conv2dProblem cases[] = {
        make(3, 24, 7, 9, 40, 3, 5, 1, 2),             // odd extents, groups
        make(1, 3, 46340, 46339, 64, 7, 7, 2, 1),      // dgrad rows 46340 x 46339, just under the limit
        make(kLimit / (1013 * 1019) - 1, 520, 1013, 1019, 72, 3, 3, 1, 8),  // both passes close to it
    };
    for (const Conv2dProblem& q : cases) {
      for (int dgrad = 0; dgrad < 2; ++dgrad) {
        const fastconv::GatherDivisors d = fastconv::make_gather_divisors(q, dgrad != 0);
        const int64_t height = dgrad ? q.H : q.P, width = dgrad ? q.W : q.Q;
        const int64_t rows = q.N * height * width, channels = dgrad ? q.K_per_group() : q.C_per_group();
        const int64_t reduction = q.R * q.S * channels;
        CHECK_EQ(d.fast, rows < kLimit);
        if (!d.fast) continue;
        const int64_t ms[] = {0, 1, width - 1, width, height * width - 1, height * width, rows - 1, rows + 255,
                              rows / 2 + 7};
        for (int64_t m : ms) {
          const fastconv::Pixel a = fastconv::split_pixel(static_cast<uint32_t>(m), d);
          const fastconv::Pixel b = fastconv::split_pixel(m, height, width);
          CHECK_EQ(a.n, b.n);
          CHECK_EQ(a.y, b.y);
          CHECK_EQ(a.x, b.x);
        }
        const int64_t ks[] = {0, 7, channels - 1, channels, q.S * channels, reduction - 1, reduction + 31};
        for (int64_t k : ks) {
          const fastconv::TapChannel a = fastconv::split_tap_channel(static_cast<uint32_t>(k), d);
          const fastconv::TapChannel b = fastconv::split_tap_channel(k, channels, q.S);
          CHECK_EQ(a.r, b.r);
          CHECK_EQ(a.s, b.s);
          CHECK_EQ(a.c, b.c);
        }
      }
    }
    // one row past the limit: the kernels divide
    const Conv2dProblem past = make(1, 8, 1, kLimit, 8, 1, 1, 1, 1);
    CHECK_EQ(fastconv::make_gather_divisors(past, false).fast, false);
    CHECK_EQ(fastconv::make_gather_divisors(make(1, 8, 1, kLimit - 1, 8, 1, 1, 1, 1), false).fast, true);
  }

  if (failures == 0) printf("ok\n");
  return failures == 0 ? 0 : 1;
}
