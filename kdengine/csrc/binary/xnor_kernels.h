// Shared by the ISA files of the binary GEMM: xnor.cpp (ops, packing, the portable and POPCNT
// kernels), xnor_avx2.cpp (the AVX2 kernels), xnor_lut.cpp (the AVX2 table-lookup GEMM) and
// xnor_avx512.cpp (the AVX-512 VPOPCNTDQ kernels). The math, the bit layout and the memory
// traffic of every path are described at the top of xnor.cpp.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/parallel.h"

namespace kdengine_binary {

using u32 = uint32_t;
using u64 = uint64_t;

#define KD_AVX2 __attribute__((target("avx2,popcnt")))
#define KD_POPCNT __attribute__((target("popcnt")))
#define KD_INLINE inline __attribute__((always_inline))

constexpr int MR = 2;         // A rows per scalar micro-tile
constexpr int NR = 4;         // B rows per scalar micro-tile
constexpr int64_t MB = 64;    // A rows per task (multiple of MR)
constexpr int64_t NB = 128;   // B rows per task (multiple of NR)
constexpr int64_t KCW = 256;  // words per K block (scalar and GEMV paths; a multiple of 8)

// Runs tile(m, n, mr, nr, k0, k1) over every tm x tn micro-tile and K block [k0, k1) (in units of
// kunit), task by task: a task is MB A rows x NB B rows, all K blocks; tasks go to ATen's threads.
template <int tm, int tn, typename Tile>
void drive(int64_t M, int64_t N, int64_t kunits, int64_t kblock, const Tile& tile) {
  const int64_t nmb = (M + MB - 1) / MB;
  const int64_t nnb = (N + NB - 1) / NB;
  // Task t = (B block t / nmb, A block t % nmb): consecutive tasks of one thread share a B block.
  kdengine::parallel_for_dynamic(0, nmb * nnb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t % nmb) * MB, m1 = std::min(M, m0 + MB);
      const int64_t n0 = (t / nmb) * NB, n1 = std::min(N, n0 + NB);
      for (int64_t k0 = 0; k0 < kunits; k0 += kblock) {
        const int64_t k1 = std::min(kunits, k0 + kblock);
        for (int64_t m = m0; m < m1; m += tm) {
          const int64_t mr = std::min<int64_t>(tm, m1 - m);
          for (int64_t n = n0; n < n1; n += tn) tile(m, n, mr, std::min<int64_t>(tn, n1 - n), k0, k1);
        }
      }
    }
  });
}

// --------------------------------------------------------------------------- scalar packing rows

// bit = (x < 0): -0.0 and +0.0 are +1; NaN is reported through `nan`.
template <typename T>
inline void pack_signs_row_scalar(const T* x, int64_t K, u32* out, bool& nan) {
  const int64_t W = (K + 31) / 32;
  for (int64_t w = 0; w < W; ++w) {
    u32 word = 0;
    const int64_t e = std::min<int64_t>(32, K - 32 * w);
    for (int64_t j = 0; j < e; ++j) {
      const float v = static_cast<float>(x[32 * w + j]);  // exact sign for every float type
      nan |= (v != v);
      word |= static_cast<u32>(v < 0.0f) << j;
    }
    out[w] = word;
  }
}

template <>
inline void pack_signs_row_scalar<double>(const double* x, int64_t K, u32* out, bool& nan) {
  const int64_t W = (K + 31) / 32;
  for (int64_t w = 0; w < W; ++w) {
    u32 word = 0;
    const int64_t e = std::min<int64_t>(32, K - 32 * w);
    for (int64_t j = 0; j < e; ++j) {
      const double v = x[32 * w + j];
      nan |= (v != v);
      word |= static_cast<u32>(v < 0.0) << j;
    }
    out[w] = word;
  }
}

// bit = (s != 0)
inline void pack_bool_row_scalar(const uint8_t* s, int64_t K, u32* out) {
  const int64_t W = (K + 31) / 32;
  for (int64_t w = 0; w < W; ++w) {
    u32 word = 0;
    const int64_t e = std::min<int64_t>(32, K - 32 * w);
    for (int64_t j = 0; j < e; ++j) word |= static_cast<u32>(s[32 * w + j] != 0) << j;
    out[w] = word;
  }
}

// --------------------------------------------------------------------------- AVX2 (xnor_avx2.cpp)

// counts[m, n] = popcount(A[m] OP B[n]) over all W words, added into C (zero on entry); with
// `base`, from split_rows rows of A on, C receives base[m] - 2 count instead and it returns true.
// Requires AVX2 (the caller checks).
bool gemm_counts_avx2(const u32* A, int64_t M, const u32* B, int64_t N, int64_t W, int32_t* C,
                      bool use_and, const int32_t* base, int64_t split_rows);
void pack_signs_row_f32_avx2(const float* x, int64_t K, u32* out, bool& nan);
void pack_bool_row_avx2(const uint8_t* s, int64_t K, u32* out);

// --------------------------------------------------------------------------- AVX-512 (xnor_avx512.cpp)

// As gemm_counts_avx2; from split_rows rows of A on, C is written completely (counts, or
// base[m] - 2 count with base) and C need not be zeroed. Requires AVX-512 VPOPCNTDQ.
bool gemm_counts_avx512(const u32* A, int64_t M, const u32* B, int64_t N, int64_t W, int32_t* C,
                        bool use_and, const int32_t* base, int64_t split_rows);
void pack_signs_row_f32_avx512(const float* x, int64_t K, u32* out, bool& nan);
void pack_bool_row_avx512(const uint8_t* s, int64_t K, u32* out);

}  // namespace kdengine_binary
