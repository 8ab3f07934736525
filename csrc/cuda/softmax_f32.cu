// Softmax-family kernels for float32 inputs, exact fp32 FMA path (TF32 not allowed); one
// translation unit per compute type, so the build parallelises. Also compiled by g++ against the
// host emulator: csrc/emu/softmax_emu_f32.cpp.
#include "cuda/softmax_kernels.cuh"
#include "cuda/softmax_launch.h"

NLK_DEFINE_SOFTMAX_LAUNCHERS(f32, SimtF32Policy, float)
