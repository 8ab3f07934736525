// Softmax-family kernels for float32 inputs on TF32 tensor cores (used when TF32 is allowed); one
// translation unit per compute type, so the build parallelises. Also compiled by g++ against the
// host emulator: csrc/emu/softmax_emu_tf32.cpp.
#include "cuda/softmax_kernels.cuh"
#include "cuda/softmax_launch.h"

NLK_DEFINE_SOFTMAX_LAUNCHERS(tf32, TF32Policy, float)
