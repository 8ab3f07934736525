// Softmax-family kernels (docs/design.md section 4): y = softmax_rows(scale * theta phi^T) g, with
// lse, and a FlashAttention-2 style backward that does not read lse: it recomputes each row's
// max m and sum l in one pass over the scores, then rebuilds P = exp(scale * S - m) / l from
// them tile by tile. Tensor cores through nvcuda::wmma (fp16/bf16 m16n16k16, tf32 m16n16k8), or
// an exact fp32 FMA path; fp32 accumulation everywhere; int64 offsets; any strides; any N, M,
// dk, dv (ragged tiles are zero-padded in shared memory, key columns >= M masked).
//
// Block: 128 threads = 4 warps; a block owns a tile of 64 rows, each warp 16 of them, and a
// chunk of OC output columns (grid.y); the other dimension streams in tiles of 64. dk and dv
// stream through shared memory in chunks of KC, so they are unbounded; outputs wider than OC
// are split over grid.y and each such block recomputes the scores (the cost of wide outputs: the
// score work repeats ceil(width / OC) times).
//
// Numerics: scores and softmax in natural-log units with fmaf (P = exp(fma(S, scale, -m))), so
// lse carries one rounding. The forward normalises a row by the sum of the P values (rounded to
// the operand type) that the P g product uses; the backward rebuilds P from the recomputed m and
// l (see BwdWorkspace), not from lse.
//
// Kernels never assume a fragment layout: at start each block loads a 16x16 tile holding
// 0..255 into an accumulator fragment, which tells every lane the (row, col) of each of its
// elements; element-wise work (online-softmax rescale, dS = P * (dP - D), the epilogue) then
// reads those maps. Cross-lane work (row max / sum) goes through shared memory.
//
// Backward, deterministic (no atomics): prep computes D = rowsum(dy * y); stats recomputes each
// row's max m and sum l (see BwdWorkspace: more accurate than P = exp(S - lse) for peaked rows);
// dkv owns a key tile and loops over query tiles (dg += P^T dy, or dphi += dS^T theta); dq owns a
// query tile and loops over key tiles (dtheta += dS phi).
#pragma once

#include "cuda_common.cuh"

namespace NLK_KERNELS_NS {

using namespace nvcuda;

constexpr unsigned kFull = 0xffffffffu;

// --- warp-level 16x16 tile products -------------------------------------------------------------

// Tensor cores: In is the shared-memory operand type, Prec the wmma operand precision.
template <class In_, class Prec, int K>
struct WmmaPolicy {
  using In = In_;
  static constexpr int KSTEP = K;
  static constexpr bool kTf32 = std::is_same<Prec, wmma::precision::tf32>::value;
  static constexpr bool kChunkSums = false;  // see SimtF32Policy
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, K, float>;
  template <class L>
  using A = wmma::fragment<wmma::matrix_a, 16, 16, K, Prec, L>;
  template <class L>
  using B = wmma::fragment<wmma::matrix_b, 16, 16, K, Prec, L>;

  __device__ static void zero(Acc& c) { wmma::fill_fragment(c, 0.f); }
  template <class Frag>
  __device__ static void round_tf32(Frag& f) {
    if constexpr (kTf32) {
      for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
    }
  }
  template <class L>
  __device__ static void load_a(A<L>& f, const In* p, int ld) {
    wmma::load_matrix_sync(f, p, ld);
    round_tf32(f);
  }
  template <class L>
  __device__ static void load_b(B<L>& f, const In* p, int ld) {
    wmma::load_matrix_sync(f, p, ld);
    round_tf32(f);
  }
  template <class LA, class LB>
  __device__ static void mma(Acc& c, const A<LA>& a, const B<LB>& b) {
    wmma::mma_sync(c, a, b, c);
  }
  __device__ static void store(float* p, const Acc& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
  __device__ static void load_acc(Acc& c, const float* p, int ld) {
    wmma::load_matrix_sync(c, p, ld, wmma::mem_row_major);
  }
};

// Exact fp32: the same interface on CUDA cores. A "fragment" of an operand is its shared-memory
// address; lane l owns rows l/16 + 2i, column l%16 of the 16x16 accumulator.
struct SimtF32Policy {
  using In = float;
  static constexpr int KSTEP = 16;
  // Long dot products (dk up to thousands) are summed per KC chunk, then chunk sums are added:
  // error ~ (KC + d / KC) eps instead of d eps, as accurate as PyTorch's blocked fp32 GEMM.
  static constexpr bool kChunkSums = true;
  struct Acc {
    static constexpr int num_elements = 8;
    float x[8];
  };
  template <class L>
  struct Op {
    const float* p;
    int ld;
  };
  template <class L>
  using A = Op<L>;
  template <class L>
  using B = Op<L>;

  template <class L>
  __device__ static float at(const Op<L>& o, int r, int c) {
    return std::is_same<L, wmma::row_major>::value ? o.p[r * o.ld + c] : o.p[c * o.ld + r];
  }
  __device__ static void zero(Acc& c) {
    for (int i = 0; i < 8; ++i) c.x[i] = 0.f;
  }
  template <class L>
  __device__ static void load_a(Op<L>& f, const float* p, int ld) {
    f.p = p;
    f.ld = ld;
  }
  template <class L>
  __device__ static void load_b(Op<L>& f, const float* p, int ld) {
    f.p = p;
    f.ld = ld;
  }
  template <class LA, class LB>
  __device__ static void mma(Acc& c, const Op<LA>& a, const Op<LB>& b) {
    const int lane = threadIdx.x & 31, col = lane & 15, r0 = lane >> 4;
    for (int i = 0; i < 8; ++i) {
      const int r = r0 + 2 * i;
      float s = c.x[i];
      for (int k = 0; k < KSTEP; ++k) s = fmaf(at(a, r, k), at(b, k, col), s);
      c.x[i] = s;
    }
  }
  __device__ static void store(float* p, const Acc& c, int ld) {
    const int lane = threadIdx.x & 31, col = lane & 15, r0 = lane >> 4;
    for (int i = 0; i < 8; ++i) p[(r0 + 2 * i) * ld + col] = c.x[i];
  }
  __device__ static void load_acc(Acc& c, const float* p, int ld) {
    const int lane = threadIdx.x & 31, col = lane & 15, r0 = lane >> 4;
    for (int i = 0; i < 8; ++i) c.x[i] = p[(r0 + 2 * i) * ld + col];
  }
};

using F16Policy = WmmaPolicy<__half, __half, 16>;
using BF16Policy = WmmaPolicy<__nv_bfloat16, __nv_bfloat16, 16>;
using TF32Policy = WmmaPolicy<float, wmma::precision::tf32, 8>;

// --- tile configuration and shared-memory plan --------------------------------------------------

constexpr size_t round128(size_t n) { return (n + 127) / 128 * 128; }
constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

template <class P>
struct Cfg {
  using In = typename P::In;
  static constexpr int THREADS = 128, WARPS = 4;
  static constexpr int BM = 64;  // rows owned by a block (16 per warp)
  static constexpr int BN = 64;  // rows of the streamed dimension per step
  static constexpr int PAD = 16 / int(sizeof(In));           // 16 bytes: aligned rows, fewer bank conflicts
  static constexpr int KC = sizeof(In) == 2 ? 64 : 32;       // dk / dv chunk of the score products
  static constexpr int OC = sizeof(In) == 2 ? 128 : 64;      // output columns per block
  static constexpr int LDK = KC + PAD;                       // chunk tiles (64 x KC)
  static constexpr int LDO = OC + PAD;                       // output-chunk operand tiles (64 x OC)
  static constexpr int LDS = BN + 4;                         // fp32 score tiles (64 x 64)
  static constexpr int LDP = BN + PAD;                       // In probability tiles (64 x 64)
  // Shared memory: one region reused by the phases (two chunk tiles, or one output-chunk tile),
  // an fp32 score tile, an In tile, and per-row vectors.
  static constexpr size_t U_BYTES =
      round128(cmax(2 * 64 * LDK * sizeof(In), 64 * LDO * sizeof(In)));
  static constexpr size_t S_BYTES = round128(64 * LDS * sizeof(float));
  static constexpr size_t P_BYTES = round128(64 * LDP * sizeof(In));
  static constexpr size_t V_BYTES = round128(4 * 64 * sizeof(float));
  static constexpr size_t SMEM = U_BYTES + S_BYTES + P_BYTES + V_BYTES;
  static_assert(OC % 16 == 0 && KC % P::KSTEP == 0 && BN % P::KSTEP == 0, "tile sizes");
  static_assert(SMEM <= 96 * 1024, "shared memory plan too large");
};

// The block's dynamic shared memory (Cfg::SMEM bytes), by region.
template <class P>
struct Smem {
  using C = Cfg<P>;
  using In = typename P::In;
  unsigned char* base;
  __device__ Smem() {
    EMU_DYNAMIC_SMEM(unsigned char, smem);
    base = smem;
  }
  __device__ In* u0() const { return reinterpret_cast<In*>(base); }
  __device__ In* u1() const { return reinterpret_cast<In*>(base) + 64 * C::LDK; }
  __device__ float* s() const { return reinterpret_cast<float*>(base + C::U_BYTES); }
  __device__ In* p() const { return reinterpret_cast<In*>(base + C::U_BYTES + C::S_BYTES); }
  __device__ float* v(int i) const {
    return reinterpret_cast<float*>(base + C::U_BYTES + C::S_BYTES + C::P_BYTES) + 64 * i;
  }
};

// (row, col) inside the 16x16 tile of each accumulator element of this lane.
template <class P>
struct FragMap {
  unsigned char rc[P::Acc::num_elements];
  __device__ int row(int i) const { return rc[i] >> 4; }
  __device__ int col(int i) const { return rc[i] & 15; }
};

// Discover the accumulator layout: load a tile holding 0..255 (scratch: 16x16 floats).
template <class P>
__device__ FragMap<P> discover_layout(float* scratch) {
  for (int e = threadIdx.x; e < 256; e += Cfg<P>::THREADS) scratch[e] = float(e);
  __syncthreads();
  typename P::Acc t;
  P::load_acc(t, scratch, 16);
  FragMap<P> map;
  for (int i = 0; i < P::Acc::num_elements; ++i) map.rc[i] = static_cast<unsigned char>(t.x[i]);
  __syncthreads();
  return map;
}

// One batch element of a strided (B, rows, cols) tensor of the params struct (T const for the
// inputs): element (r, c) at ptr[r * s[1] + c * s[2]]. The strides stay in the params and are
// read where used, as kernel parameters (copies held in registers cost the kernels up to 15
// registers a thread).
template <class T>
struct Mat {
  T* ptr;
  const int64_t* s;  // batch, row, column
  __device__ Mat(T* p, const int64_t* strides) : ptr(p), s(strides) {}
  // Batch element b of tensor t.
  template <class V>
  __device__ Mat(V* t, const int64_t* strides, int64_t b)
      : ptr(static_cast<T*>(t) + b * strides[0]), s(strides) {}
  // The part from row r0 and column c0 on.
  __device__ Mat at(int64_t r0, int64_t c0) const { return Mat(ptr + r0 * s[1] + c0 * s[2], s); }
  __device__ T& operator()(int64_t r, int64_t c) const { return ptr[r * s[1] + c * s[2]]; }
};

// Copy a ROWS x COLS tile of a strided global matrix into shared memory (leading dimension ld),
// converting to In; rows >= rv or columns >= cv are zero. Threads walk the dimension with unit
// stride in memory, so channels-first views load coalesced too; where that dimension has unit
// stride, the base is 16-byte aligned and the other stride a multiple of 16 bytes, each thread
// moves 16 bytes at a time (vectors that cross rv / cv fall back to element loads).
template <int ROWS, int COLS, int THREADS, bool ROWS_FAST, class In, class T>
__device__ void load_tile_vec(In* dst, int ld, const T* src, int64_t other, int rv, int cv) {
  constexpr int V = 16 / int(sizeof(T));
  constexpr int FAST = ROWS_FAST ? ROWS : COLS;
  static_assert(FAST % V == 0, "tile edge must hold whole 16-byte vectors");
  for (int e = threadIdx.x; e < ROWS * COLS / V; e += THREADS) {
    const int slow = e / (FAST / V), f0 = (e % (FAST / V)) * V;
    const int r0 = ROWS_FAST ? f0 : slow, c0 = ROWS_FAST ? slow : f0;
    const int fast_valid = ROWS_FAST ? rv : cv;
    const bool slow_ok = ROWS_FAST ? c0 < cv : r0 < rv;
    const T* p = src + slow * other + f0;
    T v[V];
    if (slow_ok && f0 + V <= fast_valid) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      memcpy(static_cast<void*>(v), &raw, 16);
    } else {
      for (int k = 0; k < V; ++k) v[k] = slow_ok && f0 + k < fast_valid ? p[k] : from_float<T>(0.f);
    }
    for (int k = 0; k < V; ++k) {
      const int r = ROWS_FAST ? r0 + k : r0, c = ROWS_FAST ? c0 : c0 + k;
      dst[r * ld + c] = from_float<In>(to_float(v[k]));
    }
  }
}

template <int ROWS, int COLS, int THREADS, class In, class T>
__device__ void load_tile(In* dst, int ld, const Mat<const T>& m, int rv, int cv) {
  const T* src = m.ptr;
  const int64_t sr = m.s[1], sc = m.s[2];
  constexpr int V = 16 / int(sizeof(T));
  const bool rows_fast = sr == 1 && sc != 1;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (rows_fast && aligned && sc % V == 0) {
    load_tile_vec<ROWS, COLS, THREADS, true>(dst, ld, src, sc, rv, cv);
    return;
  }
  if (!rows_fast && sc == 1 && aligned && sr % V == 0) {
    load_tile_vec<ROWS, COLS, THREADS, false>(dst, ld, src, sr, rv, cv);
    return;
  }
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int r = rows_fast ? e % ROWS : e / COLS;
    const int c = rows_fast ? e / ROWS : e % COLS;
    float v = 0.f;
    if (r < rv && c < cv) v = to_float(src[r * sr + c * sc]);
    dst[r * ld + c] = from_float<In>(v);
  }
}

template <class T>
__device__ __forceinline__ int imin(T a, T b) {
  return static_cast<int>(a < b ? a : b);
}

// acc[j] (16 x 16, j < nj) += A (this warp's 16 rows, K = kdim) * B, both in shared memory.
template <class P, class LA, class LB, int NJ>
__device__ void warp_gemm(typename P::Acc (&acc)[NJ], int nj, const typename P::In* a, int lda,
                          const typename P::In* b, int ldb, int kdim) {
  constexpr bool a_row = std::is_same<LA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LB, wmma::row_major>::value;
  for (int kk = 0; kk < kdim; kk += P::KSTEP) {
    typename P::template A<LA> fa;
    P::load_a(fa, a_row ? a + kk : a + kk * lda, lda);
    for (int j = 0; j < NJ; ++j) {
      if (j >= nj) break;
      typename P::template B<LB> fb;
      P::load_b(fb, b_row ? b + kk * ldb + j * 16 : b + j * 16 * ldb + kk, ldb);
      P::mma(acc[j], fa, fb);
    }
  }
}

// Scores of a 64 x 64 tile for this warp's 16 rows: s[j] = X_rows Y_j^T over the full feature
// dimension d, X and Y streamed in chunks of KC through the shared region (u0: X, u1: Y).
template <class P, class T>
__device__ void tile_scores(typename P::Acc (&s)[4], const Smem<P>& sm, const Mat<const T>& x,
                            int xrows, const Mat<const T>& y, int yrows, int64_t d) {
  using C = Cfg<P>;
  const int warp = threadIdx.x / 32;
  for (int j = 0; j < 4; ++j) P::zero(s[j]);
  const int nj = (yrows + 15) / 16;
  for (int64_t k0 = 0; k0 < d; k0 += C::KC) {
    const int kc = imin<int64_t>(C::KC, d - k0);
    __syncthreads();  // everyone is done with the shared region
    load_tile<64, C::KC, C::THREADS>(sm.u0(), C::LDK, x.at(0, k0), xrows, kc);
    load_tile<64, C::KC, C::THREADS>(sm.u1(), C::LDK, y.at(0, k0), yrows, kc);
    __syncthreads();
    if constexpr (P::kChunkSums) {
      typename P::Acc part[4];
      for (int j = 0; j < 4; ++j) P::zero(part[j]);
      warp_gemm<P, wmma::row_major, wmma::col_major>(part, nj, sm.u0() + warp * 16 * C::LDK,
                                                     C::LDK, sm.u1(), C::LDK, kc);
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < P::Acc::num_elements; ++i) s[j].x[i] += part[j].x[i];
    } else {
      warp_gemm<P, wmma::row_major, wmma::col_major>(s, nj, sm.u0() + warp * 16 * C::LDK, C::LDK,
                                                     sm.u1(), C::LDK, kc);
    }
  }
}

// --- what the tile kernels share ----------------------------------------------------------------

// What a block of the tile kernels starts from: its shared memory, this thread's warp and lane,
// and the tile it owns of a batch element's n rows (query rows, or key rows for dkv). grid.x
// walks the `tiles` tiles of `size` rows of batch element 0, then those of batch element 1, ...:
// b is the block's batch element, row0 its tile's first row, rows the tile's rows below n (fewer
// in the last tile). theta, phi and g are batch element b of the inputs.
template <class P, class T>
struct Block {
  Smem<P> sm;
  int warp, lane;
  int64_t b, row0;
  int rows;
  Mat<const T> theta, phi, g;
  __device__ Block(const NonlocalSoftmaxParams& p, int tiles, int64_t n, int size)
      : warp(threadIdx.x / 32), lane(threadIdx.x % 32), b(blockIdx.x / tiles),
        row0(int64_t(blockIdx.x % tiles) * size), rows(imin<int64_t>(size, n - row0)),
        theta(p.theta, p.theta_stride, b), phi(p.phi, p.phi_stride, b), g(p.g, p.g_stride, b) {}
};

// tile_scores (this warp's 16 rows) stored to the fp32 tile sm.s(), where the warp's lanes read
// each other's elements.
template <class P, class T>
__device__ void scores_to_smem(const Smem<P>& sm, const Mat<const T>& x, int xrows,
                               const Mat<const T>& y, int yrows, int64_t d) {
  using C = Cfg<P>;
  const int warp = threadIdx.x / 32;
  typename P::Acc s[4];
  tile_scores<P, T>(s, sm, x, xrows, y, yrows, d);
  for (int j = 0; j < 4; ++j) P::store(sm.s() + warp * 16 * C::LDS + j * 16, s[j], C::LDS);
  __syncwarp();
}

// The output columns a block writes: chunk `chunk` of OC columns (grid.y, or a part of it)
// starts at column c0 and has oc columns below width, in nj 16-column tiles.
template <class P>
struct OutChunk {
  int64_t c0;
  int oc, nj;
  __device__ OutChunk(int64_t chunk, int64_t width)
      : c0(chunk * Cfg<P>::OC), oc(imin<int64_t>(Cfg<P>::OC, width - c0)), nj((oc + 15) / 16) {}
};

// This warp's float32 accumulators of an output chunk (frag[j]: its 16 rows, the chunk's columns
// 16j to 16j + 15), zero at first. Kept apart from OutChunk: the fp32 path indexes frag
// dynamically, which keeps the whole object in local memory (c0, oc and nj with it, were they
// members).
template <class P>
struct ChunkAcc {
  using C = Cfg<P>;
  using Acc = typename P::Acc;
  Acc frag[C::OC / 16];

  __device__ ChunkAcc() {
    for (int j = 0; j < C::OC / 16; ++j) P::zero(frag[j]);
  }

  // Row r (of the block's 64) times f[r].
  __device__ void scale_rows(const OutChunk<P>& ch, const FragMap<P>& map, const float* f) {
    const int warp = threadIdx.x / 32;
    for (int j = 0; j < C::OC / 16; ++j) {
      if (j >= ch.nj) break;
      for (int i = 0; i < Acc::num_elements; ++i) frag[j].x[i] *= f[warp * 16 + map.row(i)];
    }
  }

  // Adds this warp's 16 rows of the In tile sm.p() (64 x n) times rows 0..n-1 of src in the
  // chunk's columns, which are staged through the shared region. The first barrier: every warp
  // is done with the shared region (score or dP chunks) and has written its rows of sm.p().
  template <class T>
  __device__ void add_product(const OutChunk<P>& ch, const Smem<P>& sm, const Mat<const T>& src,
                              int n) {
    const int warp = threadIdx.x / 32;
    __syncthreads();
    load_tile<64, C::OC, C::THREADS>(sm.u0(), C::LDO, src.at(0, ch.c0), n, ch.oc);
    __syncthreads();
    warp_gemm<P, wmma::row_major, wmma::row_major>(frag, ch.nj, sm.p() + warp * 16 * C::LDP,
                                                   C::LDP, sm.u0(), C::LDO, n);
  }

  // out(r, c0 + c) = value(accumulator, r) for this warp's elements in rows r < rows and columns
  // c < oc; out starts at the block's first row.
  template <class T, class F>
  __device__ void store(const OutChunk<P>& ch, const FragMap<P>& map, int rows, const Mat<T>& out,
                        F value) const {
    const int warp = threadIdx.x / 32;
    const Mat<T> o = out.at(0, ch.c0);
    for (int j = 0; j < C::OC / 16; ++j) {
      if (j >= ch.nj) break;
      for (int i = 0; i < Acc::num_elements; ++i) {
        const int r = warp * 16 + map.row(i), c = j * 16 + map.col(i);
        if (r < rows && c < ch.oc) o(r, c) = from_float<T>(value(frag[j].x[i], r));
      }
    }
  }
};

// --- forward ------------------------------------------------------------------------------------

// grid: (row tiles * B, output chunks of dv). Writes y[:, rows, chunk] and (chunk 0) lse.
template <class P, class T>
__global__ void __launch_bounds__(128) softmax_fwd_kernel(NonlocalSoftmaxParams p, int row_tiles) {
  using C = Cfg<P>;
  using In = typename P::In;
  const Block<P, T> blk(p, row_tiles, p.N, C::BM);  // a tile of query rows
  const Mat<const T> theta = blk.theta.at(blk.row0, 0);
  float* m_s = blk.sm.v(0);
  float* l_s = blk.sm.v(1);
  float* alpha_s = blk.sm.v(2);
  float* lr_s = blk.sm.v(3);  // sum of the P values as rounded for the P g product
  float* S = blk.sm.s();
  In* Pt = blk.sm.p();

  const FragMap<P> map = discover_layout<P>(S);
  for (int r = threadIdx.x; r < C::BM; r += C::THREADS) {
    m_s[r] = -INFINITY;
    l_s[r] = 0.f;
    lr_s[r] = 0.f;
  }
  const OutChunk<P> ch(blockIdx.y, p.dv);  // a chunk of y's columns
  ChunkAcc<P> acc;

  for (int64_t key0 = 0; key0 < p.M; key0 += C::BN) {
    const int keys = imin<int64_t>(C::BN, p.M - key0);
    scores_to_smem<P, T>(blk.sm, theta, blk.rows, blk.phi.at(key0, 0), keys, p.dk);
    {  // Online softmax of this warp's rows: two lanes per row, 32 columns each.
      const int r = blk.warp * 16 + blk.lane / 2, h = blk.lane & 1;
      const float* srow = S + r * C::LDS + h * 32;
      float mx = -INFINITY;
      for (int c = 0; c < 32; ++c)
        if (h * 32 + c < keys) mx = fmaxf(mx, srow[c] * p.scale);
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      In* prow = Pt + r * C::LDP + h * 32;
      float sum = 0.f, sum_r = 0.f;
      for (int c = 0; c < 32; ++c) {
        const float pv = h * 32 + c < keys ? expf(fmaf(srow[c], p.scale, -m_new)) : 0.f;
        const In pr = from_float<In>(pv);
        sum += pv;
        sum_r += to_float(pr);
        prow[c] = pr;
      }
      sum += __shfl_xor_sync(kFull, sum, 1);
      sum_r += __shfl_xor_sync(kFull, sum_r, 1);
      // Both lanes of the pair have read m_s[r] (m_old); a shuffle orders no memory, so the
      // barrier does, before lane 0 overwrites it (without it, compute-sanitizer racecheck
      // reports this pair).
      __syncwarp();
      if (h == 0) {
        const float alpha = expf(m_old - m_new);
        alpha_s[r] = alpha;
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
        lr_s[r] = lr_s[r] * alpha + sum_r;
      }
    }
    __syncwarp();
    acc.scale_rows(ch, map, alpha_s);
    acc.add_product(ch, blk.sm, blk.g.at(key0, 0), keys);
  }

  acc.store(ch, map, blk.rows, Mat<T>(p.y, p.y_stride, blk.b).at(blk.row0, 0),
            [lr_s](float a, int r) { return a / lr_s[r]; });
  if (blockIdx.y == 0) {
    float* lse = static_cast<float*>(p.lse) + blk.b * p.lse_stride[0] + blk.row0 * p.lse_stride[1];
    for (int r = threadIdx.x; r < blk.rows; r += C::THREADS)
      lse[r * p.lse_stride[1]] = m_s[r] + logf(l_s[r]);
  }
}

// --- backward -----------------------------------------------------------------------------------

// The backward's workspace (float32): D = rowsum(dy * y), then the row max m of scale * S and
// 1 / l, l = sum_j exp(scale * S_ij - m), each B x N contiguous. P is recomputed as
// exp(fma(S, scale, -m)) / l rather than exp(scale * S - lse): lse rounded to fp32 is off by up
// to half an ulp (4e-6 at lse ~ 100), which would be the relative error of every P of a peaked
// row; m and l keep P (and so the gradients) as accurate as PyTorch's softmax. It costs one pass
// of scores (softmax_bwd_stats_kernel).
struct BwdWorkspace {
  float* D;
  float* m;
  float* inv_l;
  __device__ BwdWorkspace(const NonlocalSoftmaxParams& p)
      : D(static_cast<float*>(p.workspace)), m(D + p.B * p.N), inv_l(m + p.B * p.N) {}
};

// m, 1 / l and D (BwdWorkspace) of a tile of 64 query rows, in shared memory.
template <class P>
struct RowStats {
  float* m;
  float* D;
  float* inv_l;
  __device__ explicit RowStats(const Smem<P>& sm) : m(sm.v(0)), D(sm.v(1)), inv_l(sm.v(2)) {}
  // Those of rows q0.. of batch element b, zero past `rows`. Each thread fills some entries: a
  // barrier must come before they are read.
  __device__ void load(const NonlocalSoftmaxParams& p, int64_t b, int64_t q0, int rows) const {
    const BwdWorkspace ws(p);
    const int64_t o = b * p.N + q0;
    for (int r = threadIdx.x; r < Cfg<P>::BM; r += Cfg<P>::THREADS) {
      m[r] = r < rows ? ws.m[o + r] : 0.f;
      inv_l[r] = r < rows ? ws.inv_l[o + r] : 0.f;
      D[r] = r < rows ? ws.D[o + r] : 0.f;
    }
  }
};

// dS = P * (dP - D) of this warp's 16 rows, rounded to In into the tile sm.p(): P from the fp32
// tile sm.s(), dP in tile_scores' accumulators dp, D by row, or by column for dS^T (D_BY_COL).
template <bool D_BY_COL, class P>
__device__ void store_ds(const Smem<P>& sm, const FragMap<P>& map, const typename P::Acc (&dp)[4],
                         const float* D) {
  using C = Cfg<P>;
  const int warp = threadIdx.x / 32;
  const float* S = sm.s();
  typename P::In* dS = sm.p();
  for (int j = 0; j < 4; ++j) {
    for (int i = 0; i < P::Acc::num_elements; ++i) {
      const int r = warp * 16 + map.row(i), c = j * 16 + map.col(i);
      dS[r * C::LDP + c] =
          from_float<typename P::In>(S[r * C::LDS + c] * (dp[j].x[i] - D[D_BY_COL ? c : r]));
    }
  }
}

// D[b, i] = sum_c dy[b, i, c] * y[b, i, c]: one warp per row.
template <class T>
__global__ void __launch_bounds__(128) softmax_bwd_prep_kernel(NonlocalSoftmaxParams p) {
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.N) return;  // whole warps leave together
  const int64_t b = row / p.N, i = row % p.N;
  const T* dy = static_cast<const T*>(p.dy) + b * p.dy_stride[0] + i * p.dy_stride[1];
  const T* y = static_cast<const T*>(p.y) + b * p.y_stride[0] + i * p.y_stride[1];
  float s = 0.f;
  for (int64_t c = lane; c < p.dv; c += 32)
    s += to_float(dy[c * p.dy_stride[2]]) * to_float(y[c * p.y_stride[2]]);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(kFull, s, o);
  if (lane == 0) BwdWorkspace(p).D[row] = s;
}

// m and 1 / l of every row (see BwdWorkspace). grid: query tiles * B.
template <class P, class T>
__global__ void __launch_bounds__(128) softmax_bwd_stats_kernel(NonlocalSoftmaxParams p, int row_tiles) {
  using C = Cfg<P>;
  const Block<P, T> blk(p, row_tiles, p.N, C::BM);  // a tile of query rows
  const Mat<const T> theta = blk.theta.at(blk.row0, 0);
  const float* S = blk.sm.s();
  // Two lanes per row keep (m, l) of their 32 columns in registers; merged at the end.
  const int r = blk.warp * 16 + blk.lane / 2, h = blk.lane & 1;
  float m = -INFINITY, l = 0.f;
  for (int64_t key0 = 0; key0 < p.M; key0 += C::BN) {
    const int keys = imin<int64_t>(C::BN, p.M - key0);
    scores_to_smem<P, T>(blk.sm, theta, blk.rows, blk.phi.at(key0, 0), keys, p.dk);
    const float* srow = S + r * C::LDS + h * 32;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c)
      if (h * 32 + c < keys) mx = fmaxf(mx, srow[c] * p.scale);
    const float m_new = fmaxf(m, mx);
    float sum = 0.f;
    for (int c = 0; c < 32; ++c)
      if (h * 32 + c < keys) sum += expf(fmaf(srow[c], p.scale, -m_new));
    l = (m_new == -INFINITY ? 0.f : l * expf(m - m_new)) + sum;
    m = m_new;
  }
  const float m_other = __shfl_xor_sync(kFull, m, 1);
  const float l_other = __shfl_xor_sync(kFull, l, 1);
  const float m_row = fmaxf(m, m_other);
  const float l_row = l * expf(m - m_row) + l_other * expf(m_other - m_row);
  if (h == 0 && r < blk.rows) {
    BwdWorkspace ws(p);
    ws.m[blk.b * p.N + blk.row0 + r] = m_row;
    ws.inv_l[blk.b * p.N + blk.row0 + r] = 1.f / l_row;
  }
}

// dtheta. grid: (query tiles * B, chunks of dk). Per key tile: P = exp(scale * S - m) / l,
// dP = dy g^T, dS = P * (dP - D), dtheta_chunk += scale * dS phi_chunk.
template <class P, class T>
__global__ void __launch_bounds__(128) softmax_bwd_dq_kernel(NonlocalSoftmaxParams p, int row_tiles) {
  using C = Cfg<P>;
  const Block<P, T> blk(p, row_tiles, p.N, C::BM);  // a tile of query rows
  const Mat<const T> theta = blk.theta.at(blk.row0, 0);
  const Mat<const T> dy = Mat<const T>(p.dy, p.dy_stride, blk.b).at(blk.row0, 0);
  const RowStats<P> st(blk.sm);
  float* S = blk.sm.s();

  const FragMap<P> map = discover_layout<P>(S);
  st.load(p, blk.b, blk.row0, blk.rows);
  __syncthreads();  // (tile_scores' first barrier would do for dk >= 1)
  const OutChunk<P> ch(blockIdx.y, p.dk);  // a chunk of dtheta's columns
  ChunkAcc<P> acc;

  for (int64_t key0 = 0; key0 < p.M; key0 += C::BN) {
    const int keys = imin<int64_t>(C::BN, p.M - key0);
    scores_to_smem<P, T>(blk.sm, theta, blk.rows, blk.phi.at(key0, 0), keys, p.dk);
    {  // P = exp(scale S - m) / l in place (fp32), this warp's rows, two lanes per row.
      const int r = blk.warp * 16 + blk.lane / 2, h = blk.lane & 1;
      float* srow = S + r * C::LDS + h * 32;
      for (int c = 0; c < 32; ++c)
        srow[c] = h * 32 + c < keys ? expf(fmaf(srow[c], p.scale, -st.m[r])) * st.inv_l[r] : 0.f;
    }
    // dP = dy g^T over dv, then dS.
    typename P::Acc dp[4];
    tile_scores<P, T>(dp, blk.sm, dy, blk.rows, blk.g.at(key0, 0), keys, p.dv);
    store_ds<false>(blk.sm, map, dp, st.D);
    acc.add_product(ch, blk.sm, blk.phi.at(key0, 0), keys);
  }

  const float scale = p.scale;
  acc.store(ch, map, blk.rows, Mat<T>(p.dtheta, p.dtheta_stride, blk.b).at(blk.row0, 0),
            [scale](float a, int) { return a * scale; });
}

// dg and dphi. grid: (key tiles * B, dv chunks of dg + dk chunks of dphi). A block owns 64 keys
// and loops over query tiles: P^T = exp(scale * S^T - m) / l (m, l of each query row);
// dg_chunk += P^T dy_chunk, or dP^T = g dy^T, dS^T = P^T * (dP^T - D),
// dphi_chunk += scale * dS^T theta_chunk.
template <class P, class T>
__global__ void __launch_bounds__(128) softmax_bwd_dkv_kernel(NonlocalSoftmaxParams p, int key_tiles,
                                                              int dg_chunks) {
  using C = Cfg<P>;
  using In = typename P::In;
  const Block<P, T> blk(p, key_tiles, p.M, C::BN);  // a tile of key rows
  const int64_t key0 = blk.row0;
  const int keys = blk.rows;
  const Mat<const T> phi = blk.phi.at(key0, 0), g = blk.g.at(key0, 0);
  const Mat<const T> dy(p.dy, p.dy_stride, blk.b);
  const bool is_dg = int(blockIdx.y) < dg_chunks;
  const RowStats<P> st(blk.sm);
  float* St = blk.sm.s();  // P^T (keys x queries), fp32
  In* Op = blk.sm.p();     // P^T or dS^T as an operand

  const FragMap<P> map = discover_layout<P>(St);
  // A chunk of dg's or of dphi's columns.
  const OutChunk<P> ch(is_dg ? blockIdx.y : blockIdx.y - dg_chunks, is_dg ? p.dv : p.dk);
  ChunkAcc<P> acc;

  for (int64_t q0 = 0; q0 < p.N; q0 += C::BM) {
    const int rows = imin<int64_t>(C::BM, p.N - q0);
    // No barrier needed before overwriting the row vectors: every read of them in the previous
    // tile precedes that tile's last __syncthreads().
    st.load(p, blk.b, q0, rows);
    __syncthreads();
    scores_to_smem<P, T>(blk.sm, phi, keys, blk.theta.at(q0, 0), rows, p.dk);
    {  // P^T in place, this warp's key rows, two lanes per row; queries >= rows are zero.
      const int r = blk.warp * 16 + blk.lane / 2, h = blk.lane & 1;
      float* srow = St + r * C::LDS + h * 32;
      In* orow = Op + r * C::LDP + h * 32;
      for (int c = 0; c < 32; ++c) {
        const int q = h * 32 + c;
        const float pv = q < rows ? expf(fmaf(srow[c], p.scale, -st.m[q])) * st.inv_l[q] : 0.f;
        srow[c] = pv;
        if (is_dg) orow[c] = from_float<In>(pv);
      }
    }
    if (is_dg) {
      acc.add_product(ch, blk.sm, dy.at(q0, 0), rows);
    } else {
      // dP^T = g dy^T over dv, then dS^T.
      typename P::Acc dpt[4];
      tile_scores<P, T>(dpt, blk.sm, g, keys, dy.at(q0, 0), rows, p.dv);
      store_ds<true>(blk.sm, map, dpt, st.D);
      acc.add_product(ch, blk.sm, blk.theta.at(q0, 0), rows);
    }
  }

  const Mat<T> out(is_dg ? p.dg : p.dphi, is_dg ? p.dg_stride : p.dphi_stride, blk.b);
  const float mul = is_dg ? 1.f : p.scale;
  acc.store(ch, map, keys, out.at(key0, 0), [mul](float a, int) { return a * mul; });
}

// --- launchers ----------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class P, class T>
const char* launch_softmax_fwd(const NonlocalSoftmaxParams& p, void* stream) {
  using C = Cfg<P>;
  if (p.B == 0 || p.N == 0 || p.dv == 0) return nullptr;
  if (p.M == 0) return "softmax_fwd: M == 0 (no keys to attend to)";
  const int64_t row_tiles = ceil_div(p.N, C::BM);
  const int64_t gx = row_tiles * p.B, gy = ceil_div(p.dv, C::OC);
  if (gx > 2147483647 || gy > 65535) return "softmax_fwd: problem too large for one launch";
  NLK_LAUNCH_TRY
  const char* err = nlk_allow_smem(softmax_fwd_kernel<P, T>, C::SMEM);
  if (err) return err;
  emu_launch(softmax_fwd_kernel<P, T>, dim3(unsigned(gx), unsigned(gy)), dim3(C::THREADS), C::SMEM,
             static_cast<cudaStream_t>(stream), p, int(row_tiles));
  return nlk_launch_error();
  NLK_LAUNCH_CATCH
}

template <class P, class T>
const char* launch_softmax_bwd(const NonlocalSoftmaxParams& p, void* stream) {
  using C = Cfg<P>;
  if (p.B == 0) return nullptr;
  if (p.M == 0) return "softmax_bwd: M == 0 (no keys to attend to)";
  if (p.workspace == nullptr) return "softmax_bwd: no workspace (3 * B * N float32)";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  NLK_LAUNCH_TRY
  const char* err = nullptr;
  if (p.N > 0) {
    const int64_t gx = ceil_div(p.B * p.N, 4);
    if (gx > 2147483647) return "softmax_bwd: problem too large for one launch";
    emu_launch(softmax_bwd_prep_kernel<T>, dim3(unsigned(gx)), dim3(128), 0, s, p);
    if ((err = nlk_launch_error())) return err;
    const int64_t row_tiles = ceil_div(p.N, C::BM);
    if (row_tiles * p.B > 2147483647) return "softmax_bwd: problem too large for one launch";
    if ((err = nlk_allow_smem(softmax_bwd_stats_kernel<P, T>, C::SMEM))) return err;
    emu_launch(softmax_bwd_stats_kernel<P, T>, dim3(unsigned(row_tiles * p.B)), dim3(C::THREADS),
               C::SMEM, s, p, int(row_tiles));
    if ((err = nlk_launch_error())) return err;
  }
  if (p.N > 0 && p.dk > 0) {
    const int64_t row_tiles = ceil_div(p.N, C::BM);
    const int64_t gx = row_tiles * p.B, gy = ceil_div(p.dk, C::OC);
    if (gx > 2147483647 || gy > 65535) return "softmax_bwd: problem too large for one launch";
    if ((err = nlk_allow_smem(softmax_bwd_dq_kernel<P, T>, C::SMEM))) return err;
    emu_launch(softmax_bwd_dq_kernel<P, T>, dim3(unsigned(gx), unsigned(gy)), dim3(C::THREADS),
               C::SMEM, s, p, int(row_tiles));
    if ((err = nlk_launch_error())) return err;
  }
  {
    const int64_t key_tiles = ceil_div(p.M, C::BN);
    const int64_t dg_chunks = ceil_div(p.dv, C::OC), dk_chunks = ceil_div(p.dk, C::OC);
    const int64_t gx = key_tiles * p.B, gy = dg_chunks + dk_chunks;
    if (gx > 2147483647 || gy > 65535) return "softmax_bwd: problem too large for one launch";
    if (gy > 0) {
      if ((err = nlk_allow_smem(softmax_bwd_dkv_kernel<P, T>, C::SMEM))) return err;
      emu_launch(softmax_bwd_dkv_kernel<P, T>, dim3(unsigned(gx), unsigned(gy)), dim3(C::THREADS),
                 C::SMEM, s, p, int(key_tiles), int(dg_chunks));
      if ((err = nlk_launch_error())) return err;
    }
  }
  return nullptr;
  NLK_LAUNCH_CATCH
}

}  // namespace NLK_KERNELS_NS

// One translation unit per compute type instantiates its launchers with this.
#define NLK_DEFINE_SOFTMAX_LAUNCHERS(name, Policy, T)                                    \
  namespace NLK_KERNELS_NS {                                                             \
  const char* softmax_fwd_##name(const NonlocalSoftmaxParams& p, void* stream) {         \
    return launch_softmax_fwd<Policy, T>(p, stream);                                     \
  }                                                                                      \
  const char* softmax_bwd_##name(const NonlocalSoftmaxParams& p, void* stream) {         \
    return launch_softmax_bwd<Policy, T>(p, stream);                                     \
  }                                                                                      \
  }
