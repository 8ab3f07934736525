// The hot loops of the concatenation kernels (concat_kernel.h has the table and the work split).
// Included by one .cpp per instruction set, which first defines NLK_CONCAT_NS (the namespace of
// this copy), NLK_CONCAT_TABLE / NLK_CONCAT_LABEL (the table it defines) and CPU_CAPABILITY /
// CPU_CAPABILITY_<ISA> (ATen's vector transposes, for channels-first g). The loops are plain
// C++ written for the compiler's vectoriser (fixed-width inner loops over a tile of columns, unit
// strides in their own branch); that is where the AVX2 / AVX-512 builds gain. Sums run in double
// and in a fixed order, so a result does not depend on the thread that computed it; the builds
// differ only in rounding (FMA contraction), within the tolerance rule.
//
// Nothing here may instantiate a template shared with the baseline code (std::vector,
// std::lower_bound, ATen's tensors): the linker could keep this file's copy, compiled with wider
// instructions, for every caller. Helpers live in an anonymous namespace.
#pragma once

#if !defined(NLK_CONCAT_NS) || !defined(NLK_CONCAT_TABLE) || !defined(NLK_CONCAT_LABEL) || \
    !defined(CPU_CAPABILITY)
#error "define NLK_CONCAT_NS, NLK_CONCAT_TABLE, NLK_CONCAT_LABEL and CPU_CAPABILITY before including concat_kernel_impl.h"
#endif

#include "cpu/aten_vec.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fast/concat_kernel.h"

namespace nonlocal_kernels::fast::NLK_CONCAT_NS {
namespace {

constexpr int kLanes = 8;           // independent partial sums of a dot product
constexpr int64_t kRowBlock = 256;  // rows per block of a channels-first projection
constexpr int64_t kAhead = 8;       // the backward sweep prefetches dy rows this many queries ahead

inline int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }

// sum_d x[d * xs] * y[d] in double, kLanes interleaved partial sums added in lane order.
template <typename T>
inline double dot_d(const T* x, int64_t xs, const T* y, int64_t n) {
  double lane[kLanes] = {};
  int64_t d = 0;
  if (xs == 1) {
    for (; d + kLanes <= n; d += kLanes)
      for (int l = 0; l < kLanes; ++l) lane[l] += double(x[d + l]) * double(y[d + l]);
  } else {
    for (; d + kLanes <= n; d += kLanes)
      for (int l = 0; l < kLanes; ++l) lane[l] += double(x[(d + l) * xs]) * double(y[d + l]);
  }
  double s = 0.0;
  for (; d < n; ++d) s += double(x[d * xs]) * double(y[d]);
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// #{r < M : nb[r] < v} for nb ascending (std::lower_bound's answer).
template <typename T>
inline int64_t count_below(const T* nb, int64_t M, T v) {
  int64_t lo = 0, n = M;
  while (n > 0) {
    const int64_t half = n >> 1;
    if (nb[lo + half] < v) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

template <typename T>
void project_impl(const ProjectArgs& p, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  T* out = static_cast<T*>(p.out);
  const int64_t L = p.L, dk = p.dk, xs1 = p.xs1, xs2 = p.xs2;
  while (r0 < r1) {
    const int64_t b = r0 / L, l0 = r0 % L, l1 = imin(L, l0 + (r1 - r0));
    const T* xb = x + b * p.xs0;
    T* ob = out + b * L;
    if (xs1 < xs2) {  // channels-first: column c is a run over l; a block of rows at a time
      double acc[kRowBlock];
      for (int64_t lb = l0; lb < l1; lb += kRowBlock) {
        const int64_t n = imin(kRowBlock, l1 - lb);
        for (int64_t i = 0; i < n; ++i) acc[i] = 0.0;
        for (int64_t c = 0; c < dk; ++c) {
          const T* xc = xb + c * xs2 + lb * xs1;
          const double wc = double(w[c]);
          if (xs1 == 1) {
            for (int64_t i = 0; i < n; ++i) acc[i] += double(xc[i]) * wc;
          } else {
            for (int64_t i = 0; i < n; ++i) acc[i] += double(xc[i * xs1]) * wc;
          }
        }
        for (int64_t i = 0; i < n; ++i) ob[lb + i] = T(acc[i]);
      }
    } else {  // rows: each (b, l) is a run over c
      for (int64_t l = l0; l < l1; ++l) ob[l] = T(dot_d<T>(xb + l * xs1, xs2, w, dk));
    }
    r0 += l1 - l0;
  }
}

template <typename T>
void project_grads_impl(const ProjectArgs& p, int64_t c0, int64_t c1) {
  const int64_t B = p.B, L = p.L, dk = p.dk;
  const int64_t xs0 = p.xs0, xs1 = p.xs1, xs2 = p.xs2, os0 = p.os0, os1 = p.os1, os2 = p.os2;
  const T* xp = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* d = static_cast<const T*>(p.d);
  T* op = static_cast<T*>(p.dx);
  T* wgrad = static_cast<T*>(p.wgrad);
  if (xs1 < xs2) {  // channels-first: each feature column c is a run over l
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0.0;
      const T wc = w[c];
      for (int64_t b = 0; b < B; ++b) {
        const T* xc = xp + b * xs0 + c * xs2;
        T* oc = op + b * os0 + c * os2;
        const T* db = d + b * L;
        if (os1 == 1) {
          for (int64_t l = 0; l < L; ++l) oc[l] = db[l] * wc;
        } else {
          for (int64_t l = 0; l < L; ++l) oc[l * os1] = db[l] * wc;
        }
        acc += dot_d<T>(xc, xs1, db, L);
      }
      wgrad[c] = T(acc);
    }
    return;
  }
  // rows: each (b, l) is a run over c; the sums over rows need one thread (c0 = 0, c1 = dk).
  double acc[kRowBlock];
  for (int64_t cb = 0; cb < dk; cb += kRowBlock) {  // blocks of columns: acc stays in L1
    const int64_t n = imin(kRowBlock, dk - cb);
    for (int64_t c = 0; c < n; ++c) acc[c] = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t l = 0; l < L; ++l) {
        const T* xr = xp + b * xs0 + l * xs1 + cb * xs2;
        T* orow = op + b * os0 + l * os1 + cb * os2;
        const T dl = d[b * L + l];
        const double dd = double(dl);
        if (xs2 == 1 && os2 == 1) {
          for (int64_t c = 0; c < n; ++c) {
            orow[c] = dl * w[cb + c];
            acc[c] += dd * double(xr[c]);
          }
        } else {
          for (int64_t c = 0; c < n; ++c) {
            orow[c * os2] = dl * w[cb + c];
            acc[c] += dd * double(xr[c * xs2]);
          }
        }
      }
    }
    for (int64_t c = 0; c < n; ++c) wgrad[cb + c] = T(acc[c]);
  }
  (void)c0;
  (void)c1;
}

// One tile of w <= kTile columns of the prefix sums over the keys by decreasing b.
template <typename T, bool kFull, bool kUnit>
inline void prefix_tile(const ConcatArgs& p, int64_t bi, int64_t d0, int64_t w) {
  // Rows of g in rank order: g_sorted's (contiguous) when it is set, else g's through perm.
  const bool sorted = p.g_sorted != nullptr;
  const int64_t M = p.M, dv = p.dv, gs2 = (kUnit || sorted) ? 1 : p.gs2;
  const int64_t width = kFull ? kTile : w;
  const T* g = sorted ? static_cast<const T*>(p.g_sorted) + bi * M * dv + d0
                      : static_cast<const T*>(p.g) + bi * p.gs0 + d0 * gs2;
  const int64_t gs1 = sorted ? dv : p.gs1;
  const T* nb = static_cast<const T*>(p.neg_b) + bi * M;
  const int64_t* pr = p.perm + bi * M;
  T* Pb = static_cast<T*>(p.P) + bi * (M + 1) * 2 * dv + d0;
  double sg[kTile], sbg[kTile];
  for (int64_t d = 0; d < width; ++d) {
    sg[d] = sbg[d] = 0.0;
    Pb[d] = Pb[dv + d] = T(0);
  }
  for (int64_t r = 0; r < M; ++r) {
    const T* gj = g + (sorted ? r : pr[r]) * gs1;
    const double bj = -double(nb[r]);
    T* row = Pb + (r + 1) * 2 * dv;
    for (int64_t d = 0; d < width; ++d) {
      const double v = double(gj[d * gs2]);
      sg[d] += v;
      sbg[d] += bj * v;
      row[d] = T(sg[d]);
      row[dv + d] = T(sbg[d]);
    }
  }
}

// Columns [c0, c1) of the prefix sums when the rows of g are contiguous (g_sorted, or g with
// unit column stride): blocks of kBlock columns, kLanes at a time (the vectoriser's shape).
template <typename T>
void prefix_rows(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  const bool sorted = p.g_sorted != nullptr;
  const int64_t M = p.M, dv = p.dv, gs1 = sorted ? dv : p.gs1;
  const T* g = sorted ? static_cast<const T*>(p.g_sorted) + bi * M * dv
                      : static_cast<const T*>(p.g) + bi * p.gs0;
  const T* nb = static_cast<const T*>(p.neg_b) + bi * M;
  const int64_t* pr = p.perm + bi * M;
  T* Pb = static_cast<T*>(p.P) + bi * (M + 1) * 2 * dv;
  double sg[kBlock], sbg[kBlock];
  for (int64_t d0 = c0; d0 < c1; d0 += kBlock) {
    const int64_t width = imin(kBlock, c1 - d0);
    for (int64_t d = 0; d < width; ++d) {
      sg[d] = sbg[d] = 0.0;
      Pb[d0 + d] = Pb[dv + d0 + d] = T(0);
    }
    for (int64_t r = 0; r < M; ++r) {
      const T* gj = g + (sorted ? r : pr[r]) * gs1 + d0;
      const double bj = -double(nb[r]);
      T* row = Pb + (r + 1) * 2 * dv + d0;
      int64_t d = 0;
      for (; d + kLanes <= width; d += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double v = double(gj[d + l]);
          sg[d + l] += v;
          sbg[d + l] += bj * v;
          row[d + l] = T(sg[d + l]);
          row[dv + d + l] = T(sbg[d + l]);
        }
      }
      for (; d < width; ++d) {
        const double v = double(gj[d]);
        sg[d] += v;
        sbg[d] += bj * v;
        row[d] = T(sg[d]);
        row[dv + d] = T(sbg[d]);
      }
    }
  }
}

template <typename T>
void prefix_sums_impl(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  if (p.g_sorted != nullptr || p.gs2 == 1) {
    prefix_rows<T>(p, bi, c0, c1);
    return;
  }
  for (int64_t d0 = c0; d0 < c1; d0 += kTile) {  // tiles of columns: the strided reads of a
    const int64_t w = imin(kTile, c1 - d0);       // channels-first g stay in cache
    if (w == kTile && (p.gs2 == 1 || p.g_sorted != nullptr))
      prefix_tile<T, true, true>(p, bi, d0, w);
    else if (w == kTile)
      prefix_tile<T, true, false>(p, bi, d0, w);
    else
      prefix_tile<T, false, false>(p, bi, d0, w);
  }
}

template <typename T>
void query_rows_impl(const ConcatArgs& p, int64_t bi, int64_t i0, int64_t i1) {
  const int64_t N = p.N, M = p.M, dv = p.dv;
  const T inv_m = T(p.inv_m);
  const T* ab = static_cast<const T*>(p.a) + bi * N;
  const T* nb = static_cast<const T*>(p.neg_b) + bi * M;
  const T* Pb = static_cast<const T*>(p.P) + bi * (M + 1) * 2 * dv;
  T* yb = static_cast<T*>(p.y) + bi * N * dv;
  int64_t* kb = p.k + bi * N;
  for (int64_t i = i0; i < i1; ++i) {
    const T ai = ab[i];
    const int64_t ki = count_below<T>(nb, M, ai);
    kb[i] = ki;
    const T* Pg = Pb + ki * 2 * dv;
    const T* Pbg = Pg + dv;
    T* yi = yb + i * dv;
    const T wa = ai * inv_m;
    for (int64_t d = 0; d < dv; ++d) yi[d] = Pbg[d] * inv_m + wa * Pg[d];
  }
}

// One block of w <= kBlock columns of the backward sweep (ConcatKernelTable::key_sweep).
template <typename T, bool kFull>
inline void sweep_block(const ConcatArgs& p, int64_t bi, int64_t blk) {
  const int64_t N = p.N, M = p.M, dv = p.dv;
  const int64_t d0 = blk * kBlock, width = kFull ? kBlock : imin(kBlock, dv - d0);
  const T* ab = static_cast<const T*>(p.a) + bi * N;
  const T* dyb = static_cast<const T*>(p.dy) + bi * N * dv + d0;
  const T* Pb = static_cast<const T*>(p.P) + bi * (M + 1) * 2 * dv + d0;
  const T* nb = static_cast<const T*>(p.neg_b) + bi * M;
  const int64_t* order = p.order + bi * N;
  const int64_t* bs = p.bin_start + bi * (M + 2);
  const T* gs = static_cast<const T*>(p.g_sorted) + bi * M * dv + d0;
  T* dgs = static_cast<T*>(p.dg_sorted) + bi * M * dv + d0;
  double* dapart = p.dapart + blk * p.B * N + bi * N;
  double* dbpart = p.dbpart + blk * p.B * M + bi * M;
  const double inv_m = p.inv_m;
  for (int64_t q = bs[0]; q < bs[1]; ++q) dapart[order[q]] = 0.0;  // k = 0: P[0] = 0
  double sdy[kBlock], sady[kBlock];
  for (int64_t d = 0; d < width; ++d) sdy[d] = sady[d] = 0.0;
  for (int64_t r = M - 1; r >= 0; --r) {
    // The queries with k = r + 1 reach keys of rank <= r: they join the suffix sums now.
    // (Queries are taken from the end of `order`, so q falls steadily and the rows of
    // upcoming queries, random in dy, can be prefetched.)
    const T* Pg = Pb + (r + 1) * 2 * dv;
    for (int64_t q = bs[r + 2] - 1; q >= bs[r + 1]; --q) {
      if (q - kAhead >= bs[1]) {
        const char* next = reinterpret_cast<const char*>(dyb + order[q - kAhead] * dv);
        for (int64_t off = 0; off < width * int64_t(sizeof(T)); off += 64)
          __builtin_prefetch(next + off);
      }
      const int64_t i = order[q];
      const T* dyi = dyb + i * dv;
      const double ai = double(ab[i]);
      double lane[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= width; d += kLanes) {  // kLanes at a time: the vectoriser's shape
        for (int l = 0; l < kLanes; ++l) {
          const double v = double(dyi[d + l]);
          sdy[d + l] += v;
          sady[d + l] += ai * v;
          lane[l] += v * double(Pg[d + l]);
        }
      }
      for (; d < width; ++d) {
        const double v = double(dyi[d]);
        sdy[d] += v;
        sady[d] += ai * v;
        lane[d % kLanes] += v * double(Pg[d]);
      }
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += lane[l];
      dapart[i] = s;
    }
    const double bj = -double(nb[r]);
    const T* gr = gs + r * dv;
    T* dgr = dgs + r * dv;
    double lane[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= width; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        dgr[d + l] = T((bj * sdy[d + l] + sady[d + l]) * inv_m);
        lane[l] += double(gr[d + l]) * sdy[d + l];
      }
    }
    for (; d < width; ++d) {
      dgr[d] = T((bj * sdy[d] + sady[d]) * inv_m);
      lane[d % kLanes] += double(gr[d]) * sdy[d];
    }
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += lane[l];
    dbpart[r] = s;
  }
}

template <typename T>
void key_sweep_impl(const ConcatArgs& p, int64_t bi, int64_t k0, int64_t k1) {
  for (int64_t blk = k0; blk < k1; ++blk) {
    if ((blk + 1) * kBlock <= p.dv)
      sweep_block<T, true>(p, bi, blk);
    else
      sweep_block<T, false>(p, bi, blk);
  }
}

// dst row r (contiguous, dv per row) <-> src row perm[r] (strides rs, cs), columns [c0, c1) in
// tiles of kTile: kGather copies src into dst, else dst into src.
template <typename T, bool kGather>
void permute_rows(T* dst, T* src, int64_t rs, int64_t cs, const int64_t* pr, int64_t M,
                  int64_t dv, int64_t c0, int64_t c1) {
  for (int64_t d0 = c0; d0 < c1; d0 += kTile) {
    const int64_t w = imin(kTile, c1 - d0);
    for (int64_t r = 0; r < M; ++r) {
      T* a = dst + r * dv + d0;
      T* b = src + pr[r] * rs + d0 * cs;
      if (cs == 1 && w == kTile) {
        for (int64_t d = 0; d < kTile; ++d) {
          if (kGather) a[d] = b[d]; else b[d] = a[d];
        }
      } else {
        for (int64_t d = 0; d < w; ++d) {
          if (kGather) a[d] = b[d * cs]; else b[d * cs] = a[d];
        }
      }
    }
  }
}

// Blocks of ATen's float transpose: one vector of floats (16 with AVX-512, else 8).
constexpr int64_t kTB = at::vec::Vectorized<float>::size() >= 16 ? 16 : 8;

// A channels-first float source / destination src(j, d) = src[j + d * cs], and dst row rank[j]
// (contiguous, dv per row) for key j: kTB x kTB blocks through a transposed buffer, columns
// [c0, c1); ragged edges element by element.
template <bool kGather>
void permute_transposed(float* dst, float* src, int64_t cs, const int64_t* rank, int64_t M,
                        int64_t dv, int64_t c0, int64_t c1) {
  alignas(64) float buf[kTB * kTB];
  for (int64_t d0 = c0; d0 < c1; d0 += kTB) {
    const int64_t dw = imin(kTB, c1 - d0);
    for (int64_t j0 = 0; j0 < M; j0 += kTB) {
      const int64_t jw = imin(kTB, M - j0);
      if (dw == kTB && jw == kTB) {
        if (kGather) {
          at::vec::transpose_mxn<float, kTB, kTB>(src + d0 * cs + j0, cs, buf, kTB);
          for (int64_t i = 0; i < kTB; ++i)
            std::memcpy(dst + rank[j0 + i] * dv + d0, buf + i * kTB, sizeof(float) * kTB);
        } else {
          for (int64_t i = 0; i < kTB; ++i)
            std::memcpy(buf + i * kTB, dst + rank[j0 + i] * dv + d0, sizeof(float) * kTB);
          at::vec::transpose_mxn<float, kTB, kTB>(buf, kTB, src + d0 * cs + j0, cs);
        }
      } else {
        for (int64_t d = 0; d < dw; ++d)
          for (int64_t j = 0; j < jw; ++j) {
            float* a = dst + rank[j0 + j] * dv + d0 + d;
            float* b = src + (d0 + d) * cs + j0 + j;
            if (kGather) *a = *b; else *b = *a;
          }
      }
    }
  }
}

template <typename T>
void gather_keys_impl(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.gs1 == 1 && p.gs2 != 1) {
      permute_transposed<true>(static_cast<float*>(p.g_sorted) + bi * p.M * p.dv,
                               const_cast<float*>(static_cast<const float*>(p.g)) + bi * p.gs0,
                               p.gs2, p.rank + bi * p.M, p.M, p.dv, c0, c1);
      return;
    }
  }
  permute_rows<T, true>(static_cast<T*>(p.g_sorted) + bi * p.M * p.dv,
                        const_cast<T*>(static_cast<const T*>(p.g)) + bi * p.gs0, p.gs1, p.gs2,
                        p.perm + bi * p.M, p.M, p.dv, c0, c1);
}

template <typename T>
void scatter_keys_impl(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.ds1 == 1 && p.ds2 != 1) {
      permute_transposed<false>(static_cast<float*>(p.dg_sorted) + bi * p.M * p.dv,
                                static_cast<float*>(p.dg) + bi * p.ds0, p.ds2,
                                p.rank + bi * p.M, p.M, p.dv, c0, c1);
      return;
    }
  }
  permute_rows<T, false>(static_cast<T*>(p.dg_sorted) + bi * p.M * p.dv,
                         static_cast<T*>(p.dg) + bi * p.ds0, p.ds1, p.ds2, p.perm + bi * p.M,
                         p.M, p.dv, c0, c1);
}

void project_entry(const ProjectArgs& p, int64_t r0, int64_t r1) {
  p.is_double ? project_impl<double>(p, r0, r1) : project_impl<float>(p, r0, r1);
}
void project_grads_entry(const ProjectArgs& p, int64_t c0, int64_t c1) {
  p.is_double ? project_grads_impl<double>(p, c0, c1) : project_grads_impl<float>(p, c0, c1);
}
void prefix_sums_entry(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  p.is_double ? prefix_sums_impl<double>(p, bi, c0, c1) : prefix_sums_impl<float>(p, bi, c0, c1);
}
void query_rows_entry(const ConcatArgs& p, int64_t bi, int64_t i0, int64_t i1) {
  p.is_double ? query_rows_impl<double>(p, bi, i0, i1) : query_rows_impl<float>(p, bi, i0, i1);
}
void key_sweep_entry(const ConcatArgs& p, int64_t bi, int64_t k0, int64_t k1) {
  p.is_double ? key_sweep_impl<double>(p, bi, k0, k1) : key_sweep_impl<float>(p, bi, k0, k1);
}
void gather_keys_entry(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  p.is_double ? gather_keys_impl<double>(p, bi, c0, c1) : gather_keys_impl<float>(p, bi, c0, c1);
}
void scatter_keys_entry(const ConcatArgs& p, int64_t bi, int64_t c0, int64_t c1) {
  p.is_double ? scatter_keys_impl<double>(p, bi, c0, c1)
              : scatter_keys_impl<float>(p, bi, c0, c1);
}

}  // namespace
}  // namespace nonlocal_kernels::fast::NLK_CONCAT_NS

namespace nonlocal_kernels::fast {
const ConcatKernelTable NLK_CONCAT_TABLE = {
    NLK_CONCAT_LABEL,
    NLK_CONCAT_NS::project_entry,
    NLK_CONCAT_NS::project_grads_entry,
    NLK_CONCAT_NS::prefix_sums_entry,
    NLK_CONCAT_NS::query_rows_entry,
    NLK_CONCAT_NS::key_sweep_entry,
    NLK_CONCAT_NS::gather_keys_entry,
    NLK_CONCAT_NS::scatter_keys_entry};
}  // namespace nonlocal_kernels::fast
