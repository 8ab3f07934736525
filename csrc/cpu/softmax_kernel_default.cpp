// The CPU softmax kernels for any CPU: portable at::vec::Vectorized (CPU_CAPABILITY=DEFAULT).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define NLK_CAPNS generic
#define NLK_TABLE kKernelsDefault
#define NLK_TABLE_LABEL "default"
#include "cpu/softmax_kernel_impl.h"
