// Torch-facing half of softmax_fwd / softmax_bwd for the CUDA kernels, shared by the real CUDA
// registration (csrc/cuda/softmax_cuda.cpp) and the emulated one (csrc/emu/softmax_emu.cpp):
// checks, output allocation, the params struct, the choice of compute type, launch errors.
// .cpp only (torch headers).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cuda/softmax_launch.h"
#include "ops_common.h"

namespace nonlocal_kernels {

inline SoftmaxLaunchFn pick_softmax_kernel(const SoftmaxKernels& k, at::ScalarType dtype,
                                           bool allow_tf32, bool backward, const char* op) {
  switch (dtype) {
    case at::kHalf: return backward ? k.bwd_f16 : k.fwd_f16;
    case at::kBFloat16: return backward ? k.bwd_bf16 : k.fwd_bf16;
    case at::kFloat:
      if (allow_tf32) return backward ? k.bwd_tf32 : k.fwd_tf32;
      return backward ? k.bwd_f32 : k.fwd_f32;
    default:
      TORCH_CHECK(false, op, ": theta: dtype ", dtype,
                  " is not supported by the CUDA kernels (float32, float16, bfloat16)");
  }
}

inline void set_y_lse(NonlocalSoftmaxParams& p, const at::Tensor& y, const at::Tensor& lse) {
  set_strides3(p.y_stride, y);
  p.lse_stride[0] = lse.stride(0);
  p.lse_stride[1] = lse.stride(1);
}

// stream: the cudaStream_t to launch on (nullptr for the emulator).
inline std::tuple<at::Tensor, at::Tensor> cuda_softmax_fwd(const SoftmaxKernels& kernels,
                                                           const at::Tensor& theta,
                                                           const at::Tensor& phi,
                                                           const at::Tensor& g, double scale,
                                                           void* stream, const char* op) {
  check_softmax_inputs(theta, phi, g);
  TORCH_CHECK(phi.size(1) > 0, op, ": phi: M must be at least 1, got shape ", phi.sizes());
  const SoftmaxLaunchFn fn =
      pick_softmax_kernel(kernels, theta.scalar_type(), at::globalContext().allowTF32CuBLAS(),
                          false, op);
  at::Tensor y = new_output({theta.size(0), theta.size(1), g.size(2)}, g.options());
  at::Tensor lse = new_output({theta.size(0), theta.size(1)}, theta.options().dtype(at::kFloat));
  NonlocalSoftmaxParams p = softmax_params(theta, phi, g, scale);
  p.y = y.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  set_y_lse(p, y, lse);
  const char* err = fn(p, stream);
  TORCH_CHECK(err == nullptr, op, ": kernel failed: ", err);
  return {y, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_softmax_bwd(
    const SoftmaxKernels& kernels, const at::Tensor& dy, const at::Tensor& theta,
    const at::Tensor& phi, const at::Tensor& g, const at::Tensor& y, const at::Tensor& lse,
    double scale, void* stream, const char* op) {
  check_softmax_inputs(theta, phi, g);
  TORCH_CHECK(phi.size(1) > 0, op, ": phi: M must be at least 1, got shape ", phi.sizes());
  const auto B = theta.size(0), N = theta.size(1), dv = g.size(2);
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == B && dy.size(1) == N && dy.size(2) == dv, op,
              ": dy: expected (B, N, dv) = (", B, ", ", N, ", ", dv, "), got ", dy.sizes());
  TORCH_CHECK(y.sizes() == dy.sizes(), op, ": y: expected ", dy.sizes(), ", got ", y.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == N, op,
              ": lse: expected (B, N) = (", B, ", ", N, "), got ", lse.sizes());
  TORCH_CHECK(dy.scalar_type() == theta.scalar_type() && y.scalar_type() == theta.scalar_type(),
              op, ": dy, y: expected dtype ", theta.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse: expected float32, got ",
              lse.scalar_type());
  TORCH_CHECK(dy.device() == theta.device() && y.device() == theta.device() &&
                  lse.device() == theta.device(),
              op, ": dy, y, lse: expected device ", theta.device());
  const SoftmaxLaunchFn fn =
      pick_softmax_kernel(kernels, theta.scalar_type(), at::globalContext().allowTF32CuBLAS(),
                          true, op);
  at::Tensor dtheta = new_output_like(theta);
  at::Tensor dphi = new_output_like(phi);
  at::Tensor dg = new_output_like(g);
  at::Tensor workspace = at::empty({3, B, N}, theta.options().dtype(at::kFloat));
  NonlocalSoftmaxParams p = softmax_params(theta, phi, g, scale);
  p.y = const_cast<void*>(y.const_data_ptr());
  p.lse = const_cast<void*>(lse.const_data_ptr());
  set_y_lse(p, y, lse);
  p.dy = dy.const_data_ptr();
  set_strides3(p.dy_stride, dy);
  p.dtheta = dtheta.mutable_data_ptr();
  p.dphi = dphi.mutable_data_ptr();
  p.dg = dg.mutable_data_ptr();
  set_strides3(p.dtheta_stride, dtheta);
  set_strides3(p.dphi_stride, dphi);
  set_strides3(p.dg_stride, dg);
  p.workspace = workspace.mutable_data_ptr();
  const char* err = fn(p, stream);
  TORCH_CHECK(err == nullptr, op, ": kernel failed: ", err);
  return {dtheta, dphi, dg};
}

}  // namespace nonlocal_kernels
