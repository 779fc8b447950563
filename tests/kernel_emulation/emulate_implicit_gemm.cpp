// Runs one implicit-GEMM kernel configuration (pass, element type, tile, shape) in the CPU emulation of
// emu.h and compares every output with a double-precision reference, bit for bit. This is an emulation on
// the CPU, not a GPU run: it checks the kernels' index math, fragment layouts, cp.async pipeline
// synchronisation and address alignment; it says nothing about speed, nor about real hardware behaviour
// beyond the PTX ISA's documented semantics.
//
// Built by tests/test_kernel_emulation.py against copies of csrc/cuda's kernel sources whose PTX wrappers
// call emu.h (the include path puts those copies first). Usage, one configuration per run:
//
//   emulate_implicit_gemm pass=fprop|dgrad|wgrad dtype=fp16|bf16|fp32 tile=0..7 cp_async=deferred|immediate
//       N= C= H= W= K= R= S= [stride=h,w] [pad=h,w] [dil=h,w] [groups=]
//       [epilogue=scale+shift+residual+relu]   (fprop; any subset, or none)
//       [splits=]                              (fprop, wgrad: the requested split count)
//       [wgmma=deferred|immediate]             (tiles 6, 7: when the MMAs read shared memory; default deferred)
//       [divisors=fast|divide]                 (fprop, dgrad: the gather's setup by multiplies, the default, or
//                                               by its fallback's divisions)
//       [residual_offset=]                     (fprop: the residual starts this many elements into its buffer, as
//                                               a view at an offset does: the epilogue's unaligned path)
//
// Exit status 0: bit-exact, no ldmatrix or cp.async bank conflict, no shared-memory race, no write outside an
// output buffer. 1: a check failed (the output says which). An emulation check (a misaligned or out-of-bounds
// address, copies not waited for) aborts.
//
// Why bit-exact works: every operand is k/8 with |k| <= 8, exact in fp16, bf16 and TF32, and the sums stay
// far inside float's 24-bit mantissa, so any order of accumulation gives the same float; the epilogue's
// float operations are repeated in the same order by the reference.
#include "emu.h"

// The patched kernel sources (anonymous-namespace kernels, so they are included, not linked).
#include "conv2d_implicit_gemm_dgrad_kernel.cu"
#include "conv2d_implicit_gemm_dgrad_wgmma_kernel.cu"
#include "conv2d_implicit_gemm_fprop_kernel.cu"
#include "conv2d_implicit_gemm_fprop_wgmma_kernel.cu"
#include "conv2d_implicit_gemm_wgrad_kernel.cu"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <string>

// Which passes (bit 0 fprop, 1 dgrad, 2 wgrad) and element types (bit 0 fp16, 1 bf16, 2 fp32) this build
// instantiates: the planted-bug builds take one of each to compile faster.
#ifndef EMU_PASSES
#define EMU_PASSES 7
#endif
#ifndef EMU_DTYPES
#define EMU_DTYPES 7
#endif

using namespace fastconv;

namespace {

// ---- element types ------------------------------------------------------------------------------------

template <typename T>
T to_element(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}
inline float to_host_float(float v) { return v; }
inline float to_host_float(__half v) { return __half2float(v); }
inline float to_host_float(__nv_bfloat16 v) { return __bfloat162float(v); }
// What the kernel sees of a host value: rounded to T.
template <typename T>
float as_element(float v) {
  return to_host_float(to_element<T>(v));
}

// ---- global memory ------------------------------------------------------------------------------------

// A "global memory" buffer: 256-byte aligned like cudaMalloc's, registered for emu.h's cp.async bounds
// check, and fenced by guard bytes that reveal a plain store outside it.
template <typename T>
class DeviceBuffer {
 public:
  static constexpr size_t kGuardBytes = 256;
  static constexpr unsigned char kGuardByte = 0x5a;

  DeviceBuffer(const char* name, size_t count) : name_(name), count_(count) {
    const size_t bytes = (count * sizeof(T) + 255) / 256 * 256;
    base_ = static_cast<unsigned char*>(std::aligned_alloc(256, bytes + 2 * kGuardBytes));
    std::memset(base_, kGuardByte, bytes + 2 * kGuardBytes);
    data_ = reinterpret_cast<T*>(base_ + kGuardBytes);
    g_global_buffers.push_back({base_ + kGuardBytes, count * sizeof(T)});
  }
  ~DeviceBuffer() {
    const auto it = std::find_if(g_global_buffers.begin(), g_global_buffers.end(),
                                 [&](const GlobalBuffer& b) { return b.begin == base_ + kGuardBytes; });
    g_global_buffers.erase(it);
    std::free(base_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return data_; }
  size_t size() const { return count_; }
  T& operator[](size_t i) { return data_[i]; }

  // The guard bytes before the buffer and after its last element (up to the allocation's end) are intact.
  bool guards_intact() const {
    const unsigned char* end = base_ + kGuardBytes + count_ * sizeof(T);
    const unsigned char* alloc_end = base_ + kGuardBytes + (count_ * sizeof(T) + 255) / 256 * 256 + kGuardBytes;
    for (const unsigned char* p = base_; p < base_ + kGuardBytes; ++p)
      if (*p != kGuardByte) return false;
    for (const unsigned char* p = end; p < alloc_end; ++p)
      if (*p != kGuardByte) return false;
    return true;
  }
  const char* name() const { return name_; }

 private:
  const char* name_;
  size_t count_;
  unsigned char* base_;
  T* data_;
};

// ---- the configuration --------------------------------------------------------------------------------

struct Config {
  std::string pass, dtype;
  int tile = 0;
  bool immediate = false, wgmma_immediate = false;
  bool divide = false;  // divisors=divide: the gather's setup divides (GatherDivisors::fast false)
  int64_t N = 0, C = 0, H = 0, W = 0, K = 0, R = 0, S = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1, groups = 1;
  bool scale = false, shift = false, residual = false, relu = false;
  int splits = 1;
  int64_t residual_offset = 0;
  std::string text;  // the arguments, for messages
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "emulate_implicit_gemm: %s (see the usage at the top of emulate_implicit_gemm.cpp)\n",
               why.c_str());
  std::exit(2);
}

// The launchers' GatherDivisors, or (divisors=divide) their 64-bit fallback, which the small shapes here would not
// reach.
bool g_divide = false;
GatherDivisors gather_divisors(const Conv2dProblem& pb, bool dgrad) {
  GatherDivisors d = make_gather_divisors(pb, dgrad);
  if (g_divide) d.fast = false;
  return d;
}

// The grid the launchers give a tiles_m x tiles_n x batches tile grid (implicit_gemm_grid).
dim3 tile_grid(int64_t tiles_m, int64_t tiles_n, int64_t batches) {
  dim3 grid;
  if (!implicit_gemm_grid(tiles_m, tiles_n, batches, &grid)) usage("the tile grid exceeds CUDA's grid limits");
  return grid;
}

int64_t parse_int(const std::string& key, const std::string& v) {
  size_t used = 0;
  int64_t r = 0;
  try {
    r = std::stoll(v, &used);
  } catch (...) {
    used = 0;
  }
  if (used == 0 || used != v.size()) usage("bad integer for " + key + ": '" + v + "'");
  return r;
}

// "a,b" or "a" (both the same).
void parse_pair(const std::string& key, const std::string& v, int64_t* h, int64_t* w) {
  const size_t comma = v.find(',');
  *h = parse_int(key, v.substr(0, comma));
  *w = comma == std::string::npos ? *h : parse_int(key, v.substr(comma + 1));
}

Config parse(int argc, char** argv) {
  std::map<std::string, std::string> kv;
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) usage("argument '" + arg + "' is not key=value");
    kv[arg.substr(0, eq)] = arg.substr(eq + 1);
    c.text += (i > 1 ? " " : "") + arg;
  }
  const auto take = [&](const char* key, bool required) -> std::string {
    const auto it = kv.find(key);
    if (it == kv.end()) {
      if (required) usage(std::string("missing ") + key + "=");
      return "";
    }
    std::string v = it->second;
    kv.erase(it);
    return v;
  };
  c.pass = take("pass", true);
  c.dtype = take("dtype", true);
  c.tile = static_cast<int>(parse_int("tile", take("tile", true)));
  const std::string mode = take("cp_async", true);
  if (mode != "deferred" && mode != "immediate") usage("cp_async= is deferred or immediate");
  c.immediate = mode == "immediate";
  const std::string wgmma = take("wgmma", false);
  if (!wgmma.empty() && wgmma != "deferred" && wgmma != "immediate") usage("wgmma= is deferred or immediate");
  c.wgmma_immediate = wgmma == "immediate";
  const std::string divisors = take("divisors", false);
  if (!divisors.empty() && divisors != "fast" && divisors != "divide") usage("divisors= is fast or divide");
  c.divide = divisors == "divide";
  int64_t* dims[] = {&c.N, &c.C, &c.H, &c.W, &c.K, &c.R, &c.S};
  const char* names[] = {"N", "C", "H", "W", "K", "R", "S"};
  for (int i = 0; i < 7; ++i) *dims[i] = parse_int(names[i], take(names[i], true));
  std::string v;
  if (!(v = take("stride", false)).empty()) parse_pair("stride", v, &c.stride_h, &c.stride_w);
  if (!(v = take("pad", false)).empty()) parse_pair("pad", v, &c.pad_h, &c.pad_w);
  if (!(v = take("dil", false)).empty()) parse_pair("dil", v, &c.dil_h, &c.dil_w);
  if (!(v = take("groups", false)).empty()) c.groups = parse_int("groups", v);
  if (!(v = take("splits", false)).empty()) c.splits = static_cast<int>(parse_int("splits", v));
  if (!(v = take("residual_offset", false)).empty()) c.residual_offset = parse_int("residual_offset", v);
  v = take("epilogue", false);
  for (size_t at = 0; at < v.size();) {
    const size_t plus = std::min(v.find('+', at), v.size());
    const std::string term = v.substr(at, plus - at);
    if (term == "scale") c.scale = true;
    else if (term == "shift") c.shift = true;
    else if (term == "residual") c.residual = true;
    else if (term == "relu") c.relu = true;
    else if (term != "none") usage("unknown epilogue term '" + term + "'");
    at = plus + 1;
  }
  if (!kv.empty()) usage("unknown argument " + kv.begin()->first + "=");
  if (c.tile < 0 || c.tile >= kImplicitGemmTiles) usage("tile= is 0 .. " + std::to_string(kImplicitGemmTiles - 1));
  if (c.groups < 1 || c.C % c.groups != 0 || c.K % c.groups != 0) usage("groups must divide C and K");
  if (c.splits < 1) usage("splits= is at least 1");
  if (c.residual_offset < 0) usage("residual_offset= is at least 0");
  return c;
}

Conv2dProblem problem_of(const Config& c) {
  Conv2dProblem pb{};
  pb.N = c.N, pb.C = c.C, pb.H = c.H, pb.W = c.W, pb.K = c.K, pb.R = c.R, pb.S = c.S;
  pb.pad_h = c.pad_h, pb.pad_w = c.pad_w, pb.stride_h = c.stride_h, pb.stride_w = c.stride_w;
  pb.dil_h = c.dil_h, pb.dil_w = c.dil_w, pb.groups = c.groups;
  pb.P = conv_output_extent(c.H, c.pad_h, c.dil_h, c.R, c.stride_h);
  pb.Q = conv_output_extent(c.W, c.pad_w, c.dil_w, c.S, c.stride_w);
  return pb;
}

// Channels per group as the host wrapper pads them (csrc/cuda/conv2d_implicit_gemm.cpp, kChannelMultiple).
int64_t padded_channels(int64_t per_group) { return (per_group + 7) / 8 * 8; }

// k/8 with |k| <= 8: exact in every element type (see the top of the file).
std::vector<float> random_values(size_t count, std::mt19937& rng) {
  std::vector<float> v(count);
  for (float& e : v) e = (static_cast<int>(rng() % 17) - 8) / 8.f;
  return v;
}

// Counts mismatches, printing the first few.
struct Mismatches {
  long count = 0, checked = 0;
  void check(float want, float got, const std::string& where) {
    ++checked;
    if (want == got) return;  // (NaN never equals: unwritten or poisoned outputs fail)
    if (count < 8) std::printf("  mismatch at %s: want %g, got %g\n", where.c_str(), want, got);
    ++count;
  }
  long report() const {
    if (count != 0) std::printf("  %ld of %ld outputs differ\n", count, checked);
    return count;
  }
};

std::string at(std::initializer_list<std::pair<const char*, int64_t>> index) {
  std::string s;
  for (const auto& [name, v] : index) s += (s.empty() ? "" : " ") + std::string(name) + "=" + std::to_string(v);
  return s;
}

template <typename... Buffers>
long damaged_guards(const Buffers&... buffers) {
  long damaged = 0;
  const auto check = [&](const auto& b) {
    if (!b.guards_intact()) {
      std::printf("  a store landed outside the buffer %s\n", b.name());
      ++damaged;
    }
  };
  (check(buffers), ...);
  return damaged;
}

// ---- fprop --------------------------------------------------------------------------------------------

// y = relu?(conv(x, w) * scale + shift + residual), as launch_conv2d_implicit_gemm_fprop runs it on the
// tensors conv2d_implicit_gemm.cpp's fused_cuda prepares (each group's channels zero-padded to 8).
template <typename T>
long run_fprop(const Config& c, std::mt19937& rng) {
  const Conv2dProblem pb = problem_of(c);
  const int64_t G = c.groups, Cg = c.C / G, Kg = c.K / G, Cgp = padded_channels(Cg), P = pb.P, Q = pb.Q;
  const int64_t M = c.N * P * Q;
  const std::vector<float> x = random_values(c.N * c.H * c.W * c.C, rng), w = random_values(c.K * c.R * c.S * Cg, rng),
                           scale = random_values(c.K, rng), shift = random_values(c.K, rng),
                           residual = random_values(M * c.K, rng);
  Conv2dProblem padded = pb;
  padded.C = G * Cgp;
  DeviceBuffer<T> xd("x", c.N * c.H * c.W * padded.C), wd("w", c.K * c.R * c.S * Cgp), scaled("scale", c.K),
      shiftd("shift", c.K), residuald("residual", c.residual_offset + residual.size()), yd("y", M * c.K);
  for (int64_t pixel = 0; pixel < c.N * c.H * c.W; ++pixel)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t ch = 0; ch < Cgp; ++ch)
        xd[pixel * padded.C + g * Cgp + ch] = to_element<T>(ch < Cg ? x[pixel * c.C + g * Cg + ch] : 0.f);
  for (int64_t krs = 0; krs < c.K * c.R * c.S; ++krs)
    for (int64_t ch = 0; ch < Cgp; ++ch) wd[krs * Cgp + ch] = to_element<T>(ch < Cg ? w[krs * Cg + ch] : 0.f);
  for (int64_t k = 0; k < c.K; ++k) scaled[k] = to_element<T>(scale[k]), shiftd[k] = to_element<T>(shift[k]);
  for (size_t i = 0; i < residual.size(); ++i) residuald[c.residual_offset + i] = to_element<T>(residual[i]);
  for (size_t i = 0; i < yd.size(); ++i) yd[i] = to_element<T>(NAN);
  // conv2d_implicit_gemm_fprop_splits' rule for the split count: no empty split
  constexpr int BK = ImplicitGemmElement<T>::BK;
  const int64_t k_tiles = ceil_div(c.R * c.S * Cgp, BK);
  const int splits = static_cast<int>(ceil_div(k_tiles, ceil_div(k_tiles, std::min<int64_t>(c.splits, k_tiles))));
  DeviceBuffer<float> partial("partial", splits > 1 ? splits * M * c.K : 1);
  for (size_t i = 0; i < partial.size(); ++i) partial[i] = NAN;
  const T* scale_arg = c.scale ? scaled.data() : nullptr;
  const T* shift_arg = c.shift ? shiftd.data() : nullptr;
  const T* residual_arg = c.residual ? residuald.data() + c.residual_offset : nullptr;

  if (implicit_gemm_is_wgmma_tile(c.tile) && sizeof(T) == 2) {
    // Hopper's wgmma tiles (fp16/bf16 fprop; elsewhere the host runs their mma.sync twin, as below)
    if (splits > 1) usage("the wgmma tiles (6, 7) have no split-K variant");
    if constexpr (sizeof(T) == 2) {
      dispatch_implicit_gemm_wgmma_tile(c.tile, [&](auto cfg) {
        using Cfg = decltype(cfg);
        constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, true, true>() + kWgmmaAlignmentSlack;  // as the launcher
        emu_launch(tile_grid(ceil_div(M, Cfg::BM), ceil_div(Kg, Cfg::BN), G), Cfg::THREADS, smem,
                   conv2d_implicit_gemm_fprop_wgmma_kernel<T, Cfg>, padded, gather_divisors(padded, false),
                   static_cast<const T*>(xd.data()),
                   static_cast<const T*>(wd.data()), scale_arg, shift_arg, residual_arg, c.relu, yd.data());
        return cudaSuccess;
      });
    }
  } else
  // (the extension builds the split variant for kImplicitGemmSplitTile only; the emulation runs it on any tile)
  dispatch_implicit_gemm_tile(implicit_gemm_mma_sync_twin(c.tile), [&](auto cfg) {
    using Cfg = decltype(cfg);
    constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, true, true>();
    const dim3 grid = tile_grid(ceil_div(M, Cfg::BM), ceil_div(Kg, Cfg::BN), G * splits);
    if (splits > 1) {
      emu_launch(grid, Cfg::THREADS, smem, conv2d_implicit_gemm_fprop_kernel<T, Cfg, true>, padded,
                 gather_divisors(padded, false), splits,
                 static_cast<const T*>(xd.data()), static_cast<const T*>(wd.data()), scale_arg, shift_arg,
                 residual_arg, c.relu, yd.data(), partial.data());
    } else {
      emu_launch(grid, Cfg::THREADS, smem, conv2d_implicit_gemm_fprop_kernel<T, Cfg, false>, padded,
                 gather_divisors(padded, false), 1,
                 static_cast<const T*>(xd.data()), static_cast<const T*>(wd.data()), scale_arg, shift_arg,
                 residual_arg, c.relu, yd.data(), static_cast<float*>(nullptr));
    }
    return cudaSuccess;
  });
  if (splits > 1) {  // a small grid-stride grid: blocks and threads both loop
    emu_launch(dim3(3, 1, 1), 64, 0, conv2d_implicit_gemm_fprop_reduce_kernel<T>,
               static_cast<const float*>(partial.data()), M * c.K, c.K, splits, scale_arg, shift_arg, residual_arg,
               c.relu, yd.data());
  }

  Mismatches bad;
  for (int64_t m = 0; m < M; ++m) {
    const Pixel out = split_pixel(m, P, Q);
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t g = k / Kg;
      double sum = 0;
      for (int64_t r = 0; r < c.R; ++r)
        for (int64_t s = 0; s < c.S; ++s) {
          const int64_t h = out.y * c.stride_h - c.pad_h + r * c.dil_h, wi = out.x * c.stride_w - c.pad_w + s * c.dil_w;
          if (h < 0 || h >= c.H || wi < 0 || wi >= c.W) continue;
          for (int64_t ch = 0; ch < Cg; ++ch)
            sum += static_cast<double>(as_element<T>(x[((out.n * c.H + h) * c.W + wi) * c.C + g * Cg + ch])) *
                   as_element<T>(w[((k * c.R + r) * c.S + s) * Cg + ch]);
        }
      float v = static_cast<float>(sum);  // exact (see the top of the file)
      if (c.scale) v *= as_element<T>(scale[k]);
      if (c.shift) v += as_element<T>(shift[k]);
      if (c.residual) v += as_element<T>(residual[m * c.K + k]);
      if (c.relu && v < 0.f) v = 0.f;
      bad.check(as_element<T>(v), to_host_float(yd[m * c.K + k]), at({{"m", m}, {"k", k}}));
    }
  }
  std::printf("  fprop: %d split(s) of %lld reduction tiles\n", splits, static_cast<long long>(k_tiles));
  return bad.report() + damaged_guards(xd, wd, scaled, shiftd, residuald, yd, partial);
}

// ---- dgrad --------------------------------------------------------------------------------------------

// dx = conv's adjoint applied to dy, on the tensors conv2d_implicit_gemm_dgrad_cuda prepares: dy's
// channels padded to 8 per group, the filter transposed to wt[g][c][r][s][k] with k padded.
template <typename T>
long run_dgrad(const Config& c, std::mt19937& rng) {
  const Conv2dProblem pb = problem_of(c);
  const int64_t G = c.groups, Cg = c.C / G, Kg = c.K / G, Kgp = padded_channels(Kg), P = pb.P, Q = pb.Q;
  const int64_t M = c.N * c.H * c.W;
  const std::vector<float> dy = random_values(c.N * P * Q * c.K, rng), w = random_values(c.K * c.R * c.S * Cg, rng);
  Conv2dProblem padded = pb;
  padded.K = G * Kgp;
  DeviceBuffer<T> dyd("dy", c.N * P * Q * padded.K), wtd("wt", G * Cg * c.R * c.S * Kgp), dxd("dx", M * c.C);
  for (int64_t pixel = 0; pixel < c.N * P * Q; ++pixel)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Kgp; ++k)
        dyd[pixel * padded.K + g * Kgp + k] = to_element<T>(k < Kg ? dy[pixel * c.K + g * Kg + k] : 0.f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t ch = 0; ch < Cg; ++ch)
      for (int64_t rs = 0; rs < c.R * c.S; ++rs)
        for (int64_t k = 0; k < Kgp; ++k)
          wtd[((g * Cg + ch) * c.R * c.S + rs) * Kgp + k] =
              to_element<T>(k < Kg ? w[((g * Kg + k) * c.R * c.S + rs) * Cg + ch] : 0.f);
  for (size_t i = 0; i < dxd.size(); ++i) dxd[i] = to_element<T>(NAN);

  if (implicit_gemm_is_wgmma_tile(c.tile) && sizeof(T) == 2) {
    // Hopper's wgmma tiles (fp16/bf16; fp32 runs their mma.sync twin, as below)
    if constexpr (sizeof(T) == 2) {
      dispatch_implicit_gemm_wgmma_tile(c.tile, [&](auto cfg) {
        using Cfg = decltype(cfg);
        constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, true, true>() + kWgmmaAlignmentSlack;  // as the launcher
        emu_launch(tile_grid(ceil_div(M, Cfg::BM), ceil_div(Cg, Cfg::BN), G), Cfg::THREADS, smem,
                   conv2d_implicit_gemm_dgrad_wgmma_kernel<T, Cfg>, padded, gather_divisors(padded, true),
                   static_cast<const T*>(dyd.data()),
                   static_cast<const T*>(wtd.data()), dxd.data());
        return cudaSuccess;
      });
    }
  } else {
    dispatch_implicit_gemm_tile(implicit_gemm_mma_sync_twin(c.tile), [&](auto cfg) {
      using Cfg = decltype(cfg);
      constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, true, true>();
      emu_launch(tile_grid(ceil_div(M, Cfg::BM), ceil_div(Cg, Cfg::BN), G), Cfg::THREADS, smem,
                 conv2d_implicit_gemm_dgrad_kernel<T, Cfg>, padded, gather_divisors(padded, true),
                 static_cast<const T*>(dyd.data()),
                 static_cast<const T*>(wtd.data()), dxd.data());
      return cudaSuccess;
    });
  }

  // reference: scatter every dy element through every tap
  std::vector<double> dx(M * c.C, 0.0);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t k = 0; k < c.K; ++k) {
          const int64_t g = k / Kg;
          const double d = as_element<T>(dy[((n * P + p) * Q + q) * c.K + k]);
          for (int64_t r = 0; r < c.R; ++r)
            for (int64_t s = 0; s < c.S; ++s) {
              const int64_t h = p * c.stride_h - c.pad_h + r * c.dil_h, wi = q * c.stride_w - c.pad_w + s * c.dil_w;
              if (h < 0 || h >= c.H || wi < 0 || wi >= c.W) continue;
              for (int64_t ch = 0; ch < Cg; ++ch)
                dx[((n * c.H + h) * c.W + wi) * c.C + g * Cg + ch] +=
                    d * as_element<T>(w[((k * c.R + r) * c.S + s) * Cg + ch]);
            }
        }
  Mismatches bad;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t ch = 0; ch < c.C; ++ch)
      bad.check(as_element<T>(static_cast<float>(dx[m * c.C + ch])), to_host_float(dxd[m * c.C + ch]),
                at({{"m", m}, {"c", ch}}));
  return bad.report() + damaged_guards(dyd, wtd, dxd);
}

// ---- wgrad --------------------------------------------------------------------------------------------

// dw = dy^T * im2col(x) split over the reduction, then the split-sum kernel, on the tensors
// conv2d_implicit_gemm_wgrad_cuda prepares (dy's and x's channels padded to 8 per group); the result is
// the padded KRSC filter, whose padding must come out zero.
template <typename T>
long run_wgrad(const Config& c, std::mt19937& rng) {
  const Conv2dProblem pb = problem_of(c);
  const int64_t G = c.groups, Cg = c.C / G, Kg = c.K / G, Kgp = padded_channels(Kg), Cgp = padded_channels(Cg);
  const int64_t P = pb.P, Q = pb.Q;
  const std::vector<float> dy = random_values(c.N * P * Q * c.K, rng), x = random_values(c.N * c.H * c.W * c.C, rng);
  Conv2dProblem padded = pb;
  padded.K = G * Kgp, padded.C = G * Cgp;
  DeviceBuffer<T> dyd("dy", c.N * P * Q * padded.K), xd("x", c.N * c.H * c.W * padded.C);
  for (int64_t pixel = 0; pixel < c.N * P * Q; ++pixel)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Kgp; ++k)
        dyd[pixel * padded.K + g * Kgp + k] = to_element<T>(k < Kg ? dy[pixel * c.K + g * Kg + k] : 0.f);
  for (int64_t pixel = 0; pixel < c.N * c.H * c.W; ++pixel)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t ch = 0; ch < Cgp; ++ch)
        xd[pixel * padded.C + g * Cgp + ch] = to_element<T>(ch < Cg ? x[pixel * c.C + g * Cg + ch] : 0.f);
  // conv2d_implicit_gemm_wgrad_splits' rule for an explicit request: no empty split
  constexpr int BK = ImplicitGemmElement<T>::BK;
  const int64_t k_tiles = ceil_div(c.N * P * Q, BK);
  int splits = 1;
  if (k_tiles > 1) {
    const int64_t per_split = ceil_div(k_tiles, std::min<int64_t>(c.splits, k_tiles));
    splits = static_cast<int>(ceil_div(k_tiles, per_split));
  }
  const int64_t Ncols = c.R * c.S * Cgp, count = padded.K * Ncols;
  DeviceBuffer<float> partial("partial", splits * count);
  DeviceBuffer<T> dwd("dw", count);
  for (size_t i = 0; i < partial.size(); ++i) partial[i] = NAN;

  dispatch_implicit_gemm_tile(implicit_gemm_mma_sync_twin(c.tile), [&](auto cfg) {
    using Cfg = decltype(cfg);
    constexpr int smem = implicit_gemm_smem_bytes<T, Cfg, false, false>();
    emu_launch(tile_grid(ceil_div(Kgp, Cfg::BM), ceil_div(Ncols, Cfg::BN), G * splits), Cfg::THREADS, smem,
               conv2d_implicit_gemm_wgrad_kernel<T, Cfg>, padded, splits, static_cast<const T*>(dyd.data()),
               static_cast<const T*>(xd.data()), partial.data());
    return cudaSuccess;
  });
  // a small grid-stride grid: blocks and threads both loop
  emu_launch(dim3(3, 1, 1), 64, 0, conv2d_implicit_gemm_wgrad_reduce_kernel<T>,
             static_cast<const float*>(partial.data()), count, splits, dwd.data());

  Mismatches bad;
  for (int64_t k = 0; k < c.K; ++k) {
    const int64_t g = k / Kg, row = g * Kgp + k % Kg;
    for (int64_t r = 0; r < c.R; ++r)
      for (int64_t s = 0; s < c.S; ++s)
        for (int64_t ch = 0; ch < Cg; ++ch) {
          double sum = 0;
          for (int64_t n = 0; n < c.N; ++n)
            for (int64_t p = 0; p < P; ++p)
              for (int64_t q = 0; q < Q; ++q) {
                const int64_t h = p * c.stride_h - c.pad_h + r * c.dil_h, wi = q * c.stride_w - c.pad_w + s * c.dil_w;
                if (h < 0 || h >= c.H || wi < 0 || wi >= c.W) continue;
                sum += static_cast<double>(as_element<T>(dy[((n * P + p) * Q + q) * c.K + k])) *
                       as_element<T>(x[((n * c.H + h) * c.W + wi) * c.C + g * Cg + ch]);
              }
          bad.check(as_element<T>(static_cast<float>(sum)),
                    to_host_float(dwd[row * Ncols + (r * c.S + s) * Cgp + ch]),
                    at({{"k", k}, {"r", r}, {"s", s}, {"c", ch}}));
        }
  }
  for (int64_t row = 0; row < padded.K; ++row)  // the padded filters and channels are exactly zero
    for (int64_t j = 0; j < Ncols; ++j)
      if (row % Kgp >= Kg || j % Cgp >= Cg)
        bad.check(0.f, to_host_float(dwd[row * Ncols + j]), at({{"padded row", row}, {"column", j}}));
  std::printf("  wgrad: %d split(s) of %lld reduction tiles\n", splits, static_cast<long long>(k_tiles));
  return bad.report() + damaged_guards(dyd, xd, partial, dwd);
}

// ---- dispatch -----------------------------------------------------------------------------------------

template <typename T>
long run_pass(const Config& c, std::mt19937& rng) {
  if (c.pass == "fprop") {
    if constexpr ((EMU_PASSES & 1) != 0) return run_fprop<T>(c, rng);
  } else if (c.pass == "dgrad") {
    if constexpr ((EMU_PASSES & 2) != 0) return run_dgrad<T>(c, rng);
  } else if (c.pass == "wgrad") {
    if constexpr ((EMU_PASSES & 4) != 0) return run_wgrad<T>(c, rng);
  } else {
    usage("pass= is fprop, dgrad or wgrad");
  }
  usage("this build leaves out pass " + c.pass);
}

long run(const Config& c, std::mt19937& rng) {
  if (c.dtype == "fp16") {
    if constexpr ((EMU_DTYPES & 1) != 0) return run_pass<__half>(c, rng);
  } else if (c.dtype == "bf16") {
    if constexpr ((EMU_DTYPES & 2) != 0) return run_pass<__nv_bfloat16>(c, rng);
  } else if (c.dtype == "fp32") {
    if constexpr ((EMU_DTYPES & 4) != 0) return run_pass<float>(c, rng);
  } else {
    usage("dtype= is fp16, bf16 or fp32");
  }
  usage("this build leaves out dtype " + c.dtype);
}

}  // namespace

int main(int argc, char** argv) {
  const Config c = parse(argc, argv);
  g_cp_async_immediate = c.immediate;
  g_wgmma_immediate = c.wgmma_immediate;
  g_divide = c.divide;
  std::mt19937 rng(20240601);
  const long failures = run(c, rng);
  const long conflicted = g_ldmatrix_conflicted_phases.load(), phases = g_ldmatrix_phases.load();
  const long copy_conflicted = g_cp_async_conflicted_phases.load(), copy_phases = g_cp_async_phases.load();
  if (conflicted != 0) std::printf("  %ld of %ld ldmatrix phases have shared-memory bank conflicts\n", conflicted, phases);
  if (copy_conflicted != 0)
    std::printf("  %ld of %ld cp.async phases have shared-memory bank conflicts\n", copy_conflicted, copy_phases);
  const long epilogue_conflicted = g_epilogue_conflicted_phases.load(), epilogue_phases = g_epilogue_phases.load();
  if (epilogue_conflicted != 0)
    std::printf("  %ld of %ld epilogue staging phases have shared-memory bank conflicts\n", epilogue_conflicted,
                epilogue_phases);
  const long races = g_shared_races.load();
  if (races != 0) std::printf("  %ld shared-memory races; the first: %s\n", races, g_first_shared_race);
  const bool ok = failures == 0 && conflicted == 0 && copy_conflicted == 0 && epilogue_conflicted == 0 && races == 0;
  std::printf("%s: %s (%ld ldmatrix phases, %ld cp.async phases, %ld epilogue staging phases)\n", c.text.c_str(),
              ok ? "bit-exact" : "FAILED", phases, copy_phases, epilogue_phases);
  return ok ? 0 : 1;
}
