// ATen's vector headers, included as a system header: they contain `#pragma unroll`, which GCC
// reports under -Wall (-Wunknown-pragmas) and `#pragma GCC diagnostic` cannot silence in GCC < 13.
// Include only after CPU_CAPABILITY / CPU_CAPABILITY_<ISA> are defined (softmax_kernel_*.cpp).
#pragma once
#pragma GCC system_header

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
