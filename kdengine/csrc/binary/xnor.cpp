// Binary (XNOR / AND) popcount GEMM, sign/spike bit packing and the fused binary linear layer, CPU.
//
// Math. Rows of A (M rows) and B (N rows) are K sign bits packed into 32-bit words, bit j of word w
// is element 32*w + j, bit 1 = -1 (signs) or 1 = spike; padding bits beyond K are 0.
//   xnor  (mode 0): out[m,n] = sum_k sign(a) sign(b) = K - 2 * popcount(a XOR b)
//   spike (mode 1): out[m,n] = sum_k s * sign(w)     = popcount(s) - 2 * popcount(s AND w)
// Zero padding bits never count: 0 XOR 0 = 0 and 0 AND x = 0; an operand whose padding bits were
// set after packing is first copied with them cleared (clear_padding). Counts are exact integers
// (int32: K < 2^31, checked).
//
// Layout. Inputs are row-major (rows, W), W = ceil(K/32) int32 words per row (PackedSigns.bits).
//
// Kernels (the ISA is picked at run time with __builtin_cpu_supports, so the library, built with
// plain -O3, runs on any x86-64 and uses AVX2/POPCNT where present):
// * AVX2, M >= 16 and N >= 192 (GEMM): the table-lookup GEMM of xnor_lut.cpp (one vpshufb + one
//   add per 128 binary MACs, ~25 % faster than the panel kernel below, which remains for narrower
//   N and is selectable for tests with binary_set_lut_min).
// * AVX2, M >= 16, N < 192: both operands are first split into nibble planes (lo = byte & 0x0f,
//   hi = (byte >> 4) & 0x0f, 2 x 32 bytes per 256 bits) and packed into panels, 4 A rows and 2 B
//   rows interleaved per 256-bit step (GotoBLAS-style, O((M + N) K) work). A 4 x 2 register tile
//   (inline asm: 8 uint8 counters, LUT, B planes in registers) then needs per output and step
//   XOR/AND + 2 vpshufb (Mula's nibble-lookup popcount) + 2 byte adds = 6 vector ops; counters
//   are reduced with vpsadbw once per K block of <= 31 steps (they take <= 8 per step).
// * AVX2, M < 16 (batch-1 linear / GEMV): splitting B would cost as much as the product, so only
//   A is split; B rows are read raw (masked load for a partial last step) and split in registers,
//   reused by a 3 x 2 tile: 7 ops per output and step, every weight bit read once.
// * POPCNT / portable: 2 x 4 tiles of 64-bit words, XOR/AND + __builtin_popcountll (one POPCNT
//   where the CPU has it, else libgcc's bit-twiddling).
//
// Cache blocking and memory traffic. Tasks of 64 A rows x 128 B rows go to ATen's threads
// (kdengine::parallel_for, parallel.h). In the GEMM path a task walks K in blocks of <= 31 steps (7936 bits); its B
// block (128 rows x 31 steps x 64 B = 254 KiB of planes) stays in L2 and is streamed once per A
// panel as one sequential, software-prefetched stream, while the A panel (<= 7.9 KiB) stays in L1
// across the task's 64 B panels. Per 8 outputs and step the tile loads 8 A + 4 B vectors (L1/L2),
// so the loop is bound by vector issue (4 pipes, 2 of them for vpshufb on Zen 3), not memory.
// The last K block writes K - 2 count (popcount(s) - 2 count) itself: no zeroing, no extra pass.
// Measured on this 2-core Zen 3 at ~3.2 GHz (AVX2, no AVX-512), one thread: the bare asm loop on
// L1-resident panels ~480 G binary MAC/s (~150 per clock, issue bound 171); the whole 1024 x 1024
// x 4096 GEMM incl. packing ~400 G (~9.5x torch fp32 at ~43 G); see kdengine/bench/binary.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/parallel.h"
#include "binary/xnor_lut.h"
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include <time.h>

namespace kdengine_binary {
namespace {

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
std::atomic<int64_t> kSplitBMinRows{16};  // M from which the AVX2 path splits B too (binary_set_split_b_rows)

// The path thresholds (test/bench knobs), loaded once per call so that a concurrent change cannot
// make binary_gemm allocate for one path (uninitialized output) and gemm_counts take another.
struct PathKnobs {
  int64_t lut_rows, lut_cols, split_rows;
};
PathKnobs path_knobs() {
  return {kLutMinRows.load(std::memory_order_relaxed), kLutMinCols.load(std::memory_order_relaxed),
          kSplitBMinRows.load(std::memory_order_relaxed)};
}

enum Isa : int64_t { kPortable = 0, kPopcnt = 1, kAvx2 = 2 };

bool cpu_has(Isa isa) {
  if (isa == kPortable) return true;
  if (isa == kPopcnt) return __builtin_cpu_supports("popcnt");
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

Isa best_isa() {
  static const Isa best = cpu_has(kAvx2) ? kAvx2 : (cpu_has(kPopcnt) ? kPopcnt : kPortable);
  return best;
}

// -1: the best ISA of this CPU; 0..2 force one (binary_force_isa, a test knob: every call after
// the change, in every thread, takes the forced path).
std::atomic<int64_t> kForcedIsa{-1};

Isa pick_isa() {
  const int64_t forced = kForcedIsa.load(std::memory_order_relaxed);
  return forced < 0 ? best_isa() : static_cast<Isa>(forced);
}

KD_INLINE u64 load64(const u32* p) {
  u64 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// --------------------------------------------------------------------------- scalar micro-kernel

// Counts over words [w0, w1) for an mr x nr tile, added into c. Inlined into a plain and a
// target("popcnt") wrapper, so __builtin_popcountll becomes a libgcc call or one POPCNT.
template <int mr, int nr, bool AND>
KD_INLINE void scalar_tile(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t w0,
                           int64_t w1, int64_t (&cnt)[mr][nr]) {
  int64_t w = w0;
  for (; w + 2 <= w1; w += 2) {
    u64 av[mr], bv[nr];
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r) av[r] = load64(a + r * lda + w);
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) bv[j] = load64(b + j * ldb + w);
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < nr; ++j)
        cnt[r][j] += __builtin_popcountll(AND ? (av[r] & bv[j]) : (av[r] ^ bv[j]));
  }
  if (w < w1) {  // odd word count: the last 32-bit word
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < nr; ++j) {
        const u32 x = AND ? (a[r * lda + w] & b[j * ldb + w]) : (a[r * lda + w] ^ b[j * ldb + w]);
        cnt[r][j] += __builtin_popcount(x);
      }
  }
}

template <int mr, int nr>
KD_INLINE void store_counts(const int64_t (&cnt)[mr][nr], int32_t* c, int64_t ldc) {
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) c[r * ldc + j] += static_cast<int32_t>(cnt[r][j]);
}

template <int mr, int nr, bool AND>
void micro_portable(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t w0, int64_t w1,
                    int32_t* c, int64_t ldc) {
  int64_t cnt[mr][nr] = {};
  scalar_tile<mr, nr, AND>(a, lda, b, ldb, w0, w1, cnt);
  store_counts<mr, nr>(cnt, c, ldc);
}

template <int mr, int nr, bool AND>
KD_POPCNT void micro_popcnt(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t w0,
                            int64_t w1, int32_t* c, int64_t ldc) {
  int64_t cnt[mr][nr] = {};
  scalar_tile<mr, nr, AND>(a, lda, b, ldb, w0, w1, cnt);
  store_counts<mr, nr>(cnt, c, ldc);
}

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

// --------------------------------------------------------------------------- drivers

using ScalarFn = void (*)(const u32*, int64_t, const u32*, int64_t, int64_t, int64_t, int32_t*,
                          int64_t);
using VecFn = void (*)(const u32*, int64_t, const u32*, int64_t, int64_t, int64_t, int64_t,
                       int32_t*, int64_t);

#define KD_ROW4(fn, mr, AND) \
  { &fn<mr, 1, AND>, &fn<mr, 2, AND>, &fn<mr, 3, AND>, &fn<mr, 4, AND> }
#define KD_ROW2(fn, mr, AND) \
  { &fn<mr, 1, AND>, &fn<mr, 2, AND> }

// [isa: portable, popcnt][mode][mr - 1][nr - 1]
const ScalarFn kScalar[2][2][MR][NR] = {
    {{KD_ROW4(micro_portable, 1, false), KD_ROW4(micro_portable, 2, false)},
     {KD_ROW4(micro_portable, 1, true), KD_ROW4(micro_portable, 2, true)}},
    {{KD_ROW4(micro_popcnt, 1, false), KD_ROW4(micro_popcnt, 2, false)},
     {KD_ROW4(micro_popcnt, 1, true), KD_ROW4(micro_popcnt, 2, true)}},
};
// [mode][mr - 1][nr - 1]
const VecFn kVec[2][VMR][VNR] = {
    {KD_ROW2(micro_avx2, 1, false), KD_ROW2(micro_avx2, 2, false), KD_ROW2(micro_avx2, 3, false)},
    {KD_ROW2(micro_avx2, 1, true), KD_ROW2(micro_avx2, 2, true), KD_ROW2(micro_avx2, 3, true)},
};


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

// counts[m, n] = popcount(A[m] OP B[n]) over all W words, added into C (zero on entry). With
// `base` (per row: K, or popcount(A[m])) the AVX2 GEMM path writes base[m] - 2 count directly
// (C need not be zeroed) and returns true; otherwise C holds counts and it returns false.
bool gemm_counts(const u32* A, int64_t M, const u32* B, int64_t N, int64_t W, int32_t* C,
                 bool use_and, Isa isa, const int32_t* base = nullptr,
                 const PathKnobs& knobs = path_knobs()) {
  const int mode = use_and ? 1 : 0;
  if (isa == kAvx2 && M >= knobs.lut_rows && N >= knobs.lut_cols) {  // table-lookup GEMM (xnor_lut.cpp)
    lut_gemm_avx2(A, M, B, N, W, C, use_and, base);
    return base != nullptr;
  }
  if (isa == kAvx2) {
    const int64_t nv = (W + 7) / 8, lds = 16 * nv;
    auto split_all = [&](const u32* src, int64_t rows) {
      at::Tensor t = at::empty({rows, lds}, at::TensorOptions().dtype(at::kInt));  // 64-B aligned
      u32* dst = reinterpret_cast<u32*>(t.data_ptr<int32_t>());
      kdengine::parallel_for(0, rows, std::max<int64_t>(1, 8192 / W), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) split_row_avx2(src + r * W, W, dst + r * lds);
      });
      return t;
    };
    if (M >= knobs.split_rows) {
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
  const auto& table = kScalar[isa == kPopcnt ? 1 : 0][mode];
  drive<MR, NR>(M, N, W, KCW, [&](int64_t m, int64_t n, int64_t mr, int64_t nr, int64_t k0, int64_t k1) {
    table[mr - 1][nr - 1](A + m * W, W, B + n * W, W, k0, k1, C + m * N + n, N);
  });
  return false;
}

// --------------------------------------------------------------------------- packing

// bit = (x < 0): -0.0 and +0.0 are +1; NaN is reported through `nan`.
template <typename T>
void pack_signs_row_scalar(const T* x, int64_t K, u32* out, bool& nan) {
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
void pack_signs_row_scalar<double>(const double* x, int64_t K, u32* out, bool& nan) {
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

template <typename T>
void pack_signs_row(const T* x, int64_t K, u32* out, bool& nan, Isa) {
  pack_signs_row_scalar<T>(x, K, out, nan);
}

void pack_signs_row(const float* x, int64_t K, u32* out, bool& nan, Isa isa) {
  if (isa == kAvx2)
    pack_signs_row_f32_avx2(x, K, out, nan);
  else
    pack_signs_row_scalar<float>(x, K, out, nan);
}

// bit = (s != 0)
void pack_bool_row_scalar(const uint8_t* s, int64_t K, u32* out) {
  const int64_t W = (K + 31) / 32;
  for (int64_t w = 0; w < W; ++w) {
    u32 word = 0;
    const int64_t e = std::min<int64_t>(32, K - 32 * w);
    for (int64_t j = 0; j < e; ++j) word |= static_cast<u32>(s[32 * w + j] != 0) << j;
    out[w] = word;
  }
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

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows, K), got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// Packs the rows of x (R, K) floating into (R, ceil(K/32)) int32; raises ValueError on NaN.
at::Tensor pack_signs_impl(const at::Tensor& x_in, Isa isa) {
  check_2d(x_in, "x");
  TORCH_CHECK_VALUE(x_in.is_floating_point(), "x must be a floating tensor, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1), W = (K + 31) / 32;
  TORCH_CHECK_VALUE(K >= 1, "x must have K >= 1 elements per row, got K = 0");
  at::Tensor out = at::empty({R, W}, x.options().dtype(at::kInt));
  u32* o = reinterpret_cast<u32*>(out.data_ptr<int32_t>());
  std::atomic<bool> any_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "binary_pack_signs", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / K);
    kdengine::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      bool nan = false;
      for (int64_t r = r0; r < r1; ++r) {
        pack_signs_row(xp + r * K, K, o + r * W, nan, isa);
      }
      if (nan) any_nan.store(true);
    });
  });
  TORCH_CHECK_VALUE(!any_nan.load(),
                    "x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits");
  return out;
}

at::Tensor pack_bool_impl(const at::Tensor& s_in, Isa isa) {
  check_2d(s_in, "s");
  TORCH_CHECK_VALUE(s_in.scalar_type() == at::kBool || s_in.scalar_type() == at::kByte,
                    "s must be a bool or uint8 tensor, got ", s_in.scalar_type());
  const at::Tensor s = s_in.contiguous();
  const int64_t R = s.size(0), K = s.size(1), W = (K + 31) / 32;
  TORCH_CHECK_VALUE(K >= 1, "s must have K >= 1 elements per row, got K = 0");
  at::Tensor out = at::empty({R, W}, s.options().dtype(at::kInt));
  u32* o = reinterpret_cast<u32*>(out.data_ptr<int32_t>());
  const uint8_t* sp = reinterpret_cast<const uint8_t*>(s.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  kdengine::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (isa == kAvx2)
        pack_bool_row_avx2(sp + r * K, K, o + r * W);
      else
        pack_bool_row_scalar(sp + r * K, K, o + r * W);
    }
  });
  return out;
}

void check_bits(const at::Tensor& t, const char* name, int64_t k) {
  check_2d(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, " must be int32 packed words, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k < (int64_t(1) << 31), "k=", k,
                    " is too large: the counts are int32, so K must be < 2^31 = 2147483648");
  TORCH_CHECK_VALUE(t.size(1) == (k + 31) / 32, name, " has ", t.size(1),
                    " words per row but k = ", k, " needs ", (k + 31) / 32);
}

// Padding bits (bits k % 32 .. 31 of the last word of a row) never count. PackedSigns checks them
// at construction, but its bits tensor can be edited in place afterwards: t itself when no row has
// one set (one word read per row), else a copy with them cleared, so the kernels below (which
// assume zero padding) give the same result as with clean padding.
at::Tensor clear_padding(const at::Tensor& t, int64_t k) {
  const int rem = static_cast<int>(k % 32);
  const int64_t R = t.size(0), W = t.size(1);
  if (rem == 0 || R == 0) return t;
  const u32 pad = ~((u32{1} << rem) - 1);
  const u32* p = reinterpret_cast<const u32*>(t.data_ptr<int32_t>()) + (W - 1);
  bool dirty = false;
  for (int64_t r = 0; r < R; ++r) dirty |= (p[r * W] & pad) != 0;
  if (!dirty) return t;
  at::Tensor c = t.clone();
  u32* q = reinterpret_cast<u32*>(c.data_ptr<int32_t>()) + (W - 1);
  for (int64_t r = 0; r < R; ++r) q[r * W] &= ~pad;
  return c;
}

at::Tensor counts_impl(const at::Tensor& a, const at::Tensor& b, Isa isa, bool use_and) {
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  at::Tensor c = at::zeros({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return c;
  gemm_counts(reinterpret_cast<const u32*>(a.data_ptr<int32_t>()), M,
              reinterpret_cast<const u32*>(b.data_ptr<int32_t>()), N, W, c.data_ptr<int32_t>(),
              use_and, isa);
  return c;
}

// --------------------------------------------------------------------------- ops

at::Tensor binary_pack_signs(const at::Tensor& x) { return pack_signs_impl(x, pick_isa()); }

at::Tensor binary_pack_bool(const at::Tensor& s) { return pack_bool_impl(s, pick_isa()); }

// mode 0: K - 2 popcount(a ^ b); mode 1: popcount(a) - 2 popcount(a & b).
at::Tensor binary_gemm(const at::Tensor& a_in, const at::Tensor& b_in, int64_t k, int64_t mode) {
  check_bits(a_in, "a", k);
  check_bits(b_in, "b", k);
  const at::Tensor a = clear_padding(a_in, k), b = clear_padding(b_in, k);
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (xnor) or 1 (spike AND), got ", mode);
  const Isa isa = pick_isa();
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  const u32* ap = reinterpret_cast<const u32*>(a.data_ptr<int32_t>());
  // per-row base of the result: K (xnor) or popcount of the spike row
  std::vector<int32_t> base(static_cast<size_t>(M), static_cast<int32_t>(k));
  if (mode == 1) {
    kdengine::parallel_for(0, M, std::max<int64_t>(1, 16384 / W), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int64_t p = 0;
        for (int64_t w = 0; w < W; ++w) p += __builtin_popcount(ap[m * W + w]);
        base[m] = static_cast<int32_t>(p);
      }
    });
  }
  // the AVX2 GEMM path writes every output itself; the others accumulate into zeros
  const PathKnobs knobs = path_knobs();
  const bool writes_all = isa == kAvx2 && M >= knobs.split_rows;
  at::Tensor c = writes_all ? at::empty({M, N}, a.options().dtype(at::kInt))
                            : at::zeros({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return c;
  int32_t* cp = c.data_ptr<int32_t>();
  if (gemm_counts(ap, M, reinterpret_cast<const u32*>(b.data_ptr<int32_t>()), N, W, cp, mode == 1,
                  isa, base.data(), knobs))
    return c;
  kdengine::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) cp[m * N + n] = base[m] - 2 * cp[m * N + n];
  });
  return c;
}

// y = (K - 2 popcount(pack(x) ^ w)) * scale[n] + bias[n], in float32 (float64 for float64 x),
// rounded once to x's dtype. The multiply and the add round separately (no FMA), like torch.
template <typename acc_t>
void linear_epilogue(const int32_t* c, int64_t M, int64_t N, int64_t k, const acc_t* scale,
                     const acc_t* bias, acc_t* y) {
  kdengine::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        acc_t v = static_cast<acc_t>(k - 2 * static_cast<int64_t>(c[m * N + n]));
        if (scale) v = v * scale[n];
        if (bias) v = v + bias[n];
        y[m * N + n] = v;
      }
  });
}

at::Tensor binary_linear(const at::Tensor& x, const at::Tensor& w_in, int64_t k,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  check_2d(x, "x");
  check_bits(w_in, "weight", k);
  const at::Tensor w = clear_padding(w_in, k);
  TORCH_CHECK_VALUE(x.size(1) == k, "x has K = ", x.size(1), " features but weight has k = ", k);
  const Isa isa = pick_isa();
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = w.size(0);
  for (const auto* opt : {&scale, &bias}) {
    if (opt->has_value()) {
      const at::Tensor& t = opt->value();
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N && t.scalar_type() == acc && t.is_contiguous()
                        && t.device().is_cpu(),
                        opt == &scale ? "scale" : "bias", " must be a contiguous CPU (N,) = (", N,
                        ",) tensor of dtype ", acc);
    }
  }
  const at::Tensor a = pack_signs_impl(x, isa);
  const at::Tensor c = counts_impl(a, w, isa, false);
  at::Tensor y = at::empty({x.size(0), N}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "binary_linear_epilogue", [&] {
    linear_epilogue<scalar_t>(c.data_ptr<int32_t>(), c.size(0), N, k,
                              scale.has_value() ? scale->data_ptr<scalar_t>() : nullptr,
                              bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                              y.data_ptr<scalar_t>());
  });
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

int64_t binary_isa() { return best_isa(); }

// Forces the ISA of every later call (-1: back to the best one); returns the previous setting.
int64_t binary_force_isa(int64_t isa) {
  TORCH_CHECK_VALUE(isa >= -1 && isa <= kAvx2,
                    "isa must be -1 (auto), 0 (portable), 1 (popcnt) or 2 (avx2), got ", isa);
  TORCH_CHECK_VALUE(isa < 0 || cpu_has(static_cast<Isa>(isa)), "isa ", isa,
                    " is not supported by this CPU");
  return kForcedIsa.exchange(isa);
}

// Core clock estimate (GHz) for the benchmark's roofline: `iters` x 4 dependent integer adds (one
// per cycle) timed with this thread's CPU clock, so time the thread spends preempted on a shared
// machine does not count. 0 where the probe is not implemented (non-x86).
double binary_cpu_ghz(int64_t iters) {
#if defined(__x86_64__)
  timespec t0{}, t1{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  int64_t x = 0, n = std::max<int64_t>(iters, 1);
  asm volatile(
      "1:\n"
      "add $1, %[x]\n"
      "add $1, %[x]\n"
      "add $1, %[x]\n"
      "add $1, %[x]\n"
      "dec %[n]\n"
      "jnz 1b\n"
      : [x] "+r"(x), [n] "+r"(n)
      :
      : "cc");
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  return s > 0 ? 4.0 * static_cast<double>(std::max<int64_t>(iters, 1)) / s / 1e9 : 0.0;
#else
  (void)iters;
  return 0.0;
#endif
}

// Sets the smallest M and N for the table-lookup GEMM (returns the old pair; tests/bench).
std::vector<int64_t> binary_set_lut_min(int64_t rows, int64_t cols) {
  return {kLutMinRows.exchange(rows), kLutMinCols.exchange(cols)};
}

// Sets the M threshold from which the AVX2 path also splits B (returns the old one; tests/bench).
int64_t binary_set_split_b_rows(int64_t rows) {
  return kSplitBMinRows.exchange(rows);
}

}  // namespace
}  // namespace kdengine_binary

// CPU-only utilities and test knobs (kdengine.testing); the kernel ops' schemas are defined once,
// for CPU and CUDA alike, in kdengine/ops/binary/schema.py.
TORCH_LIBRARY_FRAGMENT(kdengine_cpu, m) {
  m.def("binary_isa() -> int", &kdengine_binary::binary_isa);
  m.def("binary_force_isa(int isa) -> int", &kdengine_binary::binary_force_isa);
  m.def("binary_set_split_b_rows(int rows) -> int", &kdengine_binary::binary_set_split_b_rows);
  m.def("binary_set_lut_min(int rows, int cols) -> int[]", &kdengine_binary::binary_set_lut_min);
  m.def("binary_cpu_ghz(int iters) -> float", &kdengine_binary::binary_cpu_ghz);
}

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("binary_pack_signs", &kdengine_binary::binary_pack_signs);
  m.impl("binary_pack_bool", &kdengine_binary::binary_pack_bool);
  m.impl("binary_gemm", &kdengine_binary::binary_gemm);
  m.impl("binary_linear", &kdengine_binary::binary_linear);
}
