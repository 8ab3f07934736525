// Host emulator for CUDA kernels: lets g++ compile and run the kernels of csrc/cuda on the CPU.
// Design: docs/cuda.md (the emulator).
//
// - Every CUDA thread of a block is a fiber: its own stack (mmap, with a guard page), started with
//   makecontext/swapcontext once and afterwards switched with __builtin_setjmp/__builtin_longjmp
//   (about 70 ns per switch). Blocks run one at a time, so `__shared__` is `static`.
// - A fiber runs until it parks: at __syncthreads(), at a warp collective (__syncwarp,
//   __shfl_*_sync, __ballot_sync, nvcuda::wmma::*_sync) or when it returns. A barrier releases
//   when every thread of the block waits at the same __syncthreads(); a warp collective completes
//   when every lane named in its mask has arrived at the same collective. Everything else is an
//   error with file and line (thrown as cuda_emu::Error by emu_launch): threads waiting at
//   different barriers, a thread exiting while others wait at a barrier, a lane of a mask that
//   exits or never arrives, a lane calling a collective without its own bit in the mask, deadlock.
// - The order in which ready threads run is selectable (set_run_order / NONLOCAL_KERNELS_EMU_ORDER:
//   "forward", "reverse", "random:SEED"): the ready thread first in that order always runs next,
//   so under "forward" warp 0 runs ahead to the next barrier before warp 1 starts, under
//   "reverse" the last warp does, under "random" a fresh random order after every barrier. Blocks
//   run in the same order. A missing barrier gives a wrong result under some order, so tests run
//   several.
// - Dynamic shared memory (EMU_DYNAMIC_SMEM / cuda_emu::dynamic_smem) is a fresh allocation of
//   exactly the requested size, filled with 0xFF (NaN as float) at every block start.
// - nvcuda::wmma for m16n16k16 (__half, __nv_bfloat16 -> float) and m16n16k8 (precision::tf32 ->
//   float): a fragment holds num_elements values per lane mapped to tile positions through a fixed
//   pseudo-random permutation, so kernels cannot depend on a lane layout (element-wise loops over
//   frag.x[i] work). load/store check 32-byte alignment and ldm (a multiple of 16 bytes, at least
//   the tile's width) and that every lane passes the same pointer, ldm and layout; load reads
//   memory when the lane arrives, store writes after all lanes arrived, so a missing __syncwarp()
//   around them shows. mma_sync multiplies exactly in fp32 (tf32 operands truncated to 10 mantissa
//   bits, as the hardware reads them).
// - emu_launch(kernel, grid, block, smem_bytes, stream, args...) is kernel<<<grid, block,
//   smem_bytes, stream>>>(args...) under nvcc (see csrc/cuda/cuda_common.cuh).
// It cannot see races between blocks, bank conflicts, occupancy or speed.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is the host emulator: include it only from host-compiled (g++) sources"
#endif

#define NONLOCAL_CUDA_EMU 1

// CUDA's own crt/host_defines.h keeps these when they are already defined.
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#if defined(CUDA_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

#ifndef warpSize
#define warpSize 32
#endif

namespace cuda_emu {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Order { Forward, Reverse, Random };

namespace detail {

enum class St : uint8_t { Ready, Sync, Warp, Done, Failed };

struct Fiber;
struct WarpOp;
// Called once, in the scheduler, when every lane of `group` arrived at the same collective.
using CompleteFn = void (*)(Fiber* const* warp_lanes, unsigned group, const WarpOp& op);

struct WarpOp {
  const char* name;
  unsigned mask;
  const char* file;
  int line;
  bool any_site;  // __syncwarp: lanes may meet from different call sites
  CompleteFn complete;
  void* arg;  // per lane, lives on the lane's stack while it waits
};

struct Fiber {
  void* jmp[5];  // __builtin_setjmp buffer
  ucontext_t uc;
  char* stack = nullptr;  // usable region (above the guard page)
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  uint3 tid;
  int linear = 0, lane = 0, warp = 0;
  St state = St::Done;
  bool started = false;
  const char* sync_file = nullptr;
  int sync_line = 0;
  WarpOp op{};
};

struct Runtime {
  std::mutex mutex;
  std::vector<std::unique_ptr<Fiber>> fibers;
  int nthreads = 0;
  void* sched_jmp[5];
  ucontext_t sched_uc;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::string error;
  const char* launch_file = "";
  int launch_line = 0;
  bool order_set = false;
  Order order = Order::Forward;
  uint64_t seed = 0;
  size_t stack_bytes = 0;
  // Scheduling: the ready thread with the lowest rank runs next (see set_order_ranks).
  std::vector<int> by_rank, rank_of;
  std::vector<uint64_t> ready_bits;  // by rank
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

// Read by the threadIdx/blockIdx/... macros: plain globals, no function call in kernel loops.
inline Fiber* g_cur = nullptr;
inline uint3 g_block_idx{0, 0, 0};
inline dim3 g_block_dim{1, 1, 1};
inline dim3 g_grid_dim{1, 1, 1};

inline std::string where(const char* file, int line) {
  const char* base = file ? std::strrchr(file, '/') : nullptr;
  return std::string(base ? base + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

inline std::string thread_name(const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]",
                g_block_idx.x, g_block_idx.y, g_block_idx.z, f.tid.x, f.tid.y, f.tid.z, f.warp,
                f.lane);
  return buf;
}

inline std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// --- context switching ------------------------------------------------------------------------

inline void asan_start(void** save, const void* bottom, size_t size) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}
inline void asan_finish(void* save, const void** bottom, size_t* size) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}

[[noreturn]] __attribute__((noinline)) inline void jump_to(void** buf) {
  __builtin_longjmp(buf, 1);
}

// Fiber side: give control back to the scheduler; returns when the scheduler resumes us.
__attribute__((noinline, noclone)) inline void park() {
  Runtime& R = runtime();
  Fiber* f = g_cur;
  if (__builtin_setjmp(f->jmp) == 0) {
    asan_start(&f->asan_fake, R.sched_bottom, R.sched_size);
    jump_to(R.sched_jmp);
  }
  asan_finish(f->asan_fake, nullptr, nullptr);
}

// Report an error. In a fiber the exception unwinds that fiber's stack (destroying its
// temporaries) up to fiber_main, which hands the message to the scheduler; in the scheduler it
// propagates out of emu_launch.
[[noreturn]] inline void fail(const std::string& msg) { throw Error(msg); }

inline void fiber_main() {
  Runtime& R = runtime();
  asan_finish(nullptr, &R.sched_bottom, &R.sched_size);
  Fiber* f = g_cur;
  try {
    R.body(R.body_ctx);
    f->state = St::Done;
  } catch (const Error& e) {
    R.error = e.what();
    f->state = St::Failed;
  } catch (const std::exception& e) {
    R.error = thread_name(*f) + ": exception in kernel: " + e.what();
    f->state = St::Failed;
  } catch (...) {
    R.error = thread_name(*f) + ": exception in kernel";
    f->state = St::Failed;
  }
  asan_start(nullptr, R.sched_bottom, R.sched_size);
  jump_to(R.sched_jmp);
}

// Scheduler side: run fiber f until it parks, exits or fails.
__attribute__((noinline, noclone)) inline void resume(Fiber* f) {
  Runtime& R = runtime();
  g_cur = f;
  if (__builtin_setjmp(R.sched_jmp) == 0) {
    asan_start(&R.sched_fake, f->stack, f->stack_size);
    if (!f->started) {
      f->started = true;
      swapcontext(&R.sched_uc, &f->uc);  // first entry only; it comes back through sched_jmp
    } else {
      jump_to(f->jmp);
    }
  }
  asan_finish(R.sched_fake, nullptr, nullptr);
  g_cur = nullptr;
}

inline size_t stack_bytes() {
  Runtime& R = runtime();
  if (R.stack_bytes == 0) {
#if defined(CUDA_EMU_ASAN)
    size_t kb = 2048;
#else
    size_t kb = 256;
#endif
    if (const char* v = std::getenv("NONLOCAL_KERNELS_EMU_STACK_KB")) kb = std::strtoull(v, nullptr, 10);
    if (kb < 64) kb = 64;
    R.stack_bytes = kb * 1024;
  }
  return R.stack_bytes;
}

inline void ensure_fibers(int n) {
  Runtime& R = runtime();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(R.fibers.size()) < n) {
    auto f = std::make_unique<Fiber>();
    const size_t size = stack_bytes();
    void* mem = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (mem == MAP_FAILED) throw Error("cuda_emu: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f->stack = static_cast<char*>(mem) + page;
    f->stack_size = size;
    R.fibers.push_back(std::move(f));
  }
}

// --- run order ----------------------------------------------------------------------------------

inline void parse_order(const std::string& s, Order* order, uint64_t* seed) {
  if (s == "forward" || s.empty()) {
    *order = Order::Forward;
    *seed = 0;
  } else if (s == "reverse") {
    *order = Order::Reverse;
    *seed = 0;
  } else if (s.rfind("random", 0) == 0) {
    *order = Order::Random;
    *seed = 0;
    if (s.size() > 6) {
      if (s[6] != ':' || s.size() == 7) throw Error("cuda_emu: run order must be forward, reverse or random:SEED, got '" + s + "'");
      char* end = nullptr;
      *seed = std::strtoull(s.c_str() + 7, &end, 10);
      if (*end != '\0') throw Error("cuda_emu: bad seed in run order '" + s + "'");
    }
  } else {
    throw Error("cuda_emu: run order must be forward, reverse or random:SEED, got '" + s + "'");
  }
}

inline void load_order_from_env() {
  Runtime& R = runtime();
  if (R.order_set) return;
  R.order_set = true;
  if (const char* v = std::getenv("NONLOCAL_KERNELS_EMU_ORDER")) parse_order(v, &R.order, &R.seed);
}

// The ready thread of lowest rank always runs next. Forward: rank = thread index, so thread 0
// runs until it parks, then thread 1, ..., and warp 0 runs all the way to the next barrier (its
// warp collectives complete among its own lanes) before warp 1 starts: the largest possible skew
// between warps. Reverse: the opposite. Random: a fresh random ranking after every barrier.
inline void set_order_ranks(Runtime& R, int n, std::mt19937_64& rng) {
  R.by_rank.resize(n);
  R.rank_of.resize(n);
  for (int i = 0; i < n; ++i) R.by_rank[i] = R.order == Order::Reverse ? n - 1 - i : i;
  if (R.order == Order::Random) std::shuffle(R.by_rank.begin(), R.by_rank.end(), rng);
  for (int i = 0; i < n; ++i) R.rank_of[R.by_rank[i]] = i;
  R.ready_bits.assign((n + 63) / 64, 0);
}

inline void mark_ready(Fiber* f) {
  Runtime& R = runtime();
  f->state = St::Ready;
  const int r = R.rank_of[f->linear];
  R.ready_bits[r / 64] |= uint64_t(1) << (r % 64);
}

// The ready fiber of lowest rank (removed from the ready set), or nullptr.
inline Fiber* next_ready() {
  Runtime& R = runtime();
  for (size_t w = 0; w < R.ready_bits.size(); ++w) {
    if (R.ready_bits[w] == 0) continue;
    const int bit = __builtin_ctzll(R.ready_bits[w]);
    R.ready_bits[w] &= R.ready_bits[w] - 1;
    return R.fibers[R.by_rank[int(w) * 64 + bit]].get();
  }
  return nullptr;
}

// --- warp collectives -------------------------------------------------------------------------

inline unsigned existing_lanes(int warp) {
  const int n = runtime().nthreads - warp * 32;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

inline bool same_op(const WarpOp& a, const WarpOp& b) {
  if (a.mask != b.mask || a.complete != b.complete) return false;
  if (a.any_site) return true;
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

inline std::string describe_lane(const Fiber& g) {
  switch (g.state) {
    case St::Done: return "has exited";
    case St::Sync: return "waits at __syncthreads() at " + where(g.sync_file, g.sync_line);
    case St::Warp:
      return "waits in " + std::string(g.op.name) + " at " + where(g.op.file, g.op.line) +
             " (mask " + hex(g.op.mask) + ")";
    default: return "is running";
  }
}

// Scheduler side, after f parked at a warp collective: complete it if every lane is there.
inline void try_complete(Fiber* f) {
  Runtime& R = runtime();
  const int base = f->warp * 32;
  const unsigned group = f->op.mask & existing_lanes(f->warp);
  Fiber* lanes[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!(group >> l & 1u)) continue;
    Fiber* g = R.fibers[base + l].get();
    if (g->state == St::Done)
      fail(thread_name(*f) + ": " + f->op.name + " at " + where(f->op.file, f->op.line) +
           " (mask " + hex(f->op.mask) + "): lane " + std::to_string(l) +
           " of the mask exited without joining");
    if (g->state != St::Warp || !same_op(g->op, f->op)) return;
    lanes[l] = g;
  }
  f->op.complete(lanes, group, f->op);
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) mark_ready(lanes[l]);
}

// Scheduler side, after f exited: no collective may still wait for it.
inline void check_exit(Fiber* f) {
  Runtime& R = runtime();
  const int base = f->warp * 32;
  const int n = std::min(32, R.nthreads - base);
  for (int l = 0; l < n; ++l) {
    Fiber* g = R.fibers[base + l].get();
    if (g->state == St::Warp && (g->op.mask >> f->lane & 1u))
      fail(thread_name(*g) + ": " + g->op.name + " at " + where(g->op.file, g->op.line) +
           " (mask " + hex(g->op.mask) + "): lane " + std::to_string(f->lane) +
           " of the mask exited without joining");
  }
}

// Fiber side: arrive at a warp collective and wait until it completes.
inline void warp_collective(const char* name, unsigned mask, const char* file, int line,
                            bool any_site, CompleteFn complete, void* arg) {
  Fiber* f = g_cur;
  if (f == nullptr) throw Error(std::string(name) + " called outside a kernel");
  if (!(mask >> f->lane & 1u))
    fail(thread_name(*f) + ": " + name + " at " + where(file, line) + ": mask " + hex(mask) +
         " does not contain the calling lane " + std::to_string(f->lane));
  f->op = WarpOp{name, mask, file, line, any_site, complete, arg};
  f->state = St::Warp;
  park();
}

// --- the block scheduler ----------------------------------------------------------------------

// Kept out of run_block: getcontext returns twice, which would pessimise (and warn about) the caller.
__attribute__((noinline)) inline void init_context(Fiber* f) {
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_main, 0);
}

inline void run_block(std::mt19937_64& rng) {
  Runtime& R = runtime();
  const int n = R.nthreads;
  set_order_ranks(R, n, rng);
  for (int t = 0; t < n; ++t) {
    Fiber* f = R.fibers[t].get();
    f->started = false;
    f->asan_fake = nullptr;
    init_context(f);
    mark_ready(f);
  }
  if (R.smem) std::memset(R.smem, 0xFF, R.smem_bytes);
  for (;;) {
    if (Fiber* f = next_ready()) {
      resume(f);
      if (!R.error.empty()) throw Error(R.error);
      if (f->state == St::Warp) try_complete(f);
      else if (f->state == St::Done) check_exit(f);
      continue;
    }
    // Nobody can run: the block is done, a barrier releases, or something is wrong.
    const Fiber* sync = nullptr;
    const Fiber* exited = nullptr;
    const Fiber* warp = nullptr;
    for (int t = 0; t < n; ++t) {
      const Fiber* f = R.fibers[t].get();
      if (f->state == St::Sync && !sync) sync = f;
      if (f->state == St::Done && !exited) exited = f;
      if (f->state == St::Warp && !warp) warp = f;
    }
    if (!sync && !warp) return;  // every thread exited
    if (warp) {
      const unsigned group = warp->op.mask & existing_lanes(warp->warp);
      std::string why;
      for (int l = 0; l < 32 && why.empty(); ++l) {
        if (!(group >> l & 1u)) continue;
        const Fiber* g = R.fibers[warp->warp * 32 + l].get();
        if (g->state != St::Warp || !same_op(g->op, warp->op))
          why = "lane " + std::to_string(l) + " " + describe_lane(*g);
      }
      fail("deadlock: " + thread_name(*warp) + " waits in " + warp->op.name + " at " +
           where(warp->op.file, warp->op.line) + " (mask " + hex(warp->op.mask) + ") but " + why);
    }
    if (exited)
      fail(thread_name(*exited) + " exited while " + thread_name(*sync) +
           " waits at __syncthreads() at " + where(sync->sync_file, sync->sync_line) +
           " (every thread of the block must reach every barrier)");
    for (int t = 0; t < n; ++t) {
      const Fiber* f = R.fibers[t].get();
      if (f->sync_line != sync->sync_line || std::strcmp(f->sync_file, sync->sync_file) != 0)
        fail("threads wait at different barriers: " + thread_name(*sync) + " at __syncthreads() " +
             where(sync->sync_file, sync->sync_line) + ", " + thread_name(*f) + " at " +
             where(f->sync_file, f->sync_line));
    }
    if (R.order == Order::Random) set_order_ranks(R, n, rng);
    for (int t = 0; t < n; ++t) mark_ready(R.fibers[t].get());
  }
}

struct LaunchGuard {
  Runtime& R;
  explicit LaunchGuard(Runtime& r) : R(r) {}
  ~LaunchGuard() {
    g_cur = nullptr;
    std::free(R.smem);
    R.smem = nullptr;
    R.smem_bytes = 0;
    R.body = nullptr;
    R.body_ctx = nullptr;
    R.error.clear();
  }
};

inline void launch(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx,
                   const char* file, int line) {
  Runtime& R = runtime();
  if (g_cur != nullptr) throw Error("cuda_emu: kernel launch from inside a kernel at " + where(file, line));
  std::lock_guard<std::mutex> lock(R.mutex);
  load_order_from_env();
  const std::string at = " (launch at " + where(file, line) + ")";
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024)
    throw Error("cuda_emu: invalid block size " + std::to_string(block.x) + "x" +
                std::to_string(block.y) + "x" + std::to_string(block.z) + at);
  if (block.z > 64) throw Error("cuda_emu: blockDim.z > 64" + at);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u)
    throw Error("cuda_emu: invalid grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
                "x" + std::to_string(grid.z) + at);
  if (smem > 227 * 1024)
    throw Error("cuda_emu: " + std::to_string(smem) + " bytes of dynamic shared memory exceed the "
                "227 KiB a block can have" + at);
  LaunchGuard guard(R);
  R.error.clear();
  R.launch_file = file;
  R.launch_line = line;
  R.nthreads = static_cast<int>(nthreads);
  ensure_fibers(R.nthreads);
  for (int t = 0; t < R.nthreads; ++t) {
    Fiber* f = R.fibers[t].get();
    f->linear = t;
    f->lane = t % 32;
    f->warp = t / 32;
    f->tid = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y),
                   unsigned(t / (block.x * block.y))};
    f->sync_file = "";
    f->sync_line = 0;
  }
  R.body = body;
  R.body_ctx = ctx;
  if (smem > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, smem) != 0) throw Error("cuda_emu: out of memory" + at);
    R.smem = static_cast<unsigned char*>(p);
    R.smem_bytes = smem;
  }
  g_grid_dim = grid;
  g_block_dim = block;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::mt19937_64 rng(R.seed * 0x9E3779B97F4A7C15ull + 12345);
  std::vector<uint64_t> blocks;
  if (R.order == Order::Random) {
    blocks.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = i;
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  for (uint64_t i = 0; i < nblocks; ++i) {
    const uint64_t b = R.order == Order::Random ? blocks[i]
                       : R.order == Order::Reverse ? nblocks - 1 - i : i;
    g_block_idx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                        unsigned(b / (uint64_t(grid.x) * grid.y))};
    try {
      run_block(rng);
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + at);
    }
  }
}

template <class Tuple, class Kernel>
struct LaunchCtx {
  Kernel kernel;
  Tuple* args;
  static void run(void* p) {
    auto* c = static_cast<LaunchCtx*>(p);
    std::apply(c->kernel, *c->args);  // every thread gets its own copies of the arguments
  }
};

}  // namespace detail

// "forward", "reverse" or "random:SEED"; the default comes from NONLOCAL_KERNELS_EMU_ORDER.
inline void set_run_order(const std::string& order) {
  detail::Runtime& R = detail::runtime();
  std::lock_guard<std::mutex> lock(R.mutex);
  Order o;
  uint64_t seed;
  detail::parse_order(order, &o, &seed);
  R.order = o;
  R.seed = seed;
  R.order_set = true;
}

inline std::string run_order() {
  detail::Runtime& R = detail::runtime();
  std::lock_guard<std::mutex> lock(R.mutex);
  detail::load_order_from_env();
  if (R.order == Order::Forward) return "forward";
  if (R.order == Order::Reverse) return "reverse";
  return "random:" + std::to_string(R.seed);
}

inline void* dynamic_smem() {
  if (detail::g_cur == nullptr) throw Error("dynamic shared memory used outside a kernel");
  return detail::runtime().smem;
}

}  // namespace cuda_emu

// --- what kernels see -----------------------------------------------------------------------------

#define threadIdx (::cuda_emu::detail::g_cur->tid)
#define blockIdx (::cuda_emu::detail::g_block_idx)
#define blockDim (::cuda_emu::detail::g_block_dim)
#define gridDim (::cuda_emu::detail::g_grid_dim)

// extern __shared__ T name[] has no host equivalent: kernels declare dynamic shared memory with
// this macro (csrc/cuda/cuda_common.cuh gives the nvcc spelling).
#define EMU_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::cuda_emu::dynamic_smem())

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  Fiber* f = g_cur;
  if (f == nullptr) throw cuda_emu::Error("__syncthreads() called outside a kernel");
  f->sync_file = file;
  f->sync_line = line;
  f->state = St::Sync;
  park();
}

namespace cuda_emu {
namespace detail {
inline void syncwarp_complete(Fiber* const*, unsigned, const WarpOp&) {}
}  // namespace detail
}  // namespace cuda_emu

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  warp_collective("__syncwarp", mask, file, line, true, &syncwarp_complete, nullptr);
}

inline void __threadfence() {}
inline void __threadfence_block() {}

namespace cuda_emu {
namespace detail {

struct ShflArg {
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
  int param;  // srcLane, laneMask or delta
  int width;
};

enum class ShflKind { Idx, Xor, Down, Up };

template <ShflKind K>
void shfl_complete(Fiber* const* lanes, unsigned group, const WarpOp& op) {
  for (int l = 0; l < 32; ++l) {
    if (!(group >> l & 1u)) continue;
    auto* a = static_cast<ShflArg*>(lanes[l]->op.arg);
    const int w = a->width;
    if (w < 1 || w > 32 || (w & (w - 1)) != 0)
      fail(thread_name(*lanes[l]) + ": " + op.name + " at " + where(op.file, op.line) +
           ": width " + std::to_string(w) + " is not a power of 2 in [1, 32]");
    const int seg = l & ~(w - 1);
    int src = l;
    if (K == ShflKind::Idx) src = seg + (a->param & (w - 1));
    if (K == ShflKind::Xor) {
      src = l ^ a->param;
      if (src < seg || src >= seg + w) src = l;
    }
    if (K == ShflKind::Down && (l - seg) + a->param < w) src = l + a->param;
    if (K == ShflKind::Up && (l - seg) - a->param >= 0) src = l - a->param;
    if (src < 0 || src > 31 || !(group >> src & 1u))
      fail(thread_name(*lanes[l]) + ": " + op.name + " at " + where(op.file, op.line) +
           " reads lane " + std::to_string(src) + ", which is not in the mask " + hex(op.mask) +
           " (or does not exist): the value would be undefined");
    auto* s = static_cast<ShflArg*>(lanes[src]->op.arg);
    std::memcpy(a->out, s->in, sizeof a->in);
  }
}

template <ShflKind K, class T>
T shfl(const char* name, unsigned mask, T var, int param, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffle of this type");
  ShflArg a;
  std::memset(&a, 0, sizeof a);
  std::memcpy(a.in, &var, sizeof(T));
  a.param = param;
  a.width = width;
  warp_collective(name, mask, file, line, false, &shfl_complete<K>, &a);
  T out;
  std::memcpy(&out, a.out, sizeof(T));
  return out;
}

struct BallotArg {
  int pred;
  unsigned out;
};

inline void ballot_complete(Fiber* const* lanes, unsigned group, const WarpOp&) {
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((group >> l & 1u) && static_cast<BallotArg*>(lanes[l]->op.arg)->pred) bits |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (group >> l & 1u) static_cast<BallotArg*>(lanes[l]->op.arg)->out = bits;
}

}  // namespace detail
}  // namespace cuda_emu

template <class T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  return shfl<ShflKind::Idx>("__shfl_sync", mask, var, srcLane, width, file, line);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  return shfl<ShflKind::Xor>("__shfl_xor_sync", mask, var, laneMask, width, file, line);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  return shfl<ShflKind::Down>("__shfl_down_sync", mask, var, int(delta), width, file, line);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  return shfl<ShflKind::Up>("__shfl_up_sync", mask, var, int(delta), width, file, line);
}

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  BallotArg a{pred != 0, 0};
  warp_collective("__ballot_sync", mask, file, line, false, &ballot_complete, &a);
  return a.out;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  const unsigned group = mask & cuda_emu::detail::existing_lanes(cuda_emu::detail::g_cur->warp);
  return (__ballot_sync(mask, pred, file, line) & group) == group;
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) != 0;
}

// Fibers of one block share one OS thread and switch only where they park: plain read-modify-
// write is atomic here.
template <class T>
T atomicAdd(T* address, T val) {
  T old = *address;
  *address = old + val;
  return old;
}
template <class T>
T atomicMax(T* address, T val) {
  T old = *address;
  if (val > old) *address = val;
  return old;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// --- nvcuda::wmma -------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// Round to tf32 (10 explicit mantissa bits), to nearest with ties away from zero (cvt.rna).
inline float __float_to_tf32(float in) {
  uint32_t u;
  std::memcpy(&u, &in, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

namespace emu {

template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <class Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K, id = 1; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N, id = 2; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N, id = 3; };

// Fixed pseudo-random permutation of the rows*cols tile positions for one fragment kind.
template <int Id, int Rows, int Cols>
const int* permutation() {
  static const std::vector<int> perm = [] {
    std::vector<int> p(Rows * Cols);
    for (int i = 0; i < Rows * Cols; ++i) p[i] = i;
    uint64_t s = 0x243F6A8885A308D3ull ^ (uint64_t(Id) * 0x9E3779B97F4A7C15ull) ^ (Rows * 131 + Cols);
    for (int i = Rows * Cols - 1; i > 0; --i) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      std::swap(p[i], p[s % uint64_t(i + 1)]);
    }
    return p;
  }();
  return perm.data();
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline float tf32_truncate(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace emu

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
 public:
  using D = emu::dims<Use, M, N, K>;
  using element_type = T;
  using storage_element_type = typename emu::storage<T>::type;
  static constexpr int rows = D::rows, cols = D::cols;
  static constexpr int num_elements = rows * cols / 32;
  storage_element_type x[num_elements];
  // Tile position (row * cols + col) of element i of `lane`.
  static int position(int lane, int i) {
    return emu::permutation<D::id * 1000 + (std::is_same<T, precision::tf32>::value ? 7 : 0),
                            rows, cols>()[lane * num_elements + i];
  }
};

template <class Frag, class V>
inline void fill_fragment(Frag& f, const V& v) {
  using E = typename Frag::storage_element_type;
  for (int i = 0; i < Frag::num_elements; ++i) {
    if constexpr (std::is_same<V, E>::value) f.x[i] = v;
    else f.x[i] = emu::from_float<E>(static_cast<float>(v));
  }
}

namespace emu {

struct MemArg {
  const void* ptr;
  unsigned ldm;
  bool row_major;
};

inline void check_uniform(cuda_emu::detail::Fiber* const* lanes, unsigned, const cuda_emu::detail::WarpOp& op) {
  using namespace cuda_emu::detail;
  const auto* a0 = static_cast<MemArg*>(lanes[0]->op.arg);
  for (int l = 1; l < 32; ++l) {
    const auto* a = static_cast<MemArg*>(lanes[l]->op.arg);
    if (a->ptr != a0->ptr || a->ldm != a0->ldm || a->row_major != a0->row_major)
      fail(thread_name(*lanes[l]) + ": " + op.name + " at " + where(op.file, op.line) +
           ": lanes pass different arguments (lane 0: pointer " + std::to_string(uintptr_t(a0->ptr)) +
           " ldm " + std::to_string(a0->ldm) + "; lane " + std::to_string(l) + ": pointer " +
           std::to_string(uintptr_t(a->ptr)) + " ldm " + std::to_string(a->ldm) +
           "): a wmma operation needs warp-uniform arguments");
  }
}

template <class Frag>
void check_mem(const char* name, const void* ptr, unsigned ldm, bool row_major, const char* file,
               int line) {
  using namespace cuda_emu::detail;
  Fiber* f = g_cur;
  if (f == nullptr) throw cuda_emu::Error(std::string(name) + " called outside a kernel");
  if (existing_lanes(f->warp) != 0xffffffffu)
    fail(thread_name(*f) + ": " + name + " at " + where(file, line) + " needs a full warp of 32 threads");
  using E = typename Frag::storage_element_type;
  const std::string at = thread_name(*f) + ": " + name + " at " + where(file, line) + ": ";
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    fail(at + "pointer " + std::to_string(reinterpret_cast<uintptr_t>(ptr)) +
         " is not 32-byte (256-bit) aligned");
  if ((ldm * sizeof(E)) % 16 != 0)
    fail(at + "ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes (" +
         std::to_string(16 / sizeof(E)) + " elements)");
  const unsigned need = row_major ? Frag::cols : Frag::rows;
  if (ldm < need)
    fail(at + "ldm " + std::to_string(ldm) + " is smaller than the tile's leading dimension " +
         std::to_string(need));
}

template <class Frag, class E>
void load(Frag& f, const E* p, unsigned ldm, bool row_major, const char* name, const char* file, int line) {
  using namespace cuda_emu::detail;
  check_mem<Frag>(name, p, ldm, row_major, file, line);
  const int lane = g_cur->lane;
  for (int i = 0; i < Frag::num_elements; ++i) {  // read when the lane arrives
    const int pos = Frag::position(lane, i);
    const int r = pos / Frag::cols, c = pos % Frag::cols;
    f.x[i] = p[row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r];
  }
  MemArg a{p, ldm, row_major};
  warp_collective(name, 0xffffffffu, file, line, false, &check_uniform, &a);
}

template <class Frag, class E>
void store(E* p, const Frag& f, unsigned ldm, bool row_major, const char* name, const char* file, int line) {
  using namespace cuda_emu::detail;
  check_mem<Frag>(name, p, ldm, row_major, file, line);
  MemArg a{p, ldm, row_major};
  warp_collective(name, 0xffffffffu, file, line, false, &check_uniform, &a);
  const int lane = g_cur->lane;
  for (int i = 0; i < Frag::num_elements; ++i) {  // written once every lane arrived
    const int pos = Frag::position(lane, i);
    const int r = pos / Frag::cols, c = pos % Frag::cols;
    p[row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r] = f.x[i];
  }
}

template <class FD, class FA, class FB, class FC>
struct MmaArg {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
};

template <class FD, class FA, class FB, class FC, bool TF32>
void mma_complete(cuda_emu::detail::Fiber* const* lanes, unsigned, const cuda_emu::detail::WarpOp&) {
  constexpr int M = FD::rows, N = FD::cols, K = FA::cols;
  float A[M * K], B[K * N], C[M * N];
  for (int l = 0; l < 32; ++l) {
    const auto* arg = static_cast<MmaArg<FD, FA, FB, FC>*>(lanes[l]->op.arg);
    for (int i = 0; i < FA::num_elements; ++i) {
      float v = to_float(arg->a->x[i]);
      A[FA::position(l, i)] = TF32 ? tf32_truncate(v) : v;
    }
    for (int i = 0; i < FB::num_elements; ++i) {
      float v = to_float(arg->b->x[i]);
      B[FB::position(l, i)] = TF32 ? tf32_truncate(v) : v;
    }
    for (int i = 0; i < FC::num_elements; ++i) C[FC::position(l, i)] = arg->c->x[i];
  }
  float Dm[M * N];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      float acc = C[r * N + c];
      for (int k = 0; k < K; ++k) acc += A[r * K + k] * B[k * N + c];
      Dm[r * N + c] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    auto* arg = static_cast<MmaArg<FD, FA, FB, FC>*>(lanes[l]->op.arg);
    for (int i = 0; i < FD::num_elements; ++i) arg->d->x[i] = Dm[FD::position(l, i)];
  }
}

template <class L> constexpr bool is_row() { return std::is_same<L, row_major>::value; }

}  // namespace emu

template <int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, L>& f,
                      const typename fragment<matrix_a, M, N, K, T, L>::storage_element_type* p,
                      unsigned ldm, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::load(f, p, ldm, emu::is_row<L>(), "wmma::load_matrix_sync(matrix_a)", file, line);
}
template <int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, L>& f,
                      const typename fragment<matrix_b, M, N, K, T, L>::storage_element_type* p,
                      unsigned ldm, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::load(f, p, ldm, emu::is_row<L>(), "wmma::load_matrix_sync(matrix_b)", file, line);
}
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                      layout_t layout, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  emu::load(f, p, ldm, layout == mem_row_major, "wmma::load_matrix_sync(accumulator)", file, line);
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  emu::store(p, f, ldm, layout == mem_row_major, "wmma::store_matrix_sync", file, line);
}

template <int M, int N, int K, class TA, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b,
              const fragment<accumulator, M, N, K, float>& c, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  using namespace cuda_emu::detail;
  using FD = fragment<accumulator, M, N, K, float>;
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TA, LB>;
  constexpr bool tf32 = std::is_same<TA, precision::tf32>::value;
  static_assert((M == 16 && N == 16 && K == 16 &&
                 (std::is_same<TA, __half>::value || std::is_same<TA, __nv_bfloat16>::value)) ||
                    (M == 16 && N == 16 && K == 8 && tf32),
                "cuda_emu emulates wmma m16n16k16 (half, bfloat16) and m16n16k8 (tf32) only");
  Fiber* f = g_cur;
  if (f == nullptr) throw cuda_emu::Error("wmma::mma_sync called outside a kernel");
  if (existing_lanes(f->warp) != 0xffffffffu)
    fail(thread_name(*f) + ": wmma::mma_sync at " + where(file, line) + " needs a full warp of 32 threads");
  emu::MmaArg<FD, FA, FB, FD> arg{&d, &a, &b, &c};
  warp_collective("wmma::mma_sync", 0xffffffffu, file, line, false,
                  &emu::mma_complete<FD, FA, FB, FD, tf32>, &arg);
}

}  // namespace wmma
}  // namespace nvcuda

// --- launching --------------------------------------------------------------------------------

// emu_launch(kernel, grid, block, smem_bytes, stream, args...) is kernel<<<grid, block,
// smem_bytes, stream>>>(args...) under nvcc. Blocks run one after another in the selected order;
// errors throw cuda_emu::Error naming the launch site.
template <class... KArgs, class... Args>
void emu_launch_at(const char* file, int line, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                   size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  (void)stream;
  static_assert(sizeof...(KArgs) == sizeof...(Args), "emu_launch: wrong number of kernel arguments");
  using Tuple = std::tuple<std::decay_t<KArgs>...>;
  Tuple targs(std::forward<Args>(args)...);  // converted and copied once, like kernel parameters
  cuda_emu::detail::LaunchCtx<Tuple, void (*)(KArgs...)> ctx{kernel, &targs};
  cuda_emu::detail::launch(grid, block, smem_bytes, &decltype(ctx)::run, &ctx, file, line);
}
#define emu_launch(...) emu_launch_at(__FILE__, __LINE__, __VA_ARGS__)
