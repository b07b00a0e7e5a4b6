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
// Files, one per instruction set: this one (the ops, packing, the portable and POPCNT kernels),
// xnor_avx2.cpp (the AVX2 GEMV and panel kernels and packing rows), xnor_lut.cpp (the AVX2
// table-lookup GEMM), xnor_avx512.cpp (the AVX-512 VPOPCNTDQ kernels and packing rows);
// xnor_kernels.h holds what they share.
//
// Kernels (the ISA is picked at run time by common/cpu_isa.h, so the library, built with plain
// -O3, runs on any x86-64 and uses POPCNT/AVX2/AVX-512 where present):
// * AVX-512 VPOPCNTDQ (the best where present): B transposed into panels of 32 rows, one A word
//   broadcast against 8 B rows per vector, XOR/AND + vpopcntq + vpaddq in a 6 x 4 register tile
//   (~2.5x the table-lookup GEMM below at 1024 x 1024 x 4096); raw B rows for M < 16. Details at
//   the top of xnor_avx512.cpp.
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

#include "binary/xnor_kernels.h"
#include "binary/xnor_lut.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
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

// The levels of common/cpu_isa.h's binary family; the choice (best of this CPU, the
// binary_force_isa test knob, KDENGINE_CPU_PORTABLE) is made there, once per op call.
enum Isa : int64_t {
  kPortable = kdengine::kIsaPortable,
  kPopcnt = kdengine::kIsaPopcnt,
  kAvx2 = kdengine::kIsaAvx2,
  kAvx512 = kdengine::kIsaAvx512,
};

Isa pick_isa() { return static_cast<Isa>(kdengine::cpu_isa(kdengine::kBinary)); }

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

// --------------------------------------------------------------------------- drivers

using ScalarFn = void (*)(const u32*, int64_t, const u32*, int64_t, int64_t, int64_t, int32_t*,
                          int64_t);

#define KD_ROW4(fn, mr, AND) \
  { &fn<mr, 1, AND>, &fn<mr, 2, AND>, &fn<mr, 3, AND>, &fn<mr, 4, AND> }

// [isa: portable, popcnt][mode][mr - 1][nr - 1]
const ScalarFn kScalar[2][2][MR][NR] = {
    {{KD_ROW4(micro_portable, 1, false), KD_ROW4(micro_portable, 2, false)},
     {KD_ROW4(micro_portable, 1, true), KD_ROW4(micro_portable, 2, true)}},
    {{KD_ROW4(micro_popcnt, 1, false), KD_ROW4(micro_popcnt, 2, false)},
     {KD_ROW4(micro_popcnt, 1, true), KD_ROW4(micro_popcnt, 2, true)}},
};


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
  if (isa == kAvx2) return gemm_counts_avx2(A, M, B, N, W, C, use_and, base, knobs.split_rows);
  if (isa == kAvx512) return gemm_counts_avx512(A, M, B, N, W, C, use_and, base, knobs.split_rows);
  const auto& table = kScalar[isa == kPopcnt ? 1 : 0][mode];
  drive<MR, NR>(M, N, W, KCW, [&](int64_t m, int64_t n, int64_t mr, int64_t nr, int64_t k0, int64_t k1) {
    table[mr - 1][nr - 1](A + m * W, W, B + n * W, W, k0, k1, C + m * N + n, N);
  });
  return false;
}

// --------------------------------------------------------------------------- packing


template <typename T>
void pack_signs_row(const T* x, int64_t K, u32* out, bool& nan, Isa) {
  pack_signs_row_scalar<T>(x, K, out, nan);
}

void pack_signs_row(const float* x, int64_t K, u32* out, bool& nan, Isa isa) {
  if (isa == kAvx512)
    pack_signs_row_f32_avx512(x, K, out, nan);
  else if (isa == kAvx2)
    pack_signs_row_f32_avx2(x, K, out, nan);
  else
    pack_signs_row_scalar<float>(x, K, out, nan);
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
      if (isa == kAvx512)
        pack_bool_row_avx512(sp + r * K, K, o + r * W);
      else if (isa == kAvx2)
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
  // the AVX2 and AVX-512 GEMM paths write every output themselves; the others accumulate into zeros
  const PathKnobs knobs = path_knobs();
  const bool writes_all = (isa == kAvx2 || isa == kAvx512) && M >= knobs.split_rows;
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

// The best ISA of this CPU (not the forced one: see kdengine_cpu::cpu_isa for that).
int64_t binary_isa() { return kdengine::best_cpu_isa(kdengine::kBinary); }

// Forces the ISA of every later call (-1: back to the best one); returns the previous setting.
int64_t binary_force_isa(int64_t isa) {
  const std::string err = kdengine::force_isa_error(kdengine::kBinary, isa);
  TORCH_CHECK_VALUE(err.empty(), err);
  return kdengine::force_isa(kdengine::kBinary, isa);
}

// Core clock estimate (GHz) for the benchmark's roofline: `iters` x 4 dependent 64-bit integer
// multiplies (3 cycles each on every x86 core since Sandy Bridge and Zen) timed with this thread's
// CPU clock, so time the thread spends preempted on a shared machine does not count. Not a chain of
// `add $1`: newer Intel cores fold immediate adds at rename, which reads as 4x the clock. 0 where
// the probe is not implemented (non-x86).
double binary_cpu_ghz(int64_t iters) {
#if defined(__x86_64__)
  timespec t0{}, t1{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  int64_t x = 1, m = 3, n = std::max<int64_t>(iters, 1);
  asm volatile(
      "1:\n"
      "imul %[m], %[x]\n"
      "imul %[m], %[x]\n"
      "imul %[m], %[x]\n"
      "imul %[m], %[x]\n"
      "dec %[n]\n"
      "jnz 1b\n"
      : [x] "+r"(x), [n] "+r"(n)
      : [m] "r"(m)
      : "cc");
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  return s > 0 ? 12.0 * static_cast<double>(std::max<int64_t>(iters, 1)) / s / 1e9 : 0.0;
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
