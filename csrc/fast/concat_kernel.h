// The hot loops of the concatenation kernels (concat_sorted.cpp), compiled once per instruction
// set like the softmax kernels: concat_kernel_impl.h is included by concat_kernel_default.cpp
// (portable), concat_kernel_avx2.cpp and concat_kernel_avx512.cpp (x86-64; those two files alone
// get their ISA's flags: setup.py ISA_FLAGS, CMakeLists.txt). concat_sorted.cpp checks the
// arguments, allocates, splits the work (at::parallel_for, baseline ISA) and calls the table that
// cpu::selected_isa() picks (NONLOCAL_KERNELS_CPU_ISA, cpu_isa.h). Each entry does one thread's
// share [begin, end) of one loop; which thread runs a share never changes its result.
#pragma once

#include <cstdint>

namespace nonlocal_kernels::fast {

// A dtype's arguments as raw pointers (float, or double when is_double): the ISA files include
// no ATen tensor code, so no inline function compiled with wider instructions can be picked by
// the linker for the baseline code.
struct ConcatArgs {
  bool is_double = false;
  int64_t B = 0, N = 0, M = 0, dv = 0;
  double inv_m = 0.0;               // 1 / M, rounded to the dtype where the kernels use it so
  const void* a = nullptr;          // (B, N)
  const void* neg_b = nullptr;      // (B, M) ascending
  const int64_t* perm = nullptr;    // (B, M)
  const int64_t* rank = nullptr;    // (B, M), the inverse of perm (gather_keys, scatter_keys)
  const void* g = nullptr;          // (B, M, dv), strides gs0, gs1, gs2
  int64_t gs0 = 0, gs1 = 0, gs2 = 0;
  void* P = nullptr;                // (B, M + 1, 2, dv) contiguous
  int64_t* k = nullptr;             // (B, N)
  void* y = nullptr;                // (B, N, dv) contiguous (forward)
  const void* dy = nullptr;         // (B, N, dv) contiguous (backward)
  void* dg = nullptr;               // like g: strides ds0, ds1, ds2
  int64_t ds0 = 0, ds1 = 0, ds2 = 0;
  // Backward: the queries sorted by k (stable), bin c = order[bin_start[c] .. bin_start[c + 1]),
  // per batch (N and M + 2 entries); per column block, partial dot products of da and db.
  const int64_t* order = nullptr;
  const int64_t* bin_start = nullptr;
  double* dapart = nullptr;         // (ceil(dv / kBlock), B, N)
  double* dbpart = nullptr;         // (ceil(dv / kBlock), B, M), by key rank
  // g's rows in key-rank order and dg's, (B, M, dv) contiguous (the backward's sweep reads and
  // writes whole rows in order; g and dg may be channels-first). The forward's prefix sums read
  // g_sorted instead of g when it is set.
  void* g_sorted = nullptr;
  void* dg_sorted = nullptr;
};

// x (B, L, dk) with strides xs0, xs1, xs2; w (dk,) contiguous; out / d (B, L) contiguous;
// dx (B, L, dk) with strides os0, os1, os2; wgrad (dk,).
struct ProjectArgs {
  bool is_double = false;
  int64_t B = 0, L = 0, dk = 0;
  const void* x = nullptr;
  int64_t xs0 = 0, xs1 = 0, xs2 = 0;
  const void* w = nullptr;
  void* out = nullptr;       // project: out = x w
  const void* d = nullptr;   // project_grads: dx = d w^T, wgrad = sum_{b,l} d x
  void* dx = nullptr;
  int64_t os0 = 0, os1 = 0, os2 = 0;
  void* wgrad = nullptr;
};

constexpr int64_t kTile = 16;    // feature columns per tile of the forward's prefix sums
constexpr int64_t kBlock = 128;  // feature columns per block of the backward's sweep

struct ConcatKernelTable {
  const char* name;
  // Flattened rows [r0, r1) of B * L: out = x . w, summed in double.
  void (*project)(const ProjectArgs& p, int64_t r0, int64_t r1);
  // Channels-first x (xs1 < xs2): columns [c0, c1) of dx and wgrad. Otherwise c0 = 0, c1 = dk
  // only (one thread: the sums run over rows).
  void (*project_grads)(const ProjectArgs& p, int64_t c0, int64_t c1);
  // Forward, batch bi: prefix sums of columns [c0, c1) (multiples of kTile but the last); then
  // the queries [i0, i1): k, y.
  void (*prefix_sums)(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1);
  void (*query_rows)(const ConcatArgs& p, int64_t bi, int64_t i0, int64_t i1);
  // Backward, batch bi, column blocks [k0, k1) of kBlock columns: one sweep over the key ranks
  // from the last, adding each bin's queries (sorted by k) into the running suffix sums of dy
  // and a dy (double), with their da partial dot products dy_i . P[k_i, 0]; then the key's dg
  // and its db partial dot product g_j . S_dy.
  void (*key_sweep)(const ConcatArgs& p, int64_t bi, int64_t k0, int64_t k1);
  // Batch bi, columns [c0, c1): g_sorted[r] = g[perm[r]], dg[perm[r]] = dg_sorted[r] (tiles of
  // kTile columns; a channels-first float g / dg goes through ATen's vector transposes).
  void (*gather_keys)(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1);
  void (*scatter_keys)(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1);
};

// Defined by concat_kernel_default.cpp (always), concat_kernel_avx2.cpp and
// concat_kernel_avx512.cpp (x86-64 only).
extern const ConcatKernelTable kConcatKernelsDefault;
#if defined(__x86_64__)
extern const ConcatKernelTable kConcatKernelsAVX2;
extern const ConcatKernelTable kConcatKernelsAVX512;
#endif

}  // namespace nonlocal_kernels::fast
