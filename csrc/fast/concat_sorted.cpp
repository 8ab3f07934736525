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
// concat_project(x, w) -> out
//   x (B, L, dk) any strides, w (dk,) contiguous, float32 or float64: out[b, l] = x[b, l] . w,
//   summed in double (the projections a = theta w_theta and b = phi w_phi).
// Every loop is deterministic: parallel loops split rows (da, y) or feature columns (bins).
// The loops themselves are in concat_kernel_impl.h, built once per instruction set
// (concat_kernel.h); this file checks, allocates, splits the work and picks the build.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_isa.h"
#include "fast/concat_kernel.h"

namespace nonlocal_kernels::fast {
namespace {

// A loop runs on several threads only when each thread gets at least this many elements of
// work (64 K, twice ATen's own grain): below it a thread hand-off costs more than it saves.
// I3D res3's loops (0.2-0.8 M elements) split over 2 threads at this value; at 2^20 they ran on
// one, and the three ops took 1.56x as long on a quiet 2-core machine
// (benchmarks/results/concat-threads-2026-12-01.md).
// On a loaded machine a parallel region can wait for a descheduled thread, as ATen's and BLAS's
// own regions do.
constexpr int64_t kParallelWork = int64_t(1) << 16;

// Grain (in loop iterations) for a loop whose iterations each touch `per_item` elements.
inline int64_t grain_for(int64_t per_item, int64_t at_least = 1) {
  return std::max(at_least, kParallelWork / std::max<int64_t>(1, per_item));
}

// The kernel build cpu::selected_isa() picks (NONLOCAL_KERNELS_CPU_ISA, the CPU's features).
const ConcatKernelTable& concat_kernels() {
  switch (cpu::selected_isa()) {
#if defined(__x86_64__)
    case cpu::Isa::kAVX512: return kConcatKernelsAVX512;
    case cpu::Isa::kAVX2: return kConcatKernelsAVX2;
#endif
    default: return kConcatKernelsDefault;
  }
}

ProjectArgs project_args(const at::Tensor& x, const at::Tensor& w) {
  ProjectArgs p;
  p.is_double = x.scalar_type() == at::kDouble;
  p.B = x.size(0);
  p.L = x.size(1);
  p.dk = x.size(2);
  p.x = x.const_data_ptr();
  p.xs0 = x.stride(0);
  p.xs1 = x.stride(1);
  p.xs2 = x.stride(2);
  p.w = w.const_data_ptr();
  return p;
}

// out[b, l] = x[b, l, :] . w (summed in double), x any strides. Rows are split over threads
// past kParallelWork elements per thread (a matrix-vector product: torch.bmm's BLAS would split
// even the smallest one).
at::Tensor concat_project_cpu(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 1 && w.size(0) == x.size(2) && w.is_contiguous() &&
                  x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "concat_project: x (B, L, dk) and contiguous w (dk,) of one dtype, float32 or "
              "float64, expected");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  ProjectArgs p = project_args(x, w);
  p.out = out.mutable_data_ptr();
  const ConcatKernelTable& kt = concat_kernels();
  at::parallel_for(0, p.B * p.L, grain_for(p.dk), [&](int64_t r0, int64_t r1) {
    kt.project(p, r0, r1);
  });
  return out;
}

// dx = d w^T laid out like x, wgrad = sum_{b,l} d[b, l] x[b, l, :] (in double).
void projection_grads(const ConcatKernelTable& kt, const at::Tensor& x, const at::Tensor& d,
                      const at::Tensor& w, at::Tensor& dx, at::Tensor& wgrad) {
  ProjectArgs p = project_args(x, w);
  p.d = d.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.os0 = dx.stride(0);
  p.os1 = dx.stride(1);
  p.os2 = dx.stride(2);
  p.wgrad = wgrad.mutable_data_ptr();
  if (p.xs1 < p.xs2) {  // channels-first: the threads split the feature columns
    at::parallel_for(0, p.dk, grain_for(p.B * p.L), [&](int64_t c0, int64_t c1) {
      kt.project_grads(p, c0, c1);
    });
  } else {
    kt.project_grads(p, 0, p.dk);
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
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "concat_sorted: float32 or float64 expected, got ", a.scalar_type());
  TORCH_CHECK(neg_b_sorted.size(0) == a.size(0) && perm.sizes() == neg_b_sorted.sizes() &&
                  g.size(0) == a.size(0) && g.size(1) == perm.size(1),
              "concat_sorted: inconsistent sizes");
}

ConcatArgs concat_args(const at::Tensor& a, const at::Tensor& neg_b_sorted,
                       const at::Tensor& perm, const at::Tensor& g) {
  ConcatArgs p;
  p.is_double = a.scalar_type() == at::kDouble;
  p.B = a.size(0);
  p.N = a.size(1);
  p.M = g.size(1);
  p.dv = g.size(2);
  // 1/M rounded to the dtype, as the kernels have always used it.
  p.inv_m = p.is_double ? 1.0 / double(p.M) : double(1.0f / float(p.M));
  p.a = a.const_data_ptr();
  p.neg_b = neg_b_sorted.const_data_ptr();
  p.perm = perm.const_data_ptr<int64_t>();
  p.g = g.const_data_ptr();
  p.gs0 = g.stride(0);
  p.gs1 = g.stride(1);
  p.gs2 = g.stride(2);
  return p;
}

// rank = the inverse of perm, per batch.
std::vector<int64_t> ranks_of(const ConcatArgs& p) {
  std::vector<int64_t> rank(p.B * p.M);
  for (int64_t bi = 0; bi < p.B; ++bi)
    for (int64_t r = 0; r < p.M; ++r) rank[bi * p.M + p.perm[bi * p.M + r]] = r;
  return rank;
}

// fn(bi, c0, c1) over (batch, tile of kTile columns), split over threads past kParallelWork.
template <typename Fn>
void by_tiles(const ConcatArgs& p, const Fn& fn) {
  const int64_t ntiles = (p.dv + kTile - 1) / kTile;
  at::parallel_for(0, p.B * ntiles, grain_for(p.M * kTile), [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      fn(w / ntiles, (w % ntiles) * kTile, std::min(p.dv, (w % ntiles + 1) * kTile));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> concat_sorted_fwd_cpu(
    const at::Tensor& a, const at::Tensor& neg_b_sorted, const at::Tensor& perm,
    const at::Tensor& g) {
  check_common(a, neg_b_sorted, perm, g);
  const int64_t B = a.size(0), N = a.size(1), M = g.size(1), dv = g.size(2);
  auto y = at::empty({B, N, dv}, a.options());
  auto P = at::empty({B, M + 1, 2, dv}, a.options());
  auto k = at::empty({B, N}, a.options().dtype(at::kLong));
  ConcatArgs p = concat_args(a, neg_b_sorted, perm, g);
  p.P = P.mutable_data_ptr();
  p.k = k.mutable_data_ptr<int64_t>();
  p.y = y.mutable_data_ptr();
  const ConcatKernelTable& kt = concat_kernels();
  const int64_t ntiles = (dv + kTile - 1) / kTile;
  // A g without unit column stride (channels-first, strided) is first gathered into rank order,
  // so that the prefix sums run on contiguous rows.
  at::Tensor g_sorted;
  std::vector<int64_t> rank;
  if (p.gs2 != 1) {
    g_sorted = at::empty({B, M, dv}, a.options());
    p.g_sorted = g_sorted.mutable_data_ptr();
    rank = ranks_of(p);
    p.rank = rank.data();
    by_tiles(p, [&](int64_t bi, int64_t c0, int64_t c1) { kt.gather_keys(p, bi, c0, c1); });
  }
  for (int64_t bi = 0; bi < B; ++bi) {
    // Prefix sums over the keys by decreasing b, split over tiles of feature columns.
    at::parallel_for(0, ntiles, grain_for(M * kTile), [&](int64_t t0, int64_t t1) {
      kt.prefix_sums(p, bi, t0 * kTile, std::min(dv, t1 * kTile));
    });
    // Binary search and the output rows, split over queries.
    at::parallel_for(0, N, grain_for(dv), [&](int64_t i0, int64_t i1) {
      kt.query_rows(p, bi, i0, i1);
    });
  }
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
  auto db = at::empty({B, M}, a.options()), db_sorted = at::empty({B, M}, a.options());
  ConcatArgs p = concat_args(a, neg_b_sorted, perm, g);
  p.P = const_cast<void*>(P.const_data_ptr());  // read only in the backward
  p.k = const_cast<int64_t*>(k.const_data_ptr<int64_t>());  // read only in the backward
  p.dy = dy.const_data_ptr();
  p.dg = dg.mutable_data_ptr();
  p.ds0 = dg.stride(0);
  p.ds1 = dg.stride(1);
  p.ds2 = dg.stride(2);
  const ConcatKernelTable& kt = concat_kernels();
  // The queries sorted by k (a stable counting sort, per batch): bin c is
  // order[bin_start[c] .. bin_start[c + 1]).
  std::vector<int64_t> order(B * N), bin_start(B * (M + 2));
  const int64_t* kp = p.k;
  for (int64_t bi = 0; bi < B; ++bi) {
    int64_t* bs = bin_start.data() + bi * (M + 2);
    std::fill(bs, bs + M + 2, 0);
    for (int64_t i = 0; i < N; ++i) ++bs[kp[bi * N + i] + 1];
    for (int64_t c = 0; c <= M; ++c) bs[c + 1] += bs[c];
    std::vector<int64_t> next(bs, bs + M + 1);
    for (int64_t i = 0; i < N; ++i) order[bi * N + next[kp[bi * N + i]]++] = i;
  }
  p.order = order.data();
  p.bin_start = bin_start.data();
  const int64_t nblocks = (dv + kBlock - 1) / kBlock;
  std::vector<double> dapart(nblocks * B * N), dbpart(nblocks * B * M);
  p.dapart = dapart.data();
  p.dbpart = dbpart.data();
  auto g_sorted = at::empty({B, M, dv}, a.options()), dg_sorted = at::empty({B, M, dv}, a.options());
  p.g_sorted = g_sorted.mutable_data_ptr();
  p.dg_sorted = dg_sorted.mutable_data_ptr();
  const std::vector<int64_t> rank = ranks_of(p);
  p.rank = rank.data();
  by_tiles(p, [&](int64_t bi, int64_t c0, int64_t c1) { kt.gather_keys(p, bi, c0, c1); });
  // One sweep per batch and block of feature columns: every sum has a fixed order, whichever
  // thread runs the block.
  at::parallel_for(0, B * nblocks, grain_for((N + M) * kBlock), [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) kt.key_sweep(p, w / nblocks, w % nblocks, w % nblocks + 1);
  });
  by_tiles(p, [&](int64_t bi, int64_t c0, int64_t c1) { kt.scatter_keys(p, bi, c0, c1); });
  // da, db: the blocks' partial dot products added in block order.
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "concat_sorted_bwd", [&] {
    auto sum_blocks = [&](const std::vector<double>& part, int64_t n, scalar_t* out) {
      for (int64_t i = 0; i < n; ++i) {
        double s = 0.0;
        for (int64_t c = 0; c < nblocks; ++c) s += part[c * n + i];
        out[i] = scalar_t(s * p.inv_m);
      }
    };
    sum_blocks(dapart, B * N, da.mutable_data_ptr<scalar_t>());
    sum_blocks(dbpart, B * M, db_sorted.mutable_data_ptr<scalar_t>());
    const scalar_t* dbs = db_sorted.const_data_ptr<scalar_t>();
    scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < B * M; ++r) dbp[(r / M) * M + p.perm[r]] = dbs[r];
  });
  auto dw_theta = dw.narrow(0, 0, dk), dw_phi = dw.narrow(0, dk, dk);
  projection_grads(kt, theta, da, w.narrow(0, 0, dk), dtheta, dw_theta);
  projection_grads(kt, phi, db, w.narrow(0, dk, dk), dphi, dw_phi);
  return {dtheta, dphi, dg, dw};
}

}  // namespace
}  // namespace nonlocal_kernels::fast

TORCH_LIBRARY_FRAGMENT(nonlocal_kernels, m) {
  m.def(
      "concat_sorted_fwd(Tensor a, Tensor neg_b_sorted, Tensor perm, Tensor g) -> "
      "(Tensor y, Tensor P, Tensor k)");
  m.def(
      "concat_sorted_bwd(Tensor dy, Tensor a, Tensor k, Tensor P, Tensor neg_b_sorted, "
      "Tensor perm, Tensor g, Tensor theta, Tensor phi, Tensor w) -> "
      "(Tensor dtheta, Tensor dphi, Tensor dg, Tensor dw)");
  m.def("concat_project(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(nonlocal_kernels, CPU, m) {
  m.impl("concat_sorted_fwd", &nonlocal_kernels::fast::concat_sorted_fwd_cpu);
  m.impl("concat_sorted_bwd", &nonlocal_kernels::fast::concat_sorted_bwd_cpu);
  m.impl("concat_project", &nonlocal_kernels::fast::concat_project_cpu);
}
