// Tile kernels of the CPU softmax family (see softmax_cpu.h for the work split and
// docs/design.md section 4 for the algorithm). Included by one .cpp per instruction set, which first
// defines NLK_CAPNS (the namespace of this copy), NLK_TABLE / NLK_TABLE_LABEL (the KernelTable
// it defines), CPU_CAPABILITY and CPU_CAPABILITY_<ISA>, so that at::vec::Vectorized is the AVX2
// or the portable version.
//
// Everything is computed in the compute type A (float, or double for float64 inputs): inputs are
// converted while loading tiles; S, P, dP, dS and every accumulator are A; row sums of the
// softmax and D = rowsum(P * dP) are summed in double.
//
// Two ways to do the tile products (NONLOCAL_KERNELS_CPU_GEMM):
// - "vec" (default, kPacked): the panel GEMM below, on at::vec::Vectorized: a 6 x 2-vector
//   register-blocked micro-kernel, k blocked by 256, B operands (phi, phi^T, g, g^T and the
//   per-tile theta / dy) packed into panels, phi/g once per call; A operands read in place.
// - "blas": one sgemm_/dgemm_ call per tile product, on strided views (torch's own BLAS, found
//   at load time through weak symbols).
// "vec" takes 5-11% less time than "blas" on the 2-core benchmark VM (it packs phi/g once per
// call where a BLAS call packs both operands of every tile product): section 4 of
// benchmarks/results/cpu-kernel-2026-11-24.md.
#pragma once

#if !defined(NLK_CAPNS) || !defined(NLK_TABLE) || !defined(NLK_TABLE_LABEL)
#error "define NLK_CAPNS, NLK_TABLE and NLK_TABLE_LABEL before including softmax_kernel_impl.h"
#endif

#include "cpu/aten_vec.h"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "cpu/softmax_cpu.h"

namespace nonlocal_kernels::cpu::NLK_CAPNS {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// A 64-byte aligned grow-only buffer owned by one thread (BLAS-path fallbacks, the reduction).
template <typename T>
class Buf {
 public:
  Buf() = default;
  explicit Buf(size_t count) { ensure(count); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p_); }
  T* ensure(size_t count) {
    if (count > n_) {
      std::free(p_);
      p_ = nullptr;
      n_ = 0;
      size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (p_ == nullptr) throw std::bad_alloc();
      n_ = count;
    }
    return p_;
  }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Each worker thread's scratch tiles, kept between calls up to kArenaKeepBytes.
thread_local Arena worker_arena;
constexpr size_t kArenaKeepBytes = size_t(16) << 20;

// A matrix read through strides: element (r, c) at p[r * rs + c * cs].
template <typename T>
struct View {
  const T* p;
  int64_t rs, cs;
  View t() const { return {p, cs, rs}; }  // the transpose
};

// ---------------------------------------------------------------------------------------------
// GEMM on tiles: C (m x n, row-major, ldc) = A (m x k) B (k x n), or += when accumulating.
// Overwriting never reads C (it may hold garbage).

inline void blas_call(char ta, char tb, int m, int n, int k, float alpha, const float* a,
                      int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_call(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// A rows x cols view as a BLAS operand: a row-major matrix (trans = false) or the transpose of
// one (trans = true) with leading dimension ld. False when neither stride is 1.
template <typename T>
bool as_blas(const View<T>& v, int64_t rows, int64_t cols, int64_t& ld, bool& trans) {
  if (v.cs == 1 && (rows == 1 || v.rs >= cols)) {
    ld = rows == 1 ? cols : v.rs;
    trans = false;
  } else if (v.rs == 1 && (cols == 1 || v.cs >= rows)) {
    ld = cols == 1 ? rows : v.cs;
    trans = true;
  } else {
    return false;
  }
  ld = std::max<int64_t>(ld, 1);
  return ld <= INT_MAX;
}

// The panel GEMM (ATen Vectorized). B (k x n) is packed into column panels [jb][kk][kNR<T>],
// zero-padded past n, so the micro-kernel reads it contiguously; a panel set is addressed by its
// base, the full k it was packed with (its "ld") and a starting kk, so a k-slice of a bigger
// packed matrix (phi, g packed once per call) is free. A (m x k) is read in place through its
// strides, one of which must be 1: row-major tiles (P, dS, a row-major theta or dy) and
// transposed ones (P^T, dS^T, a column-wise copy of a channels-first theta) both stream well; only
// the last partial strip of fewer than kMR rows is copied (zero-padded).
constexpr int64_t kMR = 6;    // micro-tile rows: 12 accumulators + 2 B vectors + 1 broadcast
constexpr int64_t kKC = 256;  // k block (the B panel, kKC x kNR, stays in L1)
template <typename T>
constexpr int64_t kNR = 2 * Vec<T>::size();  // micro-tile columns: two vectors

template <typename T>
inline int64_t panels(int64_t n, int64_t width) {
  return (n + width - 1) / width;
}

// Square blocks of ATen's float transpose: one vector of floats (8 with AVX2, 16 with AVX-512,
// whose transpose_mxn<float, 8, 8> is a masked 16 x 16 one, four times the work).
constexpr int64_t kTB = Vec<float>::size() >= 16 ? 16 : 8;

// B-panels jb0..jb1 of the k x n matrix alpha * src(r, c), src(r, c) = src[r * rs + c * cs].
// Row-major sources copy kNR contiguous values per row; column-major ones (rs == 1) go through
// kTB x kTB (float) or 8 x 8 blocks, so that both the reads and the writes stay within a few
// cache lines.
template <typename A, typename S>
void pack_b(const S* src, int64_t rs, int64_t cs, int64_t k, int64_t n, A alpha, A* dst,
            int64_t jb0, int64_t jb1) {
  constexpr int64_t NR = kNR<A>;
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t c0 = jb * NR, cn = std::min(NR, n - c0);
    A* d = dst + jb * k * NR;
    if (cs == 1 && cn == NR) {
      for (int64_t kk = 0; kk < k; ++kk) {
        const S* s = src + kk * rs + c0;
        A* dk_ = d + kk * NR;
        for (int64_t j = 0; j < NR; ++j) dk_[j] = alpha * static_cast<A>(s[j]);
      }
    } else if (rs == 1 && cs != 1) {
      int64_t kk0 = 0;
      if constexpr (std::is_same_v<S, float> && std::is_same_v<A, float>) {
        if (cn == NR) {  // whole kTB x kTB blocks through ATen's (AVX2 / AVX-512) transpose
          for (; kk0 + kTB <= k; kk0 += kTB) {
            for (int64_t j0 = 0; j0 < NR; j0 += kTB)
              at::vec::transpose_mxn<float, kTB, kTB>(src + (c0 + j0) * cs + kk0, cs,
                                                      d + kk0 * NR + j0, NR);
            if (alpha != A(1))
              for (int64_t i = 0; i < kTB * NR; i += Vec<A>::size())
                (Vec<A>::loadu(d + kk0 * NR + i) * Vec<A>(alpha)).store(d + kk0 * NR + i);
          }
        }
      }
      for (; kk0 < k; kk0 += 8) {
        const int64_t kn = std::min<int64_t>(8, k - kk0);
        for (int64_t j = 0; j < NR; ++j) {
          if (j < cn) {
            const S* s = src + (c0 + j) * cs + kk0;
            for (int64_t kk = 0; kk < kn; ++kk)
              d[(kk0 + kk) * NR + j] = alpha * static_cast<A>(s[kk]);
          } else {
            for (int64_t kk = 0; kk < kn; ++kk) d[(kk0 + kk) * NR + j] = A(0);
          }
        }
      }
    } else {
      for (int64_t kk = 0; kk < k; ++kk) {
        const S* s = src + kk * rs + c0 * cs;
        int64_t j = 0;
        for (; j < cn; ++j) d[kk * NR + j] = alpha * static_cast<A>(s[j * cs]);
        for (; j < NR; ++j) d[kk * NR + j] = A(0);
      }
    }
  }
}

// acc (kMR x kNR) = A (kMR rows x kc, element (r, kk) at a[r * ars + kk * acs], with ars == 1
// when kColA, else acs == 1) . b-panel (kc x kNR). Written for the registers: nothing takes the
// accumulators' address, so they never touch the stack.
#define NLK_MICRO_LOOP(kColA)                                    \
  Vec<T> c0[kMR], c1[kMR];                                       \
  for (int r = 0; r < kMR; ++r) c0[r] = c1[r] = Vec<T>(T(0));    \
  for (int64_t kk = 0; kk < kc; ++kk) {                          \
    const Vec<T> b0 = Vec<T>::loadu(b), b1 = Vec<T>::loadu(b + V); \
    for (int r = 0; r < kMR; ++r) {                              \
      const Vec<T> av(kColA ? a[r] : a[r * lda]);                \
      c0[r] = at::vec::fmadd(av, b0, c0[r]);                     \
      c1[r] = at::vec::fmadd(av, b1, c1[r]);                     \
    }                                                            \
    a += kColA ? lda : 1;                                        \
    b += NR;                                                     \
  }

// out (kMR x kNR, row-major) = A . B: the edge tiles.
template <typename T, bool kColA>
inline void micro(int64_t kc, const T* __restrict a, int64_t lda, const T* __restrict b,
                  T* __restrict out) {
  constexpr int64_t V = Vec<T>::size(), NR = kNR<T>;
  NLK_MICRO_LOOP(kColA)
  for (int r = 0; r < kMR; ++r) {
    c0[r].store(out + r * NR);
    c1[r].store(out + r * NR + V);
  }
}

// out (kMR x kNR, row-major; only its first Vec<T>::size() columns are written) = A . B: the
// last panel when it has at most one vector of columns (e.g. M = 196: 12 panels + 4 columns).
// Each column is summed exactly as by `micro`.
template <typename T, bool kColA>
inline void micro_half(int64_t kc, const T* __restrict a, int64_t lda, const T* __restrict b,
                       T* __restrict out) {
  constexpr int64_t NR = kNR<T>;
  Vec<T> c0[kMR];
  for (int r = 0; r < kMR; ++r) c0[r] = Vec<T>(T(0));
  for (int64_t kk = 0; kk < kc; ++kk) {
    const Vec<T> b0 = Vec<T>::loadu(b);
    for (int r = 0; r < kMR; ++r) c0[r] = at::vec::fmadd(Vec<T>(kColA ? a[r] : a[r * lda]), b0, c0[r]);
    a += kColA ? lda : 1;
    b += NR;
  }
  for (int r = 0; r < kMR; ++r) c0[r].store(out + r * NR);
}

// C (a full kMR x kNR tile, ldc) = (or +=) A . B. The product is summed in registers from zero
// and added to C at the end (not continued from C): long k is then summed in blocks of at most
// kKC, which keeps the rounding error close to a BLAS's.
template <typename T, bool kColA, bool kAccumulate>
inline void micro_full(int64_t kc, const T* __restrict a, int64_t lda, const T* __restrict b,
                       T* __restrict c, int64_t ldc) {
  constexpr int64_t V = Vec<T>::size(), NR = kNR<T>;
  NLK_MICRO_LOOP(kColA)
  for (int r = 0; r < kMR; ++r) {
    if constexpr (kAccumulate) {
      c0[r] = c0[r] + Vec<T>::loadu(c + r * ldc);
      c1[r] = c1[r] + Vec<T>::loadu(c + r * ldc + V);
    }
    c0[r].store(c + r * ldc);
    c1[r].store(c + r * ldc + V);
  }
}
#undef NLK_MICRO_LOOP

// C[0:rows, 0:cols] (ldc) = (or +=) out: the edge tiles.
template <typename T>
inline void update_c(const T* __restrict out, T* __restrict c, int64_t ldc, int64_t rows,
                     int64_t cols, bool accumulate) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + out[r * NR + j] : out[r * NR + j];
}

// Packed B operand: panels at p, packed with full depth ld, used from depth k0 on.
template <typename T>
struct Panels {
  const T* p;
  int64_t ld, k0;
};

// C (m x n, row-major, ldc) = (or +=) A (m x k, a view with a unit stride) B (k x n, panels).
// `edge` is scratch for kMR x kKC elements.
template <typename T, bool kColA>
void gemm_strided_a(int64_t m, int64_t n, int64_t k, const View<T>& A, const Panels<T>& B,
                    bool accumulate, T* C, int64_t ldc, T* edge) {
  constexpr int64_t NR = kNR<T>;
  const int64_t lda = kColA ? A.cs : A.rs;
  const int64_t mfull = m / kMR, mrem = m % kMR, nb = panels<T>(n, NR);
  alignas(64) T out[kMR * NR];
  for (int64_t k0 = 0; k0 < k; k0 += kKC) {
    const int64_t kc = std::min(kKC, k - k0);
    const bool acc = accumulate || k0 > 0;
    if (mrem > 0) {  // the last rows, as a zero-padded column-major strip
      for (int64_t kk = 0; kk < kc; ++kk)
        for (int64_t i = 0; i < kMR; ++i)
          edge[kk * kMR + i] =
              i < mrem ? A.p[(mfull * kMR + i) * A.rs + (k0 + kk) * A.cs] : T(0);
    }
    for (int64_t jb = 0; jb < nb; ++jb) {
      const T* bp = B.p + jb * B.ld * NR + (B.k0 + k0) * NR;
      const int64_t cols = std::min(NR, n - jb * NR);
      for (int64_t ib = 0; ib < mfull; ++ib) {
        const T* ap = A.p + ib * kMR * A.rs + k0 * A.cs;
        T* c = C + ib * kMR * ldc + jb * NR;
        if (cols == NR) {
          if (acc) {
            micro_full<T, kColA, true>(kc, ap, lda, bp, c, ldc);
          } else {
            micro_full<T, kColA, false>(kc, ap, lda, bp, c, ldc);
          }
        } else if (cols <= Vec<T>::size()) {
          micro_half<T, kColA>(kc, ap, lda, bp, out);
          update_c(out, c, ldc, kMR, cols, acc);
        } else {
          micro<T, kColA>(kc, ap, lda, bp, out);
          update_c(out, c, ldc, kMR, cols, acc);
        }
      }
      if (mrem > 0) {
        if (cols <= Vec<T>::size()) {
          micro_half<T, true>(kc, edge, kMR, bp, out);
        } else {
          micro<T, true>(kc, edge, kMR, bp, out);
        }
        update_c(out, C + mfull * kMR * ldc + jb * NR, ldc, mrem, cols, acc);
      }
    }
  }
}

template <typename T>
void gemm_panels(int64_t m, int64_t n, int64_t k, const View<T>& A, const Panels<T>& B,
                 bool accumulate, T* C, int64_t ldc, T* edge) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < m; ++r) std::fill(C + r * ldc, C + r * ldc + n, T(0));
    return;
  }
  if (A.rs == 1 && (A.cs != 1 || m > 1)) {
    gemm_strided_a<T, true>(m, n, k, A, B, accumulate, C, ldc, edge);
  } else {
    gemm_strided_a<T, false>(m, n, k, A, B, accumulate, C, ldc, edge);
  }
}

// GEMM on strided views, used by the BLAS kernels: a BLAS call when both views have a unit
// stride (always, for the operands those kernels build), else the panel GEMM.
template <typename T>
class Gemm {
 public:
  explicit Gemm(bool use_blas) : use_blas_(use_blas) {}

  // C (m x n, row-major, ldc) = A B (+ C when accumulate).
  void operator()(int64_t m, int64_t n, int64_t k, View<T> A, View<T> B, bool accumulate, T* C,
                  int64_t ldc) {
    if (m == 0 || n == 0) return;
    int64_t lda, ldb;
    bool ta, tb;
    if (use_blas_ && k > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && ldc <= INT_MAX &&
        as_blas(A, m, k, lda, ta) && as_blas(B, k, n, ldb, tb)) {
      // Row-major C = A B is column-major C^T = B^T A^T.
      blas_call(tb ? 'T' : 'N', ta ? 'T' : 'N', int(n), int(m), int(k), T(1), B.p, int(ldb),
                A.p, int(lda), accumulate ? T(1) : T(0), C, int(ldc));
      return;
    }
    if (A.rs != 1 && A.cs != 1) {  // no unit stride: a row-major copy
      T* ac = acopy_.ensure(size_t(m * std::max<int64_t>(k, 1)));
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < k; ++c) ac[r * k + c] = A.p[r * A.rs + c * A.cs];
      A = View<T>{ac, k, 1};
    }
    T* bp = bpack_.ensure(size_t(panels<T>(n, kNR<T>) * kNR<T> * std::max<int64_t>(k, 1)));
    pack_b<T, T>(B.p, B.rs, B.cs, k, n, T(1), bp, 0, panels<T>(n, kNR<T>));
    gemm_panels<T>(m, n, k, A, Panels<T>{bp, k, 0}, accumulate, C, ldc,
                   edge_.ensure(size_t(kMR * kKC)));
  }

 private:
  bool use_blas_;
  Buf<T> acopy_, bpack_, edge_;
};

// ---------------------------------------------------------------------------------------------
// Row helpers (vectorised over a row of a tile).

// Sleef's 1-ulp exp (exp_u20 is ~10% faster on this loop but its 2-ulp error shows up against
// the tolerance rule when dv is in the thousands).
template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  return x.exp();
}

template <typename T>
T row_max(const T* x, int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= V) {
    Vec<T> acc = Vec<T>::loadu(x);
    for (j = V; j + V <= n; j += V) acc = at::vec::maximum(acc, Vec<T>::loadu(x + j));
    T tmp[V];
    acc.store(tmp);
    for (int64_t i = 0; i < V; ++i) m = std::max(m, tmp[i]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x = exp(mul * src - sub) (src may be x itself; mul * src - sub one fused multiply-subtract,
// exact for mul = 1); returns the sum of the new x.
template <typename T>
T exp_sub_sum(const T* src, T* x, int64_t n, T sub, T mul = T(1)) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> s(sub), a(mul);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    Vec<T> e = vexp(at::vec::fmsub(Vec<T>::loadu(src + j), a, s));
    e.store(x + j);
    acc = acc + e;
  }
  if (j < n) {
    const int64_t rest = n - j;
    Vec<T> e = vexp(at::vec::fmsub(Vec<T>::loadu(src + j, rest), a, s));
    e.store(x + j, rest);
    T tmp[V] = {};
    e.store(tmp, rest);
    acc = acc + Vec<T>::loadu(tmp);
  }
  T tmp[V];
  acc.store(tmp);
  T sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += tmp[i];
  return sum;
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> av(a);
  int64_t j = 0;
  for (; j + V <= n; j += V) (Vec<T>::loadu(x + j) * av).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// dot = sum_c x[c] * y[c] and sum = sum_c x[c], both in double, with 8 partial sums each (a
// fixed order, so deterministic) to break the latency chain of one accumulator. Used for the
// backward's rowsum(P * dP) and rowsum(P).
template <typename S>
void dot_sum_double(const S* x, const S* y, int64_t n, double& dot, double& sum) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, xs[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>) {
    // The same 8 partial sums, 4 + 4 lanes of two AVX2 registers: float -> double, then FMA
    // (exact: the product of two floats fits a double).
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    __m256d slo = _mm256_setzero_pd(), shi = _mm256_setzero_pd();
    for (; c + 8 <= n; c += 8) {
      const __m256 xv = _mm256_loadu_ps(x + c), yv = _mm256_loadu_ps(y + c);
      const __m256d xlo = _mm256_cvtps_pd(_mm256_castps256_ps128(xv));
      const __m256d xhi = _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1));
      lo = _mm256_fmadd_pd(xlo, _mm256_cvtps_pd(_mm256_castps256_ps128(yv)), lo);
      hi = _mm256_fmadd_pd(xhi, _mm256_cvtps_pd(_mm256_extractf128_ps(yv, 1)), hi);
      slo = _mm256_add_pd(slo, xlo);
      shi = _mm256_add_pd(shi, xhi);
    }
    _mm256_storeu_pd(acc, lo);
    _mm256_storeu_pd(acc + 4, hi);
    _mm256_storeu_pd(xs, slo);
    _mm256_storeu_pd(xs + 4, shi);
  }
#endif
  for (; c + 8 <= n; c += 8)
    for (int i = 0; i < 8; ++i) {
      acc[i] += static_cast<double>(x[c + i]) * static_cast<double>(y[c + i]);
      xs[i] += static_cast<double>(x[c + i]);
    }
  for (int i = 0; c < n; ++c, ++i) {
    acc[i] += static_cast<double>(x[c]) * static_cast<double>(y[c]);
    xs[i] += static_cast<double>(x[c]);
  }
  dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  sum = ((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7]));
}

// ds = c * p * (dp - d), in place into dp.
template <typename T>
void softmax_grad_row(const T* p, T* dp, int64_t n, T d, T c) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> dv(d), cv(c);
  int64_t j = 0;
  for (; j + V <= n; j += V)
    (Vec<T>::loadu(p + j) * cv * (Vec<T>::loadu(dp + j) - dv)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * c * (dp[j] - d);
}

// ---------------------------------------------------------------------------------------------
// Conversion between the input/output dtype S and the compute type A.

// dst (rows x cols, row-major, ld) = alpha * src (strided). A source with unit row stride
// (channels-first) is read in column blocks of 16, so reads and writes both stream.
template <typename S, typename A>
void load_tile(const S* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, A* dst,
               int64_t ld, A alpha) {
  if (rs == 1 && cs != 1) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t cn = std::min<int64_t>(16, cols - c0);
      for (int64_t r = 0; r < rows; ++r) {
        A* d = dst + r * ld + c0;
        for (int64_t c = 0; c < cn; ++c) d[c] = alpha * static_cast<A>(src[(c0 + c) * cs + r]);
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = src + r * rs;
      A* d = dst + r * ld;
      for (int64_t c = 0; c < cols; ++c) d[c] = alpha * static_cast<A>(s[c * cs]);
    }
  }
}

// dst (strided, dtype S) = alpha * src (rows x cols, row-major, ld); blocked like load_tile.
template <typename S, typename A>
void store_tile(const A* src, int64_t ld, int64_t rows, int64_t cols, S* dst, int64_t rs,
                int64_t cs, A alpha) {
  if (rs == 1 && cs != 1) {
    int64_t r_full = 0;
    if constexpr (std::is_same_v<S, float> && std::is_same_v<A, float>) {
      // Whole kTB x kTB blocks: scaled into `blk`, then ATen's transpose into dst.
      r_full = rows / kTB * kTB;
      const int64_t c_full = cols / kTB * kTB;
      alignas(64) float blk[kTB * kTB];
      const Vec<A> av(alpha);
      for (int64_t c0 = 0; c0 < c_full; c0 += kTB)
        for (int64_t r0 = 0; r0 < r_full; r0 += kTB) {
          for (int64_t i = 0; i < kTB; ++i)
            (Vec<A>::loadu(src + (r0 + i) * ld + c0, kTB) * av).store(blk + i * kTB, kTB);
          at::vec::transpose_mxn<float, kTB, kTB>(blk, kTB, dst + c0 * cs + r0, cs);
        }
      for (int64_t c = c_full; c < cols; ++c)  // the last cols % kTB columns, rows < r_full
        for (int64_t r = 0; r < r_full; ++r) dst[c * cs + r] = alpha * src[r * ld + c];
    }
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {  // the rows from r_full on
      const int64_t cn = std::min<int64_t>(16, cols - c0);
      for (int64_t r = r_full; r < rows; ++r) {
        const A* s = src + r * ld + c0;
        for (int64_t c = 0; c < cn; ++c) dst[(c0 + c) * cs + r] = static_cast<S>(alpha * s[c]);
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      S* d = dst + r * rs;
      const A* s = src + r * ld;
      for (int64_t c = 0; c < cols; ++c) d[c * cs] = static_cast<S>(alpha * s[c]);
    }
  }
}

template <typename S>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

// ---------------------------------------------------------------------------------------------
// Kernels. kPacked selects the panel GEMM on phi/g panels packed once per call (plan.kt, ...);
// otherwise tile products are BLAS calls on strided views (plan.k, plan.v).

template <typename S>
void pack_impl(const void* src_v, int64_t bs, int64_t rs, int64_t cs, int64_t rows,
               int64_t cols, void* dst_v, int64_t b0, int64_t b1) {
  using A = typename Compute<S>::type;
  const S* src = static_cast<const S*>(src_v);
  A* dst = static_cast<A*>(dst_v);
  constexpr int64_t kChunk = 64;  // rows per block, so a transposing copy stays in cache
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t r0 = 0; r0 < rows; r0 += kChunk)
      load_tile<S, A>(src + b * bs + r0 * rs, rs, cs, std::min(kChunk, rows - r0), cols,
                      dst + (b * rows + r0) * cols, cols, A(1));
}

// B-panels of the k x n matrices src[b] (b * bs + r * rs + c * cs), items = (batch, panel).
template <typename S>
void pack_panels_impl(const void* src_v, int64_t bs, int64_t rs, int64_t cs, int64_t k,
                      int64_t n, double alpha, void* dst_v, int64_t dst_bs, int64_t item0,
                      int64_t item1) {
  using A = typename Compute<S>::type;
  const S* src = static_cast<const S*>(src_v);
  A* dst = static_cast<A*>(dst_v);
  const int64_t np = panels<A>(n, kNR<A>);
  for (int64_t item = item0; item < item1;) {
    const int64_t b = item / np, jb0 = item % np, jb1 = std::min(np, jb0 + (item1 - item));
    pack_b<A, S>(src + b * bs, rs, cs, k, n, static_cast<A>(alpha), dst + b * dst_bs, jb0, jb1);
    item += jb1 - jb0;
  }
}

// Online-softmax update of one row of S (in place to P = exp(S - m_new)); rescales acc. The row
// sum l is kept in double (scaled by the same alpha as acc), so y = acc / l and lse = m + log l
// lose nothing to the running sum over many key tiles.
template <typename A>
inline void online_softmax_row(A* srow, int64_t bn, A& m, double& l, A* acc_row, int64_t dv) {
  const A m_new = std::max(m, row_max(srow, bn));
  const A sum = exp_sub_sum(srow, srow, bn, m_new);
  if (m != -std::numeric_limits<A>::infinity() && m != m_new) {
    const A alpha = std::exp(m - m_new);
    l *= static_cast<double>(alpha);
    scale_row(acc_row, dv, alpha);
  }
  l += static_cast<double>(sum);
  m = m_new;
}

// An input tile (rows x cols at src, strides rs, cs; rows <= the tile height) as the A operand
// of the panel GEMM: in place when it is the compute type and row-major; a column-major source
// (a channels-first view, rs == 1) is copied column by column into `buf` (lda = rows: the
// micro-kernel's strided broadcasts then stay within a few cache lines); anything else is
// converted into `buf` row-major.
template <typename S, typename A>
View<A> a_operand(const S* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, A* buf) {
  if constexpr (std::is_same_v<S, A>) {
    if (cs == 1 && rs != 1) return View<A>{src, rs, cs};
  }
  if (rs == 1 && cs != 1) {
    for (int64_t c = 0; c < cols; ++c) {
      const S* sc = src + c * cs;
      A* d = buf + c * rows;
      for (int64_t r = 0; r < rows; ++r) d[r] = static_cast<A>(sc[r]);
    }
    return View<A>{buf, 1, rows};
  }
  load_tile<S, A>(src, rs, cs, rows, cols, buf, cols, A(1));
  return View<A>{buf, cols, 1};
}

// Row stride of the S / dP tiles of BN columns: padded so that their columns (read by the
// micro-kernel as P^T and dS^T) do not map to a handful of L1 sets when BN is a power of two.
constexpr int64_t score_ld(int64_t BN) { return BN + 16; }

// The tile products of the forward and the backward, on either path: the packed path multiplies
// by B-panels (of phi, g or their transposes, packed once per call, or of the task's query-side
// tile), the BLAS path calls Gemm on strided views of the same matrices. A key tile j is rows
// j0 .. j0 + bn - 1 of phi or g of batch b.

// phi or g as a B operand: packed path, its B-panels per batch (bs elements apart), of the matrix
// itself for products with a key tile, of its transpose for products with a key tile's
// transpose; BLAS path, the strided view m.
struct KeyOperand {
  const void* panels;
  int64_t bs;
  MatView m;
};

template <typename A>
View<A> key_tile(const MatView& m, int64_t b, int64_t j0) {
  return View<A>{static_cast<const A*>(m.ptr) + b * m.bs + j0 * m.rs, m.rs, m.cs};
}

// out (bm x bn, ldo) = X Y_j^T over depth d (X: bm x d): S = scale theta phi_j^T (the scale is in
// the phi^T panels, or in X on the BLAS path) and dP = dy g_j^T. Both kernels take S from here:
// the backward's P = exp(S - lse) needs the forward's S bit for bit.
template <typename A, bool kPacked>
void times_key_tile_t(Gemm<A>& gemm, const View<A>& x, const KeyOperand& y, int64_t b,
                      int64_t j0, int64_t bm, int64_t bn, int64_t d, A* out, int64_t ldo,
                      A* edge) {
  if constexpr (kPacked) {
    constexpr int64_t NR = kNR<A>;
    const A* yt = static_cast<const A*>(y.panels) + b * y.bs + (j0 / NR) * d * NR;
    gemm_panels<A>(bm, bn, d, x, Panels<A>{yt, d, 0}, false, out, ldo, edge);
  } else {
    gemm(bm, bn, d, x, key_tile<A>(y.m, b, j0).t(), false, out, ldo);
  }
}

// out (bm x d, ldo) = (or += when accumulate) X Y_j (X: bm x bn; Y has M rows): acc += P g_j
// and dtheta += dS phi_j.
template <typename A, bool kPacked>
void times_key_tile(Gemm<A>& gemm, const View<A>& x, const KeyOperand& y, int64_t b, int64_t j0,
                    int64_t bm, int64_t bn, int64_t M, int64_t d, bool accumulate, A* out,
                    int64_t ldo, A* edge) {
  if constexpr (kPacked) {
    const A* yp = static_cast<const A*>(y.panels) + b * y.bs;
    gemm_panels<A>(bm, d, bn, x, Panels<A>{yp, M, j0}, accumulate, out, ldo, edge);
  } else {
    gemm(bm, d, bn, x, key_tile<A>(y.m, b, j0), accumulate, out, ldo);
  }
}

// out (bn x d, ldo) = (or += when accumulate) X Q (X: bn x bm), Q the task's query-side tile
// (bm x d): its B-panels qp on the packed path, the view qv on the BLAS path. dg_j += P^T dy and
// dphi_j += dS^T (scale theta).
template <typename A, bool kPacked>
void times_query_tile(Gemm<A>& gemm, const View<A>& x, const A* qp, const View<A>& qv,
                      int64_t bn, int64_t bm, int64_t d, bool accumulate, A* out, int64_t ldo,
                      A* edge) {
  if constexpr (kPacked) {
    gemm_panels<A>(bn, d, bm, x, Panels<A>{qp, bm, 0}, accumulate, out, ldo, edge);
  } else {
    gemm(bn, d, bm, x, qv, accumulate, out, ldo);
  }
}

// The BLAS path with MKL's packed key-tile operands (CpuPlan::mkl_*): float compute only.
template <typename A>
bool mkl_packed(const CpuPlan& plan) {
  if constexpr (std::is_same_v<A, float>) {
    return !plan.packed && plan.mkl_kt != nullptr;
  } else {
    return false;
  }
}

// out (m x n, ldo) = (or += when accumulate) X (m x k, row-major, ldx) times the packed B
// operand of key tile j0 of batch b (one of CpuPlan::mkl_*: tiles `per_tile` floats apart).
inline void mkl_times_packed(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx,
                             const float* packed, int64_t per_tile, int64_t b, int64_t j0,
                             const CpuPlan& plan, int64_t M, bool accumulate, float* out,
                             int64_t ldo) {
  const int64_t nkt = (M + plan.BN - 1) / plan.BN;
  const float* bp = packed + (b * nkt + j0 / plan.BN) * per_tile;
  cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, int(m), int(n), int(k), x,
                      int(ldx), bp, 0, accumulate ? 1.0f : 0.0f, out, int(ldo));
}
// Compiled for the float64 kernels, never called there (mkl_packed<double> is false).
template <typename A>
void mkl_times_packed(int64_t, int64_t, int64_t, const A*, int64_t, const float*, int64_t,
                      int64_t, int64_t, const CpuPlan&, int64_t, bool, A*, int64_t) {
  std::abort();
}

template <typename S, bool kPacked>
void forward_impl(const NonlocalSoftmaxParams& p, const CpuPlan& plan, TaskQueue& tasks) {
  using A = typename Compute<S>::type;
  const int64_t N = p.N, M = p.M, dk = p.dk, dv = p.dv, BM = plan.BM, BN = plan.BN;
  const int64_t LS = score_ld(BN);
  const A scale = static_cast<A>(plan.scale);  // double: params.h holds a float
  Arena& arena = worker_arena;
  arena.reserve(Arena::bytes_for<A>(BM * dk) + Arena::bytes_for<A>(BM * LS) +
                Arena::bytes_for<A>(BM * dv) + Arena::bytes_for<A>(BM) +
                Arena::bytes_for<A>(kMR * kKC) + Arena::bytes_for<double>(BM));
  A* q = arena.take<A>(BM * dk);
  A* s = arena.take<A>(BM * LS);
  A* acc = arena.take<A>(BM * dv);
  A* mrow = arena.take<A>(BM);
  A* edge = arena.take<A>(kMR * kKC);
  double* lrow = arena.take<double>(BM);
  Gemm<A> gemm(!plan.packed);
  const KeyOperand phi_t{plan.kt, plan.kt_bs, plan.k}, g{plan.vp, plan.v_bs, plan.v};  // S, P g
  const S* theta = static_cast<const S*>(p.theta);
  S* y = static_cast<S*>(p.y);
  A* lse = static_cast<A*>(p.lse);
  const int64_t ts1 = p.theta_stride[1], ts2 = p.theta_stride[2];
  const bool mkl = mkl_packed<A>(plan);

  for (int64_t task; tasks.next(task);) {
    const int64_t b = task / plan.n_qtiles, i0 = (task % plan.n_qtiles) * BM;
    const int64_t bm = std::min(BM, N - i0);
    const S* tsrc = theta + b * p.theta_stride[0] + i0 * ts1;
    View<A> qv{q, dk, 1};
    if constexpr (kPacked) {
      qv = a_operand<S, A>(tsrc, ts1, ts2, bm, dk, q);  // scale is in the phi^T panels
    } else {
      load_tile<S, A>(tsrc, ts1, ts2, bm, dk, q, dk, scale);
    }
    // acc is overwritten by the first key tile's P g_j (no rescale before it), then added to.
    std::fill(mrow, mrow + bm, -std::numeric_limits<A>::infinity());
    std::fill(lrow, lrow + bm, 0.0);
    if (mkl && bm < BM) std::fill(q + bm * dk, q + BM * dk, A(0));  // rows past N: zero scores
    for (int64_t j0 = 0; j0 < M; j0 += BN) {
      const int64_t bn = std::min(BN, M - j0);
      // S = scale theta phi_j^T
      if (mkl) {
        mkl_times_packed(BM, bn, dk, q, dk, plan.mkl_kt, plan.mkl_kt_tile, b, j0, plan, M, false,
                         s, LS);
      } else {
        times_key_tile_t<A, kPacked>(gemm, qv, phi_t, b, j0, bm, bn, dk, s, LS, edge);
      }
      for (int64_t r = 0; r < bm; ++r)
        online_softmax_row(s + r * LS, bn, mrow[r], lrow[r], acc + r * dv, dv);
      // acc += P g_j
      if (mkl) {
        mkl_times_packed(BM, dv, bn, s, LS, plan.mkl_v, plan.mkl_v_tile, b, j0, plan, M, j0 > 0,
                         acc, dv);
      } else {
        times_key_tile<A, kPacked>(gemm, View<A>{s, LS, 1}, g, b, j0, bm, bn, M, dv, j0 > 0,
                                   acc, dv, edge);
      }
    }
    for (int64_t r = 0; r < bm; ++r) {
      const A inv = static_cast<A>(1.0 / lrow[r]);
      S* yrow = y + b * p.y_stride[0] + (i0 + r) * p.y_stride[1];
      const A* arow = acc + r * dv;
      for (int64_t c = 0; c < dv; ++c) yrow[c * p.y_stride[2]] = static_cast<S>(arow[c] * inv);
      lse[b * p.lse_stride[0] + (i0 + r) * p.lse_stride[1]] =
          static_cast<A>(static_cast<double>(mrow[r]) + std::log(lrow[r]));
    }
  }
  arena.trim(kArenaKeepBytes);
}

// Backward of one (batch, query-tile group) task. Per query tile, two passes over the key tiles:
//  1. P = exp(S - lse) (S recomputed bit for bit as in the forward), dg_j += P^T dy,
//     dP = dy g_j^T; both tiles are kept (a BM x M row panel each, per thread), and
//     D_i = sum_j P_ij dP_ij is summed in double;
//  2. dS = P * (dP - D), dphi_j += dS^T (scale theta), dtheta += dS phi_j.
// D is taken from the very P and dP the gradient uses (as autograd's softmax backward does), not
// from rowsum(dy * y) as in FlashAttention-2: with a wide g (dv in the hundreds or more) dP is
// large, dP - D cancels, and the small differences between the forward's P (which made y) and
// the backward's recomputed P, plus the rounding of dP, then cost dtheta/dphi up to several times
// the error of PyTorch in the same precision (see scripts/accuracy_sweep.py). Keeping the
// tiles costs no extra FLOPs; the memory is 2 * BM * M per thread, linear in M.
// P is also normalised by its own row sum sigma_i = sum_j P_ij (double, pass 1): lse is a float,
// so exp(S - lse) sums to 1 only within half an ulp of lse (2.4e-7 at lse ~ 7), and a peaked row
// with a large D multiplies that into dtheta/dphi (dS_ij = P_ij (dP_ij - D_i) cancels to a small
// value): without the normalisation, up to 1.22x the tolerance in 1 draw in 3000 of the ragged
// test case (benchmarks/results/cpu-kernel-2026-11-24.md, section 6). With
// c_i = 1 / sigma_i: D_i = c_i sum_j P_ij dP_ij and dS_ij = c_i P_ij (dP_ij - D_i). dg keeps the
// unnormalised P (it is summed in pass 1, before sigma is known; nothing cancels there).
// In exact arithmetic D_i = dy_i . y_i. The columns c where g[:, c] is all zero add nothing to
// dP, so their share dy_ic y_ic is taken from y as given: zero for a real zero column (the
// forward's y is exactly zero there), and -dlse_i for the column that ops.softmax_grads
// appends to pass a gradient flowing into lse (y: 1, dy: -dlse, g: 0).
template <typename S, bool kPacked>
void backward_impl(const NonlocalSoftmaxParams& p, const CpuPlan& plan, TaskQueue& tasks) {
  using A = typename Compute<S>::type;
  constexpr int64_t NR = kNR<A>;
  const int64_t N = p.N, M = p.M, dk = p.dk, dv = p.dv, BM = plan.BM, BN = plan.BN;
  const int64_t LS = score_ld(BN);
  const int64_t LQ = dk + 16;  // row stride of the dtheta tile, padded as score_ld pads
  const int64_t G = plan.groups;
  const int64_t n_ktiles = (M + BN - 1) / BN;
  const A scale = static_cast<A>(plan.scale);  // double: params.h holds a float
  // q, dyt: the theta / dy tiles when they must be converted (BLAS path: always, theta scaled);
  // qbp, dybp: the same tiles as B-panels (k = BM), theta scaled (panel path only).
  const int64_t qb_n = kPacked ? panels<A>(dk, NR) * NR * BM : 1;
  const int64_t dyb_n = kPacked ? panels<A>(dv, NR) * NR * BM : 1;
  Arena& arena = worker_arena;
  arena.reserve(Arena::bytes_for<A>(BM * dk) + Arena::bytes_for<A>(BM * LQ) +
                Arena::bytes_for<A>(BM * dv) + Arena::bytes_for<A>(n_ktiles * BM * LS) * 2 +
                Arena::bytes_for<A>(BM) * 3 + Arena::bytes_for<double>(BM) * 2 +
                Arena::bytes_for<A>(kMR * kKC) + Arena::bytes_for<A>(qb_n) +
                Arena::bytes_for<A>(dyb_n));
  A* q = arena.take<A>(BM * dk);
  A* dq = arena.take<A>(BM * LQ);
  A* dyt = arena.take<A>(BM * dv);
  A* s_all = arena.take<A>(n_ktiles * BM * LS);   // P tiles of the current query tile
  A* dp_all = arena.take<A>(n_ktiles * BM * LS);  // dP, then dS tiles
  A* D = arena.take<A>(BM);
  A* L = arena.take<A>(BM);
  A* Pinv = arena.take<A>(BM);
  double* Dsum = arena.take<double>(BM);
  double* Psum = arena.take<double>(BM);
  A* edge = arena.take<A>(kMR * kKC);
  A* qbp = arena.take<A>(qb_n);
  A* dybp = arena.take<A>(dyb_n);
  Gemm<A> gemm(!plan.packed);
  const KeyOperand phi_t{plan.kt, plan.kt_bs, plan.k};  // S
  const KeyOperand phi{plan.kp, plan.k_bs, plan.k};      // dS phi
  const KeyOperand g_t{plan.vtp, plan.vt_bs, plan.v};    // dP
  std::vector<int64_t> zero_cols;  // the all-zero columns of g[b] (plan.zero_cols)
  int64_t zero_cols_batch = -1;
  const S* theta = static_cast<const S*>(p.theta);
  const S* dy = static_cast<const S*>(p.dy);
  const S* y = static_cast<const S*>(p.y);
  const A* lse = static_cast<const A*>(p.lse);
  S* dtheta = static_cast<S*>(p.dtheta);
  const int64_t ts1 = p.theta_stride[1], ts2 = p.theta_stride[2];
  const int64_t ds1 = p.dy_stride[1], ds2 = p.dy_stride[2];
  const bool mkl = mkl_packed<A>(plan);

  for (int64_t task; tasks.next(task);) {
    const int64_t b = task / G, grp = task % G;
    if (b != zero_cols_batch) {
      zero_cols.clear();
      for (int64_t c = 0; c < dv; ++c)
        if (plan.zero_cols[b * dv + c]) zero_cols.push_back(c);
      zero_cols_batch = b;
    }
    A* dkp = static_cast<A*>(plan.partial) + (b * G + grp) * M * (dk + dv);  // (M, dk)
    A* dvp = dkp + M * dk;                                                    // (M, dv)
    // The group's first query tile overwrites its partial dphi/dg (every row of both is written
    // once per query tile), the others add to it: no zeroing pass over M x (dk + dv).
    const int64_t qt_begin = grp * plan.tiles_per_group;
    const int64_t qt_end = std::min(plan.n_qtiles, (grp + 1) * plan.tiles_per_group);
    for (int64_t qt = qt_begin; qt < qt_end; ++qt) {
      const bool acc_kv = qt > qt_begin;
      const int64_t i0 = qt * BM, bm = std::min(BM, N - i0);
      const S* tsrc = theta + b * p.theta_stride[0] + i0 * ts1;
      const S* dysrc = dy + b * p.dy_stride[0] + i0 * ds1;
      View<A> qv{q, dk, 1}, dyv{dyt, dv, 1};
      if constexpr (kPacked) {
        // unscaled: scale is in phi^T panels; only S needs it
        qv = a_operand<S, A>(tsrc, ts1, ts2, bm, dk, q);
        dyv = a_operand<S, A>(dysrc, ds1, ds2, bm, dv, dyt);
        pack_b<A, S>(tsrc, ts1, ts2, bm, dk, scale, qbp, 0, panels<A>(dk, NR));
        pack_b<A, S>(dysrc, ds1, ds2, bm, dv, A(1), dybp, 0, panels<A>(dv, NR));
      } else {
        load_tile<S, A>(tsrc, ts1, ts2, bm, dk, q, dk, scale);
        load_tile<S, A>(dysrc, ds1, ds2, bm, dv, dyt, dv, A(1));
        if (mkl && bm < BM) {  // rows past N: zero S, dP and dS rows (as in the forward)
          std::fill(q + bm * dk, q + BM * dk, A(0));
          std::fill(dyt + bm * dv, dyt + BM * dv, A(0));
        }
      }
      for (int64_t r = 0; r < bm; ++r) {
        L[r] = lse[b * p.lse_stride[0] + (i0 + r) * p.lse_stride[1]];
        Dsum[r] = 0.0;
        Psum[r] = 0.0;
      }
      // Pass 1: P, dg, dP, D and sigma.
      for (int64_t j0 = 0; j0 < M; j0 += BN) {
        const int64_t bn = std::min(BN, M - j0);
        A* s = s_all + (j0 / BN) * BM * LS;
        A* dp = dp_all + (j0 / BN) * BM * LS;
        const View<A> pt{s, 1, LS};  // P^T
        // P = exp(S - lse), S = scale theta phi_j^T recomputed bit for bit as in the forward
        if (mkl) {
          mkl_times_packed(BM, bn, dk, q, dk, plan.mkl_kt, plan.mkl_kt_tile, b, j0, plan, M,
                           false, s, LS);
        } else {
          times_key_tile_t<A, kPacked>(gemm, qv, phi_t, b, j0, bm, bn, dk, s, LS, edge);
        }
        for (int64_t r = 0; r < bm; ++r) exp_sub_sum(s + r * LS, s + r * LS, bn, L[r]);
        // dg_j += P^T dy
        times_query_tile<A, kPacked>(gemm, pt, dybp, dyv, bn, bm, dv, acc_kv, dvp + j0 * dv, dv,
                                     edge);
        // dP = dy g_j^T
        if (mkl) {
          mkl_times_packed(BM, bn, dv, dyt, dv, plan.mkl_vt, plan.mkl_vt_tile, b, j0, plan, M,
                           false, dp, LS);
        } else {
          times_key_tile_t<A, kPacked>(gemm, dyv, g_t, b, j0, bm, bn, dv, dp, LS, edge);
        }
        for (int64_t r = 0; r < bm; ++r) {  // key tiles in order: deterministic
          double dot, sum;
          dot_sum_double(s + r * LS, dp + r * LS, bn, dot, sum);
          Dsum[r] += dot;
          Psum[r] += sum;
        }
      }
      for (int64_t r = 0; r < bm; ++r) {
        const S* yrow = y + b * p.y_stride[0] + (i0 + r) * p.y_stride[1];
        const S* dyrow = dysrc + r * ds1;
        const double inv = 1.0 / Psum[r];
        double d = Dsum[r] * inv;
        for (int64_t c : zero_cols)
          d += static_cast<double>(dyrow[c * ds2]) * static_cast<double>(yrow[c * p.y_stride[2]]);
        D[r] = static_cast<A>(d);
        Pinv[r] = static_cast<A>(inv);
      }
      // Pass 2: dS = c P * (dP - D); dphi_j += dS^T (scale theta); dtheta += dS phi_j (times
      // scale when written). Key tiles in reverse order: the last ones of pass 1 are still in
      // cache.
      // dq: overwritten by the first key tile of this pass (the last one), then added to.
      for (int64_t jt = n_ktiles - 1; jt >= 0; --jt) {
        const int64_t j0 = jt * BN, bn = std::min(BN, M - j0);
        const A* s = s_all + (j0 / BN) * BM * LS;
        A* dp = dp_all + (j0 / BN) * BM * LS;
        const View<A> dst{dp, 1, LS}, ds{dp, LS, 1};  // dS^T, dS
        for (int64_t r = 0; r < bm; ++r)
          softmax_grad_row(s + r * LS, dp + r * LS, bn, D[r], Pinv[r]);
        times_query_tile<A, kPacked>(gemm, dst, qbp, qv, bn, bm, dk, acc_kv, dkp + j0 * dk, dk,
                                     edge);
        if (mkl) {
          mkl_times_packed(BM, dk, bn, dp, LS, plan.mkl_k, plan.mkl_k_tile, b, j0, plan, M,
                           jt < n_ktiles - 1, dq, LQ);
        } else {
          times_key_tile<A, kPacked>(gemm, ds, phi, b, j0, bm, bn, M, dk, jt < n_ktiles - 1, dq,
                                     LQ, edge);
        }
      }
      store_tile<S, A>(dq, LQ, bm, dk, dtheta + b * p.dtheta_stride[0] + i0 * p.dtheta_stride[1],
                       p.dtheta_stride[1], p.dtheta_stride[2], scale);
    }
  }
  arena.trim(kArenaKeepBytes);
}

// ---------------------------------------------------------------------------------------------
// Row kernels of the whole-batch path (softmax_cpu.cpp): the call's scores are one contiguous
// (rows, n) buffer of the compute type A, made and consumed by BLAS batched products.

// Rows [r0, r1): x = softmax(scale * x) in place, lse[r] = log sum_j exp(scale * x_rj).
// Three passes over a row that stays in L1/L2: max, exp(scale x - m) with its sum, 1 / sum.
template <typename A>
void softmax_rows_impl(A* x, int64_t n, A scale, A* lse, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    A* row = x + r * n;
    if (!(scale > A(0))) scale_row(row, n, scale);  // then max(row) is max(scale x) itself
    const A a = scale > A(0) ? scale : A(1);
    const A m = a * row_max(row, n);
    const A sum = exp_sub_sum(row, row, n, m, a);
    scale_row(row, n, static_cast<A>(1.0 / static_cast<double>(sum)));
    lse[r] = static_cast<A>(static_cast<double>(m) + std::log(static_cast<double>(sum)));
  }
}

// Rows [r0, r1) of dp, given the forward's softmax p: dS = scale c p (dp - D) in place, with
// c = 1 / sum_j p_j and D = c sum_j p_j dp_j + extra[r], both sums in double. p is normalised
// already, so c differs from 1 by p's rounding only; dividing by it anyway keeps D the weighted
// mean of dp under the very weights dS uses, as the tiled backward does. extra (null: none)
// carries D's share of the columns of g that are all zero (see backward_impl).
template <typename A>
void softmax_grad_rows_impl(const A* p, A* dp, int64_t n, double scale, const double* extra,
                            int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    double dot, sum;
    dot_sum_double(p + r * n, dp + r * n, n, dot, sum);
    const double c = 1.0 / sum;
    const double d = dot * c + (extra != nullptr ? extra[r] : 0.0);
    softmax_grad_row(p + r * n, dp + r * n, n, static_cast<A>(d), static_cast<A>(scale * c));
  }
}

template <typename S>
void reduce_impl(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t row0,
                 int64_t row1) {
  using A = typename Compute<S>::type;
  const int64_t M = p.M, dk = p.dk, dv = p.dv, G = plan.groups;
  const A* part = static_cast<const A*>(plan.partial);
  S* dphi = static_cast<S*>(p.dphi);
  S* dg = static_cast<S*>(p.dg);
  // Blocks of up to kRows rows of one batch: summed into a row-major tile, then stored with
  // store_tile (column blocks for a channels-first dphi / dg, instead of one strided pass per
  // row that touches a new cache line per element).
  constexpr int64_t kRows = 64;
  Buf<A> sumb(size_t(kRows * std::max<int64_t>({dk, dv, 1})));
  A* sum = sumb.get();
  for (int64_t r = row0; r < row1;) {
    const int64_t b = r / M, j0 = r % M, rows = std::min({kRows, row1 - r, M - j0});
    for (int pass = 0; pass < 2; ++pass) {
      const int64_t d = pass == 0 ? dk : dv;
      const int64_t off = pass == 0 ? j0 * dk : M * dk + j0 * dv;
      const A* src = part + b * G * M * (dk + dv) + off;  // rows x d, contiguous
      std::copy(src, src + rows * d, sum);
      for (int64_t g = 1; g < G; ++g) {  // fixed order: deterministic
        const A* sg = src + g * M * (dk + dv);
        for (int64_t c = 0; c < rows * d; ++c) sum[c] += sg[c];
      }
      if (pass == 0) {
        store_tile<S, A>(sum, d, rows, d, dphi + b * p.dphi_stride[0] + j0 * p.dphi_stride[1],
                         p.dphi_stride[1], p.dphi_stride[2], A(1));
      } else {
        store_tile<S, A>(sum, d, rows, d, dg + b * p.dg_stride[0] + j0 * p.dg_stride[1],
                         p.dg_stride[1], p.dg_stride[2], A(1));
      }
    }
    r += rows;
  }
}

#define NLK_DISPATCH(dtype, ...)                                 \
  switch (dtype) {                                               \
    case DType::kFloat64: { using S = double; __VA_ARGS__; }     \
    case DType::kFloat32: { using S = float; __VA_ARGS__; }      \
    case DType::kFloat16: { using S = c10::Half; __VA_ARGS__; }  \
    case DType::kBFloat16: { using S = c10::BFloat16; __VA_ARGS__; } \
  }

int64_t panel_width_entry(DType dtype) {
  return dtype == DType::kFloat64 ? kNR<double> : kNR<float>;
}
void pack_entry(DType dtype, const void* src, int64_t bs, int64_t rs, int64_t cs, int64_t rows,
                int64_t cols, void* dst, int64_t b0, int64_t b1) {
  NLK_DISPATCH(dtype, return pack_impl<S>(src, bs, rs, cs, rows, cols, dst, b0, b1));
}
void pack_panels_entry(DType dtype, const void* src, int64_t bs, int64_t rs, int64_t cs,
                       int64_t k, int64_t n, double alpha, void* dst, int64_t dst_bs,
                       int64_t item0, int64_t item1) {
  NLK_DISPATCH(dtype, return pack_panels_impl<S>(src, bs, rs, cs, k, n, alpha, dst, dst_bs,
                                                 item0, item1));
}
void forward_entry(const NonlocalSoftmaxParams& p, const CpuPlan& plan, TaskQueue& tasks) {
  if (plan.packed) {
    NLK_DISPATCH(plan.dtype, return forward_impl<S, true>(p, plan, tasks));
  } else {
    NLK_DISPATCH(plan.dtype, return forward_impl<S, false>(p, plan, tasks));
  }
}
void backward_entry(const NonlocalSoftmaxParams& p, const CpuPlan& plan, TaskQueue& tasks) {
  if (plan.packed) {
    NLK_DISPATCH(plan.dtype, return backward_impl<S, true>(p, plan, tasks));
  } else {
    NLK_DISPATCH(plan.dtype, return backward_impl<S, false>(p, plan, tasks));
  }
}
void reduce_entry(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t r0, int64_t r1) {
  NLK_DISPATCH(plan.dtype, return reduce_impl<S>(p, plan, r0, r1));
}
void softmax_rows_entry(DType dtype, void* x, int64_t n, double scale, void* lse, int64_t r0,
                        int64_t r1) {
  if (dtype == DType::kFloat64) {
    softmax_rows_impl<double>(static_cast<double*>(x), n, scale, static_cast<double*>(lse), r0,
                              r1);
  } else {
    softmax_rows_impl<float>(static_cast<float*>(x), n, static_cast<float>(scale),
                             static_cast<float*>(lse), r0, r1);
  }
}
void softmax_grad_rows_entry(DType dtype, const void* p, void* dp, int64_t n, double scale,
                             const double* extra, int64_t r0, int64_t r1) {
  if (dtype == DType::kFloat64) {
    softmax_grad_rows_impl<double>(static_cast<const double*>(p), static_cast<double*>(dp), n,
                                   scale, extra, r0, r1);
  } else {
    softmax_grad_rows_impl<float>(static_cast<const float*>(p), static_cast<float*>(dp), n,
                                  scale, extra, r0, r1);
  }
}
#undef NLK_DISPATCH

}  // namespace
}  // namespace nonlocal_kernels::cpu::NLK_CAPNS

namespace nonlocal_kernels::cpu {
const KernelTable NLK_TABLE = {NLK_TABLE_LABEL,
                               NLK_CAPNS::panel_width_entry,
                               NLK_CAPNS::pack_entry,
                               NLK_CAPNS::pack_panels_entry,
                               NLK_CAPNS::forward_entry,
                               NLK_CAPNS::backward_entry,
                               NLK_CAPNS::reduce_entry,
                               NLK_CAPNS::softmax_rows_entry,
                               NLK_CAPNS::softmax_grad_rows_entry};
}  // namespace nonlocal_kernels::cpu
