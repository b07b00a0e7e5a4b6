// Binary GEMM and packing, AVX2 kernels (nibble-plane popcount): the GEMV path (A split into
// nibble planes, B rows read raw, 3 x 2 tiles) and the GEMM path (both operands in panels, 4 x 2
// inline-asm tiles), plus the AVX2 sign/spike packing rows. Math, layout and memory traffic: the
// top of xnor.cpp; the wider GEMM path is xnor_lut.cpp. Compiled with plain flags: every function
// here carries target("avx2,popcnt") and runs only where xnor.cpp found AVX2 at run time.
#include <ATen/ATen.h>

#include "binary/xnor_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace kdengine_binary {
namespace {

// --------------------------------------------------------------------------- AVX2, small M (GEMV)

// A is split into nibble planes: for every 256-bit step v of a row, 32 bytes holding the low
// nibbles (a & 0x0f per byte) then 32 bytes holding the high nibbles ((a >> 4) & 0x0f), zero-padded
// to whole steps. Per output and step: lo = b_lo ^ a_lo, hi = b_hi ^ a_hi, two vpshufb lookups and
// two byte adds (6 ops) plus B's split (3 ops per B vector, shared by the tile's MR rows): 7 ops
// against Mula's 8, and the 3 x 2 tile fits the 16 ymm registers without spills.
constexpr int VMR = 3;  // A rows per AVX2 micro-tile
constexpr int VNR = 2;  // B rows per AVX2 micro-tile

KD_AVX2 void split_row_avx2(const u32* a, int64_t W, u32* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const int64_t nv = (W + 7) / 8;
  for (int64_t v = 0; v < nv; ++v) {
    __m256i x;
    if (8 * v + 8 <= W) {
      x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 8 * v));
    } else {  // zero-pad the last, partial step (padding bits never count)
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(W - 8 * v)), lane);
      x = _mm256_maskload_epi32(reinterpret_cast<const int*>(a + 8 * v), mask);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * v), _mm256_and_si256(x, low4));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * v + 8),
                        _mm256_and_si256(_mm256_srli_epi16(x, 4), low4));
  }
}

template <int mr, int nr, bool AND, bool MASKED>
KD_AVX2 KD_INLINE void avx2_step(const u32* as, int64_t ldas, const u32* b, int64_t ldb, int64_t v,
                                 __m256i bmask, __m256i lut, __m256i low4, __m256i (&acc)[mr][nr]) {
#pragma GCC unroll 8
  for (int j = 0; j < nr; ++j) {
    const u32* bp = b + j * ldb + 8 * v;
    const __m256i bv = MASKED ? _mm256_maskload_epi32(reinterpret_cast<const int*>(bp), bmask)
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i blo = _mm256_and_si256(bv, low4);
    const __m256i bhi = _mm256_and_si256(_mm256_srli_epi16(bv, 4), low4);
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r) {
      const __m256i* ap = reinterpret_cast<const __m256i*>(as + r * ldas + 16 * v);
      const __m256i alo = _mm256_load_si256(ap), ahi = _mm256_load_si256(ap + 1);
      const __m256i xlo = AND ? _mm256_and_si256(blo, alo) : _mm256_xor_si256(blo, alo);
      const __m256i xhi = AND ? _mm256_and_si256(bhi, ahi) : _mm256_xor_si256(bhi, ahi);
      acc[r][j] = _mm256_add_epi8(
          acc[r][j], _mm256_add_epi8(_mm256_shuffle_epi8(lut, xlo), _mm256_shuffle_epi8(lut, xhi)));
    }
  }
}

// Counts over 256-bit steps [v0, v1) of an mr x nr tile, added into c. `as`: split A rows
// (stride ldas u32, 32-byte aligned); b: raw B rows with W valid words (the step that holds the
// row's last word is loaded masked, so no word past the row is ever read).
template <int mr, int nr, bool AND>
KD_AVX2 void micro_avx2(const u32* as, int64_t ldas, const u32* b, int64_t ldb, int64_t W,
                        int64_t v0, int64_t v1, int32_t* c, int64_t ldc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const int64_t vfull = std::min<int64_t>(v1, W / 8);  // steps that are whole inside the row
  __m256i bmask = zero;
  if (vfull < v1) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    bmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(W - 8 * vfull)), lane);
  }
  __m256i wide[mr][nr];  // 4 x u64 partial sums per output
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) wide[r][j] = zero;
  int64_t v = v0;
  while (v < v1) {
    // uint8 lane counters take <= 8 per step: 31 steps keep them <= 248
    const int64_t vend = std::min<int64_t>(v1, v + 31);
    __m256i acc[mr][nr];
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < nr; ++j) acc[r][j] = zero;
    const int64_t vmain = std::min(vend, vfull);
    for (; v < vmain; ++v) avx2_step<mr, nr, AND, false>(as, ldas, b, ldb, v, bmask, lut, low4, acc);
    if (v < vend) {  // only the row's last, partial step
      avx2_step<mr, nr, AND, true>(as, ldas, b, ldb, v, bmask, lut, low4, acc);
      ++v;
    }
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < nr; ++j)
        wide[r][j] = _mm256_add_epi64(wide[r][j], _mm256_sad_epu8(acc[r][j], zero));
  }
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) {
      alignas(32) int64_t lanes[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), wide[r][j]);
      c[r * ldc + j] += static_cast<int32_t>(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
    }
}

// Large M: both operands are split into nibble planes AND packed into panels (GotoBLAS style):
// A in panels of 4 rows, B in panels of 2 rows, each step of a panel contiguous
// ([step][row][lo 32 B | hi 32 B]), missing edge rows zero. A 4 x 2 tile then reads one
// sequential B stream (128 B per step, software-prefetched) while its A panel (256 B per step)
// stays in L1 across the task's B panels. Per output and step: XOR/AND, two vpshufb, two adds
// (6 vector ops, the issue bound of the nibble-LUT popcount). Splitting B costs O(N K), amortized
// over M >= kSplitBMinRows rows; smaller M (GEMV) use micro_avx2 on raw B rows instead.
constexpr int PMR = 4;   // A rows per panel / tile
constexpr int PNR = 2;   // B rows per panel / tile

// Split rows [p*pr, p*pr + pr) of src (rows x W words) into panel p of dst (zero rows past the end).
KD_AVX2 void pack_panel_avx2(const u32* src, int64_t rows, int64_t W, int pr, int64_t p, u32* dst) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t nv = (W + 7) / 8;
  u32* out = dst + p * nv * pr * 16;
  for (int r = 0; r < pr; ++r) {
    const int64_t row = p * pr + r;
    for (int64_t v = 0; v < nv; ++v) {
      __m256i x = _mm256_setzero_si256();
      if (row < rows) {
        const u32* a = src + row * W + 8 * v;
        if (8 * v + 8 <= W) {
          x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
        } else {  // zero-pad the row's last, partial step (padding bits never count)
          const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(W - 8 * v)), lane);
          x = _mm256_maskload_epi32(reinterpret_cast<const int*>(a), mask);
        }
      }
      u32* o = out + (v * pr + r) * 16;
      _mm256_store_si256(reinterpret_cast<__m256i*>(o), _mm256_and_si256(x, low4));
      _mm256_store_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_and_si256(_mm256_srli_epi16(x, 4), low4));
    }
  }
}

alignas(32) const uint8_t kNibbleLut[32] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

// One K block (1..31 steps, so the uint8 counters cannot overflow) of a 4 x 2 tile in inline asm
// with a fixed plan: the 8 counters and the LUT in 9 registers chosen by the compiler (operands),
// ymm9-12 B's lo/hi planes, ymm13-15 A's planes and temporaries. (GCC's allocation of the same
// loop written with intrinsics spilled two counters and added copies.) `off` is the B offset in
// bytes (128 per step); A's is 2 * off. B is prefetched 1024 bytes (8 steps) ahead.
#define KD_TILE42_ASM(OP) \
  asm volatile( \
      "1:\n" \
      "prefetcht0 1024(%[b],%[off])\n" \
      "prefetcht0 1088(%[b],%[off])\n" \
      "vmovdqa (%[b],%[off]), %%ymm9\n" \
      "vmovdqa 32(%[b],%[off]), %%ymm10\n" \
      "vmovdqa 64(%[b],%[off]), %%ymm11\n" \
      "vmovdqa 96(%[b],%[off]), %%ymm12\n" \
      "vmovdqa 0(%[a],%[off],2), %%ymm13\n" \
      "vmovdqa 32(%[a],%[off],2), %%ymm14\n" \
      OP " %%ymm13, %%ymm9, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c0], %[c0]\n" \
      OP " %%ymm14, %%ymm10, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c0], %[c0]\n" \
      OP " %%ymm13, %%ymm11, %%ymm13\n" \
      "vpshufb %%ymm13, %[lut], %%ymm13\n" \
      "vpaddb %%ymm13, %[c1], %[c1]\n" \
      OP " %%ymm14, %%ymm12, %%ymm14\n" \
      "vpshufb %%ymm14, %[lut], %%ymm14\n" \
      "vpaddb %%ymm14, %[c1], %[c1]\n" \
      "vmovdqa 64(%[a],%[off],2), %%ymm13\n" \
      "vmovdqa 96(%[a],%[off],2), %%ymm14\n" \
      OP " %%ymm13, %%ymm9, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c2], %[c2]\n" \
      OP " %%ymm14, %%ymm10, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c2], %[c2]\n" \
      OP " %%ymm13, %%ymm11, %%ymm13\n" \
      "vpshufb %%ymm13, %[lut], %%ymm13\n" \
      "vpaddb %%ymm13, %[c3], %[c3]\n" \
      OP " %%ymm14, %%ymm12, %%ymm14\n" \
      "vpshufb %%ymm14, %[lut], %%ymm14\n" \
      "vpaddb %%ymm14, %[c3], %[c3]\n" \
      "vmovdqa 128(%[a],%[off],2), %%ymm13\n" \
      "vmovdqa 160(%[a],%[off],2), %%ymm14\n" \
      OP " %%ymm13, %%ymm9, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c4], %[c4]\n" \
      OP " %%ymm14, %%ymm10, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c4], %[c4]\n" \
      OP " %%ymm13, %%ymm11, %%ymm13\n" \
      "vpshufb %%ymm13, %[lut], %%ymm13\n" \
      "vpaddb %%ymm13, %[c5], %[c5]\n" \
      OP " %%ymm14, %%ymm12, %%ymm14\n" \
      "vpshufb %%ymm14, %[lut], %%ymm14\n" \
      "vpaddb %%ymm14, %[c5], %[c5]\n" \
      "vmovdqa 192(%[a],%[off],2), %%ymm13\n" \
      "vmovdqa 224(%[a],%[off],2), %%ymm14\n" \
      OP " %%ymm13, %%ymm9, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c6], %[c6]\n" \
      OP " %%ymm14, %%ymm10, %%ymm15\n" \
      "vpshufb %%ymm15, %[lut], %%ymm15\n" \
      "vpaddb %%ymm15, %[c6], %[c6]\n" \
      OP " %%ymm13, %%ymm11, %%ymm13\n" \
      "vpshufb %%ymm13, %[lut], %%ymm13\n" \
      "vpaddb %%ymm13, %[c7], %[c7]\n" \
      OP " %%ymm14, %%ymm12, %%ymm14\n" \
      "vpshufb %%ymm14, %[lut], %%ymm14\n" \
      "vpaddb %%ymm14, %[c7], %[c7]\n" \
      "add $128, %[off]\n" \
      "dec %[n]\n" \
      "jnz 1b\n" \
      : [off] "+r"(off), [n] "+r"(n), [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), \
        [c4] "+x"(c4), [c5] "+x"(c5), [c6] "+x"(c6), [c7] "+x"(c7) \
      : [a] "r"(a), [b] "r"(b), [lut] "x"(lut) \
      : "cc", "memory", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

// Sums the 4 x u64 lanes of w0..w3 into one vector [s0, s1, s2, s3].
KD_AVX2 KD_INLINE __m256i hsum4x64(__m256i w0, __m256i w1, __m256i w2, __m256i w3) {
  const __m256i t01 = _mm256_add_epi64(_mm256_unpacklo_epi64(w0, w1), _mm256_unpackhi_epi64(w0, w1));
  const __m256i t23 = _mm256_add_epi64(_mm256_unpacklo_epi64(w2, w3), _mm256_unpackhi_epi64(w2, w3));
  return _mm256_add_epi64(_mm256_permute2x128_si256(t01, t23, 0x20),
                          _mm256_permute2x128_si256(t01, t23, 0x31));
}

// One A panel (rows m..m+mr) against np consecutive B panels (stride bpstride words; the last one
// has nr_last valid rows), steps [v0, v1) with v1 - v0 <= 31; adds the counts into c (ldc).
// How a K block's counts s reach the output c: kAdd c += s (c zeroed before), or, with the
// output's row bases (K for xnor, popcount(a) for spikes), so that c needs no zeroing and no extra
// pass: kStore c = s (first of several K blocks), kAdd (middle ones), kFinal c = base - 2 (c + s)
// (last one), kStoreFinal c = base - 2 s (K is one block).
enum Store : int { kAdd = 0, kStore = 1, kFinal = 2, kStoreFinal = 3 };

template <bool AND>
KD_AVX2 void panel_row42(const u32* apanel, const u32* bpanel, int64_t bpstride, int64_t np,
                         int64_t nr_last, int64_t v0, int64_t v1, int64_t mr, int32_t* c, int64_t ldc,
                         Store store, const int32_t* base) {
  const __m256i lut = _mm256_load_si256(reinterpret_cast<const __m256i*>(kNibbleLut));
  const __m256i zero = _mm256_setzero_si256();
  const __m256i pick32 = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const char* a = reinterpret_cast<const char*>(apanel);
  for (int64_t p = 0; p < np; ++p) {
    const char* b = reinterpret_cast<const char*>(bpanel + p * bpstride);
    __m256i c0 = zero, c1 = zero, c2 = zero, c3 = zero, c4 = zero, c5 = zero, c6 = zero, c7 = zero;
    int64_t off = 128 * v0, n = v1 - v0;
    if constexpr (AND) {
      KD_TILE42_ASM("vpand");
    } else {
      KD_TILE42_ASM("vpxor");
    }
    // byte counters -> 4 x u64 lane sums -> [s0..s3], [s4..s7] (s = 2 r + j) -> int32
    const __m256i lo = hsum4x64(_mm256_sad_epu8(c0, zero), _mm256_sad_epu8(c1, zero),
                                _mm256_sad_epu8(c2, zero), _mm256_sad_epu8(c3, zero));
    const __m256i hi = hsum4x64(_mm256_sad_epu8(c4, zero), _mm256_sad_epu8(c5, zero),
                                _mm256_sad_epu8(c6, zero), _mm256_sad_epu8(c7, zero));
    // int32 s0..s7 in order: low dwords of lo (s0..s3) then of hi (s4..s7)
    const __m128i s03 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(lo, pick32));
    const __m128i s47 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(hi, pick32));
    alignas(16) int32_t s[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(s), s03);
    _mm_store_si128(reinterpret_cast<__m128i*>(s + 4), s47);
    int32_t* cp = c + p * PNR;
    if (mr == PMR && (p + 1 < np || nr_last == PNR)) {
      for (int r = 0; r < PMR; ++r) {  // two adjacent outputs per row: one 64-bit update
        __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + 2 * r));
        if (store == kAdd || store == kFinal)
          v = _mm_add_epi32(v, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + r * ldc)));
        if (store >= kFinal) v = _mm_sub_epi32(_mm_set1_epi32(base[r]), _mm_add_epi32(v, v));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(cp + r * ldc), v);
      }
    } else {
      const int64_t nr = p + 1 < np ? PNR : nr_last;
      for (int64_t r = 0; r < mr; ++r)
        for (int64_t j = 0; j < nr; ++j) {
          int32_t v = s[2 * r + j];
          if (store == kAdd || store == kFinal) v += cp[r * ldc + j];
          cp[r * ldc + j] = store >= kFinal ? base[r] - 2 * v : v;
        }
    }
  }
}

using VecFn = void (*)(const u32*, int64_t, const u32*, int64_t, int64_t, int64_t, int64_t,
                       int32_t*, int64_t);

#define KD_ROW2(fn, mr, AND) \
  { &fn<mr, 1, AND>, &fn<mr, 2, AND> }

// [mode][mr - 1][nr - 1]
const VecFn kVec[2][VMR][VNR] = {
    {KD_ROW2(micro_avx2, 1, false), KD_ROW2(micro_avx2, 2, false), KD_ROW2(micro_avx2, 3, false)},
    {KD_ROW2(micro_avx2, 1, true), KD_ROW2(micro_avx2, 2, true), KD_ROW2(micro_avx2, 3, true)},
};

}  // namespace

bool gemm_counts_avx2(const u32* A, int64_t M, const u32* B, int64_t N, int64_t W, int32_t* C,
                      bool use_and, const int32_t* base, int64_t split_rows) {
  const int mode = use_and ? 1 : 0;
  const int64_t nv = (W + 7) / 8, lds = 16 * nv;
  auto split_all = [&](const u32* src, int64_t rows) {
    at::Tensor t = at::empty({rows, lds}, at::TensorOptions().dtype(at::kInt));  // 64-B aligned
    u32* dst = reinterpret_cast<u32*>(t.data_ptr<int32_t>());
    kdengine::parallel_for(0, rows, std::max<int64_t>(1, 8192 / W), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) split_row_avx2(src + r * W, W, dst + r * lds);
    });
    return t;
  };
  if (M >= split_rows) {
    const int64_t npa = (M + PMR - 1) / PMR, npb = (N + PNR - 1) / PNR;
    at::Tensor ap = at::empty({npa, nv * PMR * 16}, at::TensorOptions().dtype(at::kInt));
    at::Tensor bp = at::empty({npb, nv * PNR * 16}, at::TensorOptions().dtype(at::kInt));
    u32* apd = reinterpret_cast<u32*>(ap.data_ptr<int32_t>());
    u32* bpd = reinterpret_cast<u32*>(bp.data_ptr<int32_t>());
    kdengine::parallel_for(0, npa + npb, std::max<int64_t>(1, 4096 / W), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        if (p < npa)
          pack_panel_avx2(A, M, W, PMR, p, apd);
        else
          pack_panel_avx2(B, N, W, PNR, p - npa, bpd);
      }
    });
    const int64_t apstride = nv * PMR * 16, bpstride = nv * PNR * 16;
    const int64_t nmb = (M + MB - 1) / MB, nnb = (N + NB - 1) / NB;
    kdengine::parallel_for_dynamic(0, nmb * nnb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {  // consecutive tasks share a B block (L2)
        const int64_t m0 = (t % nmb) * MB, m1 = std::min(M, m0 + MB);
        const int64_t n0 = (t / nmb) * NB, n1 = std::min(N, n0 + NB);
        const int64_t np = (n1 - n0 + PNR - 1) / PNR, nr_last = (n1 - n0) - (np - 1) * PNR;
        for (int64_t v0 = 0; v0 < nv; v0 += 31) {  // K blocks of <= 31 steps (7936 bits)
          const int64_t v1 = std::min<int64_t>(nv, v0 + 31);
          for (int64_t m = m0; m < m1; m += PMR) {
            const int64_t mr = std::min<int64_t>(PMR, m1 - m);
            const u32* apn = apd + (m / PMR) * apstride;
            const u32* bpn = bpd + (n0 / PNR) * bpstride;
            const Store st = base == nullptr ? kAdd
                             : v1 == nv ? (v0 == 0 ? kStoreFinal : kFinal)
                             : (v0 == 0 ? kStore : kAdd);
            const int32_t* bm = base == nullptr ? nullptr : base + m;
            if (use_and)
              panel_row42<true>(apn, bpn, bpstride, np, nr_last, v0, v1, mr, C + m * N + n0, N, st, bm);
            else
              panel_row42<false>(apn, bpn, bpstride, np, nr_last, v0, v1, mr, C + m * N + n0, N, st, bm);
          }
        }
      }
    });
    return base != nullptr;
  }
  const at::Tensor asplit = split_all(A, M);
  const u32* as = reinterpret_cast<const u32*>(asplit.data_ptr<int32_t>());
  const auto& table = kVec[mode];
  drive<VMR, VNR>(M, N, nv, KCW / 8, [&](int64_t m, int64_t n, int64_t mr, int64_t nr, int64_t v0, int64_t v1) {
    table[mr - 1][nr - 1](as + m * lds, lds, B + n * W, W, W, v0, v1, C + m * N + n, N);
  });
  return false;
}

KD_AVX2 void pack_signs_row_f32_avx2(const float* x, int64_t K, u32* out, bool& nan) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 unord = zero;
  const int64_t full = K / 32;
  for (int64_t w = 0; w < full; ++w) {
    const float* p = x + 32 * w;
    u32 word = 0;
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 v = _mm256_loadu_ps(p + 8 * q);
      unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      word |= static_cast<u32>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ))) << (8 * q);
    }
    out[w] = word;
  }
  nan |= _mm256_movemask_ps(unord) != 0;
  if (full * 32 < K) pack_signs_row_scalar<float>(x + 32 * full, K - 32 * full, out + full, nan);
}

KD_AVX2 void pack_bool_row_avx2(const uint8_t* s, int64_t K, u32* out) {
  const __m256i zero = _mm256_setzero_si256();
  const int64_t full = K / 32;
  for (int64_t w = 0; w < full; ++w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32 * w));
    out[w] = ~static_cast<u32>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
  }
  if (full * 32 < K) pack_bool_row_scalar(s + 32 * full, K - 32 * full, out + full);
}

}  // namespace kdengine_binary
