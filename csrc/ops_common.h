// Torch-facing helpers shared by the kernels' registration code (.cpp only, never .cu).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>

#include "params.h"

namespace nonlocal_kernels {

// Tests set NONLOCAL_KERNELS_POISON=1: outputs start as NaN instead of uninitialised memory, so
// an element a kernel fails to write fails every check.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("NONLOCAL_KERNELS_POISON");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Like at::empty_like (same strides for dense layouts, e.g. channels-first views), poisoned the
// same way: what the fake kernels' torch.empty_like(x) promises for gradients.
inline at::Tensor new_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline at::ScalarType lse_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by every implementation of softmax_fwd / softmax_bwd (the Python layer has
// already validated user input; these guard direct calls of torch.ops.nonlocal_kernels.*).
inline void check_softmax_inputs(const at::Tensor& theta, const at::Tensor& phi,
                                 const at::Tensor& g) {
  TORCH_CHECK(theta.dim() == 3, "theta: expected (B, N, dk), got ", theta.sizes());
  TORCH_CHECK(phi.dim() == 3 && phi.size(0) == theta.size(0) && phi.size(2) == theta.size(2),
              "phi: expected (B, M, dk) = (", theta.size(0), ", M, ", theta.size(2), "), got ",
              phi.sizes());
  TORCH_CHECK(g.dim() == 3 && g.size(0) == theta.size(0) && g.size(1) == phi.size(1),
              "g: expected (B, M, dv) = (", theta.size(0), ", ", phi.size(1), ", dv), got ",
              g.sizes());
  TORCH_CHECK(phi.scalar_type() == theta.scalar_type() && g.scalar_type() == theta.scalar_type(),
              "phi, g: expected dtype ", theta.scalar_type());
  TORCH_CHECK(phi.device() == theta.device() && g.device() == theta.device(),
              "phi, g: expected device ", theta.device());
}

inline void set_strides3(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

// Points a (B, rows, cols) tensor field of the params struct and its strides at t: an input
// (read only) or an output the kernel writes.
inline void set_tensor3(const void*& ptr, int64_t* strides, const at::Tensor& t) {
  ptr = t.const_data_ptr();
  set_strides3(strides, t);
}
inline void set_tensor3(void*& ptr, int64_t* strides, const at::Tensor& t) {
  ptr = t.mutable_data_ptr();
  set_strides3(strides, t);
}

// The params struct for validated theta (B, N, dk), phi (B, M, dk), g (B, M, dv): sizes, input
// pointers and strides; every other field zero (outputs are set by the caller).
inline NonlocalSoftmaxParams softmax_params(const at::Tensor& theta, const at::Tensor& phi,
                                            const at::Tensor& g, double scale) {
  NonlocalSoftmaxParams p{};
  p.B = theta.size(0);
  p.N = theta.size(1);
  p.M = phi.size(1);
  p.dk = theta.size(2);
  p.dv = g.size(2);
  p.scale = static_cast<float>(scale);
  set_tensor3(p.theta, p.theta_stride, theta);
  set_tensor3(p.phi, p.phi_stride, phi);
  set_tensor3(p.g, p.g_stride, g);
  return p;
}

// Points p at the forward outputs y (B, N, dv) and lse (B, N).
inline void set_y_lse(NonlocalSoftmaxParams& p, const at::Tensor& y, const at::Tensor& lse) {
  p.y = const_cast<void*>(y.const_data_ptr());
  p.lse = const_cast<void*>(lse.const_data_ptr());
  set_strides3(p.y_stride, y);
  p.lse_stride[0] = lse.stride(0);
  p.lse_stride[1] = lse.stride(1);
}

// Points p at dy and at the gradients the backward writes.
inline void set_backward_tensors(NonlocalSoftmaxParams& p, const at::Tensor& dy,
                                 const at::Tensor& dtheta, const at::Tensor& dphi,
                                 const at::Tensor& dg) {
  set_tensor3(p.dy, p.dy_stride, dy);
  set_tensor3(p.dtheta, p.dtheta_stride, dtheta);
  set_tensor3(p.dphi, p.dphi_stride, dphi);
  set_tensor3(p.dg, p.dg_stride, dg);
}

// softmax_bwd's dy, y, lse against theta, phi, g (already checked by check_softmax_inputs).
inline void check_softmax_bwd_inputs(const at::Tensor& dy, const at::Tensor& theta,
                                     const at::Tensor& g, const at::Tensor& y,
                                     const at::Tensor& lse, const char* op) {
  const int64_t B = theta.size(0), N = theta.size(1), dv = g.size(2);
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == B && dy.size(1) == N && dy.size(2) == dv, op,
              ": dy: expected (B, N, dv) = (", B, ", ", N, ", ", dv, "), got ", dy.sizes());
  TORCH_CHECK(y.sizes() == dy.sizes(), op, ": y: expected ", dy.sizes(), ", got ", y.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == N, op,
              ": lse: expected (B, N) = (", B, ", ", N, "), got ", lse.sizes());
  TORCH_CHECK(dy.scalar_type() == theta.scalar_type() && y.scalar_type() == theta.scalar_type(),
              op, ": dy, y: expected dtype ", theta.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(theta.scalar_type()), op, ": lse: expected dtype ",
              lse_dtype(theta.scalar_type()), ", got ", lse.scalar_type());
  TORCH_CHECK(dy.device() == theta.device() && y.device() == theta.device() &&
                  lse.device() == theta.device(),
              op, ": dy, y, lse: expected device ", theta.device());
}

}  // namespace nonlocal_kernels
