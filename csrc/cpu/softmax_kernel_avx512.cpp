// The CPU softmax kernels compiled for AVX-512 (F, BW, VL, DQ, as ATen's own AVX512 kernels) +
// FMA (x86-64): at::vec::Vectorized is 512 bits wide, so the panel GEMM's micro-tile is 6 rows x
// 32 floats. This file alone is compiled with those flags (setup.py's ISA_FLAGS,
// CMakeLists.txt); softmax_cpu.cpp calls this table only when the CPU reports the features.
#if defined(__x86_64__)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__)
#error "softmax_kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define NLK_CAPNS avx512
#define NLK_TABLE kKernelsAVX512
#define NLK_TABLE_LABEL "avx512"
#include "cpu/softmax_kernel_impl.h"
#endif
