// The concatenation kernels' hot loops compiled for AVX2 + FMA (x86-64). This file alone is
// compiled with -mavx2 -mfma -mf16c (setup.py ISA_FLAGS, CMakeLists.txt); concat_sorted.cpp
// calls this table only when cpu::selected_isa() says the CPU has them.
#if defined(__x86_64__)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "concat_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define NLK_CONCAT_NS avx2
#define NLK_CONCAT_TABLE kConcatKernelsAVX2
#define NLK_CONCAT_LABEL "avx2"
#include "fast/concat_kernel_impl.h"
#endif
