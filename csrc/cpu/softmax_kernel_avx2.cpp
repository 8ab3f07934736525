// The CPU softmax kernels compiled for AVX2 + FMA (x86-64). This file alone is compiled with
// -mavx2 -mfma -mf16c (setup.py and CMakeLists.txt add them for it); the rest of the extension
// keeps the baseline instruction set, and softmax_cpu.cpp calls this table only when the CPU
// reports AVX2 and FMA. (A `#pragma GCC target` instead of the flags does not build with
// GCC 13: implicitly defined destructors then fail to inline libstdc++'s always_inline ones.)
#if defined(__x86_64__)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "softmax_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define NLK_CAPNS avx2
#define NLK_TABLE kKernelsAVX2
#define NLK_TABLE_LABEL "avx2"
#include "cpu/softmax_kernel_impl.h"
#endif
