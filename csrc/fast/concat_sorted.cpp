// Fused CPU kernels of backend `fast`'s sorted concatenation path (nonlocal_kernels/backends/
// fast.py has the algorithm, the autograd wiring and a pure-PyTorch version of both kernels).
//
// concat_sorted_fwd(a, neg_b_sorted, perm, g) -> (y, P, k)
//   a (B, N), neg_b_sorted (B, M) ascending (= -b sorted, keys by decreasing b), perm (B, M)
//   int64 key order, g (B, M, dv) any strides; a, neg_b_sorted, g of one floating dtype.
//   k[b, i] = #{r : neg_b_sorted[b, r] < a[b, i]}  (strict: a pair with a + b == 0 is out),
//   P[b, r, 0] = sum_{r' < r} g[b, perm[r']], P[b, r, 1] = the same for b * g (sums in double),
//   y[b, i] = (P[b, k_i, 1] + a_i P[b, k_i, 0]) / M.
// concat_sorted_bwd(dy, a, k, P, neg_b_sorted, perm, g, theta, phi, w) -> (dtheta, dphi, dg, dw)
//   dy (B, N, dv) contiguous, the rest as saved by the forward; theta, phi, w of a's dtype.
//   da_i = dy_i . P[k_i, 0] / M; key of descending rank d (j = perm[d]) receives the queries
//   with k_i > d: dg_j = (b_j S_dy + S_ady) / M, db_j = g_j . S_dy / M with S the suffix sums
//   over the per-k bins of dy and a * dy (bins and suffix sums in double); then
//   dtheta = da w_theta^T, dphi = db w_phi^T, dw = [sum_i da_i theta_i, sum_j db_j phi_j].
// Every loop is deterministic: parallel loops split rows (da, y) or feature columns (bins).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kTile = 16;  // feature columns per tile of the per-key loops
constexpr int kLanes = 8;      // independent partial sums of a dot product (vectorisable)
// A loop runs on several threads only when each thread gets at least this many elements of
// work: below it (I3D res3's ~1 ms loops) a thread hand-off costs more than it saves, and on a
// shared machine a parallel region waits for a descheduled thread (milliseconds).
constexpr int64_t kParallelWork = int64_t(1) << 20;

// Grain (in loop iterations) for a loop whose iterations each touch `per_item` elements.
inline int64_t grain_for(int64_t per_item, int64_t at_least = 1) {
  return std::max(at_least, kParallelWork / std::max<int64_t>(1, per_item));
}

// sum_d x[d] * y[d] with kLanes interleaved partial sums in acc_t.
template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += acc_t(x[d + l]) * acc_t(y[d + l]);
  acc_t s = 0;
  for (; d < n; ++d) s += acc_t(x[d]) * acc_t(y[d]);
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// For x (B, L, dk) any strides, d (B, L) contiguous and w (dk,) contiguous:
//   dx[b, l, c] = d[b, l] * w[c] (dx laid out like x) and wgrad[c] = sum_{b,l} d[b, l] x[b, l, c]
// (in double). The loops run along x's smaller stride.
template <typename scalar_t>
void projection_grads(const at::Tensor& x, const scalar_t* d, const scalar_t* w, at::Tensor& dx,
                      scalar_t* wgrad) {
  const int64_t B = x.size(0), L = x.size(1), dk = x.size(2);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t os0 = dx.stride(0), os1 = dx.stride(1), os2 = dx.stride(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = dx.mutable_data_ptr<scalar_t>();
  if (xs1 <= xs2) {  // channels-first: each feature column c is a run over l
    at::parallel_for(0, dk, grain_for(B * L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* xc = xp + b * xs0 + c * xs2;
          scalar_t* oc = op + b * os0 + c * os2;
          const scalar_t* db = d + b * L;
          double lane[4] = {};
          for (int64_t l = 0; l < L; ++l) {
            oc[l * os1] = db[l] * w[c];
            lane[l & 3] += double(db[l]) * double(xc[l * xs1]);
          }
          acc += (lane[0] + lane[1]) + (lane[2] + lane[3]);
        }
        wgrad[c] = scalar_t(acc);
      }
    });
  } else {  // rows: each (b, l) is a run over c
    std::vector<double> acc(dk, 0.0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t* xr = xp + b * xs0 + l * xs1;
        scalar_t* orow = op + b * os0 + l * os1;
        const scalar_t dl = d[b * L + l];
        for (int64_t c = 0; c < dk; ++c) {
          orow[c * os2] = dl * w[c];
          acc[c] += double(dl) * double(xr[c * xs2]);
        }
      }
    }
    for (int64_t c = 0; c < dk; ++c) wgrad[c] = scalar_t(acc[c]);
  }
}

void check_common(const at::Tensor& a, const at::Tensor& neg_b_sorted, const at::Tensor& perm,
                  const at::Tensor& g) {
  TORCH_CHECK(a.dim() == 2 && neg_b_sorted.dim() == 2 && perm.dim() == 2 && g.dim() == 3,
              "concat_sorted: a (B, N), neg_b_sorted (B, M), perm (B, M), g (B, M, dv) expected");
  TORCH_CHECK(a.is_contiguous() && neg_b_sorted.is_contiguous() && perm.is_contiguous(),
              "concat_sorted: a, neg_b_sorted and perm must be contiguous");
  TORCH_CHECK(perm.scalar_type() == at::kLong, "concat_sorted: perm must be int64");
  TORCH_CHECK(a.scalar_type() == neg_b_sorted.scalar_type() &&
                  a.scalar_type() == g.scalar_type(),
              "concat_sorted: a, neg_b_sorted and g must have one dtype");
  TORCH_CHECK(neg_b_sorted.size(0) == a.size(0) && perm.sizes() == neg_b_sorted.sizes() &&
                  g.size(0) == a.size(0) && g.size(1) == perm.size(1),
              "concat_sorted: inconsistent sizes");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> concat_sorted_fwd_cpu(
    const at::Tensor& a, const at::Tensor& neg_b_sorted, const at::Tensor& perm,
    const at::Tensor& g) {
  check_common(a, neg_b_sorted, perm, g);
  const int64_t B = a.size(0), N = a.size(1), M = g.size(1), dv = g.size(2);
  auto y = at::empty({B, N, dv}, a.options());
  auto P = at::empty({B, M + 1, 2, dv}, a.options());
  auto k = at::empty({B, N}, a.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "concat_sorted_fwd", [&] {
    const scalar_t inv_m = scalar_t(1) / scalar_t(M);
    const int64_t gs0 = g.stride(0), gs1 = g.stride(1), gs2 = g.stride(2);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t* pp = perm.const_data_ptr<int64_t>();
    const scalar_t* nbp = neg_b_sorted.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* Pp = P.mutable_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    int64_t* kp = k.mutable_data_ptr<int64_t>();
    for (int64_t bi = 0; bi < B; ++bi) {
      // Prefix sums over the keys by decreasing b, split over feature columns.
      const scalar_t* nb = nbp + bi * M;
      const int64_t* pr = pp + bi * M;
      scalar_t* Pb = Pp + bi * (M + 1) * 2 * dv;
      at::parallel_for(0, dv, grain_for(M, kTile), [&](int64_t c0, int64_t c1) {
        double sg[kTile], sbg[kTile];
        for (int64_t d0 = c0; d0 < c1; d0 += kTile) {  // tiles of columns: the strided reads
          const int64_t w = std::min(kTile, c1 - d0);    // of a channels-first g stay in cache
          for (int64_t d = 0; d < w; ++d) {
            sg[d] = sbg[d] = 0.0;
            Pb[d0 + d] = Pb[dv + d0 + d] = scalar_t(0);
          }
          for (int64_t r = 0; r < M; ++r) {
            const scalar_t* gj = gp + bi * gs0 + pr[r] * gs1 + d0 * gs2;
            const double bj = -double(nb[r]);
            scalar_t* row = Pb + (r + 1) * 2 * dv + d0;
            for (int64_t d = 0; d < w; ++d) {
              const double v = double(gj[d * gs2]);
              sg[d] += v;
              sbg[d] += bj * v;
              row[d] = scalar_t(sg[d]);
              row[dv + d] = scalar_t(sbg[d]);
            }
          }
        }
      });
      // Binary search and the output rows, split over queries.
      const scalar_t* ab = ap + bi * N;
      at::parallel_for(0, N, grain_for(dv), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t ai = ab[i];
          const int64_t ki = std::lower_bound(nb, nb + M, ai) - nb;  // #{r : nb[r] < ai}
          kp[bi * N + i] = ki;
          const scalar_t* Pg = Pb + ki * 2 * dv;
          const scalar_t* Pbg = Pg + dv;
          scalar_t* yi = yp + (bi * N + i) * dv;
          const scalar_t wa = ai * inv_m;
          for (int64_t d = 0; d < dv; ++d) yi[d] = Pbg[d] * inv_m + wa * Pg[d];
        }
      });
    }
  });
  return {y, P, k};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_sorted_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& a, const at::Tensor& k, const at::Tensor& P,
    const at::Tensor& neg_b_sorted, const at::Tensor& perm, const at::Tensor& g,
    const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& w) {
  check_common(a, neg_b_sorted, perm, g);
  const int64_t B = a.size(0), N = a.size(1), M = g.size(1), dv = g.size(2);
  TORCH_CHECK(dy.is_contiguous() && dy.dim() == 3 && dy.size(0) == B && dy.size(1) == N &&
                  dy.size(2) == dv && dy.scalar_type() == a.scalar_type(),
              "concat_sorted_bwd: dy must be contiguous (B, N, dv) of a's dtype");
  TORCH_CHECK(k.is_contiguous() && k.scalar_type() == at::kLong && k.sizes() == a.sizes(),
              "concat_sorted_bwd: k must be contiguous int64 (B, N)");
  TORCH_CHECK(P.is_contiguous() && P.dim() == 4 && P.size(0) == B && P.size(1) == M + 1 &&
                  P.size(2) == 2 && P.size(3) == dv && P.scalar_type() == a.scalar_type(),
              "concat_sorted_bwd: P must be contiguous (B, M + 1, 2, dv) of a's dtype");
  const int64_t dk = theta.size(2);
  TORCH_CHECK(theta.dim() == 3 && phi.dim() == 3 && theta.size(0) == B && theta.size(1) == N &&
                  phi.size(0) == B && phi.size(1) == M && phi.size(2) == dk &&
                  w.is_contiguous() && w.dim() == 1 && w.size(0) == 2 * dk &&
                  theta.scalar_type() == a.scalar_type() &&
                  phi.scalar_type() == a.scalar_type() && w.scalar_type() == a.scalar_type(),
              "concat_sorted_bwd: theta (B, N, dk), phi (B, M, dk), w (2 dk,) of a's dtype");
  auto dtheta = at::empty_like(theta);  // the inputs' strides: no layout copy in autograd
  auto dphi = at::empty_like(phi);
  auto dw = at::empty({2 * dk}, a.options());
  auto da = at::empty({B, N}, a.options());
  auto dg = at::empty_like(g);  // g's strides (channels-first stays channels-first)
  auto db = at::empty({B, M}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "concat_sorted_bwd", [&] {
    const scalar_t inv_m = scalar_t(1) / scalar_t(M);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const int64_t* kp = k.const_data_ptr<int64_t>();
    const scalar_t* Pp = P.const_data_ptr<scalar_t>();
    const scalar_t* nbp = neg_b_sorted.const_data_ptr<scalar_t>();
    const int64_t* pp = perm.const_data_ptr<int64_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t gs0 = g.stride(0), gs1 = g.stride(1), gs2 = g.stride(2);
    const int64_t ds0 = dg.stride(0), ds1 = dg.stride(1), ds2 = dg.stride(2);
    scalar_t* dap = da.mutable_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
    for (int64_t bi = 0; bi < B; ++bi) {
      const scalar_t* Pb = Pp + bi * (M + 1) * 2 * dv;
      const int64_t* kb = kp + bi * N;
      const scalar_t* ab = ap + bi * N;
      const scalar_t* dyb = dyp + bi * N * dv;
      // da_i = dy_i . P_g[k_i] / M, split over queries.
      at::parallel_for(0, N, grain_for(dv), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* Pg = Pb + kb[i] * 2 * dv;
          const scalar_t* dyi = dyb + i * dv;
          dap[bi * N + i] = dot<scalar_t>(dyi, Pg, dv) * inv_m;
        }
      });
      // Bins by k (sums of dy and a dy), then suffix sums over descending key ranks; each
      // thread owns a range of feature columns, so every sum runs in a fixed order.
      const scalar_t* nb = nbp + bi * M;
      const int64_t* pr = pp + bi * M;
      const int64_t nchunks = (dv + kTile - 1) / kTile;
      std::vector<double> dbpart(nchunks * M);  // per-tile partial dot products g_j . S_dy
      at::parallel_for(0, nchunks, grain_for(N * kTile), [&](int64_t c0, int64_t c1) {
        std::vector<double> H((M + 1) * 2 * kTile);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t d0 = c * kTile, w = std::min(kTile, dv - d0);
          std::fill(H.begin(), H.end(), 0.0);
          for (int64_t i = 0; i < N; ++i) {
            double* h = H.data() + kb[i] * 2 * kTile;
            const scalar_t* dyi = dyb + i * dv + d0;
            const double ai = double(ab[i]);
            for (int64_t d = 0; d < w; ++d) {
              const double v = double(dyi[d]);
              h[d] += v;
              h[kTile + d] += ai * v;
            }
          }
          double sdy[kTile] = {}, sady[kTile] = {};
          double* part = dbpart.data() + c * M;
          for (int64_t r = M - 1; r >= 0; --r) {  // key of descending rank r: bins k > r
            const double* h = H.data() + (r + 1) * 2 * kTile;
            const int64_t j = pr[r];
            const double bj = -double(nb[r]);
            const scalar_t* gj = gp + bi * gs0 + j * gs1 + d0 * gs2;
            scalar_t* dgj = dgp + bi * ds0 + j * ds1 + d0 * ds2;
            double dotl[4] = {};
            for (int64_t d = 0; d < w; ++d) {
              sdy[d] += h[d];
              sady[d] += h[kTile + d];
              dgj[d * ds2] = scalar_t((bj * sdy[d] + sady[d]) * double(inv_m));
              dotl[d & 3] += double(gj[d * gs2]) * sdy[d];
            }
            part[j] = (dotl[0] + dotl[1]) + (dotl[2] + dotl[3]);
          }
        }
      });
      for (int64_t j = 0; j < M; ++j) {
        double s = 0.0;
        for (int64_t c = 0; c < nchunks; ++c) s += dbpart[c * M + j];
        dbp[bi * M + j] = scalar_t(s * double(inv_m));
      }
    }
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* dwp = dw.mutable_data_ptr<scalar_t>();
    projection_grads<scalar_t>(theta, dap, wp, dtheta, dwp);
    projection_grads<scalar_t>(phi, dbp, wp + dk, dphi, dwp + dk);
  });
  return {dtheta, dphi, dg, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nonlocal_kernels, m) {
  m.def(
      "concat_sorted_fwd(Tensor a, Tensor neg_b_sorted, Tensor perm, Tensor g) -> "
      "(Tensor y, Tensor P, Tensor k)");
  m.def(
      "concat_sorted_bwd(Tensor dy, Tensor a, Tensor k, Tensor P, Tensor neg_b_sorted, "
      "Tensor perm, Tensor g, Tensor theta, Tensor phi, Tensor w) -> "
      "(Tensor dtheta, Tensor dphi, Tensor dg, Tensor dw)");
}

TORCH_LIBRARY_IMPL(nonlocal_kernels, CPU, m) {
  m.impl("concat_sorted_fwd", &concat_sorted_fwd_cpu);
  m.impl("concat_sorted_bwd", &concat_sorted_bwd_cpu);
}
