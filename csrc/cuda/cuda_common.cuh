// What every CUDA kernel source here includes. nvcc gets CUDA itself; a host compiler (g++)
// gets the emulator csrc/emu/cuda_emu.h, so the same .cu files build the test-only extension
// nonlocal_kernels._C_emu. Kernels use only what the emulator runs: no inline PTX, ldmatrix,
// cp.async or TMA; dynamic shared memory through EMU_DYNAMIC_SMEM; launches through emu_launch.
// No torch headers here (they would cost minutes per architecture under nvcc).
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

// The launch and error-check spellings the emulator provides, for nvcc.
#define EMU_DYNAMIC_SMEM(T, name)                                    \
  extern __shared__ __align__(128) unsigned char nlk_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(nlk_dynamic_smem_)

template <class... KArgs, class... Args>
inline void emu_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                       cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
}

// Kernels that need more than 48 KiB of dynamic shared memory must opt in (per device).
template <class... KArgs>
inline const char* nlk_allow_smem(void (*kernel)(KArgs...), size_t bytes) {
  if (bytes <= 48 * 1024) return nullptr;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

inline const char* nlk_launch_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#define NLK_KERNELS_NS nonlocal_kernels::cuda_kernels
#define NLK_LAUNCH_TRY {
#define NLK_LAUNCH_CATCH }

#else  // host compiler: the emulator

#include <string>

#include "emu/cuda_emu.h"

template <class... KArgs>
inline const char* nlk_allow_smem(void (*)(KArgs...), size_t) {
  return nullptr;
}
inline const char* nlk_launch_error() { return nullptr; }

#define NLK_KERNELS_NS nonlocal_kernels::emu_kernels
// An emulator error (a broken barrier, a misaligned wmma pointer, ...) becomes the launch error.
#define NLK_LAUNCH_TRY try {
#define NLK_LAUNCH_CATCH                               \
  }                                                    \
  catch (const cuda_emu::Error& e) {                   \
    static thread_local std::string nlk_emu_error;     \
    nlk_emu_error = e.what();                          \
    return nlk_emu_error.c_str();                      \
  }

#endif

namespace NLK_KERNELS_NS {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace NLK_KERNELS_NS
