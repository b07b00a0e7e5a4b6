// Run-time choice between the portable and the target("avx2,fma") builds of the CPU row kernels.
#pragma once

#include <cstdlib>

namespace kdengine {

// True where the CPU has AVX2 and FMA and KDENGINE_CPU_PORTABLE is unset, empty or "0". The
// variable is read per call, so tests can compare the two builds in one process.
inline bool use_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  const char* force = std::getenv("KDENGINE_CPU_PORTABLE");
  const bool portable = force != nullptr && force[0] != '\0' && force[0] != '0';
  return avx2 && !portable;
#else
  return false;
#endif
}

}  // namespace kdengine
