// The kernel-build choice shared by the per-ISA CPU kernels (cpu_isa.h). Baseline ISA only.
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace nonlocal_kernels::cpu {

Isa selected_isa() {
  const char* v = std::getenv("NONLOCAL_KERNELS_CPU_ISA");
  const std::string isa = v == nullptr ? std::string() : std::string(v);
  TORCH_CHECK(isa.empty() || isa == "avx512" || isa == "avx2" || isa == "default",
              "NONLOCAL_KERNELS_CPU_ISA: expected 'avx512', 'avx2' or 'default', got '", isa,
              "'");
#if defined(__x86_64__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c");
  static const bool has_avx512 =
      has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if ((isa.empty() || isa == "avx512") && has_avx512) return Isa::kAVX512;
  TORCH_CHECK(isa != "avx512",
              "NONLOCAL_KERNELS_CPU_ISA=avx512: this CPU has no AVX-512 F/BW/VL/DQ");
  if (isa != "default" && has_avx2) return Isa::kAVX2;
  TORCH_CHECK(isa != "avx2", "NONLOCAL_KERNELS_CPU_ISA=avx2: this CPU has no AVX2/FMA/F16C");
#else
  TORCH_CHECK(isa.empty() || isa == "default", "NONLOCAL_KERNELS_CPU_ISA=", isa,
              ": not an x86-64 build");
#endif
  return Isa::kDefault;
}

}  // namespace nonlocal_kernels::cpu
