// Which per-ISA kernel build a CPU kernel runs: NONLOCAL_KERNELS_CPU_ISA (avx512 | avx2 | default,
// read at every call; unset: the best the CPU supports) and the CPU's features (docs/cpu.md,
// "Knobs"): AVX-512 when the CPU has AVX-512 F/BW/VL/DQ
// and AVX2, FMA, F16C; else AVX2 when it has AVX2, FMA and F16C; else the portable build. A bad
// value, or a build the CPU cannot run, raises an error naming the variable.
//
// Used by the softmax kernels (csrc/cpu/softmax_cpu.cpp) and the concatenation kernels
// (csrc/fast/concat_sorted.cpp).
#pragma once

namespace nonlocal_kernels::cpu {

enum class Isa { kDefault, kAVX2, kAVX512 };

// Compiled for the baseline instruction set (cpu_isa.cpp): safe to call on any CPU.
Isa selected_isa();

}  // namespace nonlocal_kernels::cpu
