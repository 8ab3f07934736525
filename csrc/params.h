// The one params struct shared by every softmax-family kernel (CPU, CUDA, emulated CUDA).
// Plain C: no torch headers, so .cu files that include it compile fast.
//
// Layout: theta (B, N, dk), phi (B, M, dk), g (B, M, dv), y (B, N, dv), lse (B, N).
// Every tensor is addressed through its own strides (in elements, int64), so channels-first
// views t.flatten(2).transpose(1, 2) are read in place. All offsets are int64.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct NonlocalSoftmaxParams {
  // Sizes.
  int64_t B, N, M, dk, dv;
  float scale;  // logits = scale * theta . phi

  // Forward inputs.
  const void* theta;
  const void* phi;
  const void* g;
  int64_t theta_stride[3];  // batch, row, channel
  int64_t phi_stride[3];
  int64_t g_stride[3];

  // Forward outputs / backward inputs.
  void* y;
  void* lse;  // float32, or float64 when the inputs are float64
  int64_t y_stride[3];
  int64_t lse_stride[2];

  // Backward only (null in the forward).
  const void* dy;
  void* dtheta;
  void* dphi;
  void* dg;
  int64_t dy_stride[3];
  int64_t dtheta_stride[3];
  int64_t dphi_stride[3];
  int64_t dg_stride[3];
  // CUDA backward only: 3 * B * N float32 of scratch owned by the caller (BwdWorkspace in
  // csrc/cuda/softmax_kernels.cuh). Null for the CPU kernels, which do not read it.
  void* workspace;
} NonlocalSoftmaxParams;

#ifdef __cplusplus
}  // extern "C"
#endif
