// The CUDA softmax kernels (csrc/cuda/softmax_*.cu) run by the host emulator without torch,
// against a float64 loop reference: forward (y, lse) and backward (dtheta, dphi, dg) for every
// compute type, ragged sizes, channels-first / padded strides, several run orders. Errors are
// held to a dtype bound relative to the largest reference value. Built by CMake twice: optimised,
// and with AddressSanitizer + UBSan (fewer cases, NONLOCAL_EMU_TEST_SMALL), which also checks
// that no kernel reads or writes outside its tensors or its shared memory (tensors here have
// exactly the allocation their strides need). Covers the 16-byte vector loads (aligned strides,
// including rows that end mid-vector) and the element loads (odd strides).
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/softmax_bf16.cu"
#include "cuda/softmax_f16.cu"
#include "cuda/softmax_f32.cu"
#include "cuda/softmax_tf32.cu"
#include "tests/expect.h"

namespace ek = nonlocal_kernels::emu_kernels;

template <class T> T cvt(float v);
template <> float cvt<float>(float v) { return v; }
template <> __half cvt<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
static double val(float v) { return v; }
static double val(__half v) { return __half2float(v); }
static double val(__nv_bfloat16 v) { return __bfloat162float(v); }

// A (B, R, C) tensor stored with exactly the allocation its strides need (so ASan sees overruns).
template <class T>
struct Tensor3 {
  int64_t B, R, C, s[3];
  std::vector<T> data;
  // padded: rows (or columns) padded by 3 elements (unaligned), or up to a multiple of 8
  // elements when pad8 (16-byte aligned rows whose valid part ends mid-vector).
  Tensor3(int64_t b, int64_t r, int64_t c, bool channels_first, bool padded, bool pad8 = false)
      : B(b), R(r), C(c) {
    auto ext = [&](int64_t n) { return pad8 ? (n + 7) / 8 * 8 : n + (padded ? 3 : 0); };
    if (channels_first) {  // (B, C, R') viewed as (B, R, C)
      s[1] = 1, s[2] = ext(r), s[0] = c * ext(r);
    } else {  // (B, R, C')
      s[2] = 1, s[1] = ext(c), s[0] = r * ext(c);
    }
    data.assign(size_t(b * s[0]), cvt<T>(NAN));
  }
  T& at(int64_t b, int64_t r, int64_t c) { return data[size_t(b * s[0] + r * s[1] + c * s[2])]; }
  double get(int64_t b, int64_t r, int64_t c) { return val(at(b, r, c)); }
};

struct Case {
  int64_t B, N, M, dk, dv;
  bool channels_first, padded;
  float scale;
  bool pad8 = false;
};

using LaunchFn = const char* (*)(const NonlocalSoftmaxParams&, void*);

template <class T>
static void run_case(const char* kind, LaunchFn fwd, LaunchFn bwd, double tol, const Case& c,
                     const char* order, std::mt19937& rng) {
  cuda_emu::set_run_order(order);
  std::normal_distribution<float> nd;
  Tensor3<T> th(c.B, c.N, c.dk, c.channels_first, c.padded, c.pad8),
      ph(c.B, c.M, c.dk, c.channels_first, c.padded, c.pad8),
      g(c.B, c.M, c.dv, c.channels_first, c.padded, c.pad8), dy(c.B, c.N, c.dv, false, c.padded, c.pad8);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t i = 0; i < c.N; ++i)
      for (int64_t k = 0; k < c.dk; ++k) th.at(b, i, k) = cvt<T>(nd(rng));
    for (int64_t j = 0; j < c.M; ++j) {
      for (int64_t k = 0; k < c.dk; ++k) ph.at(b, j, k) = cvt<T>(nd(rng));
      for (int64_t v = 0; v < c.dv; ++v) g.at(b, j, v) = cvt<T>(nd(rng));
    }
    for (int64_t i = 0; i < c.N; ++i)
      for (int64_t v = 0; v < c.dv; ++v) dy.at(b, i, v) = cvt<T>(nd(rng));
  }
  Tensor3<T> y(c.B, c.N, c.dv, false, false), dth(c.B, c.N, c.dk, true, false),
      dph(c.B, c.M, c.dk, false, true), dg(c.B, c.M, c.dv, false, false);
  std::vector<float> lse(size_t(c.B * c.N), NAN), ws(size_t(3 * c.B * c.N), NAN);

  NonlocalSoftmaxParams p{};
  p.B = c.B, p.N = c.N, p.M = c.M, p.dk = c.dk, p.dv = c.dv, p.scale = c.scale;
  p.theta = th.data.data(), p.phi = ph.data.data(), p.g = g.data.data();
  for (int i = 0; i < 3; ++i) {
    p.theta_stride[i] = th.s[i], p.phi_stride[i] = ph.s[i], p.g_stride[i] = g.s[i];
    p.y_stride[i] = y.s[i], p.dy_stride[i] = dy.s[i], p.dtheta_stride[i] = dth.s[i];
    p.dphi_stride[i] = dph.s[i], p.dg_stride[i] = dg.s[i];
  }
  p.y = y.data.data(), p.lse = lse.data();
  p.lse_stride[0] = c.N, p.lse_stride[1] = 1;
  p.dy = dy.data.data(), p.dtheta = dth.data.data(), p.dphi = dph.data.data(), p.dg = dg.data.data();
  p.workspace = ws.data();

  std::string what = std::string(kind) + " B=" + std::to_string(c.B) + " N=" + std::to_string(c.N) +
                     " M=" + std::to_string(c.M) + " dk=" + std::to_string(c.dk) + " dv=" +
                     std::to_string(c.dv) + " order " + order;
  const char* err = fwd(p, nullptr);
  if (!err) err = bwd(p, nullptr);
  EXPECT(err == nullptr, "%s: kernel error: %s", what.c_str(), err);
  if (err) return;

  // float64 reference on the inputs as stored.
  double e_y = 0, m_y = 0, e_l = 0, m_l = 0, e_t = 0, m_t = 0, e_p = 0, m_p = 0, e_g = 0, m_g = 0;
  auto acc = [](double& e, double& m, double out, double ref) {
    e = std::isnan(out) ? INFINITY : std::fmax(e, std::fabs(out - ref));
    m = std::fmax(m, std::fabs(ref));
  };
  for (int64_t b = 0; b < c.B; ++b) {
    std::vector<double> P(size_t(c.N * c.M)), dS(size_t(c.N * c.M));
    for (int64_t i = 0; i < c.N; ++i) {
      double mx = -INFINITY;
      for (int64_t j = 0; j < c.M; ++j) {
        double s = 0;
        for (int64_t k = 0; k < c.dk; ++k) s += th.get(b, i, k) * ph.get(b, j, k);
        P[i * c.M + j] = s * c.scale;
        mx = std::fmax(mx, s * c.scale);
      }
      double l = 0;
      for (int64_t j = 0; j < c.M; ++j) l += (P[i * c.M + j] = std::exp(P[i * c.M + j] - mx));
      for (int64_t j = 0; j < c.M; ++j) P[i * c.M + j] /= l;
      acc(e_l, m_l, lse[b * c.N + i], mx + std::log(l));
      double D = 0;
      for (int64_t v = 0; v < c.dv; ++v) {
        double yv = 0;
        for (int64_t j = 0; j < c.M; ++j) yv += P[i * c.M + j] * g.get(b, j, v);
        acc(e_y, m_y, y.get(b, i, v), yv);
        D += yv * dy.get(b, i, v);
      }
      for (int64_t j = 0; j < c.M; ++j) {
        double dP = 0;
        for (int64_t v = 0; v < c.dv; ++v) dP += dy.get(b, i, v) * g.get(b, j, v);
        dS[i * c.M + j] = P[i * c.M + j] * (dP - D);
      }
      for (int64_t k = 0; k < c.dk; ++k) {
        double d = 0;
        for (int64_t j = 0; j < c.M; ++j) d += dS[i * c.M + j] * ph.get(b, j, k);
        acc(e_t, m_t, dth.get(b, i, k), c.scale * d);
      }
    }
    for (int64_t j = 0; j < c.M; ++j) {
      for (int64_t k = 0; k < c.dk; ++k) {
        double d = 0;
        for (int64_t i = 0; i < c.N; ++i) d += dS[i * c.M + j] * th.get(b, i, k);
        acc(e_p, m_p, dph.get(b, j, k), c.scale * d);
      }
      for (int64_t v = 0; v < c.dv; ++v) {
        double d = 0;
        for (int64_t i = 0; i < c.N; ++i) d += P[i * c.M + j] * dy.get(b, i, v);
        acc(e_g, m_g, dg.get(b, j, v), d);
      }
    }
  }
  const double errs[5][2] = {{e_y, m_y}, {e_l, m_l}, {e_t, m_t}, {e_p, m_p}, {e_g, m_g}};
  const char* names[5] = {"y", "lse", "dtheta", "dphi", "dg"};
  for (int k = 0; k < 5; ++k)
    EXPECT(errs[k][0] <= tol * errs[k][1], "%s: %s max error %.3g > %.3g * max %.3g", what.c_str(),
           names[k], errs[k][0], tol, errs[k][1]);
}

int main() {
  std::mt19937 rng(7);
#if NONLOCAL_EMU_TEST_SMALL
  const std::vector<Case> cases = {{1, 70, 37, 19, 23, true, false, 0.5f},
                                   {1, 70, 37, 19, 23, false, false, 0.5f, true}};
  const std::vector<const char*> orders = {"random:1"};
#else
  const std::vector<Case> cases = {{2, 70, 37, 19, 23, true, false, 0.5f},
                                   {1, 33, 80, 130, 140, false, true, 0.3f},
                                   {3, 1, 5, 1, 2, false, true, 2.0f},
                                   {1, 136, 72, 40, 24, true, false, 0.5f},     // 16-byte loads
                                   {2, 70, 37, 19, 23, false, false, 0.5f, true},  // partial vectors
                                   {1, 37, 70, 130, 70, true, false, 0.5f, true}};
  const std::vector<const char*> orders = {"forward", "reverse", "random:1"};
#endif
  for (const Case& c : cases) {
    for (const char* order : orders) {
      run_case<float>("f32", ek::softmax_fwd_f32, ek::softmax_bwd_f32, 1e-5, c, order, rng);
      run_case<float>("tf32", ek::softmax_fwd_tf32, ek::softmax_bwd_tf32, 1e-2, c, order, rng);
      run_case<__half>("f16", ek::softmax_fwd_f16, ek::softmax_bwd_f16, 1e-2, c, order, rng);
      run_case<__nv_bfloat16>("bf16", ek::softmax_fwd_bf16, ek::softmax_bwd_bf16, 5e-2, c, order, rng);
    }
  }
  return nlk_test::summary();
}
