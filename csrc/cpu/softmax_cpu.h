// CPU kernels of the softmax family (docs/design.md section 4): the interface between the op
// registration (softmax_cpu.cpp: checks, allocation, at::parallel_for) and the tile kernels,
// which are compiled once per instruction set (softmax_kernel_avx512.cpp with AVX-512 and
// softmax_kernel_avx2.cpp with AVX2+FMA on x86-64, softmax_kernel_default.cpp for any CPU) from softmax_kernel_impl.h and picked at run time.
//
// Work split (both passes are deterministic: no atomics, every sum has a fixed order):
// - forward: one task per (batch, tile of BM query rows); it streams over key tiles of BN rows
//   with the online softmax, so each output row is produced by exactly one task.
// - backward: one task per (batch, group of consecutive query tiles). A task recomputes
//   P = exp(S - lse) per (query tile, key tile) and accumulates dtheta for its own rows, and
//   dphi/dg into its group's private fp32 partial sums (B, G, M, dk + dv); a second parallel
//   pass adds the G partials in group order. G >= 2 only when B alone cannot feed every thread.
// - whole-batch path (softmax_keep_fwd / softmax_keep_bwd, calls whose B·N·M scores fit the
//   budget of docs/cpu.md): batched BLAS products over the whole (B, N, M) score buffer, with the
//   row kernels softmax_rows / softmax_grad_rows parallel over the B·N rows.
#pragma once

#include <stdint.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <stdexcept>

#include "params.h"

// Fortran BLAS (LP64), as torch itself calls it. Weak: null when no BLAS is linked.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM (CBLAS, torch's MKL exports it): a B operand packed once, multiplied many
// times. Weak: null without MKL. The int arguments take mkl_cblas.h's enum values (kCblas*).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace nonlocal_kernels::cpu {

// CBLAS enum values (mkl_cblas.h) for the packed-GEMM calls above.
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151,
              kCblasBMatrix = 162;

enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A matrix of the compute type (float, or double for float64 inputs) read through its strides:
// element (batch b, row r, column c) is at ptr[b * bs + r * rs + c * cs].
struct MatView {
  const void* ptr;
  int64_t bs, rs, cs;
};

struct CpuPlan {
  DType dtype;
  double scale;         // the op's scale in full precision (NonlocalSoftmaxParams::scale is float)
  int64_t BM, BN;       // query / key tile rows (BN a multiple of the panel width)
  int64_t n_qtiles;     // ceil(N / BM)
  int64_t groups;       // backward: query-tile groups per batch (partial dphi/dg sums)
  int64_t tiles_per_group;
  // true: the Vectorized panel GEMM on phi/g packed once per call into panels (kt, kp, vp,
  // vtp below); false: BLAS sgemm_/dgemm_ on tiles of phi/g read through k and v.
  bool packed;
  MatView k, v;         // BLAS path: phi and g (in place, or a contiguous copy)
  // BLAS path with MKL's packed GEMM (float compute; null otherwise): the key-tile B operands,
  // packed once per call, of the products that every query tile repeats. Tile j of batch b is
  // at index b * ceil(M / BN) + j, *_tile floats apart: phi_j^T (dk x bn; S, fwd+bwd), g_j
  // (bn x dv; P g, fwd), g_j^T (dv x bn; dP, bwd) and phi_j (bn x dk; dS phi, bwd). These
  // products run BM rows: a short last query tile is padded with zero rows.
  const float *mkl_kt, *mkl_v, *mkl_vt, *mkl_k;
  int64_t mkl_kt_tile, mkl_v_tile, mkl_vt_tile, mkl_k_tile;
  // Packed path: B-panels per batch (compute type) of scale * phi^T (dk x M; fwd+bwd), phi
  // (M x dk; bwd), g (M x dv; fwd) and g^T (dv x M; bwd); *_bs = elements per batch.
  const void *kt, *kp, *vp, *vtp;
  int64_t kt_bs, k_bs, v_bs, vt_bs;
  // Backward: (B, G, M, dk + dv) partial sums of the compute type; unused in the forward.
  void* partial;
  // Backward: (B, dv), whether column c of g[b] is all zero (softmax_cpu.cpp, zero_columns_of).
  const bool* zero_cols;
};

// Scratch memory owned by one thread and kept between calls (grow-only, trimmed past a size):
// buffers that came fresh from the OS at every call would cost a page fault and a page clear per
// 4 KiB, several percent of a call at the benchmark shapes. Slices are 64-byte aligned.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() { std::free(base_); }

  template <typename T>
  static size_t bytes_for(int64_t count) {
    return (static_cast<size_t>(count < 1 ? 1 : count) * sizeof(T) + 63) / 64 * 64;
  }
  // Room for `bytes` (the sum of bytes_for of every slice); carving restarts at the beginning.
  void reserve(size_t bytes) {
    if (bytes > cap_) {
      std::free(base_);
      base_ = static_cast<char*>(std::aligned_alloc(64, bytes));
      if (base_ == nullptr) {
        cap_ = 0;
        throw std::bad_alloc();
      }
      cap_ = bytes;
    }
    used_ = 0;
  }
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += bytes_for<T>(count);
    if (used_ > cap_) throw std::logic_error("nonlocal_kernels: CPU scratch arena overrun");
    return p;
  }
  // Frees the memory when more than `keep` bytes are held.
  void trim(size_t keep) {
    if (cap_ > keep) {
      std::free(base_);
      base_ = nullptr;
      cap_ = 0;
    }
  }

 private:
  char* base_ = nullptr;
  size_t cap_ = 0, used_ = 0;
};

// Tasks handed out one at a time to the workers of a parallel region (dynamic scheduling: a
// thread slowed down by another process does not hold the others up). Which thread runs a task
// never changes its result: tasks own their outputs and every sum has a fixed order.
struct TaskQueue {
  explicit TaskQueue(int64_t n) : total(n) {}
  bool next(int64_t& task) {
    task = counter.fetch_add(1, std::memory_order_relaxed);
    return task < total;
  }
  std::atomic<int64_t> counter{0};
  const int64_t total;
};

struct KernelTable {
  const char* name;
  // Columns per B-panel for this dtype's compute type (BN must be a multiple of it).
  int64_t (*panel_width)(DType dtype);
  // Copy rows x cols (per batch, batches b0..b1) of a strided input of `dtype` into a
  // contiguous buffer of the compute type.
  void (*pack)(DType dtype, const void* src, int64_t bs, int64_t rs, int64_t cs, int64_t rows,
               int64_t cols, void* dst, int64_t b0, int64_t b1);
  // B-panels of the k x n matrices alpha * src[b](r, c), src[b](r, c) = src[b * bs + r * rs +
  // c * cs], into dst (dst_bs elements per batch), items item0..item1 of (batch, panel) pairs.
  void (*pack_panels)(DType dtype, const void* src, int64_t bs, int64_t rs, int64_t cs,
                      int64_t k, int64_t n, double alpha, void* dst, int64_t dst_bs,
                      int64_t item0, int64_t item1);
  // Run tasks from the queue until it is empty (one call per worker thread).
  void (*forward)(const NonlocalSoftmaxParams& p, const CpuPlan& plan, TaskQueue& tasks);
  void (*backward)(const NonlocalSoftmaxParams& p, const CpuPlan& plan, TaskQueue& tasks);
  // dphi/dg rows [row_begin, row_end) of the flattened (B * M) rows from the partial sums.
  void (*reduce)(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t row_begin,
                 int64_t row_end);
  // Whole-batch path (softmax_cpu.cpp), rows [r0, r1) of (rows, n) buffers of the compute type
  // of `dtype`: x = softmax(scale * x) in place with lse per row (lse: the compute type); and
  // dp = scale * dS in place from the softmax p (extra: D's share of g's all-zero columns per
  // row, double, or null).
  void (*softmax_rows)(DType dtype, void* x, int64_t n, double scale, void* lse, int64_t r0,
                       int64_t r1);
  void (*softmax_grad_rows)(DType dtype, const void* p, void* dp, int64_t n, double scale,
                            const double* extra, int64_t r0, int64_t r1);
};

// Defined by softmax_kernel_default.cpp (always), softmax_kernel_avx2.cpp and
// softmax_kernel_avx512.cpp (x86-64 only).
extern const KernelTable kKernelsDefault;
#if defined(__x86_64__)
extern const KernelTable kKernelsAVX2;
extern const KernelTable kKernelsAVX512;
#endif

// Whether a BLAS sgemm_/dgemm_ is linked into this process (torch's MKL/OpenBLAS).
bool blas_available();

}  // namespace nonlocal_kernels::cpu
