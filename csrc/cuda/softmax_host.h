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

// The registrations take tensors of one device type: CUDA, or CPU for the emulated kernels.
inline void check_device_type(const at::Tensor& t, at::DeviceType type, const char* name,
                              const char* op) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, ": expected a ",
              c10::DeviceTypeName(type), " tensor, got device ", t.device());
}

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
  check_softmax_bwd_inputs(dy, theta, g, y, lse, op);
  const auto B = theta.size(0), N = theta.size(1);
  const SoftmaxLaunchFn fn =
      pick_softmax_kernel(kernels, theta.scalar_type(), at::globalContext().allowTF32CuBLAS(),
                          true, op);
  at::Tensor dtheta = new_output_like(theta);
  at::Tensor dphi = new_output_like(phi);
  at::Tensor dg = new_output_like(g);
  at::Tensor workspace = at::empty({3, B, N}, theta.options().dtype(at::kFloat));
  NonlocalSoftmaxParams p = softmax_params(theta, phi, g, scale);
  set_y_lse(p, y, lse);
  set_backward_tensors(p, dy, dtheta, dphi, dg);
  p.workspace = workspace.mutable_data_ptr();
  const char* err = fn(p, stream);
  TORCH_CHECK(err == nullptr, op, ": kernel failed: ", err);
  return {dtheta, dphi, dg};
}

}  // namespace nonlocal_kernels
