// Output thresholding of binary layers: int32 popcount counts -> packed sign bits, no float between.
//
// Math. A binary layer followed by a sign computes y[r, n] = f_n(v) with v = counts[r, n] (the exact
// integer dot product, border correction included) and f_n the float epilogue (* scale + bias, a
// folded batch norm, ...), then bit = y < 0 (bit 1 = -1, PackedSigns' convention). f_n is monotone
// in v for every channel, so the bit is one integer compare: bit = (flip[n] ? -v : v) <= t[n]
// (kdengine.ops.binary.threshold.sign_thresholds finds t and flip by bisection on the very float
// ops, so ties round exactly as the float path). Here t comes as a table (P, N) whose row r % P
// serves output row r: a conv folds its per-pixel border correction into the thresholds
// (t[p, n] = t[n] +- sub[p, n]), so the raw GEMM counts are compared as they are.
//
// Layout. counts int32 (M, N) row-major; thresholds int32 (P, N); flip uint8/bool (N,); output int32
// (M, ceil(N/32)), bit n % 32 of word n / 32, padding bits 0 -- the channel words the next binary
// conv's im2col reads (NHWC words, as Larq Compute Engine's bitpacked bconv2d output).
//
// Traffic. binary_threshold_pack reads the counts once (4 B per output) and writes 1/8 B per output.
// binary_gemm_signs never materialises the whole count matrix: it runs the XNOR GEMM
// (kdengine::binary_gemm through the dispatcher, so whatever ISA path that op picks) on blocks of
// rows small enough that their counts (<= 1 MiB) are still in L2 when the threshold pass reads
// them, then writes only the bits: the float (M, N) tensor of the unfused path (count -> float ->
// * scale + bias -> sign -> pack) never exists.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/parallel.h"

namespace {

using u32 = uint32_t;

// One output row: n channels, `neg` = -flip (0 or -1) per channel, thresholds t.
inline void threshold_row_scalar(const int32_t* c, const int32_t* neg, const int32_t* t, int64_t N,
                                 u32* out) {
  const int64_t NW = (N + 31) / 32;
  for (int64_t w = 0; w < NW; ++w) {
    u32 word = 0;
    const int64_t e = std::min<int64_t>(32, N - 32 * w);
    for (int64_t j = 0; j < e; ++j) {
      const int64_t n = 32 * w + j;
      const int32_t v = (c[n] ^ neg[n]) - neg[n];
      word |= static_cast<u32>(v <= t[n]) << j;
    }
    out[w] = word;
  }
}

#if defined(__x86_64__)
// 8 channels per compare: bit = !(v > t), movemask of the float view gives the 8 lane signs.
__attribute__((target("avx2"))) void threshold_row_avx2(const int32_t* c, const int32_t* neg,
                                                        const int32_t* t, int64_t N, u32* out) {
  const int64_t full = N / 32;
  for (int64_t w = 0; w < full; ++w) {
    u32 word = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t n = 32 * w + 8 * q;
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + n));
      const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(neg + n));
      const __m256i tv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + n));
      const __m256i sv = _mm256_sub_epi32(_mm256_xor_si256(v, m), m);
      const int gt = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(sv, tv)));
      word |= static_cast<u32>(~gt & 0xff) << (8 * q);
    }
    out[w] = word;
  }
  if (full * 32 < N) threshold_row_scalar(c + 32 * full, neg + 32 * full, t + 32 * full,
                                          N - 32 * full, out + full);
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

void threshold_row(const int32_t* c, const int32_t* neg, const int32_t* t, int64_t N, u32* out) {
#if defined(__x86_64__)
  if (has_avx2()) return threshold_row_avx2(c, neg, t, N, out);
#endif
  threshold_row_scalar(c, neg, t, N, out);
}

struct Thresholds {
  at::Tensor table;          // int32 (P, N), contiguous
  std::vector<int32_t> neg;  // -flip[n]
  int64_t P;
};

Thresholds check_thresholds(const at::Tensor& thresholds, const at::Tensor& flip, int64_t N) {
  TORCH_CHECK_VALUE(thresholds.dim() == 2 && thresholds.size(1) == N && thresholds.size(0) >= 1 &&
                        thresholds.scalar_type() == at::kInt && thresholds.device().is_cpu(),
                    "thresholds must be an int32 CPU tensor (P, N) with N = ", N, ", got ",
                    thresholds.sizes(), " ", thresholds.scalar_type());
  TORCH_CHECK_VALUE(flip.dim() == 1 && flip.size(0) == N && flip.device().is_cpu() &&
                        (flip.scalar_type() == at::kBool || flip.scalar_type() == at::kByte),
                    "flip must be a bool CPU tensor (N,) with N = ", N, ", got ", flip.sizes(), " ",
                    flip.scalar_type());
  Thresholds out{thresholds.contiguous(), std::vector<int32_t>(static_cast<size_t>(N)),
                 thresholds.size(0)};
  const at::Tensor f = flip.contiguous();
  const uint8_t* fp = reinterpret_cast<const uint8_t*>(f.data_ptr());
  for (int64_t n = 0; n < N; ++n) out.neg[n] = fp[n] ? -1 : 0;
  return out;
}

// Rows [0, rows) of `c` are output rows [r0, r0 + rows).
void threshold_rows(const int32_t* c, int64_t r0, int64_t rows, int64_t N, const Thresholds& th,
                    u32* out) {
  const int64_t NW = (N + 31) / 32;
  const int32_t* table = th.table.data_ptr<int32_t>();
  kdengine::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)),
                         [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      threshold_row(c + r * N, th.neg.data(), table + ((r0 + r) % th.P) * N, N, out + (r0 + r) * NW);
  });
}

at::Tensor binary_threshold_pack(const at::Tensor& counts_in, const at::Tensor& thresholds,
                                 const at::Tensor& flip) {
  TORCH_CHECK_VALUE(counts_in.dim() == 2 && counts_in.scalar_type() == at::kInt &&
                        counts_in.device().is_cpu(),
                    "counts must be a 2-D int32 CPU tensor (M, N), got ", counts_in.sizes(), " ",
                    counts_in.scalar_type());
  const at::Tensor counts = counts_in.contiguous();
  const int64_t M = counts.size(0), N = counts.size(1);
  TORCH_CHECK_VALUE(N >= 1, "counts must have N >= 1 channels");
  const Thresholds th = check_thresholds(thresholds, flip, N);
  at::Tensor out = at::empty({M, (N + 31) / 32}, counts.options());
  threshold_rows(counts.data_ptr<int32_t>(), 0, M, N, th, reinterpret_cast<u32*>(out.data_ptr<int32_t>()));
  return out;
}

// The XNOR GEMM of a (M, W) and b (N, W) words, K = k, thresholded block by block into bits.
at::Tensor binary_gemm_signs(const at::Tensor& a, const at::Tensor& b, int64_t k,
                             const at::Tensor& thresholds, const at::Tensor& flip) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.device().is_cpu() && b.device().is_cpu(),
                    "a and b must be 2-D CPU tensors of packed words");
  static auto gemm = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("kdengine::binary_gemm", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  const int64_t M = a.size(0), N = b.size(0);
  TORCH_CHECK_VALUE(N >= 1, "b must have N >= 1 rows");
  const Thresholds th = check_thresholds(thresholds, flip, N);
  at::Tensor out = at::empty({M, (N + 31) / 32}, a.options().dtype(at::kInt));
  u32* op = reinterpret_cast<u32*>(out.data_ptr<int32_t>());
  // rows per block: counts of <= 1 MiB (L2), at least 64 rows so the GEMM keeps its fast paths
  const int64_t rb = std::max<int64_t>(64, ((int64_t{1} << 18) / N) & ~int64_t{63});
  const at::Tensor ac = a.contiguous();
  for (int64_t r0 = 0; r0 < M; r0 += rb) {
    const int64_t rows = std::min(rb, M - r0);
    const at::Tensor c = gemm.call(ac.narrow(0, r0, rows), b, k, 0);
    threshold_rows(c.data_ptr<int32_t>(), r0, rows, N, th, op);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("binary_threshold_pack", &binary_threshold_pack);
  m.impl("binary_gemm_signs", &binary_gemm_signs);
}
