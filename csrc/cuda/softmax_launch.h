// Launchers of the softmax-family CUDA kernels (csrc/cuda/softmax_*.cu), one per compute type.
// Plain C++ (no CUDA or torch headers): included by the torch-facing registration code.
//
// Each takes the params struct (csrc/params.h) and a cudaStream_t passed as void*, launches the
// kernels on it and returns nullptr, or the launch error's message. The forward writes y and
// lse; the backward reads dy, y and writes dtheta, dphi, dg, using p.workspace as 3 * B * N
// float32 (D = rowsum(dy * y), and each row's softmax max and 1 / sum, recomputed: P is rebuilt
// from those rather than from the fp32-rounded lse, which keeps peaked rows accurate). Both
// compile twice: with nvcc into nonlocal_kernels._C (namespace cuda_kernels) and with g++
// against the host emulator into nonlocal_kernels._C_emu (namespace emu_kernels).
#pragma once

#include "params.h"

#define NLK_DECLARE_SOFTMAX_LAUNCHERS(name)                                         \
  const char* softmax_fwd_##name(const NonlocalSoftmaxParams& p, void* stream);    \
  const char* softmax_bwd_##name(const NonlocalSoftmaxParams& p, void* stream);

namespace nonlocal_kernels {

using SoftmaxLaunchFn = const char* (*)(const NonlocalSoftmaxParams&, void*);

// The launchers of one build (CUDA or emulated), by compute type.
struct SoftmaxKernels {
  SoftmaxLaunchFn fwd_f16, bwd_f16;    // float16 inputs, wmma m16n16k16
  SoftmaxLaunchFn fwd_bf16, bwd_bf16;  // bfloat16 inputs, wmma m16n16k16
  SoftmaxLaunchFn fwd_tf32, bwd_tf32;  // float32 inputs, wmma m16n16k8 tf32 (when TF32 is allowed)
  SoftmaxLaunchFn fwd_f32, bwd_f32;    // float32 inputs, exact fp32 FMA path
};

namespace cuda_kernels {
NLK_DECLARE_SOFTMAX_LAUNCHERS(f16)
NLK_DECLARE_SOFTMAX_LAUNCHERS(bf16)
NLK_DECLARE_SOFTMAX_LAUNCHERS(tf32)
NLK_DECLARE_SOFTMAX_LAUNCHERS(f32)
}  // namespace cuda_kernels

namespace emu_kernels {
NLK_DECLARE_SOFTMAX_LAUNCHERS(f16)
NLK_DECLARE_SOFTMAX_LAUNCHERS(bf16)
NLK_DECLARE_SOFTMAX_LAUNCHERS(tf32)
NLK_DECLARE_SOFTMAX_LAUNCHERS(f32)
// Run order of the emulator ("forward", "reverse", "random:SEED"): nullptr or the error.
const char* set_run_order(const char* order);
const char* get_run_order();
}  // namespace emu_kernels

#define NLK_SOFTMAX_KERNELS(ns)                                                    \
  ::nonlocal_kernels::SoftmaxKernels {                                             \
    &ns::softmax_fwd_f16, &ns::softmax_bwd_f16, &ns::softmax_fwd_bf16,             \
        &ns::softmax_bwd_bf16, &ns::softmax_fwd_tf32, &ns::softmax_bwd_tf32,       \
        &ns::softmax_fwd_f32, &ns::softmax_bwd_f32                                 \
  }

}  // namespace nonlocal_kernels
