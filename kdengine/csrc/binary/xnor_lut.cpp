// Binary GEMM by table lookup (AVX2): the GEMM path of xnor.cpp for M >= kLutMinRows (16) and
// N >= kLutMinCols (192).
//
// Math. Split every row's bit stream into nibbles: nibble g of a row is bits 4g..4g+3 (word g/8,
// bits 4(g%8)..). Then
//   popcount(a XOR b) = sum_g L[nib_g(a)][nib_g(b)],  L[x][y] = popcount(x ^ y)   (xnor)
//   popcount(a AND b) = sum_g L[nib_g(a)][nib_g(b)],  L[x][y] = popcount(x & y)   (spike)
// For a fixed A nibble x, row L[x] is a 16-entry byte table: one vpshufb looks it up for 32 B rows
// at once (their nibble g, one per byte) -- 32 x 4 = 128 binary MACs per shuffle + one byte add,
// where the nibble-LUT popcount of xnor.cpp's panel kernel needs XOR + shuffle + add per 128 MACs
// (vpshufb runs on 2 of Zen 3's 4 vector pipes, so dropping the XOR moves the bound from ~171 to
// 256 MACs per clock). This is the lookup-table GEMM idea of T-MAC / LUT-GEMM, applied to +-1 and
// {0,1} x +-1 operands, where the table needs no precomputation: the 16 possible tables are a
// constant (kLut, 2 x 16 x 32 bytes, each duplicated into both 128-bit lanes -- a vbroadcasti128
// would take a shuffle-pipe slot per step and measured 40 % slower).
//
// Layout. B is repacked into panels of LP = 256 rows: panel byte [g][32 v + pos] = nib_g of row
// 32 v + row(pos) (zero rows past N), i.e. N x K/4 bytes, 2x the packed size, built once per call
// by 8 x 8 word transposes + in-register byte transposes (O(N K), ~1 % of the product at 1024^3).
// A stays as it is: the kernel reads one A word per 8 steps and indexes the table by its nibbles
// (scalar shifts, on the integer pipes).
//
// Kernel. One A row x one panel (8 vectors of 32 rows) over a K block of LKW = 7 words = 56
// nibbles: 8 byte counters (<= 4 per step, 56 x 4 = 224 < 256: no overflow), inline asm so the
// compiler keeps the 8 add chains in registers (it otherwise reassociates them and spills). After
// a block the counters are widened (vpunpck{l,h}bw) into a 16-bit tile c16 (LMB A rows x 256,
// L1/L2) -- pos is arranged so that the widening yields rows in order -- and c16 goes to C as
// int32 (with base - 2 count fused) every 2044 words (16-bit counters hold <= 16383 nibbles).
//
// Memory traffic and blocking. Tasks = (LMB = 64 A rows) x (one panel), pulled by ATen's threads
// from a shared counter, consecutive tasks sharing a panel. Per K block the panel's 14 KiB stay in L1 across the task's
// 64 A rows; each step loads 8 B vectors + 1 table (9 loads per 8 shuffles, L1). C is written
// once per output (or once per 2044 words). Measured on this 2-core Zen 3, one thread:
// 1024 x 1024 x 4096 incl. repacking ~510 G binary MAC/s (xnor.cpp's panel kernel: ~410).
#include "binary/xnor_lut.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "common/parallel.h"

namespace kdengine_binary {

std::atomic<int64_t> kLutMinRows{16};
std::atomic<int64_t> kLutMinCols{192};  // a 256-row panel at least 3/4 used (N = 64..128: the panel kernel is 2x faster)

namespace {

using u32 = uint32_t;
#define KD_LUT_AVX2 __attribute__((target("avx2")))

constexpr int64_t LP = 256;   // B rows per panel (8 vectors of 32 rows)
constexpr int64_t LMB = 64;   // A rows per task
constexpr int64_t LKW = 7;    // words per K block: 56 nibbles x 4 <= 255 per byte counter
constexpr int64_t KSW = 2044; // words per 16-bit super-block: 8 x 2044 x 4 = 65408 <= 65535

struct LutTables {
  alignas(32) uint8_t t[2][16][32];
  LutTables() {
    for (int a = 0; a < 16; ++a)
      for (int i = 0; i < 32; ++i) {
        t[0][a][i] = static_cast<uint8_t>(__builtin_popcount(a ^ (i & 15)));
        t[1][a][i] = static_cast<uint8_t>(__builtin_popcount(a & (i & 15)));
      }
  }
};
const LutTables kLut;

// 8 x 8 transpose of 32-bit words: r[i] holds 8 words of row i -> r[j] holds word j of the 8 rows.
KD_LUT_AVX2 inline void transpose8(__m256i (&r)[8]) {
  __m256i t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m256i u[8];
  u[0] = _mm256_unpacklo_epi64(t[0], t[2]); u[1] = _mm256_unpackhi_epi64(t[0], t[2]);
  u[2] = _mm256_unpacklo_epi64(t[1], t[3]); u[3] = _mm256_unpackhi_epi64(t[1], t[3]);
  u[4] = _mm256_unpacklo_epi64(t[4], t[6]); u[5] = _mm256_unpackhi_epi64(t[4], t[6]);
  u[6] = _mm256_unpacklo_epi64(t[5], t[7]); u[7] = _mm256_unpackhi_epi64(t[5], t[7]);
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// Panel p of B: out[g * LP + 32 v + pos] = nibble g of row p*LP + 32 v + row(pos), where within a
// 32-row vector pos 0-3, 4-7 | 16-19, 20-23 hold rows 0-3, 4-7 | 8-11, 12-15 (and +16 for pos
// 8-15 | 24-31), so that vpunpck{l,h}bw of a counter vector gives rows 0-15 and 16-31 in order.
// Per 32 rows x 8 words: four 8 x 8 word transposes, then per word an in-lane 4 x 4 byte
// transpose and a 4 x 8 dword transpose give byte q of the 32 rows; its low and high nibbles are
// nibbles 2q and 2q + 1.
KD_LUT_AVX2 void pack_panel(const u32* B, int64_t N, int64_t W, int64_t p, uint8_t* out) {
  static const u32 kZero[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const __m256i bt = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  // row groups feeding V0..V3 (see above)
  static const int kRows[4][8] = {{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15},
                                  {16, 17, 18, 19, 24, 25, 26, 27}, {20, 21, 22, 23, 28, 29, 30, 31}};
  for (int64_t v = 0; v < LP / 32; ++v) {
    const int64_t r0 = p * LP + 32 * v;
    for (int64_t w0 = 0; w0 < W; w0 += 8) {
      const int64_t nw = std::min<int64_t>(8, W - w0);
      __m256i g[4][8];
      for (int q = 0; q < 4; ++q) {
        for (int i = 0; i < 8; ++i) {
          const int64_t n = r0 + kRows[q][i];
          const u32* src = n < N ? B + n * W + w0 : kZero;
          if (nw == 8 && n < N) {
            g[q][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
          } else {
            alignas(32) u32 tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (n < N) std::memcpy(tmp, src, sizeof(u32) * nw);
            g[q][i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
          }
        }
        transpose8(g[q]);
      }
      for (int64_t j = 0; j < nw; ++j) {
        const __m256i v0 = _mm256_shuffle_epi8(g[0][j], bt), v1 = _mm256_shuffle_epi8(g[1][j], bt);
        const __m256i v2 = _mm256_shuffle_epi8(g[2][j], bt), v3 = _mm256_shuffle_epi8(g[3][j], bt);
        const __m256i a = _mm256_unpacklo_epi32(v0, v1), b = _mm256_unpackhi_epi32(v0, v1);
        const __m256i c = _mm256_unpacklo_epi32(v2, v3), d = _mm256_unpackhi_epi32(v2, v3);
        const __m256i q[4] = {_mm256_unpacklo_epi64(a, c), _mm256_unpackhi_epi64(a, c),
                              _mm256_unpacklo_epi64(b, d), _mm256_unpackhi_epi64(b, d)};
        uint8_t* o = out + (8 * (w0 + j)) * LP + 32 * v;
        for (int k = 0; k < 4; ++k) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(o + (2 * k) * LP), _mm256_and_si256(q[k], lo4));
          _mm256_store_si256(reinterpret_cast<__m256i*>(o + (2 * k + 1) * LP),
                             _mm256_and_si256(_mm256_srli_epi16(q[k], 4), lo4));
        }
      }
    }
  }
}

// One A row against one panel over words [w0, w1) (<= LKW): counts added into c16 (256 u16, row order).
KD_LUT_AVX2 void lut_row(const u32* a, const uint8_t* pan, int64_t w0, int64_t w1, const uint8_t* tab,
                     uint16_t* c16) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t w = w0; w < w1; ++w) {
    const u32 aw = a[w];
    const uint8_t* b = pan + 8 * w * LP;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i t = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab + 32 * ((aw >> (4 * j)) & 15u)));
      const __m256i* bv = reinterpret_cast<const __m256i*>(b + j * LP);
      // inline asm: the compiler otherwise reassociates the 8 add chains and spills the products
      __m256i x0, x1;
      asm("vpshufb 0(%[b]), %[t], %[x0]\n\t"
          "vpshufb 32(%[b]), %[t], %[x1]\n\t"
          "vpaddb %[x0], %[c0], %[c0]\n\t"
          "vpaddb %[x1], %[c1], %[c1]\n\t"
          "vpshufb 64(%[b]), %[t], %[x0]\n\t"
          "vpshufb 96(%[b]), %[t], %[x1]\n\t"
          "vpaddb %[x0], %[c2], %[c2]\n\t"
          "vpaddb %[x1], %[c3], %[c3]\n\t"
          "vpshufb 128(%[b]), %[t], %[x0]\n\t"
          "vpshufb 160(%[b]), %[t], %[x1]\n\t"
          "vpaddb %[x0], %[c4], %[c4]\n\t"
          "vpaddb %[x1], %[c5], %[c5]\n\t"
          "vpshufb 192(%[b]), %[t], %[x0]\n\t"
          "vpshufb 224(%[b]), %[t], %[x1]\n\t"
          "vpaddb %[x0], %[c6], %[c6]\n\t"
          "vpaddb %[x1], %[c7], %[c7]"
          : [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), [c4] "+x"(c4),
            [c5] "+x"(c5), [c6] "+x"(c6), [c7] "+x"(c7), [x0] "=&x"(x0), [x1] "=&x"(x1)
          : [t] "x"(t), [b] "r"(bv)
          : "memory");
    }
  }
  const __m256i z = _mm256_setzero_si256();
  __m256i* o = reinterpret_cast<__m256i*>(c16);
#define KD_FLUSH(v, c)                                                              \
  _mm256_store_si256(o + 2 * v, _mm256_add_epi16(_mm256_load_si256(o + 2 * v), _mm256_unpacklo_epi8(c, z))); \
  _mm256_store_si256(o + 2 * v + 1, _mm256_add_epi16(_mm256_load_si256(o + 2 * v + 1), _mm256_unpackhi_epi8(c, z)));
  KD_FLUSH(0, c0) KD_FLUSH(1, c1) KD_FLUSH(2, c2) KD_FLUSH(3, c3)
  KD_FLUSH(4, c4) KD_FLUSH(5, c5) KD_FLUSH(6, c6) KD_FLUSH(7, c7)
#undef KD_FLUSH
}


// c16 (counts of this super-block, rows n0..n0+nr) -> C row: C = c16 (+ C when not the first
// super-block); on the last super-block with base: C = base - 2 (that sum).
KD_LUT_AVX2 void write_row(const uint16_t* c16, int32_t* c, int64_t nr, bool first, bool last,
                           const int32_t* base) {
  const bool fin = last && base != nullptr;
  const __m256i b = _mm256_set1_epi32(fin ? *base : 0);
  int64_t r = 0;
  for (; r + 8 <= nr; r += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c16 + r)));
    if (!first) v = _mm256_add_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r)));
    if (fin) v = _mm256_sub_epi32(b, _mm256_slli_epi32(v, 1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r), v);
  }
  for (; r < nr; ++r) {
    int32_t v = c16[r] + (first ? 0 : c[r]);
    c[r] = fin ? *base - 2 * v : v;
  }
}

}  // namespace

void lut_gemm_avx2(const u32* A, int64_t M, const u32* B, int64_t N, int64_t W, int32_t* C,
                   bool use_and, const int32_t* base) {
  if (M <= 0 || N <= 0) return;
  const int64_t G = 8 * W, np = (N + LP - 1) / LP, nmb = (M + LMB - 1) / LMB;
  const int64_t pstride = G * LP;  // a multiple of 256 bytes: panels stay 32-byte aligned
  at::Tensor panels = at::empty({np * pstride + 32}, at::TensorOptions().dtype(at::kByte));
  uint8_t* pb = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(panels.data_ptr<uint8_t>()) + 31) & ~uintptr_t(31));
  kdengine::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel(B, N, W, p, pb + p * pstride);
  });
  const uint8_t* tab = &kLut.t[use_and ? 1 : 0][0][0];
  // Tasks are pulled from a shared counter rather than split in fixed halves: when one core runs
  // slower (a shared or virtualised machine), the other takes more tasks instead of waiting.
  kdengine::parallel_for_dynamic(0, nmb * np, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) uint16_t c16[LMB][LP];
    for (int64_t t = t0; t < t1; ++t) {
      // t -> (panel t / nmb, A block t % nmb): consecutive tasks share a panel
      const int64_t m0 = (t % nmb) * LMB, m1 = std::min(M, m0 + LMB), p = t / nmb;
      const int64_t n0 = p * LP, nr = std::min(LP, N - n0);
      const uint8_t* pan = pb + p * pstride;
      for (int64_t s0 = 0; s0 < W; s0 += KSW) {
        const int64_t s1 = std::min(W, s0 + KSW);
        std::memset(c16, 0, sizeof(uint16_t) * LP * (m1 - m0));
        for (int64_t w0 = s0; w0 < s1; w0 += LKW) {
          const int64_t w1 = std::min(s1, w0 + LKW);
          for (int64_t m = m0; m < m1; ++m) lut_row(A + m * W, pan, w0, w1, tab, c16[m - m0]);
        }
        for (int64_t m = m0; m < m1; ++m)
          write_row(c16[m - m0], C + m * N + n0, nr, s0 == 0, s1 == W,
                    base == nullptr ? nullptr : base + m);
      }
    }
  });
}

}  // namespace kdengine_binary
