// A CPU emulation of the CUDA execution model the implicit-GEMM kernels (csrc/cuda/implicit_gemm.cuh,
// csrc/cuda/conv2d_implicit_gemm_*_kernel.cu) rely on, so that g++ can run their unmodified C++ on a
// machine without a GPU; the kernels of the build-free path (tests/test_nvrtc_path.py) run on it too. tests/test_kernel_emulation.py compiles copies of the kernel sources in which
// only the bodies of the PTX wrappers are replaced by the functions below:
//
//   cp.async.{ca,cg} 16 B    emu_cp_async: copy (or zero-fill) deferred to the issuing thread's
//   commit_group / wait_group  emu_commit / emu_wait, or done at issue (g_cp_async_immediate)
//   ldmatrix.x4 (.trans)     emu_ldmatrix: warp-collective, the PTX ISA's fragment layout
//   mma.sync m16n8k16 / k8   emu_mma: warp-collective, the PTX ISA's A/B/C fragment layouts
//   cvt.rna.tf32.f32         emu_tf32
//   wgmma.mma_async (sm_90a) emu_wgmma: warpgroup-collective, descriptors decoded as the PTX ISA defines
//   wgmma commit / wait_group  emu_wgmma_commit / emu_wgmma_wait: the MMAs read shared memory and update the
//                            accumulators at wait_group (the latest moment) or at issue (g_wgmma_immediate)
//   wgmma.fence, fence.proxy.async  emu_wgmma_fence / emu_fence_proxy_async: bookkeeping that a wgmma checks
//   st.global.v4.b32         emu_st_global_16: the staged epilogue's 16-byte stores (aligned, in bounds)
//
// Every shared-memory access of those wrappers (copies landing, ldmatrix rows, wgmma operands, the staged
// epilogue's stores and loads) is also checked for races against the block's barriers: see note_shared_access.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a block barrier, the warp-collective
// instructions meet at a warp barrier. This is an emulation on the CPU, not a GPU run: it checks the
// kernels' index math, fragment layouts, cp.async pipeline synchronisation and the alignment and bounds of
// their cp.async / ldmatrix addresses (plus the bank-conflict-free shared-memory layouts the kernels
// document, a property of the addresses: see bank_groups_conflict), and that their barriers order every pair of
// shared-memory accesses that needs it (note_shared_access). It says nothing about speed, nor about
// real hardware behaviour beyond the PTX ISA's documented semantics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define EMU_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "emulation check failed (%s:%d): %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                                       \
      std::fprintf(stderr, "\n");                                                              \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)

// ---- the CUDA built-ins the kernels use ------------------------------------------------------------------

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
inline thread_local uint3 threadIdx, blockIdx;
inline uint3 gridDim, blockDim;  // one launch at a time
// kernel_utils.cuh's block_sum uses it; no implicit-GEMM kernel does
inline float __shfl_down_sync(unsigned, float, int) {
  EMU_CHECK(false, "__shfl_down_sync is not emulated");
  return 0.f;
}
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
// The staged epilogue's 16-byte global loads (__ldg: ld.global.nc.v4.u32): aligned, and inside a buffer the driver
// registered (defined below, with the other global-memory checks; its stores: emu_st_global_16).
inline uint4 __ldg(const uint4* p);
using std::isnan;

// ---- emulated machine state --------------------------------------------------------------------------

// Global memory: the buffers the driver registered (a valid cp.async must read inside one of them).
struct GlobalBuffer {
  const unsigned char* begin;
  size_t bytes;
};
inline std::vector<GlobalBuffer> g_global_buffers;

// cp.async completion: false lands a copy at the wait_group that retires its group (the latest moment
// the PTX ISA allows), true at issue (the earliest). Both must give the same result.
inline bool g_cp_async_immediate = false;
// wgmma completion likewise: false at the wait_group that retires its group, true at issue. Copies landing early
// with MMAs reading late is the combination that catches a stage refilled under MMAs still in flight.
inline bool g_wgmma_immediate = false;

// Shared-memory phases of 8 lanes' 16-byte accesses (an ldmatrix matrix, a quarter of a warp's cp.async),
// and those with a bank conflict.
inline std::atomic<long> g_ldmatrix_phases{0}, g_ldmatrix_conflicted_phases{0};
inline std::atomic<long> g_cp_async_phases{0}, g_cp_async_conflicted_phases{0};
// The staged epilogue's shared-memory accesses (stage_store2: phases of 16 lanes' 8-byte stores; stage_load4: of 8
// lanes' 16-byte loads), and those with a bank conflict.
inline std::atomic<long> g_epilogue_phases{0}, g_epilogue_conflicted_phases{0};

// What the lanes of a warp exchange at a warp-collective instruction.
struct WarpExchange {
  const void* row[32];  // ldmatrix: the row address each lane supplies
  long copy_dst[32];    // cp.async: each lane's shared-memory destination offset
  long stage_at[32];    // the staged epilogue: each lane's shared-memory offset
  uint32_t a[32][4];    // mma: each lane's A and B fragment registers
  uint32_t b[32][2];
};

// What the threads of a warpgroup (4 warps) exchange at a wgmma: each one's descriptors, which must agree.
struct WarpgroupExchange {
  uint64_t desc[128][2];
};

// A block's shared memory in 8-byte granules (the smallest access a wrapper makes is an 8-byte staging store), each
// with the last write and the reads of the latest epoch that read it, for the race check (note_shared_access). An
// epoch counts the barriers a thread has passed; every thread passes the same ones, so it is the block's too.
enum class SharedAccessKind : uint8_t {
  kThread,  // one thread's load or store (the staged epilogue) or the landing of its cp.async
  kWarp,    // an ldmatrix: warp-collective, its reads complete before any lane goes on
  kWgmma,   // a wgmma's operand reads: warpgroup-collective and asynchronous, from its issue to its wait_group
};
// A thread's clocks at an access, or at the issue of an asynchronous one (see note_shared_access): the barriers it
// had passed (the epoch), its __syncwarp calls, its ldmatrix calls, the wgmmas it had retired, and its shared-memory
// operations so far (program order). Lanes of a warp count the same __syncwarp and ldmatrix calls, and threads of
// a warpgroup the same wgmmas.
struct ThreadClock {
  int epoch, syncs, collectives, wgmmas_retired;
  long seq;
};
struct SharedRead {
  SharedAccessKind kind;
  int unit;    // the thread, warp or warpgroup
  int syncs;   // kThread: the __syncwarp calls its thread had made
  long order;  // kThread: the thread's seq; kWarp: the lanes' ldmatrix count before it; kWgmma: the wgmma's index
};
struct SharedGranule {
  static constexpr int kMaxReads = 16;  // distinct readers per epoch (a TF32 element: 2 lanes of each of 4 warps)
  int write_epoch = -1, writer = -1, writer_syncs = 0;  // the last write, at its completion
  long writer_seq = 0;
  int read_epoch = -1, reads = 0;
  SharedRead read[kMaxReads];
};
inline std::atomic<long> g_shared_races{0};
inline char g_first_shared_race[512];  // written under the block's race_lock by the first race

struct BlockContext;
// Runs once per __syncthreads, after every thread arrived and before any leaves: notes whether every thread had
// fenced its landed cp.async copies to the async proxy (what a wgmma reading them after the barrier needs).
struct BarrierCompletion {
  BlockContext* block;
  void operator()() noexcept;
};

struct BlockContext {
  std::barrier<BarrierCompletion>* block_barrier;
  std::vector<char> unfenced_at_barrier;  // per thread, written as it arrives
  bool copies_fenced_at_last_barrier = true;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<WarpExchange> warps;
  std::vector<std::unique_ptr<std::barrier<>>> warpgroup_barriers;  // when the block is whole warpgroups
  std::vector<WarpgroupExchange> warpgroups;
  unsigned char* smem;
  size_t smem_bytes;
  std::mutex race_lock;  // guards shadow
  std::vector<SharedGranule> shadow;
};

inline thread_local BlockContext* t_block;
inline thread_local unsigned char* emu_smem;  // the patched kernels' `extern __shared__` array

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
  ThreadClock issued;  // the issuing thread's clocks: the copy may land any time from then to its wait_group
  bool landed;    // its bytes written at issue (g_cp_async_immediate); noted for the race check at the wait still
};
// A thread's asynchronous operations in commit groups, as cp.async and wgmma both track them: the open group
// (issued since the last commit), then the committed groups, oldest first.
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::vector<std::vector<Op>> committed;

  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // wait_group n: completes (complete(op)) every committed group but the newest n; the open group is untouched.
  template <typename F>
  void retire(int n, F&& complete) {
    while (static_cast<int>(committed.size()) > n) {
      for (const Op& op : committed.front()) complete(op);
      committed.erase(committed.begin());
    }
  }
  bool outstanding() const {
    bool any = !open.empty();
    for (const auto& group : committed) any |= !group.empty();
    return any;
  }
  void clear() {
    open.clear();
    committed.clear();
  }
};
inline thread_local AsyncGroups<PendingCopy> t_copies;
// This thread landed cp.async copies (the generic proxy) not yet fenced to the async proxy (fence.proxy.async),
// which wgmma reads shared memory through.
inline thread_local bool t_unfenced_copies = false;
// The race check's clocks (ThreadClock): the __syncthreads this thread has passed (its epoch), its __syncwarp
// calls, its ldmatrix calls, the wgmmas it has issued and retired, and its shared-memory operations.
inline thread_local int t_barriers = 0, t_warp_syncs = 0, t_collectives = 0, t_wgmmas_issued = 0,
                        t_wgmmas_retired = 0;
inline thread_local long t_seq = 0;
// Now, for a synchronous access or the issue of an asynchronous one; counts as one of the thread's operations.
inline ThreadClock clock_now() {
  return ThreadClock{t_barriers, t_warp_syncs, t_collectives, t_wgmmas_retired, t_seq++};
}

inline void BarrierCompletion::operator()() noexcept {
  block->copies_fenced_at_last_barrier =
      std::none_of(block->unfenced_at_barrier.begin(), block->unfenced_at_barrier.end(), [](char u) { return u != 0; });
}

inline void __syncthreads() {
  t_block->unfenced_at_barrier[threadIdx.x] = t_unfenced_copies;
  t_block->block_barrier->arrive_and_wait();
  ++t_barriers;
}

// The shared-memory address of the block's first byte, as __cvta_generic_to_shared reports it: 16-byte aligned
// like the hardware's dynamic shared memory, and deliberately not 128- or 512-byte aligned, so that a kernel whose
// layout depends on the address (the wgmma swizzle) must align its own stages. (The bank checks read offsets from
// the block's first byte, which the hardware's shared window aligns to 128 bytes.)
inline constexpr long kSharedWindowBase = 48;

inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - t_block->smem + kSharedWindowBase);
}

// Shared memory serves a warp's accesses of `bytes` each in phases of 128 / bytes lanes (8 lanes of 16 bytes, 16 of
// 8); a phase is conflict-free when its accesses fall in distinct `bytes`-wide slots of a 128-byte line (32 banks
// of 4 bytes). `offsets`: the shared-memory byte offsets of one phase's `lanes` accesses.
inline bool bank_slots_conflict(const long* offsets, int lanes, int bytes) {
  unsigned seen = 0;
  bool conflict = false;
  for (int i = 0; i < lanes; ++i) {
    const unsigned slot = 1u << ((offsets[i] % 128) / bytes);
    conflict |= (seen & slot) != 0;
    seen |= slot;
  }
  return conflict;
}
// The 16-byte case (an ldmatrix matrix, a quarter of a warp's cp.async): 8 chunks in the 8 bank groups.
inline bool bank_groups_conflict(const long (&offsets)[8]) { return bank_slots_conflict(offsets, 8, 16); }

// ---- shared-memory races -------------------------------------------------------------------------------

// Checks thread t's access to shared bytes [offset, offset + bytes) against each granule's last write and latest
// reads, then records it. `at`: t's clocks when it issued the access (clock_now() for a synchronous one; a cp.async
// may land, and a wgmma read, any time from its issue to the wait_group that retires it, where it is recorded).
// Two accesses to a granule, one of them a write, by different threads, or an asynchronous one and another access
// of the issuing thread, race unless the earlier one is ordered before the later one's issue:
//   - by a __syncthreads between them: the earlier one's epoch is below the later one's issue epoch;
//   - by program order, in the same thread: the earlier one completed before the later one was issued;
//   - within a warp: by a __syncwarp between them (a thread's count of them is its warp's), or because the earlier
//     one was an ldmatrix of t's warp that t had executed (every lane has its result before any lane goes on);
//   - for a write, because the earlier access was a wgmma read of t's warpgroup that t had retired (wait_group).
// Only a barrier orders a write before a wgmma's reads: the async proxy sees no warp's order.
// What it cannot see: accesses outside the wrappers (no implicit-GEMM kernel makes any), and ordering that a kernel
// would get from anything but barriers, warp syncs, warp collectives and wgmma waits.
inline void note_shared_access(long offset, int bytes, SharedAccessKind kind, bool write, const ThreadClock& at,
                               int unit, long order = 0) {
  // (an access outside the shared memory is its caller's to report)
  if (offset < 0 || offset + bytes > static_cast<long>(t_block->smem_bytes)) return;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, group = t / 128;
  const int epoch = t_barriers, window_start = at.epoch;
  // orders an earlier access of thread `other` (a write, or a kThread read) before this one's issue
  const auto ordered_in_warp = [&](int other, int other_syncs, long other_seq) {
    if (kind == SharedAccessKind::kWgmma) return false;
    return other == t ? other_seq < at.seq : other / 32 == warp && other_syncs < at.syncs;
  };
  std::lock_guard<std::mutex> lock(t_block->race_lock);
  for (long g = offset / 8; g <= (offset + bytes - 1) / 8; ++g) {
    SharedGranule& s = t_block->shadow[g];
    // the earlier access this one races with, if any: what it was (kind, write), whose (unit), when (epoch)
    bool race = false, other_write = false;
    SharedAccessKind other_kind = SharedAccessKind::kThread;
    int other = -1, other_epoch = -1;
    if (s.write_epoch >= window_start && !ordered_in_warp(s.writer, s.writer_syncs, s.writer_seq)) {
      race = other_write = true;
      other = s.writer, other_epoch = s.write_epoch;
    }
    if (write && s.read_epoch >= window_start) {
      for (int i = 0; i < s.reads && !race; ++i) {
        const SharedRead& r = s.read[i];
        race = !(r.kind == SharedAccessKind::kThread ? ordered_in_warp(r.unit, r.syncs, r.order)
                 : r.kind == SharedAccessKind::kWarp ? r.unit == warp && r.order < at.collectives
                                                     : r.unit == group && r.order < at.wgmmas_retired);
        other_kind = r.kind, other = r.unit, other_epoch = s.read_epoch;
      }
    }
    if (race && g_shared_races++ == 0) {
      const auto what = [](SharedAccessKind k, bool w) {
        return w ? "write" : k == SharedAccessKind::kThread ? "read" : k == SharedAccessKind::kWarp ? "ldmatrix"
                                                                                                    : "wgmma read";
      };
      const auto whose = [](SharedAccessKind k) {
        return k == SharedAccessKind::kThread ? "thread" : k == SharedAccessKind::kWarp ? "warp" : "warpgroup";
      };
      std::snprintf(g_first_shared_race, sizeof(g_first_shared_race),
                    "%s %d's %s of shared offset %ld (issued in epoch %d, done by epoch %d) races with %s %d's %s "
                    "(epoch %d): nothing orders them (block (%u, %u, %u))", whose(kind), unit, what(kind, write),
                    8 * g, window_start, epoch, whose(other_kind), other, what(other_kind, other_write), other_epoch,
                    blockIdx.x, blockIdx.y, blockIdx.z);
    }
    if (write) {  // recorded as complete now: later accesses are ordered after it by what follows now
      s.write_epoch = epoch, s.writer = t, s.writer_syncs = t_warp_syncs, s.writer_seq = t_seq - 1;
      continue;
    }
    if (s.read_epoch != epoch) s.read_epoch = epoch, s.reads = 0;
    const int syncs = kind == SharedAccessKind::kThread ? at.syncs : 0;
    const long read_order = kind == SharedAccessKind::kThread ? at.seq : order;
    int i = 0;
    while (i < s.reads && !(s.read[i].kind == kind && s.read[i].unit == unit)) ++i;
    if (i == s.reads) {
      EMU_CHECK(s.reads < SharedGranule::kMaxReads, "more than %d distinct readers of a shared granule in one epoch "
                "(raise SharedGranule::kMaxReads)", SharedGranule::kMaxReads);
      s.read[s.reads++] = SharedRead{kind, unit, syncs, read_order};
    } else {  // (a later write must follow every read of the unit: keep the latest)
      s.read[i].syncs = std::max(s.read[i].syncs, syncs);
      s.read[i].order = std::max(s.read[i].order, read_order);
    }
  }
}

// ---- cp.async -----------------------------------------------------------------------------------------

inline bool inside_global_buffer(const unsigned char* p, size_t bytes) {
  for (const GlobalBuffer& b : g_global_buffers)
    if (p >= b.begin && p + bytes <= b.begin + b.bytes) return true;
  return false;
}

// Lands a copy (its wait_group retires it), or writes its bytes at issue (the caller, with g_cp_async_immediate).
// Either way the race check sees the write at the wait, the last moment it may happen, checked back to its issue.
inline void write_copy(const PendingCopy& c) {
  t_unfenced_copies = true;
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);  // source size 0: zero-fill
  }
}
inline void land(const PendingCopy& c) {
  if (!c.landed) write_copy(c);
  t_unfenced_copies = true;
  ++t_seq;  // (the landing: an operation of the thread's, after everything it did before the wait)
  note_shared_access(static_cast<const unsigned char*>(c.dst) - t_block->smem, 16, SharedAccessKind::kThread, true,
                     c.issued, static_cast<int>(threadIdx.x));
}

// st.global.v4.b32: the staged epilogue's 16-byte stores, aligned and inside a registered buffer.
inline void emu_st_global_16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  EMU_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "16-byte store to %p, not 16-byte aligned", p);
  EMU_CHECK(inside_global_buffer(static_cast<const unsigned char*>(p), 16), "16-byte store to %p outside every "
            "global buffer", p);
  const uint32_t words[4] = {a, b, c, d};
  std::memcpy(p, words, 16);
}
inline uint4 __ldg(const uint4* p) {
  EMU_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "16-byte load from %p, not 16-byte aligned",
            static_cast<const void*>(p));
  EMU_CHECK(inside_global_buffer(reinterpret_cast<const unsigned char*>(p), 16), "16-byte load from %p outside every "
            "global buffer", static_cast<const void*>(p));
  return *p;
}

inline void emu_cp_async(void* dst, const void* src, bool valid) {
  const auto d = static_cast<unsigned char*>(dst);
  const auto s = static_cast<const unsigned char*>(src);
  const long offset = static_cast<long>(d - t_block->smem);
  EMU_CHECK(offset >= 0 && offset + 16 <= static_cast<long>(t_block->smem_bytes),
            "cp.async destination outside the block's shared memory (offset %ld of %zu)", offset,
            t_block->smem_bytes);
  EMU_CHECK(offset % 16 == 0, "cp.async destination not 16-byte aligned (shared offset %ld)", offset);
  EMU_CHECK(reinterpret_cast<uintptr_t>(src) % 16 == 0, "cp.async source %p not 16-byte aligned", src);
  // a zero-fill copy reads nothing, but its address must still be a global one (the kernels pass the base)
  EMU_CHECK(inside_global_buffer(s, valid ? 16 : 0), "cp.async source %p outside every global buffer (valid %d)",
            src, valid);
  // The kernels' copies are warp-wide instructions (every lane of a warp issues the same sequence): the lanes
  // meet here so that each quarter warp's destinations can be checked for bank conflicts.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int lanes = std::min(32, static_cast<int>(blockDim.x) - 32 * warp);
  WarpExchange& x = t_block->warps[warp];
  x.copy_dst[lane] = offset;
  t_block->warp_barriers[warp]->arrive_and_wait();
  if (lane == 0) {
    for (int q = 0; q + 8 <= lanes; q += 8) {
      long phase[8];
      for (int i = 0; i < 8; ++i) phase[i] = x.copy_dst[q + i];
      ++g_cp_async_phases;
      if (bank_groups_conflict(phase)) ++g_cp_async_conflicted_phases;
    }
  }
  t_block->warp_barriers[warp]->arrive_and_wait();  // lane 0 has read copy_dst before any lane reuses it
  const PendingCopy c{dst, src, valid, clock_now(), g_cp_async_immediate};
  if (c.landed) write_copy(c);
  t_copies.open.push_back(c);
}

inline void emu_commit() { t_copies.commit(); }

// cp.async.wait_group n: every committed group but the newest n has landed (the open group is untouched).
inline void emu_wait(int n) { t_copies.retire(n, land); }

// ---- the staged epilogue's shared-memory accesses ---------------------------------------------------------

inline void __syncwarp(unsigned = 0xffffffffu) {
  t_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait();
  ++t_warp_syncs;
}

// A warp-wide shared-memory access of `bytes` (8 or 16) per lane at p: checked for alignment and bounds, and its
// phases (16 lanes of 8 bytes, 8 lanes of 16) for bank conflicts (bank_slots_conflict).
inline void check_stage_access(const void* p, int bytes) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const long offset = static_cast<long>(static_cast<const unsigned char*>(p) - t_block->smem);
  EMU_CHECK(offset >= 0 && offset + bytes <= static_cast<long>(t_block->smem_bytes),
            "epilogue staging outside the block's shared memory (offset %ld of %zu)", offset, t_block->smem_bytes);
  EMU_CHECK(offset % bytes == 0, "epilogue staging access of %d bytes misaligned (shared offset %ld)", bytes, offset);
  EMU_CHECK(static_cast<int>(blockDim.x) - 32 * warp >= 32, "the staged epilogue in a partial warp");
  WarpExchange& x = t_block->warps[warp];
  x.stage_at[lane] = offset;
  t_block->warp_barriers[warp]->arrive_and_wait();
  if (lane == 0) {
    const int lanes_per_phase = 128 / bytes;
    for (int q = 0; q < 32; q += lanes_per_phase) {
      ++g_epilogue_phases;
      if (bank_slots_conflict(x.stage_at + q, lanes_per_phase, bytes)) ++g_epilogue_conflicted_phases;
    }
  }
  t_block->warp_barriers[warp]->arrive_and_wait();  // lane 0 has read stage_at before any lane reuses it
}

// The TF32 fragments' scalar loads: a read of this thread's, for the race check.
inline float emu_load_shared_f32(const float* p) {
  const long offset = static_cast<long>(reinterpret_cast<const unsigned char*>(p) - t_block->smem);
  EMU_CHECK(offset >= 0 && offset + 4 <= static_cast<long>(t_block->smem_bytes) && offset % 4 == 0,
            "fp32 operand load outside the block's shared memory or misaligned (offset %ld)", offset);
  note_shared_access(offset, 4, SharedAccessKind::kThread, false, clock_now(), static_cast<int>(threadIdx.x));
  return *p;
}

inline void emu_stage_store2(float* p, float a, float b) {
  check_stage_access(p, 8);
  note_shared_access(reinterpret_cast<unsigned char*>(p) - t_block->smem, 8, SharedAccessKind::kThread, true,
                     clock_now(), static_cast<int>(threadIdx.x));
  p[0] = a, p[1] = b;
}

inline void emu_stage_load4(float (&v)[4], const float* p) {
  check_stage_access(p, 16);
  note_shared_access(reinterpret_cast<const unsigned char*>(p) - t_block->smem, 16, SharedAccessKind::kThread, false,
                     clock_now(), static_cast<int>(threadIdx.x));
  for (int i = 0; i < 4; ++i) v[i] = p[i];
}

// ---- ldmatrix -----------------------------------------------------------------------------------------

inline uint16_t load_b16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8j + i supplies row i of matrix j; lane
// (g = lane / 4, t = lane % 4) receives in r[j] the elements (g, 2t), (g, 2t + 1) of matrix j, or of its
// transpose with .trans.
inline void emu_ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  WarpExchange& x = t_block->warps[warp];
  const long offset = static_cast<long>(static_cast<const unsigned char*>(p) - t_block->smem);
  EMU_CHECK(offset >= 0 && offset + 16 <= static_cast<long>(t_block->smem_bytes),
            "ldmatrix row outside the block's shared memory (offset %ld)", offset);
  EMU_CHECK(offset % 16 == 0, "ldmatrix row not 16-byte aligned (shared offset %ld)", offset);
  // the row this lane names; the warp's reads are done before any lane goes on (t_collectives counts them)
  const ThreadClock at = clock_now();
  note_shared_access(offset, 16, SharedAccessKind::kWarp, false, at, warp, t_collectives++);
  x.row[lane] = p;
  t_block->warp_barriers[warp]->arrive_and_wait();
  if (lane == 0) {
    // one shared-memory phase per 8x8 matrix, its 8 rows of 16 bytes
    for (int j = 0; j < 4; ++j) {
      long phase[8];
      for (int i = 0; i < 8; ++i) phase[i] = static_cast<const unsigned char*>(x.row[8 * j + i]) - t_block->smem;
      ++g_ldmatrix_phases;
      if (bank_groups_conflict(phase)) ++g_ldmatrix_conflicted_phases;
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const auto row = static_cast<const unsigned char*>(x.row[8 * j + g]);
      lo = load_b16(row + 2 * (2 * t));
      hi = load_b16(row + 2 * (2 * t + 1));
    } else {
      lo = load_b16(static_cast<const unsigned char*>(x.row[8 * j + 2 * t]) + 2 * g);
      hi = load_b16(static_cast<const unsigned char*>(x.row[8 * j + 2 * t + 1]) + 2 * g);
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  t_block->warp_barriers[warp]->arrive_and_wait();  // the rows are read before any lane reuses x.row
}

// ---- mma.sync -----------------------------------------------------------------------------------------

inline float half_bits_to_float(uint16_t v) {
  __half_raw raw;
  raw.x = v;
  return __half2float(__half(raw));
}
inline float bfloat16_bits_to_float(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
// A TF32 operand register: the tensor core reads sign, exponent and the top 10 mantissa bits.
inline float tf32_bits_to_float(uint32_t v) { return std::bit_cast<float>(v & ~0x1fffu); }

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest with ties away from zero.
inline uint32_t emu_tf32(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // Inf, NaN
  return (u + 0x1000u) & ~0x1fffu;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (m16n8k8 .tf32 for fp32): d += a * b for the warp's
// 16 x 8 tile. The products are summed in double: the driver's operands make every sum exact, so the
// order the hardware adds in does not matter.
template <typename T>
inline void emu_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  WarpExchange& x = t_block->warps[warp];
  for (int i = 0; i < 4; ++i) x.a[lane][i] = a[i];
  x.b[lane][0] = b[0], x.b[lane][1] = b[1];
  t_block->warp_barriers[warp]->arrive_and_wait();
  constexpr bool kTf32 = sizeof(T) == 4;
  constexpr int kSteps = kTf32 ? 8 : 16;
  const auto element = [](uint32_t reg, int index) -> float {  // 16-bit element `index` (0 low, 1 high)
    const uint16_t bits = static_cast<uint16_t>(index ? reg >> 16 : reg & 0xffff);
    return std::is_same_v<T, __half> ? half_bits_to_float(bits) : bfloat16_bits_to_float(bits);
  };
  // The PTX ISA's fragment layouts (g = lane / 4, t = lane % 4).
  const auto A = [&](int row, int col) -> float {
    if constexpr (kTf32) {  // a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
      return tf32_bits_to_float(x.a[(row % 8) * 4 + col % 4][(row >= 8 ? 1 : 0) + (col >= 4 ? 2 : 0)]);
    } else {  // a0 (g, 2t..2t+1), a1 (g + 8, ..), a2 (g, 2t+8..), a3 (g + 8, 2t+8..)
      const uint32_t reg = x.a[(row % 8) * 4 + (col % 8) / 2][(row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0)];
      return element(reg, col % 2);
    }
  };
  const auto B = [&](int k, int n) -> float {
    if constexpr (kTf32) {  // b0 (t, g), b1 (t + 4, g)
      return tf32_bits_to_float(x.b[n * 4 + k % 4][k >= 4 ? 1 : 0]);
    } else {  // b0 (2t..2t+1, g), b1 (2t+8..2t+9, g)
      return element(x.b[n * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k % 2);
    }
  };
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {  // c0, c1 (g, 2t..2t+1), c2, c3 (g + 8, ..)
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double sum = d[i];
    for (int k = 0; k < kSteps; ++k) sum += static_cast<double>(A(row, k)) * B(k, col);
    d[i] = static_cast<float>(sum);
  }
  t_block->warp_barriers[warp]->arrive_and_wait();  // fragments are read before any lane reuses x.a, x.b
}

// ---- wgmma (sm_90a) ------------------------------------------------------------------------------------

// A wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} of this thread: its accumulators (N / 2 floats, the
// layout below) and the two descriptors.
struct PendingWgmma {
  float* d;
  int n;
  bool bf16;
  uint64_t desc_a, desc_b;
  ThreadClock issued;  // at its issue: it may read its operands any time from then to its wait_group
  int index;           // the issuing thread's count of wgmmas before it (the same in every thread of the warpgroup)
  bool ran;            // run at issue (g_wgmma_immediate); its reads noted for the race check at the wait still
};
inline thread_local AsyncGroups<PendingWgmma> t_wgmmas;
inline thread_local bool t_wgmma_fenced = false;  // a wgmma.fence since the accumulators were last touched

inline void emu_fence_proxy_async() { t_unfenced_copies = false; }
inline void emu_wgmma_fence() { t_wgmma_fenced = true; }

// The shared-memory byte address of element (row, k) of a K-major operand named by `desc`, as the PTX ISA's
// matrix descriptor defines it: start address bits 0-13, leading-dimension offset 16-29 (unused by swizzled
// K-major layouts), stride offset 32-45 (from one group of 8 rows to the next), base offset 49-51, layout type
// 62-63. Only the 64-byte swizzle (type 2) is emulated: rows of an 8-row group lie 64 bytes apart, and the
// swizzle XORs address bits [4, 6) with bits [7, 9) of the absolute address.
inline long wgmma_k_major_address(uint64_t desc, int row, int k, int element_bytes) {
  const long start = static_cast<long>(desc & 0x3FFF) << 4;
  const long stride = static_cast<long>((desc >> 32) & 0x3FFF) << 4;
  const int base_offset = static_cast<int>((desc >> 49) & 7), layout = static_cast<int>(desc >> 62);
  EMU_CHECK(layout == 2, "wgmma descriptor layout type %d: the emulation knows the 64-byte swizzle (2) only", layout);
  EMU_CHECK(base_offset == 0, "wgmma descriptor base offset %d (the kernels align their stages)", base_offset);
  const long linear = start + (row / 8) * stride + (row % 8) * 64 + static_cast<long>(k) * element_bytes;
  return linear ^ (((linear >> 7) & 3) << 4);
}

// d += A * B for one wgmma: A 64 x 16 and B N x 16, both K-major, read from shared memory now. This thread's
// accumulators: warp w of the warpgroup owns rows 16w .. 16w + 15; lane (g, t) holds in d[4j + e] the element
// (row 16w + g + 8 * (e / 2), column 8j + 2t + e % 2). The products are summed in double (exact: see the
// driver).
inline void run_wgmma(const PendingWgmma& op) {
  const int lane = threadIdx.x % 32, warp_in_group = (threadIdx.x / 32) % 4;
  const int g = lane / 4, t = lane % 4;
  const auto element = [&](long address) -> float {  // a shared-memory address (kSharedWindowBase + offset)
    const long offset = address - kSharedWindowBase;
    EMU_CHECK(offset >= 0 && offset + 2 <= static_cast<long>(t_block->smem_bytes),
              "wgmma operand outside the block's shared memory (offset %ld)", offset);
    const uint16_t bits = load_b16(t_block->smem + offset);
    return op.bf16 ? bfloat16_bits_to_float(bits) : half_bits_to_float(bits);
  };
  for (int i = 0; i < op.n / 2; ++i) {
    const int j = i / 4, e = i % 4;
    const int row = 16 * warp_in_group + g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
    double sum = op.d[i];
    for (int k = 0; k < 16; ++k)
      sum += static_cast<double>(element(wgmma_k_major_address(op.desc_a, row, k, 2))) *
             element(wgmma_k_major_address(op.desc_b, col, k, 2));
    op.d[i] = static_cast<float>(sum);
  }
}

// Completes a wgmma at the wait_group that retires it: runs it unless it ran at issue, and notes the warpgroup's
// operand reads for the race check (once, by its first thread: A's 64 rows and B's N, 16 k each), checked back to
// its issue.
inline void complete_wgmma(const PendingWgmma& op) {
  if (!op.ran) run_wgmma(op);
  ++t_wgmmas_retired;
  if (threadIdx.x % 128 != 0) return;
  for (int row = 0; row < 64 + op.n; ++row)
    for (int k = 0; k < 16; k += 4) {  // an 8-byte granule: 4 elements, contiguous under the swizzle
      const long address = row < 64 ? wgmma_k_major_address(op.desc_a, row, k, 2)
                                    : wgmma_k_major_address(op.desc_b, row - 64, k, 2);
      note_shared_access(address - kSharedWindowBase, 8, SharedAccessKind::kWgmma, false, op.issued,
                         static_cast<int>(threadIdx.x / 128), op.index);
    }
}

// wgmma.mma_async (warpgroup-collective): every thread of the warpgroup issues it, with the same descriptors,
// after a wgmma.fence and after fencing its landed copies to the async proxy.
template <typename T, int N>
inline void emu_wgmma(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  EMU_CHECK(!t_block->warpgroups.empty(), "wgmma in a block of %u threads (not whole warpgroups)", blockDim.x);
  EMU_CHECK(t_wgmma_fenced, "wgmma without a wgmma.fence since the accumulators were last accessed");
  EMU_CHECK(!t_unfenced_copies, "wgmma after cp.async copies landed without fence.proxy.async (thread %u)",
            threadIdx.x);
  EMU_CHECK(t_block->copies_fenced_at_last_barrier,
            "wgmma after a barrier that some thread reached with landed cp.async copies not fenced (fence.proxy.async)");
  const int group = threadIdx.x / 128, member = threadIdx.x % 128;
  WarpgroupExchange& x = t_block->warpgroups[group];
  x.desc[member][0] = desc_a, x.desc[member][1] = desc_b;
  t_block->warpgroup_barriers[group]->arrive_and_wait();
  for (int other = 0; other < 128; ++other)
    EMU_CHECK(x.desc[other][0] == desc_a && x.desc[other][1] == desc_b,
              "the threads of warpgroup %d issue a wgmma with different descriptors", group);
  t_block->warpgroup_barriers[group]->arrive_and_wait();  // all compared before any thread rewrites x.desc
  const PendingWgmma op{&d[0][0], N, std::is_same_v<T, __nv_bfloat16>, desc_a, desc_b, clock_now(), t_wgmmas_issued++,
                        g_wgmma_immediate};
  if (op.ran) run_wgmma(op);
  t_wgmmas.open.push_back(op);
}

inline void emu_wgmma_commit() { t_wgmmas.commit(); }

// wgmma.wait_group n: every committed group but the newest n has completed; the accumulators may then be read
// (and touched: a wgmma.fence is due before the next wgmma).
inline void emu_wgmma_wait(int n) {
  t_wgmmas.retire(n, complete_wgmma);
  t_wgmma_fenced = false;
  // wait_group is .aligned: the whole warpgroup executes it. Meeting here puts the first thread's record of the
  // retired wgmmas' reads before any thread of the warpgroup goes on to write over their operands.
  if (!t_block->warpgroups.empty()) t_block->warpgroup_barriers[threadIdx.x / 128]->arrive_and_wait();
}

// ---- launch -------------------------------------------------------------------------------------------

// Runs kernel<<<grid, threads, smem_bytes>>>(args...): the blocks one after another, each with one
// std::thread per CUDA thread and its shared memory poisoned with 0xff bytes (NaN in every element type),
// so that reading a stage before its copies landed shows in the result.
template <typename Kernel, typename... Args>
void emu_launch(dim3 grid, int threads, size_t smem_bytes, Kernel kernel, Args... args) {
  EMU_CHECK(threads > 0 && threads <= 1024, "block of %d threads", threads);
  const int warps = (threads + 31) / 32;  // the last one partial when threads is not a multiple of 32
  gridDim = uint3{grid.x, grid.y, grid.z};
  blockDim = uint3{static_cast<unsigned>(threads), 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        BlockContext block;
        std::barrier<BarrierCompletion> block_barrier(threads, BarrierCompletion{&block});
        block.block_barrier = &block_barrier;
        block.unfenced_at_barrier.assign(threads, 0);
        for (int w = 0; w < warps; ++w)
          block.warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
        block.warps.resize(warps);
        if (threads % 128 == 0) {
          for (int g = 0; g < threads / 128; ++g) block.warpgroup_barriers.push_back(std::make_unique<std::barrier<>>(128));
          block.warpgroups.resize(threads / 128);
        }
        // 128-byte aligned, as the hardware's shared window (the bank check reads offsets from here)
        block.smem = reinterpret_cast<unsigned char*>(std::aligned_alloc(128, (smem_bytes + 255) / 128 * 128));
        block.smem_bytes = smem_bytes;
        block.shadow.resize((smem_bytes + 7) / 8);
        std::memset(block.smem, 0xff, smem_bytes);
        std::vector<std::thread> workers;
        for (int t = 0; t < threads; ++t)
          workers.emplace_back([&, t] {
            threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
            blockIdx = uint3{x, y, z};
            t_block = &block;
            emu_smem = block.smem;
            t_copies.clear();
            t_unfenced_copies = false;
            t_wgmmas.clear();
            t_wgmma_fenced = false;
            t_barriers = 0, t_warp_syncs = 0, t_collectives = 0, t_wgmmas_issued = 0, t_wgmmas_retired = 0;
            t_seq = 0;
            kernel(args...);
            EMU_CHECK(!t_copies.outstanding(), "thread %d of block (%u, %u, %u) exits with cp.async copies not waited for",
                      t, x, y, z);
            EMU_CHECK(!t_wgmmas.outstanding(), "thread %d of block (%u, %u, %u) exits with wgmma groups not waited for", t,
                      x, y, z);
          });
        for (std::thread& w : workers) w.join();
        std::free(block.smem);
      }
}
