// Tile kernels of the CPU softmax family (see softmax_cpu.h for the work split and
// DESIGN.md section 4 for the algorithm). Included by one .cpp per instruction set, which first
// defines NLK_CAPNS (the namespace of this copy), NLK_TABLE (the KernelTable it defines), CPU_CAPABILITY and CPU_CAPABILITY_<ISA> so
// that at::vec::Vectorized is the AVX2 or the portable version.
//
// Everything is computed in the compute type A (float, or double for float64 inputs): inputs are
// converted while packing, S, P, dP, dS and every accumulator are A.
//
// Tile products go through gemm(): a BLAS sgemm_/dgemm_ call on the tile (torch's own BLAS,
// found at load time through weak symbols) when `use_blas`, else gemm_vec(), a packed,
// register-blocked GEMM on at::vec::Vectorized (6 x 2-vector micro-tile, k blocked by 256).
// benchmarks/results/cpu-*.md records which is faster here.
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

#include "cpu/softmax_cpu.h"

// Fortran BLAS (LP64), as torch itself calls it. Weak: null when no BLAS is linked.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace nonlocal_kernels::cpu::NLK_CAPNS {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// A 64-byte aligned scratch buffer owned by one task range (one thread).
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

// A matrix read through strides: element (r, c) at p[r * rs + c * cs].
template <typename T>
struct View {
  const T* p;
  int64_t rs, cs;
  View t() const { return {p, cs, rs}; }  // the transpose
};

// ---------------------------------------------------------------------------------------------
// GEMM on tiles: C (m x n, row-major, ldc) = alpha * A (m x k) * B (k x n) + beta * C.
// beta == 0 never reads C (it may hold garbage).

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

template <typename T>
class Gemm {
 public:
  explicit Gemm(bool use_blas) : use_blas_(use_blas) {}

  void operator()(int64_t m, int64_t n, int64_t k, T alpha, View<T> A, View<T> B, T beta, T* C,
                  int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < n; ++c) C[r * ldc + c] = beta == T(0) ? T(0) : beta * C[r * ldc + c];
      return;
    }
    int64_t lda, ldb;
    bool ta, tb;
    if (use_blas_ && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && ldc <= INT_MAX &&
        as_blas(A, m, k, lda, ta) && as_blas(B, k, n, ldb, tb)) {
      // Row-major C = A B is column-major C^T = B^T A^T.
      blas_call(tb ? 'T' : 'N', ta ? 'T' : 'N', int(n), int(m), int(k), alpha, B.p, int(ldb),
                A.p, int(lda), beta, C, int(ldc));
      return;
    }
    gemm_vec(m, n, k, alpha, A, B, beta, C, ldc);
  }

 private:
  static constexpr int64_t kV = Vec<T>::size();
  static constexpr int64_t kNR = 2 * kV;  // micro-tile columns (two vectors)
  static constexpr int64_t kMR = 6;       // micro-tile rows: 12 accumulators + 3 = 15 registers
  static constexpr int64_t kKC = 256;     // k block

  // out (kMR x kNR) = a-panel (kc x kMR) . b-panel (kc x kNR)
  static inline void micro(int64_t kc, const T* __restrict a, const T* __restrict b,
                           T* __restrict out) {
    Vec<T> c0[kMR], c1[kMR];
    for (int r = 0; r < kMR; ++r) c0[r] = c1[r] = Vec<T>(T(0));
    for (int64_t kk = 0; kk < kc; ++kk) {
      Vec<T> b0 = Vec<T>::loadu(b), b1 = Vec<T>::loadu(b + kV);
      for (int r = 0; r < kMR; ++r) {
        Vec<T> av(a[r]);
        c0[r] = at::vec::fmadd(av, b0, c0[r]);
        c1[r] = at::vec::fmadd(av, b1, c1[r]);
      }
      a += kMR;
      b += kNR;
    }
    for (int r = 0; r < kMR; ++r) {
      c0[r].store(out + r * kNR);
      c1[r].store(out + r * kNR + kV);
    }
  }

  void gemm_vec(int64_t m, int64_t n, int64_t k, T alpha, View<T> A, View<T> B, T beta, T* C,
                int64_t ldc) {
    const int64_t nb = (n + kNR - 1) / kNR, mb = (m + kMR - 1) / kMR;
    T out[kMR * kNR];
    for (int64_t k0 = 0; k0 < k; k0 += kKC) {
      const int64_t kc = std::min(kKC, k - k0);
      T* bp = bpack_.ensure(size_t(nb * kc * kNR));
      T* ap = apack_.ensure(size_t(mb * kc * kMR));
      for (int64_t jb = 0; jb < nb; ++jb) {
        const int64_t c0 = jb * kNR, cn = std::min(kNR, n - c0);
        for (int64_t kk = 0; kk < kc; ++kk) {
          const T* src = B.p + (k0 + kk) * B.rs + c0 * B.cs;
          T* dst = bp + (jb * kc + kk) * kNR;
          int64_t c = 0;
          if (B.cs == 1) {
            for (; c < cn; ++c) dst[c] = src[c];
          } else {
            for (; c < cn; ++c) dst[c] = src[c * B.cs];
          }
          for (; c < kNR; ++c) dst[c] = T(0);
        }
      }
      for (int64_t ib = 0; ib < mb; ++ib) {
        const int64_t r0 = ib * kMR, rn = std::min(kMR, m - r0);
        for (int64_t kk = 0; kk < kc; ++kk) {
          const T* src = A.p + r0 * A.rs + (k0 + kk) * A.cs;
          T* dst = ap + (ib * kc + kk) * kMR;
          int64_t r = 0;
          for (; r < rn; ++r) dst[r] = src[r * A.rs];
          for (; r < kMR; ++r) dst[r] = T(0);
        }
      }
      const T b_eff = k0 == 0 ? beta : T(1);
      for (int64_t ib = 0; ib < mb; ++ib) {
        const int64_t r0 = ib * kMR, rn = std::min(kMR, m - r0);
        for (int64_t jb = 0; jb < nb; ++jb) {
          const int64_t c0 = jb * kNR, cn = std::min(kNR, n - c0);
          micro(kc, ap + ib * kc * kMR, bp + jb * kc * kNR, out);
          for (int64_t r = 0; r < rn; ++r) {
            T* crow = C + (r0 + r) * ldc + c0;
            const T* orow = out + r * kNR;
            if (b_eff == T(0)) {
              for (int64_t c = 0; c < cn; ++c) crow[c] = alpha * orow[c];
            } else {
              for (int64_t c = 0; c < cn; ++c) crow[c] = alpha * orow[c] + b_eff * crow[c];
            }
          }
        }
      }
    }
  }

  bool use_blas_;
  Buf<T> apack_, bpack_;
};

// ---------------------------------------------------------------------------------------------
// Row helpers (vectorised over a row of a tile).

template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
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

// x = exp(x - sub) in place; returns the sum of the new x.
template <typename T>
T exp_sub_sum(T* x, int64_t n, T sub) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> s(sub);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    Vec<T> e = vexp(Vec<T>::loadu(x + j) - s);
    e.store(x + j);
    acc = acc + e;
  }
  if (j < n) {
    const int64_t rest = n - j;
    Vec<T> e = vexp(Vec<T>::loadu(x + j, rest) - s);
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

// ds = p * (dp - d), in place into dp.
template <typename T>
void softmax_grad_row(const T* p, T* dp, int64_t n, T d) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> dv(d);
  int64_t j = 0;
  for (; j + V <= n; j += V)
    (Vec<T>::loadu(p + j) * (Vec<T>::loadu(dp + j) - dv)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}

// ---------------------------------------------------------------------------------------------
// Conversion between the input/output dtype S and the compute type A.

// dst (rows x cols, row-major, ld) = alpha * src (strided). The loop runs along the unit stride
// of the source when it has one (channels-first views have rs == 1).
template <typename S, typename A>
void load_tile(const S* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, A* dst,
               int64_t ld, A alpha) {
  if (rs == 1 && cs != 1) {
    for (int64_t c = 0; c < cols; ++c) {
      const S* s = src + c * cs;
      for (int64_t r = 0; r < rows; ++r) dst[r * ld + c] = alpha * static_cast<A>(s[r]);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = src + r * rs;
      A* d = dst + r * ld;
      for (int64_t c = 0; c < cols; ++c) d[c] = alpha * static_cast<A>(s[c * cs]);
    }
  }
}

// dst (strided, dtype S) = alpha * src (rows x cols, row-major, ld).
template <typename S, typename A>
void store_tile(const A* src, int64_t ld, int64_t rows, int64_t cols, S* dst, int64_t rs,
                int64_t cs, A alpha) {
  if (rs == 1 && cs != 1) {
    for (int64_t c = 0; c < cols; ++c) {
      S* d = dst + c * cs;
      for (int64_t r = 0; r < rows; ++r) d[r] = static_cast<S>(alpha * src[r * ld + c]);
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
// Kernels.

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

template <typename S>
void forward_impl(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t t0, int64_t t1) {
  using A = typename Compute<S>::type;
  const int64_t N = p.N, M = p.M, dk = p.dk, dv = p.dv, BM = plan.BM, BN = plan.BN;
  const A scale = static_cast<A>(p.scale);
  Buf<A> qb(BM * dk), sb(BM * BN), accb(BM * dv), mb(BM), lb(BM);
  A *q = qb.get(), *s = sb.get(), *acc = accb.get(), *mrow = mb.get(), *lrow = lb.get();
  Gemm<A> gemm(plan.use_blas);
  const S* theta = static_cast<const S*>(p.theta);
  S* y = static_cast<S*>(p.y);
  A* lse = static_cast<A*>(p.lse);
  const A* kbase = static_cast<const A*>(plan.k.ptr);
  const A* vbase = static_cast<const A*>(plan.v.ptr);

  for (int64_t task = t0; task < t1; ++task) {
    const int64_t b = task / plan.n_qtiles, i0 = (task % plan.n_qtiles) * BM;
    const int64_t bm = std::min(BM, N - i0);
    load_tile<S, A>(theta + b * p.theta_stride[0] + i0 * p.theta_stride[1], p.theta_stride[1],
                    p.theta_stride[2], bm, dk, q, dk, scale);
    std::fill(acc, acc + bm * dv, A(0));
    std::fill(mrow, mrow + bm, -std::numeric_limits<A>::infinity());
    std::fill(lrow, lrow + bm, A(0));
    const A* kb = kbase + b * plan.k.bs;
    const A* vb = vbase + b * plan.v.bs;
    for (int64_t j0 = 0; j0 < M; j0 += BN) {
      const int64_t bn = std::min(BN, M - j0);
      // S = (scale theta) phi_j^T
      const View<A> kj{kb + j0 * plan.k.rs, plan.k.rs, plan.k.cs};
      gemm(bm, bn, dk, A(1), View<A>{q, dk, 1}, kj.t(), A(0), s, BN);
      for (int64_t r = 0; r < bm; ++r) {
        A* srow = s + r * BN;
        const A m_new = std::max(mrow[r], row_max(srow, bn));
        const A sum = exp_sub_sum(srow, bn, m_new);
        if (mrow[r] != -std::numeric_limits<A>::infinity() && mrow[r] != m_new) {
          const A alpha = std::exp(mrow[r] - m_new);
          lrow[r] *= alpha;
          scale_row(acc + r * dv, dv, alpha);
        }
        lrow[r] += sum;
        mrow[r] = m_new;
      }
      // acc += P g_j
      const View<A> vj{vb + j0 * plan.v.rs, plan.v.rs, plan.v.cs};
      gemm(bm, dv, bn, A(1), View<A>{s, BN, 1}, vj, A(1), acc, dv);
    }
    for (int64_t r = 0; r < bm; ++r) {
      const A inv = A(1) / lrow[r];
      S* yrow = y + b * p.y_stride[0] + (i0 + r) * p.y_stride[1];
      const A* arow = acc + r * dv;
      for (int64_t c = 0; c < dv; ++c) yrow[c * p.y_stride[2]] = static_cast<S>(arow[c] * inv);
      lse[b * p.lse_stride[0] + (i0 + r) * p.lse_stride[1]] = mrow[r] + std::log(lrow[r]);
    }
  }
}

template <typename S>
void backward_impl(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t t0,
                   int64_t t1) {
  using A = typename Compute<S>::type;
  const int64_t N = p.N, M = p.M, dk = p.dk, dv = p.dv, BM = plan.BM, BN = plan.BN;
  const int64_t G = plan.groups;
  const A scale = static_cast<A>(p.scale);
  Buf<A> qb(BM * dk), dyb(BM * dv), sb(BM * BN), dpb(BM * BN), dqb(BM * dk), Db(BM), Lb(BM);
  A *q = qb.get(), *dyt = dyb.get(), *s = sb.get(), *dp = dpb.get(), *dq = dqb.get();
  A *D = Db.get(), *L = Lb.get();
  Gemm<A> gemm(plan.use_blas);
  const S* theta = static_cast<const S*>(p.theta);
  const S* dy = static_cast<const S*>(p.dy);
  const S* y = static_cast<const S*>(p.y);
  const A* lse = static_cast<const A*>(p.lse);
  S* dtheta = static_cast<S*>(p.dtheta);
  const A* kbase = static_cast<const A*>(plan.k.ptr);
  const A* vbase = static_cast<const A*>(plan.v.ptr);

  for (int64_t task = t0; task < t1; ++task) {
    const int64_t b = task / G, grp = task % G;
    A* dkp = static_cast<A*>(plan.partial) + (b * G + grp) * M * (dk + dv);  // (M, dk)
    A* dvp = dkp + M * dk;                                                    // (M, dv)
    std::fill(dkp, dkp + M * (dk + dv), A(0));
    const A* kb = kbase + b * plan.k.bs;
    const A* vb = vbase + b * plan.v.bs;
    const int64_t qt_end = std::min(plan.n_qtiles, (grp + 1) * plan.tiles_per_group);
    for (int64_t qt = grp * plan.tiles_per_group; qt < qt_end; ++qt) {
      const int64_t i0 = qt * BM, bm = std::min(BM, N - i0);
      load_tile<S, A>(theta + b * p.theta_stride[0] + i0 * p.theta_stride[1],
                      p.theta_stride[1], p.theta_stride[2], bm, dk, q, dk, scale);
      load_tile<S, A>(dy + b * p.dy_stride[0] + i0 * p.dy_stride[1], p.dy_stride[1],
                      p.dy_stride[2], bm, dv, dyt, dv, A(1));
      for (int64_t r = 0; r < bm; ++r) {
        // D_i = rowsum(dy_i * y_i), from y as the forward stored it.
        const S* yrow = y + b * p.y_stride[0] + (i0 + r) * p.y_stride[1];
        const A* drow = dyt + r * dv;
        A d = 0;
        for (int64_t c = 0; c < dv; ++c) d += drow[c] * static_cast<A>(yrow[c * p.y_stride[2]]);
        D[r] = d;
        L[r] = lse[b * p.lse_stride[0] + (i0 + r) * p.lse_stride[1]];
      }
      std::fill(dq, dq + bm * dk, A(0));
      for (int64_t j0 = 0; j0 < M; j0 += BN) {
        const int64_t bn = std::min(BN, M - j0);
        const View<A> kj{kb + j0 * plan.k.rs, plan.k.rs, plan.k.cs};
        const View<A> vj{vb + j0 * plan.v.rs, plan.v.rs, plan.v.cs};
        // P = exp(S - lse)
        gemm(bm, bn, dk, A(1), View<A>{q, dk, 1}, kj.t(), A(0), s, BN);
        for (int64_t r = 0; r < bm; ++r) exp_sub_sum(s + r * BN, bn, L[r]);
        // dg_j += P^T dy
        gemm(bn, dv, bm, A(1), View<A>{s, 1, BN}, View<A>{dyt, dv, 1}, A(1), dvp + j0 * dv, dv);
        // dP = dy g_j^T, then dS = P * (dP - D)
        gemm(bm, bn, dv, A(1), View<A>{dyt, dv, 1}, vj.t(), A(0), dp, BN);
        for (int64_t r = 0; r < bm; ++r) softmax_grad_row(s + r * BN, dp + r * BN, bn, D[r]);
        // dphi_j += dS^T (scale theta)
        gemm(bn, dk, bm, A(1), View<A>{dp, 1, BN}, View<A>{q, dk, 1}, A(1), dkp + j0 * dk, dk);
        // dtheta += dS phi_j (times scale when written)
        gemm(bm, dk, bn, A(1), View<A>{dp, BN, 1}, kj, A(1), dq, dk);
      }
      store_tile<S, A>(dq, dk, bm, dk,
                       dtheta + b * p.dtheta_stride[0] + i0 * p.dtheta_stride[1],
                       p.dtheta_stride[1], p.dtheta_stride[2], scale);
    }
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
  Buf<A> sumb(std::max<int64_t>(dk, dv));
  A* sum = sumb.get();
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / M, j = row % M;
    for (int pass = 0; pass < 2; ++pass) {
      const int64_t d = pass == 0 ? dk : dv;
      const int64_t off = pass == 0 ? j * dk : M * dk + j * dv;
      const A* src = part + b * G * M * (dk + dv) + off;
      std::copy(src, src + d, sum);
      for (int64_t g = 1; g < G; ++g) {  // fixed order: deterministic
        const A* sg = src + g * M * (dk + dv);
        for (int64_t c = 0; c < d; ++c) sum[c] += sg[c];
      }
      if (pass == 0) {
        S* out = dphi + b * p.dphi_stride[0] + j * p.dphi_stride[1];
        for (int64_t c = 0; c < d; ++c) out[c * p.dphi_stride[2]] = static_cast<S>(sum[c]);
      } else {
        S* out = dg + b * p.dg_stride[0] + j * p.dg_stride[1];
        for (int64_t c = 0; c < d; ++c) out[c * p.dg_stride[2]] = static_cast<S>(sum[c]);
      }
    }
  }
}

#define NLK_DISPATCH(dtype, FN, ...)                                 \
  switch (dtype) {                                                   \
    case DType::kFloat64: return FN<double>(__VA_ARGS__);            \
    case DType::kFloat32: return FN<float>(__VA_ARGS__);             \
    case DType::kFloat16: return FN<c10::Half>(__VA_ARGS__);         \
    case DType::kBFloat16: return FN<c10::BFloat16>(__VA_ARGS__);    \
  }

void pack_entry(DType dtype, const void* src, int64_t bs, int64_t rs, int64_t cs, int64_t rows,
                int64_t cols, void* dst, int64_t b0, int64_t b1) {
  NLK_DISPATCH(dtype, pack_impl, src, bs, rs, cs, rows, cols, dst, b0, b1);
}
void forward_entry(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t t0, int64_t t1) {
  NLK_DISPATCH(plan.dtype, forward_impl, p, plan, t0, t1);
}
void backward_entry(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t t0,
                    int64_t t1) {
  NLK_DISPATCH(plan.dtype, backward_impl, p, plan, t0, t1);
}
void reduce_entry(const NonlocalSoftmaxParams& p, const CpuPlan& plan, int64_t r0, int64_t r1) {
  NLK_DISPATCH(plan.dtype, reduce_impl, p, plan, r0, r1);
}
#undef NLK_DISPATCH

}  // namespace
}  // namespace nonlocal_kernels::cpu::NLK_CAPNS

namespace nonlocal_kernels::cpu {
const KernelTable NLK_TABLE = {NLK_TABLE_LABEL, NLK_CAPNS::pack_entry, NLK_CAPNS::forward_entry,
                               NLK_CAPNS::backward_entry, NLK_CAPNS::reduce_entry};
}  // namespace nonlocal_kernels::cpu
