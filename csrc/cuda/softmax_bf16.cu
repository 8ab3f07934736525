// Softmax-family kernels for bfloat16 inputs (wmma m16n16k16); one translation unit per compute
// type, so the build parallelises. Also compiled by g++ against the host emulator:
// csrc/emu/softmax_emu_bf16.cpp.
#include "cuda/softmax_kernels.cuh"
#include "cuda/softmax_launch.h"

NLK_DEFINE_SOFTMAX_LAUNCHERS(bf16, BF16Policy, __nv_bfloat16)
