// Binary GEMM and packing, AVX-512 kernels with VPOPCNTDQ (Ice Lake, Sapphire Rapids, Zen 4/5).
// Math and bit layout: the top of xnor.cpp. Every function carries a target attribute
// (KD_TARGET_AVX512_BINARY) and runs only where common/cpu_isa.h found those features at run time.
//
// GEMM path (M >= split rows, 16 by default): B in "vertical" panels. A panel holds PR = 32 rows
// of B, stored word-major: panel[w][i] = 64-bit word w of row 32 p + i (zero rows past N, a zero
// high half past an odd word count). One 512-bit vector is then word w of 8 consecutive B rows,
// and an A word broadcast to all lanes (vpxorq/vpandq with a {1to8} memory operand: a load, no
// shuffle) against it gives 8 outputs at once:
//     acc[r][v] += popcnt64(bcast(A[m + r][w]) OP panel[w][8 v .. 8 v + 7])
// Each lane is one output (m + r, 32 p + 8 v + lane), so no horizontal sum is ever needed: the
// tile ends with one vpmovqd + (base - 2 count) + one masked store per 8 outputs. The 6 x 4
// register tile (24 accumulators + 4 B vectors + 2 temporaries of the 32 zmm registers) needs per
// word 4 vector loads, 6 broadcast operands and 3 x 24 ALU ops (OP, vpopcntq, vpaddq) for
// 24 x 512 binary MACs: 341 MACs per clock on the two 512-bit ALU ports of Intel cores, against
// ~192 for the table-lookup kernel of xnor_lut.cpp (8 vpshufb + 8 vpaddb per 1024 MACs).
//
// Memory traffic and blocking. Packing B (a 64-bit word transpose, O(N K)) costs about one read
// and one write of B. Tasks are (PMB = 96 A rows) x (one panel), pulled by ATen's threads,
// consecutive tasks sharing a panel: a panel (32 x K / 8 bytes: 16 KiB at K = 4096) stays in L1/L2
// across the task's 16 A tiles, which stream their 6 rows (K / 8 bytes each) from L1/L2. K is not
// blocked: the u64 lane counters cannot overflow, and every output is written once, complete.
//
// GEMV path (M < split rows): transposing B would cost as much as the product, so B rows are read
// raw, 16 words per vector (the row's last partial vector with a masked load, no read past the
// row), against A rows likewise, in 4 x 4 tiles of horizontal accumulators reduced once per K block.
#include <ATen/ATen.h>

#include "binary/xnor_kernels.h"
#include "common/cpu_isa.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace kdengine_binary {
namespace {

#define KD_AVX512 KD_TARGET_AVX512_BINARY

constexpr int64_t PR = 32;   // B rows per panel: 4 vectors of 8 rows
constexpr int PTM = 6;       // A rows per tile
constexpr int64_t PMB = 96;  // A rows per task (a multiple of PTM)

// Panel p of B (rows x W u32 words) into out (W64 x PR u64, 64-byte aligned).
void pack_panel_v(const u32* B, int64_t N, int64_t W, int64_t p, u64* out) {
  const int64_t W64 = (W + 1) / 2;
  for (int64_t i = 0; i < PR; ++i) {
    const int64_t n = p * PR + i;
    if (n >= N) {
      for (int64_t w = 0; w < W64; ++w) out[w * PR + i] = 0;
      continue;
    }
    const u32* row = B + n * W;
    for (int64_t w = 0; w < W / 2; ++w) {
      u64 v;
      std::memcpy(&v, row + 2 * w, sizeof(v));
      out[w * PR + i] = v;
    }
    if (W % 2) out[(W64 - 1) * PR + i] = row[W - 1];
  }
}

// One 64-bit word of A in every lane (A may be u32 rows of even length: memcpy, no aliasing or
// alignment assumption; it folds into the {1to8} operand).
KD_AVX512 KD_INLINE __m512i load_bcast(const u64* p) {
  long long v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi64(v);
}

// mr (<= PTM) A rows (u64 words, stride lda) against one panel over all W64 words; writes the
// first ncols (<= PR) outputs of each row: count, or base[r] - 2 count with base.
template <int mr, bool AND>
KD_AVX512 void tile_v(const u64* a, int64_t lda, const u64* pan, int64_t W64, int32_t* c,
                      int64_t ldc, int64_t ncols, const int32_t* base) {
  __m512i acc[mr][4];
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t w = 0; w < W64; ++w) {
    const __m512i* bp = reinterpret_cast<const __m512i*>(pan + w * PR);
    const __m512i b0 = _mm512_load_si512(bp), b1 = _mm512_load_si512(bp + 1);
    const __m512i b2 = _mm512_load_si512(bp + 2), b3 = _mm512_load_si512(bp + 3);
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r) {
      const __m512i av = load_bcast(a + r * lda + w);
      if (AND) {
        acc[r][0] = _mm512_add_epi64(acc[r][0], _mm512_popcnt_epi64(_mm512_and_si512(av, b0)));
        acc[r][1] = _mm512_add_epi64(acc[r][1], _mm512_popcnt_epi64(_mm512_and_si512(av, b1)));
        acc[r][2] = _mm512_add_epi64(acc[r][2], _mm512_popcnt_epi64(_mm512_and_si512(av, b2)));
        acc[r][3] = _mm512_add_epi64(acc[r][3], _mm512_popcnt_epi64(_mm512_and_si512(av, b3)));
      } else {
        acc[r][0] = _mm512_add_epi64(acc[r][0], _mm512_popcnt_epi64(_mm512_xor_si512(av, b0)));
        acc[r][1] = _mm512_add_epi64(acc[r][1], _mm512_popcnt_epi64(_mm512_xor_si512(av, b1)));
        acc[r][2] = _mm512_add_epi64(acc[r][2], _mm512_popcnt_epi64(_mm512_xor_si512(av, b2)));
        acc[r][3] = _mm512_add_epi64(acc[r][3], _mm512_popcnt_epi64(_mm512_xor_si512(av, b3)));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r) {
    const __m256i b = _mm256_set1_epi32(base ? base[r] : 0);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const int64_t left = ncols - 8 * v;
      if (left <= 0) break;
      __m256i s = _mm512_cvtepi64_epi32(acc[r][v]);  // counts < 2^31: exact
      if (base) s = _mm256_sub_epi32(b, _mm256_add_epi32(s, s));
      const __mmask8 k = left >= 8 ? __mmask8(0xff) : static_cast<__mmask8>((1u << left) - 1);
      _mm256_mask_storeu_epi32(c + r * ldc + 8 * v, k, s);
    }
  }
}

using TileFn = void (*)(const u64*, int64_t, const u64*, int64_t, int32_t*, int64_t, int64_t,
                        const int32_t*);

#define KD_TILES6(AND) \
  { &tile_v<1, AND>, &tile_v<2, AND>, &tile_v<3, AND>, &tile_v<4, AND>, &tile_v<5, AND>, &tile_v<6, AND> }
const TileFn kTiles[2][PTM] = {KD_TILES6(false), KD_TILES6(true)};

// ------------------------------------------------------------------------ GEMV (raw B rows)

constexpr int HMR = 4;  // A rows per tile
constexpr int HNR = 4;  // B rows per tile

// Counts over 512-bit steps [v0, v1) (16 words each; the row's last step masked to W words) of
// an mr x nr tile of raw rows, added into c.
template <int mr, int nr, bool AND>
KD_AVX512 void tile_h(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t W, int64_t v0,
                      int64_t v1, int32_t* c, int64_t ldc) {
  __m512i acc[mr][nr];
#pragma GCC unroll 4
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < nr; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t left = W - 16 * v;
    const __mmask16 k = left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    __m512i av[mr];
#pragma GCC unroll 4
    for (int r = 0; r < mr; ++r) av[r] = _mm512_maskz_loadu_epi32(k, a + r * lda + 16 * v);
#pragma GCC unroll 4
    for (int j = 0; j < nr; ++j) {
      const __m512i bv = _mm512_maskz_loadu_epi32(k, b + j * ldb + 16 * v);
#pragma GCC unroll 4
      for (int r = 0; r < mr; ++r) {
        const __m512i x = AND ? _mm512_and_si512(av[r], bv) : _mm512_xor_si512(av[r], bv);
        acc[r][j] = _mm512_add_epi64(acc[r][j], _mm512_popcnt_epi64(x));
      }
    }
  }
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) c[r * ldc + j] += static_cast<int32_t>(_mm512_reduce_add_epi64(acc[r][j]));
}

using HTileFn = void (*)(const u32*, int64_t, const u32*, int64_t, int64_t, int64_t, int64_t,
                         int32_t*, int64_t);
#define KD_HROW(mr, AND) \
  { &tile_h<mr, 1, AND>, &tile_h<mr, 2, AND>, &tile_h<mr, 3, AND>, &tile_h<mr, 4, AND> }
const HTileFn kHTiles[2][HMR][HNR] = {
    {KD_HROW(1, false), KD_HROW(2, false), KD_HROW(3, false), KD_HROW(4, false)},
    {KD_HROW(1, true), KD_HROW(2, true), KD_HROW(3, true), KD_HROW(4, true)},
};

}  // namespace

bool gemm_counts_avx512(const u32* A, int64_t M, const u32* B, int64_t N, int64_t W, int32_t* C,
                        bool use_and, const int32_t* base, int64_t split_rows) {
  const int mode = use_and ? 1 : 0;
  if (M < split_rows) {
    const int64_t nv = (W + 15) / 16;
    drive<HMR, HNR>(M, N, nv, KCW / 16, [&](int64_t m, int64_t n, int64_t mr, int64_t nr, int64_t v0, int64_t v1) {
      kHTiles[mode][mr - 1][nr - 1](A + m * W, W, B + n * W, W, W, v0, v1, C + m * N + n, N);
    });
    return false;
  }
  const int64_t W64 = (W + 1) / 2, np = (N + PR - 1) / PR, nmb = (M + PMB - 1) / PMB;
  const int64_t pstride = W64 * PR;  // u64 words per panel: a multiple of 64 bytes
  at::Tensor pbuf = at::empty({np * pstride + 8}, at::TensorOptions().dtype(at::kLong));
  u64* pb = reinterpret_cast<u64*>(
      (reinterpret_cast<uintptr_t>(pbuf.data_ptr<int64_t>()) + 63) & ~uintptr_t(63));
  // A as 64-bit words: itself for an even word count, else a copy with a zero high half appended.
  at::Tensor abuf;
  const u64* a64 = nullptr;
  if (W % 2 == 0) {
    a64 = reinterpret_cast<const u64*>(A);  // u32 rows of even length: 8-byte steps (memcpy-loaded)
  } else {
    abuf = at::zeros({M, W64}, at::TensorOptions().dtype(at::kLong));
    u64* ad = reinterpret_cast<u64*>(abuf.data_ptr<int64_t>());
    for (int64_t m = 0; m < M; ++m) std::memcpy(ad + m * W64, A + m * W, sizeof(u32) * W);
    a64 = ad;
  }
  kdengine::parallel_for(0, np, std::max<int64_t>(1, 2048 / W64), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel_v(B, N, W, p, pb + p * pstride);
  });
  const auto& tiles = kTiles[mode];
  kdengine::parallel_for_dynamic(0, nmb * np, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {  // t -> (panel t / nmb, A block t % nmb)
      const int64_t m0 = (t % nmb) * PMB, m1 = std::min(M, m0 + PMB), p = t / nmb;
      const int64_t n0 = p * PR, ncols = std::min(PR, N - n0);
      const u64* pan = pb + p * pstride;
      for (int64_t m = m0; m < m1; m += PTM) {
        const int64_t mr = std::min<int64_t>(PTM, m1 - m);
        tiles[mr - 1](a64 + m * W64, W64, pan, W64, C + m * N + n0, N, ncols,
                      base == nullptr ? nullptr : base + m);
      }
    }
  });
  return base != nullptr;
}

KD_AVX512 void pack_signs_row_f32_avx512(const float* x, int64_t K, u32* out, bool& nan) {
  const __m512 zero = _mm512_setzero_ps();
  __mmask16 unord = 0;
  const int64_t full = K / 32;
  for (int64_t w = 0; w < full; ++w) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * w), v1 = _mm512_loadu_ps(x + 32 * w + 16);
    unord |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q);  // either lane NaN
    out[w] = static_cast<u32>(_mm512_cmp_ps_mask(v0, zero, _CMP_LT_OQ)) |
             (static_cast<u32>(_mm512_cmp_ps_mask(v1, zero, _CMP_LT_OQ)) << 16);
  }
  nan |= unord != 0;
  if (full * 32 < K) pack_signs_row_scalar<float>(x + 32 * full, K - 32 * full, out + full, nan);
}

KD_AVX512 void pack_bool_row_avx512(const uint8_t* s, int64_t K, u32* out) {
  const int64_t full = K / 64;
  for (int64_t w = 0; w < full; ++w) {
    const __m512i v = _mm512_loadu_si512(s + 64 * w);
    const u64 bits = _mm512_test_epi8_mask(v, v);
    std::memcpy(out + 2 * w, &bits, sizeof(bits));
  }
  if (full * 64 < K) pack_bool_row_scalar(s + 64 * full, K - 64 * full, out + 2 * full);
}

}  // namespace kdengine_binary
