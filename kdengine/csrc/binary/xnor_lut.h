// The table-lookup binary GEMM of xnor_lut.cpp (AVX2), called by xnor.cpp's gemm_counts.
#pragma once

#include <atomic>
#include <cstdint>

namespace kdengine_binary {

// counts[m, n] = popcount(A[m] XOR B[n]) (use_and = false) or popcount(A[m] AND B[n]) over W
// words per row, for every m < M, n < N, written into C (M, N) row-major. With `base` (one int32
// per A row) C receives base[m] - 2 counts[m, n] instead. Requires AVX2 (the caller checks).
void lut_gemm_avx2(const uint32_t* A, int64_t M, const uint32_t* B, int64_t N, int64_t W,
                   int32_t* C, bool use_and, const int32_t* base);

// Smallest M and N for which gemm_counts takes this path (tests and the benchmark change them).
// Atomics, read once per call (gemm_counts' PathKnobs): a change from another thread never
// splits one call between two paths.
extern std::atomic<int64_t> kLutMinRows;
extern std::atomic<int64_t> kLutMinCols;

}  // namespace kdengine_binary
