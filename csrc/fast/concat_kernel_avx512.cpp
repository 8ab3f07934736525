// The concatenation kernels' hot loops compiled for AVX-512 (F, BW, VL, DQ) + FMA (x86-64). This
// file alone is compiled with those flags (setup.py ISA_FLAGS, CMakeLists.txt); concat_sorted.cpp
// calls this table only when cpu::selected_isa() says the CPU has them.
#if defined(__x86_64__)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__)
#error "concat_kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define NLK_CONCAT_NS avx512
#define NLK_CONCAT_TABLE kConcatKernelsAVX512
#define NLK_CONCAT_LABEL "avx512"
#include "fast/concat_kernel_impl.h"
#endif
