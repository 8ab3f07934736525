// CPU implementations of nonlocal_kernels::softmax_fwd / softmax_bwd: argument checks, output
// allocation, the work plan (tile sizes, backward groups, packed phi/g), at::parallel_for, and
// the choice of kernel table (AVX2 or portable). The tile kernels are in softmax_kernel_impl.h.
//
// Tuning knobs (environment, read at every call; for benchmarks and tests):
//   NONLOCAL_KERNELS_CPU_GEMM = vec | blas   tile products via the Vectorized panel GEMM
//                                             (default) or BLAS sgemm_/dgemm_ calls on tiles
//   NONLOCAL_KERNELS_CPU_ISA  = avx512 | avx2 | default   force a kernel table (default: the
//                                             best the CPU supports)
//   NONLOCAL_KERNELS_CPU_PACK = 1             blas path: always copy phi/g (contiguous)
//   NONLOCAL_KERNELS_CPU_MKL_PACK = 0 | 1     blas path: MKL's packed GEMM for the key tiles
//                                             where torch links MKL (default 1)
//   NONLOCAL_KERNELS_CPU_BM / _BN             query / key tile rows
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>
#include <tuple>

#include "cpu/cpu_isa.h"
#include "cpu/softmax_cpu.h"
#include "ops_common.h"

namespace nonlocal_kernels::cpu {

bool blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

int64_t env_int(const char* name, int64_t fallback) {
  std::string v = env(name);
  if (v.empty()) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  TORCH_CHECK(end != nullptr && *end == '\0' && x >= 1, name, ": expected a positive integer, got '",
              v, "'");
  return x;
}

// The kernel build cpu::selected_isa() picks (NONLOCAL_KERNELS_CPU_ISA, the CPU's features).
const KernelTable& kernels() {
  switch (selected_isa()) {
#if defined(__x86_64__)
    case Isa::kAVX512: return kKernelsAVX512;
    case Isa::kAVX2: return kKernelsAVX2;
#endif
    default: return kKernelsDefault;
  }
}

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected float64, float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// GEMM path: the Vectorized panel GEMM ("vec") or BLAS on tiles ("blas"). Default: "blas" with
// the AVX-512 kernel table when a BLAS is linked (torch's MKL runs its sgemm on AVX-512 there,
// and took 5-20% less time than the panel GEMM forward+backward on the 2-core Xeon VM:
// benchmarks/results/cpu-keep-scores-2026-11-30.md), else "vec" (5-11% faster than BLAS on an
// AVX2 EPYC: benchmarks/results/cpu-kernel-2026-11-24.md, section 4).
bool use_packed_path(const KernelTable& kt) {
  std::string mode = env("NONLOCAL_KERNELS_CPU_GEMM");
  TORCH_CHECK(mode.empty() || mode == "blas" || mode == "vec",
              "NONLOCAL_KERNELS_CPU_GEMM: expected 'blas' or 'vec', got '", mode, "'");
  TORCH_CHECK(mode != "blas" || blas_available(),
              "NONLOCAL_KERNELS_CPU_GEMM=blas: no BLAS sgemm_/dgemm_ is linked in this process");
  if (mode.empty()) return !(std::string(kt.name) == "avx512" && blas_available());
  return mode != "blas";
}

// The calling thread's workspace, kept between calls up to 64 MiB (see Arena): the tiled path's
// B-panels of phi/g and backward partial sums, the whole-batch path's temporaries.
thread_local Arena call_arena;
constexpr size_t kCallArenaKeepBytes = size_t(64) << 20;

// Bytes of call arena for n elements of the compute type of `st` (double for float64, else
// float), and such a slice of it (after the caller's call_arena.reserve).
size_t arena_bytes(int64_t n, at::ScalarType st) {
  return st == at::kDouble ? Arena::bytes_for<double>(n) : Arena::bytes_for<float>(n);
}
void* arena_take(int64_t n, at::ScalarType st) {
  return st == at::kDouble ? static_cast<void*>(call_arena.take<double>(n))
                           : static_cast<void*>(call_arena.take<float>(n));
}

// B-panels (kernel layout) of the k x n matrices t[b](r, c) with strides (rs, cs).
struct PanelSpec {
  const at::Tensor* t;
  int64_t rs, cs, k, n;
  double alpha;
  int64_t per_batch(const KernelTable& kt) const {
    const int64_t width = kt.panel_width(to_dtype(*t, "input"));
    return (n + width - 1) / width * width * k;
  }
  size_t bytes(const KernelTable& kt) const {
    return arena_bytes(t->size(0) * per_batch(kt), t->scalar_type());
  }
};

// Packs every batch of `spec` in parallel over (batch, panel) into arena memory; returns the
// panels and sets `per_batch`.
const void* prepare_panels(const PanelSpec& spec, const KernelTable& kt, int64_t& per_batch) {
  const at::Tensor& t = *spec.t;
  const DType dt = to_dtype(t, "input");
  const int64_t width = kt.panel_width(dt);
  const int64_t np = (spec.n + width - 1) / width, B = t.size(0);
  per_batch = spec.per_batch(kt);
  void* dst = arena_take(B * per_batch, t.scalar_type());
  const void* src = t.data_ptr();
  const int64_t bs = t.stride(0), pb = per_batch;
  at::parallel_for(0, B * np, 1, [&](int64_t i0, int64_t i1) {
    kt.pack_panels(dt, src, bs, spec.rs, spec.cs, spec.k, spec.n, spec.alpha, dst, pb, i0, i1);
  });
  return dst;
}

// phi or g as the BLAS path's kernels read it (rows x cols per batch, compute type). Read in
// place when it already is the compute type with a unit stride a BLAS call can use; otherwise
// packed into a contiguous (B, rows, cols) buffer kept alive by `holder`.
MatView prepare_operand(const at::Tensor& t, const KernelTable& kt, at::Tensor& holder) {
  const int64_t B = t.size(0), rows = t.size(1), cols = t.size(2);
  const int64_t bs = t.stride(0), rs = t.stride(1), cs = t.stride(2);
  const bool same_type = t.scalar_type() == compute_type(t.scalar_type());
  const bool row_major = cs == 1 && (rows == 1 || rs >= cols);
  const bool col_major = rs == 1 && (cols == 1 || cs >= rows);
  const bool force_pack = env("NONLOCAL_KERNELS_CPU_PACK") == "1";
  if (same_type && !force_pack && (row_major || col_major))
    return MatView{t.data_ptr(), bs, rs, cs};
  holder = at::empty({B, rows, cols}, t.options().dtype(compute_type(t.scalar_type())));
  const void* src = t.data_ptr();
  void* dst = holder.data_ptr();
  const DType dt = to_dtype(t, "input");
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    kt.pack(dt, src, bs, rs, cs, rows, cols, dst, b0, b1);
  });
  return MatView{dst, rows * cols, cols, 1};
}

// MKL's packed GEMM for the BLAS path's key-tile operands (CpuPlan::mkl_*): float compute, MKL
// linked, not turned off (NONLOCAL_KERNELS_CPU_MKL_PACK=0). A BLAS call packs both of its
// operands every time; the key tiles are the same for every query tile, so packing them once
// per call took 5-7% off the tiled forward at (1, 25088, 6272, 256, 256) on the 2-core Xeon VM.
// phi and g (plan.k, plan.v) must be a row-major or a column-major matrix per batch with a
// valid leading dimension (prepare_operand lets a single row through with any row stride).
// The forward and the backward decide alike, so S is the same product in both.
bool mkl_pack_enabled() {
  const std::string mode = env("NONLOCAL_KERNELS_CPU_MKL_PACK");
  TORCH_CHECK(mode.empty() || mode == "0" || mode == "1",
              "NONLOCAL_KERNELS_CPU_MKL_PACK: expected '0' or '1', got '", mode, "'");
  return mode != "0";
}

bool use_mkl_pack(const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
                  const CpuPlan& plan) {
  if (!mkl_pack_enabled() || plan.packed || theta.scalar_type() == at::kDouble) return false;
  if (cblas_sgemm_pack_get_size == nullptr || cblas_sgemm_pack == nullptr ||
      cblas_sgemm_compute == nullptr)
    return false;
  auto leading = [](const MatView& m, int64_t rows, int64_t cols) {
    return (m.cs == 1 && m.rs >= cols) || (m.rs == 1 && m.cs >= rows);
  };
  return leading(plan.k, phi.size(1), phi.size(2)) && leading(plan.v, g.size(1), g.size(2));
}

// Packs, per batch and key tile of BN rows, the B operand (k x bn) of a product with key tile j
// of m (M x d, a BLAS-path MatView): phi_j^T (transposed = true, k = d) or g_j (transposed =
// false, k = bn). Returns the packed tiles (holder keeps them) and sets the floats per tile.
const float* pack_key_tiles(const MatView& m, int64_t B, int64_t M, int64_t d, bool transposed,
                            const CpuPlan& plan, at::Tensor& holder, int64_t& per_tile) {
  const int64_t BM = plan.BM, BN = plan.BN, nkt = (M + BN - 1) / BN;
  const int kdim = int(transposed ? d : BN), ndim = int(transposed ? BN : d);
  per_tile = int64_t((cblas_sgemm_pack_get_size(kCblasBMatrix, int(BM), ndim, kdim) + 3) / 4);
  holder = at::empty({B * nkt * per_tile}, at::TensorOptions().dtype(at::kFloat));
  float* dst = holder.mutable_data_ptr<float>();
  const float* src = static_cast<const float*>(m.ptr);
  // Row-major bn x d tiles (ld rs), else transposes of row-major d x bn ones (ld cs); one of
  // the two holds (use_mkl_pack).
  const bool row_major = m.cs == 1 && m.rs >= d;
  const int ld = int(row_major ? m.rs : m.cs);
  const int trans = (row_major == transposed) ? kCblasTrans : kCblasNoTrans;
  at::parallel_for(0, B * nkt, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nkt, j0 = (i % nkt) * BN, bn = std::min(BN, M - j0);
      const float* t = src + b * m.bs + j0 * m.rs;  // key tile j: bn x d, strides (rs, cs)
      cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, trans, int(BM),
                       int(transposed ? bn : d), int(transposed ? d : bn), 1.0f, t, ld,
                       dst + i * per_tile);
    }
  });
  return dst;
}

// Tiles. Key tiles of BN rows (a multiple of 16 and of the panel width, `width`: 32 floats with
// AVX-512). Query tiles: about BM0 rows, with their count per batch rounded up to a multiple of
// `multiple` so that the B * n_qtiles forward tasks and the backward groups divide evenly among
// the threads.
void choose_tiles(int64_t N, int64_t M, int64_t multiple, int64_t width, CpuPlan& plan) {
  // A BLAS call packs both its operands every time: taller query tiles amortise that (BM 256
  // took 5-15% less time than 64 on the BLAS path, same VM and file as above).
  // Key tiles of 512 rows on the BLAS path: half the tile products and online-softmax passes
  // of 256, with a 256 x 528 score tile still within L2; forward at (1, 25088, 6272, 256, 256)
  // 554 ms against 573 (384: 559, 768: 548), forward+backward at (1, 6272, 1568) 127.0 against
  // 129.4 ms (benchmarks/results/cpu-steady-heap-2026-12-01.md, section 3).
  const int64_t bm0 = env_int("NONLOCAL_KERNELS_CPU_BM", plan.packed ? 64 : 256);
  int64_t bn = env_int("NONLOCAL_KERNELS_CPU_BN", plan.packed ? 256 : 512);
  const int64_t w = std::max<int64_t>(16, width);  // 16, or the AVX-512 float panel's 32
  bn = (bn + w - 1) / w * w;
  plan.BN = std::min(bn, (M + w - 1) / w * w);
  int64_t nq = (N + bm0 - 1) / bm0;
  nq = std::min(N, (nq + multiple - 1) / multiple * multiple);
  plan.BM = (N + nq - 1) / nq;
  if (plan.BM > 6) plan.BM = (plan.BM + 5) / 6 * 6;  // whole micro-tiles (6 rows)
  plan.n_qtiles = (N + plan.BM - 1) / plan.BM;
}

// Runs `ntasks` tasks on the intra-op threads, handed out dynamically (TaskQueue).
template <typename F>
void run_tasks(int64_t ntasks, const F& worker) {
  TaskQueue queue(ntasks);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(ntasks, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(queue); });
}

// Query-tile groups per batch of the backward, each with its own partial dphi/dg
// (M x (dk + dv)): about two tasks (B * G) per thread, so that the dynamic scheduling can even
// out a slow thread, while all partial sums together stay under 256 MiB. The result depends on
// G, hence on the thread count, but is bit-identical run to run.
int64_t backward_groups(int64_t B, int64_t M, int64_t dk, int64_t dv, int64_t esize) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t G = std::max<int64_t>(1, (2 * threads + B - 1) / B);
  if (G > 1) G = (G + 1) / 2 * 2;
  const int64_t per_group = B * M * (dk + dv) * esize;
  while (G > 1 && G * per_group > (int64_t(256) << 20)) --G;
  return G;
}

// The plan of a call, the same in the forward and the backward: dtype, scale, GEMM path and the
// query tiling. The number of query tiles per batch is a multiple of the threads each batch
// should feed (T / gcd(B, T), so the forward's B * n_qtiles tasks divide evenly) and of the
// backward's groups. One tiling for both keeps the backward's recomputed S bit for bit the
// forward's on the BLAS path too, whose sgemm may round differently for a different number of
// rows: with two tilings S of the forward and of the backward differ, P = exp(S - lse) does not
// cancel lse's rounding, and dtheta/dphi reach up to 3x the tolerance in about 1 draw in 600
// (benchmarks/results/cpu-kernel-2026-11-24.md, section 6).
CpuPlan make_plan(const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
                  double scale) {
  CpuPlan plan{};
  plan.dtype = to_dtype(theta, "theta");
  plan.scale = scale;
  plan.packed = use_packed_path(kernels());
  const int64_t B = theta.size(0), N = theta.size(1), M = phi.size(1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t split = threads / std::gcd(B, threads);
  const int64_t esize = theta.scalar_type() == at::kDouble ? 8 : 4;
  plan.groups = backward_groups(B, M, theta.size(2), g.size(2), esize);
  choose_tiles(N, M, std::lcm(split, plan.groups), kernels().panel_width(plan.dtype), plan);
  return plan;
}

void check_cpu_inputs(const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g) {
  check_softmax_inputs(theta, phi, g);
  TORCH_CHECK(theta.device().is_cpu(), "theta: expected a CPU tensor, got ", theta.device());
  to_dtype(theta, "theta");
  TORCH_CHECK(phi.size(1) >= 1, "phi: M (number of key positions) must be >= 1, got phi ",
              phi.sizes());
}

// The tiled forward (softmax_fwd): nothing N x M is allocated.
std::tuple<at::Tensor, at::Tensor> softmax_fwd_cpu(const at::Tensor& theta, const at::Tensor& phi,
                                                   const at::Tensor& g, double scale) {
  check_cpu_inputs(theta, phi, g);
  const int64_t B = theta.size(0), N = theta.size(1), dv = g.size(2);
  const auto opts_a = theta.options().dtype(lse_dtype(theta.scalar_type()));
  at::Tensor y = new_output({B, N, dv}, theta.options());
  at::Tensor lse = new_output({B, N}, opts_a);
  if (B == 0 || N == 0) return {y, lse};

  NonlocalSoftmaxParams p = softmax_params(theta, phi, g, scale);
  set_y_lse(p, y, lse);

  const KernelTable& kt = kernels();
  CpuPlan plan = make_plan(theta, phi, g, scale);
  at::Tensor k_hold, v_hold;
  if (plan.packed) {
    const PanelSpec kt_spec{&phi, phi.stride(2), phi.stride(1), p.dk, p.M, scale};
    const PanelSpec v_spec{&g, g.stride(1), g.stride(2), p.M, p.dv, 1.0};
    call_arena.reserve(kt_spec.bytes(kt) + v_spec.bytes(kt));
    plan.kt = prepare_panels(kt_spec, kt, plan.kt_bs);
    plan.vp = prepare_panels(v_spec, kt, plan.v_bs);
  } else {
    plan.k = prepare_operand(phi, kt, k_hold);
    plan.v = prepare_operand(g, kt, v_hold);
  }
  at::Tensor kt_hold, vp_hold;
  if (use_mkl_pack(theta, phi, g, plan)) {
    plan.mkl_kt = pack_key_tiles(plan.k, B, p.M, p.dk, true, plan, kt_hold, plan.mkl_kt_tile);
    plan.mkl_v = pack_key_tiles(plan.v, B, p.M, dv, false, plan, vp_hold, plan.mkl_v_tile);
  }
  run_tasks(B * plan.n_qtiles, [&](TaskQueue& q) { kt.forward(p, plan, q); });
  call_arena.trim(kCallArenaKeepBytes);
  return {y, lse};
}

// Per (batch, column) of g (B, M, dv; any dtype and strides), whether the column is all zero: D's
// share of those columns is taken from y (softmax_kernel_impl.h, backward_impl), on both paths.
// A column scan stops at its first nonzero entry: one read per column on real data, where a full
// M x dv scan through a channels-first g's strides costs about 1% of a backward.
at::Tensor zero_columns_of(const at::Tensor& g) {
  const int64_t B = g.size(0), M = g.size(1), dv = g.size(2);
  at::Tensor zero = at::empty({B, dv}, g.options().dtype(at::kBool));
  bool* z = zero.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "zero_columns_of",
                                  [&] {
    const scalar_t* p = g.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < dv; ++c) {
        const scalar_t* col = p + b * g.stride(0) + c * g.stride(2);
        int64_t j = 0;
        while (j < M && static_cast<double>(col[j * g.stride(1)]) == 0.0) ++j;
        z[b * dv + c] = j == M;
      }
  });
  return zero;
}

// The tiled backward (softmax_bwd, and softmax_keep_bwd without kept scores): recomputes S.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
    const at::Tensor& y, const at::Tensor& lse, double scale, const char* op) {
  check_cpu_inputs(theta, phi, g);
  const int64_t B = theta.size(0), N = theta.size(1), M = phi.size(1), dk = theta.size(2),
                dv = g.size(2);
  check_softmax_bwd_inputs(dy, theta, g, y, lse, op);

  at::Tensor dtheta = new_output_like(theta);
  at::Tensor dphi = new_output_like(phi);
  at::Tensor dg = new_output_like(g);
  if (B == 0) return {dtheta, dphi, dg};
  if (N == 0) {  // no query rows: nothing flows to phi or g
    dphi.zero_();
    dg.zero_();
    return {dtheta, dphi, dg};
  }

  NonlocalSoftmaxParams p = softmax_params(theta, phi, g, scale);
  set_y_lse(p, y, lse);
  set_backward_tensors(p, dy, dtheta, dphi, dg);

  const KernelTable& kt = kernels();
  CpuPlan plan = make_plan(theta, phi, g, scale);
  const int64_t G = std::max<int64_t>(1, std::min(plan.groups, plan.n_qtiles));
  plan.tiles_per_group = (plan.n_qtiles + G - 1) / G;
  plan.groups = (plan.n_qtiles + plan.tiles_per_group - 1) / plan.tiles_per_group;

  at::Tensor k_hold, v_hold;
  const int64_t partial_n = B * plan.groups * M * (dk + dv);
  const size_t partial_bytes = arena_bytes(partial_n, theta.scalar_type());
  if (plan.packed) {
    const PanelSpec kt_spec{&phi, phi.stride(2), phi.stride(1), dk, M, scale};
    const PanelSpec k_spec{&phi, phi.stride(1), phi.stride(2), M, dk, 1.0};
    const PanelSpec vt_spec{&g, g.stride(2), g.stride(1), dv, M, 1.0};
    call_arena.reserve(kt_spec.bytes(kt) + k_spec.bytes(kt) + vt_spec.bytes(kt) + partial_bytes);
    plan.kt = prepare_panels(kt_spec, kt, plan.kt_bs);
    plan.kp = prepare_panels(k_spec, kt, plan.k_bs);
    plan.vtp = prepare_panels(vt_spec, kt, plan.vt_bs);
  } else {
    call_arena.reserve(partial_bytes);
    plan.k = prepare_operand(phi, kt, k_hold);
    plan.v = prepare_operand(g, kt, v_hold);
  }
  at::Tensor kt_hold, vt_hold, kp_hold;
  if (use_mkl_pack(theta, phi, g, plan)) {
    plan.mkl_kt = pack_key_tiles(plan.k, B, M, dk, true, plan, kt_hold, plan.mkl_kt_tile);
    plan.mkl_vt = pack_key_tiles(plan.v, B, M, dv, true, plan, vt_hold, plan.mkl_vt_tile);
    plan.mkl_k = pack_key_tiles(plan.k, B, M, dk, false, plan, kp_hold, plan.mkl_k_tile);
  }
  const at::Tensor zero_cols = zero_columns_of(g);
  plan.zero_cols = zero_cols.const_data_ptr<bool>();
  plan.partial = arena_take(partial_n, theta.scalar_type());

  run_tasks(B * plan.groups, [&](TaskQueue& q) { kt.backward(p, plan, q); });
  at::parallel_for(0, B * M, 64, [&](int64_t r0, int64_t r1) { kt.reduce(p, plan, r0, r1); });
  call_arena.trim(kCallArenaKeepBytes);
  return {dtheta, dphi, dg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
    const at::Tensor& y, const at::Tensor& lse, double scale) {
  return backward(dy, theta, phi, g, y, lse, scale, "softmax_bwd");
}

// ---------------------------------------------------------------------------------------------
// The whole-batch path (softmax_keep_fwd / softmax_keep_bwd): for calls whose B·N·M scores fit
// the budget (the backend decides, docs/cpu.md), the products are batched BLAS calls over the
// whole batch (at::bmm, i.e. MKL with its own threading) and the softmax and its gradient are
// row kernels over one (B, N, M) buffer: the forward writes S into it and turns it into P in
// place, the backward reads that P (kept) instead of recomputing anything. Six products, as the
// naive path does, at full BLAS speed on large operands, without its extra N x M passes and
// buffers (scaling S, a separate softmax output, softmax_backward's output). float16/bfloat16
// inputs are converted to float32 first (O((N + M) d) copies); results are cast back.

at::Tensor in_compute_type(const at::Tensor& t) {
  const at::ScalarType ct = compute_type(t.scalar_type());
  return t.scalar_type() == ct ? t : t.to(ct);
}

// A (B, L, d) tensor laid out channels-first: its transpose (B, d, L) is contiguous.
bool channels_first(const at::Tensor& t) {
  return !t.is_contiguous() && t.transpose(1, 2).is_contiguous();
}

// out = a @ b (batched), written into `out` (any dtype and strides) directly when the dtypes
// agree; a channels-first `out` as out^T = b^T a^T, which BLAS writes in place.
void bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() != a.scalar_type()) {
    out.copy_(at::bmm(a, b));
  } else if (channels_first(out)) {
    at::Tensor out_t = out.transpose(1, 2);
    at::bmm_out(out_t, b.transpose(1, 2), a.transpose(1, 2));
  } else {
    at::bmm_out(out, a, b);
  }
}

// dg = P^T dy (P: the kept (B, N, M) probabilities, dy: (B, N, dv)) into dg, laid out like g.
// A channels-first dg of the compute type with dv >= 512 takes the product into a contiguous
// (B, M, dv) buffer first and is transposed into place by the pack kernel (ATen's vector
// transposes): at 2 threads MKL's P^T dy with a contiguous output took 2-15% less time than
// dg^T = dy^T P written in dg's layout at dv = 512-2048, more than the transpose costs; at
// dv = 256 0-13%, too little to pay for the transpose everywhere
// (benchmarks/results/dk-dv-sweep-2026-12-01.md, section 3). Any other dg: bmm_into.
// dg_via_product says which of the two dg_into does.
bool dg_via_product(const at::Tensor& dg, const at::Tensor& P) {
  return channels_first(dg) && dg.scalar_type() == P.scalar_type() && dg.size(2) >= 512;
}

// prod: the (B, M, dv) product buffer where dg_via_product, else undefined.
void dg_into(at::Tensor& dg, const at::Tensor& P, const at::Tensor& dy, at::Tensor& prod,
             const KernelTable& kt) {
  const int64_t B = dg.size(0), M = dg.size(1), dv = dg.size(2);
  if (!prod.defined()) {
    bmm_into(dg, P.transpose(1, 2), dy);
    return;
  }
  at::bmm_out(prod, P.transpose(1, 2), dy);
  TORCH_INTERNAL_ASSERT(prod.is_contiguous());
  const DType dt = to_dtype(prod, "dg");
  const char* src = static_cast<const char*>(prod.const_data_ptr());
  char* dst = static_cast<char*>(dg.mutable_data_ptr());
  const int64_t esize = prod.element_size();
  // Tasks: (batch, 64 columns of prod = 64 rows of dg^T); at least 32 K elements per task.
  constexpr int64_t kRows = 64;
  const int64_t chunks = (dv + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (kRows * M));
  at::parallel_for(0, B * chunks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, r0 = (t % chunks) * kRows, rn = std::min(kRows, dv - r0);
      // dg^T[b](r, j) = prod[b](j, r): rows r0 .. r0 + rn of the (dv, M) matrix.
      kt.pack(dt, src + (b * M * dv + r0) * esize, M * dv, 1, dv, rn, M,
              dst + (b * dv * M + r0 * M) * esize, 0, 1);
    }
  });
}

// Rows of a (B, N, M) buffer per task of the row kernels: at least 16 K elements each.
int64_t row_grain(int64_t M) { return std::max<int64_t>(1, (int64_t(1) << 14) / M); }

// A contiguous `sizes` tensor of the compute type `ct` over call arena memory (after the
// caller's call_arena.reserve): the whole-batch path's temporaries, valid until the call ends.
at::Tensor arena_tensor(at::IntArrayRef sizes, at::ScalarType ct) {
  return at::from_blob(arena_take(c10::multiply_integers(sizes), ct), sizes,
                       at::TensorOptions().dtype(ct));
}

// y, lse and P = softmax(scale * theta phi^T) (B, N, M, the compute type); P is returned as the
// kept scores when `keep`, else dropped (an empty (B, 0, 0) tensor is returned).
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_keep_fwd_cpu(const at::Tensor& theta,
                                                                    const at::Tensor& phi,
                                                                    const at::Tensor& g,
                                                                    double scale, bool keep) {
  check_cpu_inputs(theta, phi, g);
  const int64_t B = theta.size(0), N = theta.size(1), M = phi.size(1), dv = g.size(2);
  const auto opts_a = theta.options().dtype(lse_dtype(theta.scalar_type()));
  at::Tensor y = new_output({B, N, dv}, theta.options());
  at::Tensor lse = new_output({B, N}, opts_a);
  if (B == 0 || N == 0) return {y, lse, at::empty({B, keep ? N : 0, keep ? M : 0}, opts_a)};
  const KernelTable& kt = kernels();
  use_packed_path(kt);  // a bad NONLOCAL_KERNELS_CPU_GEMM or _MKL_PACK is reported here too
  mkl_pack_enabled();
  const at::Tensor gc = in_compute_type(g);
  // The scores: a new tensor when kept, else call arena memory.
  if (!keep) call_arena.reserve(arena_bytes(B * N * M, theta.scalar_type()));
  at::Tensor P = keep ? at::empty({B, N, M}, opts_a)
                      : arena_tensor({B, N, M}, compute_type(theta.scalar_type()));
  at::bmm_out(P, in_compute_type(theta), in_compute_type(phi).transpose(1, 2));
  TORCH_INTERNAL_ASSERT(P.is_contiguous() && lse.is_contiguous());
  const DType dtype = to_dtype(theta, "theta");
  at::parallel_for(0, B * N, row_grain(M), [&](int64_t r0, int64_t r1) {
    kt.softmax_rows(dtype, P.mutable_data_ptr(), M, scale, lse.mutable_data_ptr(), r0, r1);
  });
  bmm_into(y, P, gc);
  if (keep) return {y, lse, P};
  call_arena.trim(kCallArenaKeepBytes);
  return {y, lse, at::empty({B, 0, 0}, opts_a)};
}

// scores: softmax_keep_fwd's third output: its P (B, N, M) when it kept them, else (B, 0, 0)
// (then the tiled backward recomputes S).
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_keep_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
    const at::Tensor& y, const at::Tensor& lse, const at::Tensor& scores, double scale) {
  check_cpu_inputs(theta, phi, g);
  const int64_t B = theta.size(0), N = theta.size(1), M = phi.size(1);
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) == B &&
                  ((scores.size(1) == 0 && scores.size(2) == 0) ||
                   (scores.size(1) == N && scores.size(2) == M)),
              "softmax_keep_bwd: scores: expected softmax_keep_fwd's third output, (B, N, M) = (",
              B, ", ", N, ", ", M, ") or (B, 0, 0) when not kept, got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == lse_dtype(theta.scalar_type()) &&
                  scores.device() == theta.device(),
              "softmax_keep_bwd: scores: expected dtype ", lse_dtype(theta.scalar_type()),
              " on ", theta.device(), ", got ", scores.scalar_type(), " on ", scores.device());
  if (scores.numel() == 0) return backward(dy, theta, phi, g, y, lse, scale, "softmax_keep_bwd");
  TORCH_CHECK(scores.is_contiguous(),
              "softmax_keep_bwd: scores: expected a contiguous tensor (softmax_keep_fwd's "
              "output as it is), got strides ", scores.strides());
  check_softmax_bwd_inputs(dy, theta, g, y, lse, "softmax_keep_bwd");
  at::Tensor dtheta = new_output_like(theta);
  at::Tensor dphi = new_output_like(phi);
  at::Tensor dg = new_output_like(g);
  const at::Tensor thc = in_compute_type(theta), phc = in_compute_type(phi);
  const at::Tensor gc = in_compute_type(g), dyc = in_compute_type(dy);
  // D's share of the columns where g is all zero, dy . y over them (see backward_impl in
  // softmax_kernel_impl.h: ops.softmax_grads passes lse's gradient as such a column).
  const at::Tensor zero_cols = zero_columns_of(g);
  at::Tensor extra;
  if (zero_cols.any().item<bool>())
    extra = (dy.to(at::kDouble) * y.to(at::kDouble) * zero_cols.unsqueeze(1)).sum(-1).contiguous();
  // dS (dP, then scale * dS in place) and dg_into's product: call arena memory.
  const at::ScalarType ct = compute_type(theta.scalar_type());
  const int64_t dv = g.size(2);
  const bool via_product = dg_via_product(dg, scores);
  call_arena.reserve(arena_bytes(B * N * M, ct) + (via_product ? arena_bytes(B * M * dv, ct) : 0));
  at::Tensor dS = arena_tensor({B, N, M}, ct);
  at::Tensor prod = via_product ? arena_tensor({B, M, dv}, ct) : at::Tensor();
  at::bmm_out(dS, dyc, gc.transpose(1, 2));
  const KernelTable& kt = kernels();
  const DType dtype = to_dtype(theta, "theta");
  const double* extra_p = extra.defined() ? extra.const_data_ptr<double>() : nullptr;
  at::parallel_for(0, B * N, row_grain(M), [&](int64_t r0, int64_t r1) {
    kt.softmax_grad_rows(dtype, scores.const_data_ptr(), dS.mutable_data_ptr(), M, scale,
                         extra_p, r0, r1);
  });
  bmm_into(dtheta, dS, phc);
  bmm_into(dphi, dS.transpose(1, 2), thc);
  dg_into(dg, scores, dyc, prod, kt);
  call_arena.trim(kCallArenaKeepBytes);
  return {dtheta, dphi, dg};
}

}  // namespace
}  // namespace nonlocal_kernels::cpu

TORCH_LIBRARY_IMPL(nonlocal_kernels, CPU, m) {
  m.impl("softmax_fwd", &nonlocal_kernels::cpu::softmax_fwd_cpu);
  m.impl("softmax_bwd", &nonlocal_kernels::cpu::softmax_bwd_cpu);
  m.impl("softmax_keep_fwd", &nonlocal_kernels::cpu::softmax_keep_fwd_cpu);
  m.impl("softmax_keep_bwd", &nonlocal_kernels::cpu::softmax_keep_bwd_cpu);
}
