// The CPU softmax kernels compiled for AVX2 + FMA (x86-64), whatever flags the rest of the
// extension is built with: the target pragma covers every function in this file, and the
// feature macros that ATen's vector headers and Sleef test are defined by hand, as -mavx2 -mfma
// would. softmax_cpu.cpp calls this table only when the CPU reports AVX2 and FMA.
#if defined(__x86_64__)
#if !defined(__AVX2__)
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define NLK_CAPNS avx2
#define NLK_TABLE kKernelsAVX2
#define NLK_TABLE_LABEL "avx2"
#include "cpu/softmax_kernel_impl.h"
#endif
