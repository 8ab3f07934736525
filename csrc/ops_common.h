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
  p.theta = theta.const_data_ptr();
  p.phi = phi.const_data_ptr();
  p.g = g.const_data_ptr();
  set_strides3(p.theta_stride, theta);
  set_strides3(p.phi_stride, phi);
  set_strides3(p.g_stride, g);
  return p;
}

}  // namespace nonlocal_kernels
