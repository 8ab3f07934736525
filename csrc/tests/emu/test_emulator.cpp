// Tests of the host CUDA emulator (csrc/emu/cuda_emu.h), no torch: plain executable run by ctest.
// Correct kernels must give the right answer under every run order; planted bugs must be caught,
// either as a wrong result under some run order or as an emulator error naming file and line.
#include "emu/cuda_emu.h"
#include "tests/expect.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace nvcuda;

static const char* kOrders[] = {"forward", "reverse", "random:1", "random:2"};

// Runs fn; returns the emulator's error message ("" when it ran without error).
static std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const cuda_emu::Error& e) {
    return e.what();
  }
  return "";
}

static bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// --- kernels ------------------------------------------------------------------------------------

// Block sum: shared-memory tree down to one warp, then warp shuffles. BUG=1 drops a barrier.
template <int BUG>
__global__ void block_sum(const float* x, int n, float* out) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + t; i < n; i += blockDim.x * gridDim.x) v += x[i];
  buf[t] = v;
  if (BUG != 1) __syncthreads();
  for (int s = blockDim.x / 2; s >= 32; s /= 2) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t < 32) {
    v = buf[t];
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (t == 0) out[blockIdx.x] = v;
  }
}

// Some threads skip the barrier (return early).
__global__ void skip_barrier(float* out) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  if (t >= 100) return;
  buf[t] = float(t);
  __syncthreads();
  out[t] = buf[(t + 1) % 100];
}

// Two halves of the block wait at different barriers.
__global__ void different_barriers(float* out) {
  const int t = threadIdx.x;
  if (t < 64) {
    __syncthreads();
    out[t] = 1.f;
  } else {
    __syncthreads();
    out[t] = 2.f;
  }
}

// Full-mask shuffle executed by half of the warp only.
__global__ void divergent_shuffle(float* out, int then_barrier) {
  const int t = threadIdx.x;
  float v = float(t);
  if (t % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  if (then_barrier) __syncthreads();
  out[t] = v;
}

// Full-mask shuffle at two different call sites (if/else).
__global__ void two_site_shuffle(float* out) {
  const int t = threadIdx.x;
  float v = float(t);
  if (t % 2 == 0) v = __shfl_xor_sync(0xffffffffu, v, 2);
  else v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[t] = v;
}

// Correct use of a half-warp mask, shuffles with width, ballot, down/up/idx.
__global__ void warp_ops(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int a = lane;
  if (lane < 16) a = __shfl_xor_sync(0x0000ffffu, lane, 3);  // lanes 0..15 only
  const int b = __shfl_down_sync(0xffffffffu, lane, 5, 8);      // segments of 8
  const int c = __shfl_up_sync(0xffffffffu, lane, 1);
  const int d = __shfl_sync(0xffffffffu, lane * 10, 7, 16);     // lane 7 of each half
  const unsigned e = __ballot_sync(0xffffffffu, lane % 3 == 0);
  out[t * 5 + 0] = a;
  out[t * 5 + 1] = b;
  out[t * 5 + 2] = c;
  out[t * 5 + 3] = d;
  out[t * 5 + 4] = int(e);
}

__global__ void shuffle_partial_warp(int* out) {  // blockDim 48: the second warp has 16 lanes
  const int t = threadIdx.x;
  int v = t;
  for (int o = 8; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[t] = v;
}

__global__ void shuffle_reads_missing_lane(int* out) {
  const int lane = threadIdx.x % 32;
  out[threadIdx.x] = __shfl_sync(0x0000ffffu | (lane >= 16 ? 0xffff0000u : 0u),
                                 lane, lane < 16 ? 20 : 3);  // lane 20 is not in 0x0000ffff
}

// C = A B with A (n x k), B (k x m) row-major, 16x16 output tiles per block through shared memory.
// BUG=1 drops the barrier before the tiles are overwritten.
template <int BUG>
__global__ void tiled_matmul(const float* A, const float* B, float* C, int n, int k, int m) {
  __shared__ float As[16][16];
  __shared__ float Bs[16][16];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * 16 + ty, col = blockIdx.x * 16 + tx;
  float acc = 0.f;
  for (int k0 = 0; k0 < k; k0 += 16) {
    As[ty][tx] = (row < n && k0 + tx < k) ? A[row * k + k0 + tx] : 0.f;
    Bs[ty][tx] = (k0 + ty < k && col < m) ? B[(k0 + ty) * m + col] : 0.f;
    __syncthreads();
    for (int kk = 0; kk < 16; ++kk) acc += As[ty][kk] * Bs[kk][tx];
    if (BUG != 1) __syncthreads();
  }
  if (row < n && col < m) C[row * m + col] = acc;
}

template <class T> T cvt(float v);
template <> float cvt<float>(float v) { return v; }
template <> __half cvt<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T> struct WmmaShape { static constexpr int K = 16; using Prec = T; };
template <> struct WmmaShape<float> { static constexpr int K = 8; using Prec = wmma::precision::tf32; };

// C = A B with wmma: one warp per 16x16 output tile, operands staged (zero-padded) in dynamic
// shared memory, so any n, k, m work. B is read as col_major when B_COL (B given as m x k).
// LAYOUT_BUG=1 writes the accumulator assuming element i of lane l sits at row l/2, col ...;
// SYNC_BUG=1 reads the stored tile without __syncwarp().
template <class T, bool B_COL, int LAYOUT_BUG, int SYNC_BUG>
__global__ void wmma_matmul(const float* A, const float* B, float* C, int n, int k, int m,
                            int misalign) {
  constexpr int K = WmmaShape<T>::K;
  using Prec = typename WmmaShape<T>::Prec;
  EMU_DYNAMIC_SMEM(unsigned char, smem);
  T* As = reinterpret_cast<T*>(smem);                       // 16 x 24 (ld 24)
  T* Bs = As + 16 * 24;                                     // 16 x 24
  float* Cs = reinterpret_cast<float*>(Bs + 16 * 24);       // 16 x 20 (ld 20)
  const int lane = threadIdx.x;
  const int row0 = blockIdx.y * 16, col0 = blockIdx.x * 16;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int k0 = 0; k0 < k; k0 += K) {
    for (int e = lane; e < 16 * K; e += 32) {
      const int r = e / K, c = e % K;
      As[r * 24 + c] = cvt<T>(row0 + r < n && k0 + c < k ? A[(row0 + r) * k + k0 + c] : 0.f);
      if (B_COL)  // Bs holds B^T tile: (m rows) x (K cols)
        Bs[(e / K) * 24 + e % K] = cvt<T>(col0 + r < m && k0 + c < k ? B[(col0 + r) * k + k0 + c] : 0.f);
      else {
        const int br = e / 16, bc = e % 16;  // K rows x 16 cols
        Bs[br * 24 + bc] = cvt<T>(k0 + br < k && col0 + bc < m ? B[(k0 + br) * m + col0 + bc] : 0.f);
      }
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, K, Prec, wmma::row_major> a;
    wmma::load_matrix_sync(a, As + misalign, 24);
    using BL = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_b, 16, 16, K, Prec, BL> b;
    wmma::load_matrix_sync(b, Bs, 24);
    if constexpr (std::is_same<T, float>::value) {
      for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
      for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
    }
    wmma::mma_sync(acc, a, b, acc);
    __syncwarp();
  }
  if (LAYOUT_BUG) {
    for (int i = 0; i < acc.num_elements; ++i) Cs[(lane / 2) * 20 + (lane % 2) * 8 + i] = acc.x[i];
  } else {
    wmma::store_matrix_sync(Cs, acc, 20, wmma::mem_row_major);
  }
  if (!SYNC_BUG) __syncwarp();
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    if (row0 + r < n && col0 + c < m) C[(row0 + r) * m + col0 + c] = Cs[r * 20 + c];
  }
}

__global__ void read_dynamic_smem(float* out) {
  EMU_DYNAMIC_SMEM(float, s);
  out[threadIdx.x] = s[threadIdx.x];  // never written: poisoned
  __syncthreads();
  s[threadIdx.x] = 1.f;
}

__global__ void record_order(int* log, int* pos) {
  log[(*pos)++] = int(threadIdx.x);
  __syncthreads();
  log[(*pos)++] = int(threadIdx.x);
}

__global__ void wmma_bad_ldm(float* out) {
  EMU_DYNAMIC_SMEM(__half, s);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, s, 20);  // 40 bytes: not a multiple of 16
  out[0] = 0.f;
}

__global__ void wmma_divergent_pointer(float* out) {
  EMU_DYNAMIC_SMEM(__half, s);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, s + (threadIdx.x == 3 ? 16 * 24 : 0), 24);
  out[0] = 0.f;
}

// --- tests --------------------------------------------------------------------------------------

static std::vector<float> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

static void test_block_reduction(std::mt19937& rng) {
  const int n = 1000, blocks = 3;
  auto x = randn(n, rng);
  double want = 0;
  for (float v : x) want += v;
  int wrong_with_bug = 0;
  for (const char* order : kOrders) {
    cuda_emu::set_run_order(order);
    for (int bug = 0; bug < 2; ++bug) {
      std::vector<float> part(blocks, NAN);
      if (bug) emu_launch(block_sum<1>, dim3(blocks), dim3(256), 0, nullptr, x.data(), n, part.data());
      else emu_launch(block_sum<0>, dim3(blocks), dim3(256), 0, nullptr, x.data(), n, part.data());
      double got = 0;
      for (float v : part) got += v;
      const bool ok = std::fabs(got - want) < 1e-3;
      if (bug) wrong_with_bug += !ok;
      else EXPECT(ok, "block reduction (%s): got %f, want %f", order, got, want);
    }
  }
  EXPECT(wrong_with_bug > 0, "a missing barrier in the block reduction went unnoticed under every order");
}

static void test_tiled_matmul(std::mt19937& rng) {
  const int n = 37, k = 29, m = 23;
  auto A = randn(n * k, rng), B = randn(k * m, rng);
  std::vector<double> want(n * m, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j)
      for (int p = 0; p < k; ++p) want[i * m + j] += double(A[i * k + p]) * B[p * m + j];
  int wrong_with_bug = 0;
  for (const char* order : kOrders) {
    cuda_emu::set_run_order(order);
    for (int bug = 0; bug < 2; ++bug) {
      std::vector<float> C(n * m, NAN);
      dim3 grid((m + 15) / 16, (n + 15) / 16), block(16, 16);
      if (bug) emu_launch(tiled_matmul<1>, grid, block, 0, nullptr, A.data(), B.data(), C.data(), n, k, m);
      else emu_launch(tiled_matmul<0>, grid, block, 0, nullptr, A.data(), B.data(), C.data(), n, k, m);
      double err = 0;
      for (int i = 0; i < n * m; ++i) err = std::isnan(C[i]) ? INFINITY : std::fmax(err, std::fabs(C[i] - want[i]));
      if (bug) wrong_with_bug += err > 1e-3;
      else EXPECT(err < 1e-3, "tiled matmul (%s): max error %g", order, err);
    }
  }
  EXPECT(wrong_with_bug > 0, "a missing barrier in the tiled matmul went unnoticed under every order");
}

template <class T, bool B_COL>
static double wmma_error(const char* order, int n, int k, int m, int layout_bug, int sync_bug,
                         std::mt19937& rng, double* scale) {
  cuda_emu::set_run_order(order);
  auto A = randn(n * k, rng), B = randn(k * m, rng);
  // Reference on the operands rounded to T (tf32 for float), accumulated in double.
  auto rnd = [](float v) -> double {
    if (std::is_same<T, float>::value) return wmma::__float_to_tf32(v);
    return wmma::emu::to_float(cvt<T>(v));
  };
  std::vector<float> C(n * m, NAN);
  dim3 grid((m + 15) / 16, (n + 15) / 16);
  const size_t smem = 2 * 16 * 24 * sizeof(T) + 16 * 20 * sizeof(float);
  if (layout_bug) emu_launch(wmma_matmul<T, B_COL, 1, 0>, grid, dim3(32), smem, nullptr, A.data(), B.data(), C.data(), n, k, m, 0);
  else if (sync_bug) emu_launch(wmma_matmul<T, B_COL, 0, 1>, grid, dim3(32), smem, nullptr, A.data(), B.data(), C.data(), n, k, m, 0);
  else emu_launch(wmma_matmul<T, B_COL, 0, 0>, grid, dim3(32), smem, nullptr, A.data(), B.data(), C.data(), n, k, m, 0);
  double err = 0;
  *scale = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) {
      double want = 0;
      for (int p = 0; p < k; ++p)
        want += rnd(A[i * k + p]) * rnd(B_COL ? B[j * k + p] : B[p * m + j]);
      const double got = C[i * m + j];
      err = std::isnan(got) ? INFINITY : std::fmax(err, std::fabs(got - want));
      *scale = std::fmax(*scale, std::fabs(want));
    }
  return err;
}

template <class T, bool B_COL>
static void test_wmma(const char* name, std::mt19937& rng) {
  double scale;
  for (const char* order : kOrders) {
    const double err = wmma_error<T, B_COL>(order, 37, 45, 21, 0, 0, rng, &scale);
    EXPECT(err <= 1e-5 * scale, "wmma matmul %s (%s): max error %g (scale %g)", name, order, err, scale);
  }
  const double lay = wmma_error<T, B_COL>("forward", 16, 16, 16, 1, 0, rng, &scale);
  EXPECT(lay > 1e-2 * scale, "wmma %s: a kernel assuming a fragment layout gave the right answer", name);
  int wrong = 0;
  for (const char* order : kOrders) wrong += wmma_error<T, B_COL>(order, 16, 16, 16, 0, 1, rng, &scale) > 1e-2 * scale;
  EXPECT(wrong > 0, "wmma %s: reading a stored tile without __syncwarp() went unnoticed", name);
}

static void test_wmma_checks() {
  std::vector<float> A(16 * 16, 1.f), B(16 * 16, 1.f), C(16 * 16);
  const size_t smem = 2 * 16 * 24 * sizeof(__half) + 16 * 20 * sizeof(float);
  std::string e = error_of([&] {
    emu_launch(wmma_matmul<__half, false, 0, 0>, dim3(1), dim3(32), smem, nullptr, A.data(), B.data(), C.data(), 16, 16, 16, 4);
  });
  EXPECT(contains(e, "not 32-byte") && contains(e, "test_emulator.cpp:"), "misaligned wmma pointer: got '%s'", e.c_str());
  e = error_of([&] { emu_launch(wmma_bad_ldm, dim3(1), dim3(32), 4096, nullptr, C.data()); });
  EXPECT(contains(e, "ldm 20") && contains(e, "multiple of 16 bytes"), "bad ldm: got '%s'", e.c_str());
  e = error_of([&] { emu_launch(wmma_divergent_pointer, dim3(1), dim3(32), 4096, nullptr, C.data()); });
  EXPECT(contains(e, "warp-uniform"), "divergent wmma pointer: got '%s'", e.c_str());
  e = error_of([&] {
    emu_launch(wmma_matmul<__half, false, 0, 0>, dim3(1), dim3(48), smem, nullptr, A.data(), B.data(), C.data(), 16, 16, 16, 0);
  });
  EXPECT(contains(e, "full warp"), "wmma in a partial warp: got '%s'", e.c_str());
}

static void test_barrier_errors() {
  std::vector<float> out(128);
  for (const char* order : kOrders) {
    cuda_emu::set_run_order(order);
    std::string e = error_of([&] { emu_launch(skip_barrier, dim3(2), dim3(128), 0, nullptr, out.data()); });
    EXPECT(contains(e, "exited while") && contains(e, "__syncthreads() at test_emulator.cpp:"),
           "barrier skipped by some threads (%s): got '%s'", order, e.c_str());
    e = error_of([&] { emu_launch(different_barriers, dim3(1), dim3(128), 0, nullptr, out.data()); });
    EXPECT(contains(e, "different barriers"), "different barriers (%s): got '%s'", order, e.c_str());
    for (int then_barrier = 0; then_barrier < 2; ++then_barrier) {
      e = error_of([&] { emu_launch(divergent_shuffle, dim3(1), dim3(64), 0, nullptr, out.data(), then_barrier); });
      EXPECT(contains(e, "__shfl_xor_sync at test_emulator.cpp:") && contains(e, "(mask 0xffffffff)") &&
                 (contains(e, "exited without joining") || contains(e, "waits at __syncthreads()")),
             "divergent full-mask shuffle (%s, barrier %d): got '%s'", order, then_barrier, e.c_str());
    }
    e = error_of([&] { emu_launch(two_site_shuffle, dim3(1), dim3(32), 0, nullptr, out.data()); });
    EXPECT(contains(e, "deadlock") && contains(e, "__shfl_xor_sync"), "shuffle at two sites (%s): got '%s'", order, e.c_str());
  }
  std::vector<int> iout(64);
  std::string e = error_of([&] { emu_launch(shuffle_reads_missing_lane, dim3(1), dim3(32), 0, nullptr, iout.data()); });
  EXPECT(contains(e, "reads lane 20"), "shuffle from a lane outside the mask: got '%s'", e.c_str());
  e = error_of([&] { emu_launch(skip_barrier, dim3(1), dim3(2000), 0, nullptr, out.data()); });
  EXPECT(contains(e, "invalid block size"), "oversized block: got '%s'", e.c_str());
  e = error_of([&] { emu_launch(skip_barrier, dim3(1, 70000), dim3(32), 0, nullptr, out.data()); });
  EXPECT(contains(e, "invalid grid"), "grid.y > 65535: got '%s'", e.c_str());
  cuda_emu::set_run_order("forward");
  e = error_of([&] { cuda_emu::set_run_order("sideways"); });
  EXPECT(contains(e, "run order"), "bad run order: got '%s'", e.c_str());
}

static void test_warp_ops() {
  for (const char* order : kOrders) {
    cuda_emu::set_run_order(order);
    std::vector<int> out(64 * 5, -1);
    emu_launch(warp_ops, dim3(1), dim3(64), 0, nullptr, out.data());
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) ballot |= (l % 3 == 0) << l;
    for (int t = 0; t < 64; ++t) {
      const int l = t % 32;
      const int* o = &out[t * 5];
      EXPECT(o[0] == (l < 16 ? l ^ 3 : l), "half-warp xor (%s) lane %d: %d", order, l, o[0]);
      EXPECT(o[1] == (l % 8 + 5 < 8 ? l + 5 : l), "shfl_down width 8 (%s) lane %d: %d", order, l, o[1]);
      EXPECT(o[2] == (l >= 1 ? l - 1 : l), "shfl_up (%s) lane %d: %d", order, l, o[2]);
      EXPECT(o[3] == ((l / 16) * 16 + 7) * 10, "shfl width 16 (%s) lane %d: %d", order, l, o[3]);
      EXPECT(unsigned(o[4]) == ballot, "ballot (%s) lane %d: %x", order, l, o[4]);
    }
    std::vector<int> p(48);
    emu_launch(shuffle_partial_warp, dim3(1), dim3(48), 0, nullptr, p.data());
    for (int t = 0; t < 48; ++t) {
      int want = 0;
      for (int j = 0; j < 16; ++j) want += (t & ~15) + j;
      EXPECT(p[t] == want, "partial warp (%s) thread %d: %d, want %d", order, t, p[t], want);
    }
  }
}

static void test_dynamic_smem_and_orders() {
  std::vector<float> out(64, 0.f);
  emu_launch(read_dynamic_smem, dim3(2), dim3(64), 64 * sizeof(float), nullptr, out.data());
  EXPECT(std::isnan(out[0]) && std::isnan(out[63]), "dynamic shared memory is not poisoned per block");
  auto run = [](const char* order) {
    cuda_emu::set_run_order(order);
    std::vector<int> log(128);
    int pos = 0;
    emu_launch(record_order, dim3(1), dim3(64), 0, nullptr, log.data(), &pos);
    return log;
  };
  auto f = run("forward"), r = run("reverse"), a = run("random:1"), b = run("random:2"), a2 = run("random:1");
  EXPECT(f[0] == 0 && f[63] == 63, "forward order runs threads 0, 1, ...");
  EXPECT(r[0] == 63 && r[63] == 0, "reverse order runs threads 63, 62, ...");
  EXPECT(a != f && a != r && a != b, "random orders do not differ");
  EXPECT(a == a2, "random:1 is not reproducible");
  cuda_emu::set_run_order("forward");
}

int main() {
  std::mt19937 rng(1234);
  test_block_reduction(rng);
  test_tiled_matmul(rng);
  test_wmma<__half, false>("fp16 row-major B", rng);
  test_wmma<__half, true>("fp16 col-major B", rng);
  test_wmma<__nv_bfloat16, false>("bf16", rng);
  test_wmma<float, true>("tf32", rng);
  test_wmma_checks();
  test_barrier_errors();
  test_warp_ops();
  test_dynamic_smem_and_orders();
  return nlk_test::summary();
}
