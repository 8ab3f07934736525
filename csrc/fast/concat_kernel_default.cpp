// The concatenation kernels' hot loops for any CPU (baseline instruction set).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define NLK_CONCAT_NS generic
#define NLK_CONCAT_TABLE kConcatKernelsDefault
#define NLK_CONCAT_LABEL "default"
#include "fast/concat_kernel_impl.h"
