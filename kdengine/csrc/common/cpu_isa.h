// Run-time choice of the instruction set of every CPU kernel, in one place.
//
// The library is compiled without -march: each fast path is a function carrying
// __attribute__((target(...))), and a kernel asks cpu_isa(family) which one to call. Two families
// of kernels need different features:
//   kBinary  (the XNOR / AND popcount GEMM and bit packing): portable < POPCNT < AVX2 (+POPCNT)
//            < AVX-512 with VPOPCNTDQ (F, BW, VL, VPOPCNTDQ; Ice Lake, Sapphire Rapids, Zen 4/5)
//   kFloat   (the KD row kernels, top-k KD, the IF and LIF neurons): portable < AVX2 + FMA
//            < AVX-512 (F, BW, VL, DQ; 16 floats per vector)
// The answer is the best level this CPU has, unless
//   * a test knob forces a level for the family (force_isa, process-wide: every thread sees the
//     change at its next call; forcing a level the CPU lacks is refused, so a test never
//     silently runs another path), or
//   * KDENGINE_CPU_PORTABLE is set to anything but "" or "0" (read per call): portable code
//     everywhere, as on a CPU without any of these extensions.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace kdengine {

enum CpuIsa : int64_t { kIsaPortable = 0, kIsaPopcnt = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };
enum IsaFamily : int { kBinary = 0, kFloat = 1 };
constexpr int kIsaFamilies = 2;

// Feature-test macros for the target attributes of each family's AVX-512 functions.
#define KD_TARGET_AVX512_BINARY __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")))
#define KD_TARGET_AVX512_FLOAT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

// Whether this CPU can run `isa` for `family` (kIsaPopcnt exists only for kBinary).
inline bool cpu_has_isa(IsaFamily family, int64_t isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  switch (isa) {
    case kIsaPortable:
      return true;
    case kIsaPopcnt:
      return family == kBinary && __builtin_cpu_supports("popcnt");
    case kIsaAvx2:
      return family == kBinary ? __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")
                               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kIsaAvx512:
      return family == kBinary
                 ? avx512 && __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt")
                 : avx512 && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
                       __builtin_cpu_supports("fma");
    default:
      return false;
  }
#else
  (void)family;
  return isa == kIsaPortable;
#endif
}

// The best level of this CPU for the family (computed once).
inline int64_t best_cpu_isa(IsaFamily family) {
  static const int64_t best[kIsaFamilies] = {
      [] {
        for (int64_t i = kIsaAvx512; i > 0; --i)
          if (cpu_has_isa(kBinary, i)) return i;
        return int64_t{kIsaPortable};
      }(),
      [] {
        for (int64_t i = kIsaAvx512; i > 0; --i)
          if (cpu_has_isa(kFloat, i)) return i;
        return int64_t{kIsaPortable};
      }(),
  };
  return best[family];
}

// -1: automatic; otherwise the forced level. An inline variable: one instance in the library.
inline std::atomic<int64_t> g_forced_isa[kIsaFamilies] = {{-1}, {-1}};

inline bool portable_forced_by_env() {
  const char* force = std::getenv("KDENGINE_CPU_PORTABLE");
  return force != nullptr && force[0] != '\0' && force[0] != '0';
}

// The level a kernel of `family` runs now (see the top of this file).
inline int64_t cpu_isa(IsaFamily family) {
  const int64_t forced = g_forced_isa[family].load(std::memory_order_relaxed);
  if (forced >= 0) return forced;
  return portable_forced_by_env() ? int64_t{kIsaPortable} : best_cpu_isa(family);
}

inline const char* isa_name(IsaFamily family, int64_t isa) {
  switch (isa) {
    case kIsaPortable:
      return "portable";
    case kIsaPopcnt:
      return "popcnt";
    case kIsaAvx2:
      return family == kBinary ? "avx2" : "avx2-fma";
    case kIsaAvx512:
      return family == kBinary ? "avx512-vpopcntdq" : "avx512";
    default:
      return "?";
  }
}

// Why `isa` cannot be forced for `family` ("" when it can): an unknown level, or one this CPU
// lacks. The op that exposes force_isa turns a non-empty answer into a ValueError.
inline std::string force_isa_error(IsaFamily family, int64_t isa) {
  if (isa < -1 || isa > kIsaAvx512)
    return "isa must be -1 (auto), 0 (portable), 1 (popcnt), 2 (avx2) or 3 (avx512), got " +
           std::to_string(isa);
  if (isa >= 0 && !cpu_has_isa(family, isa)) {
    const char* fam = family == kBinary ? "binary" : "float (kd_loss, topk_kd, if_multistep, lif_multistep)";
    return std::string("isa ") + std::to_string(isa) + " (" + isa_name(family, isa) +
           ") is not available for the " + fam + " kernels on this CPU";
  }
  return "";
}

// Forces `isa` (checked with force_isa_error first) for every later call of the family's kernels
// (-1: back to automatic); returns the previous setting.
inline int64_t force_isa(IsaFamily family, int64_t isa) { return g_forced_isa[family].exchange(isa); }

// The kernels of the float family written before AVX-512: AVX2+FMA at level >= 2.
inline bool use_avx2_fma() { return cpu_isa(kFloat) >= kIsaAvx2; }

}  // namespace kdengine
