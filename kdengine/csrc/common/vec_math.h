// Branch-free vector exp / expm1 / log / log1p for the CPU kernels (GCC vector extensions).
//
// Why our own: the KD loss spends most of its arithmetic in exp(), and libm's scalar expf does
// not vectorize without -ffast-math, which we must not use (NaN and inf have to survive).
// Everything here is written with GCC vector types (8 or 16 x float, 4 x double), so the same
// source compiles to SSE2 pairs in a default-target function, to AVX2+FMA when inlined into a
// function declared __attribute__((target("avx2,fma"))) and, for 16-float vectors, to AVX-512 in
// one declared with common/cpu_isa.h's KD_TARGET_AVX512_FLOAT: the kernels pick at run time. Every function is always_inline for that reason (an out-of-line call would be compiled
// for the default target, and passing 32-byte vectors across it changes the ABI).
//
// Float accuracy, max error against float64 measured on 2M random points per range (SSE2 and
// AVX2+FMA builds alike):
//   vexp        Cephes range reduction x = n ln2 + r (ln2 split in two so n*C1 is exact), degree-5
//               polynomial: <= 1.0 ulp on [-87.3, 88.3]. Results below FLT_MIN flush to 0
//               (x < -87.3365); x > 88.37 gives +inf.
//   vexp_nonpos the same for x <= 0 (the kernels' case: logits minus their maximum), <= 1.0 ulp,
//               a few operations cheaper.
//   vexpm1      same reduction, 2^n expm1(r) + (2^n - 1) with a degree-8 Taylor polynomial for
//               expm1(r), |r| <= ln2/2: <= 1.5 ulp, no cancellation near 0.
//   vlog        Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial: <= 0.9 ulp,
//               subnormals rescaled; log(0) = -inf, log(<0) = NaN, log(inf) = inf.
//   vlog1p      Goldberg's trick log1p(u) = log(w) u / (w - 1), w = 1 + u: <= 2.3 ulp.
// NaN in gives NaN out everywhere: every clamp is written as `x < lo ? lo : x`, which keeps a NaN
// (the comparison is false), never as fmin/fmax, which would swallow it.
// Double vectors call the scalar libm functions lane by lane (the float64 path is for accuracy
// and gradcheck, not speed).
#pragma once

// Vectors never cross a call boundary (everything is always_inline): the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kdvec {

#define KDV_INLINE inline __attribute__((always_inline))

typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int64_t v4l __attribute__((vector_size(32)));

// Per-vector-type facts: element type, lane count, the mask type comparisons return.
template <class VT>
struct Traits;
template <>
struct Traits<v8f> {
  using E = float;
  using M = v8i;
  static constexpr int W = 8;
  static KDV_INLINE M iota() { return M{0, 1, 2, 3, 4, 5, 6, 7}; }
};
template <>
struct Traits<v16f> {
  using E = float;
  using M = v16i;
  static constexpr int W = 16;
  static KDV_INLINE M iota() { return M{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
};
template <>
struct Traits<v4d> {
  using E = double;
  using M = v4l;
  static constexpr int W = 4;
  static KDV_INLINE M iota() { return M{0, 1, 2, 3}; }
};

template <class VT>
KDV_INLINE VT bcast(typename Traits<VT>::E x) {
  return VT{} + x;
}

// Loads n <= W elements (the rest filled with `fill`), stores n elements: rows of any length are
// processed by full vectors, the last one partial.
template <class VT>
KDV_INLINE VT load(const typename Traits<VT>::E* p, int n, typename Traits<VT>::E fill) {
  constexpr int W = Traits<VT>::W;
  VT v;
  if (__builtin_expect(n == W, 1)) {
    std::memcpy(&v, p, sizeof(VT));
  } else {
    v = bcast<VT>(fill);
    for (int k = 0; k < n; ++k) v[k] = p[k];
  }
  return v;
}

template <class VT>
KDV_INLINE void store(typename Traits<VT>::E* p, VT v, int n) {
  constexpr int W = Traits<VT>::W;
  if (__builtin_expect(n == W, 1)) {
    std::memcpy(p, &v, sizeof(VT));
  } else {
    for (int k = 0; k < n; ++k) p[k] = v[k];
  }
}

// Horizontal reductions in a fixed lane order (deterministic).
template <class VT>
KDV_INLINE double hsum(VT v) {
  double s = 0.0;
  for (int k = 0; k < Traits<VT>::W; ++k) s += static_cast<double>(v[k]);
  return s;
}

template <class VT>
KDV_INLINE typename Traits<VT>::E hmax(VT v) {
  typename Traits<VT>::E m = v[0];
  for (int k = 1; k < Traits<VT>::W; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// Widening 8 floats to 2 x 4 doubles and back (one rounding), for the few places where fp32
// cancellation matters. The v4d overloads are the identity, so templated code reads the same.
KDV_INLINE void widen(v8f x, v4d& lo, v4d& hi) {
  lo = __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3), v4d);
  hi = __builtin_convertvector(__builtin_shufflevector(x, x, 4, 5, 6, 7), v4d);
}
KDV_INLINE v8f narrow(v4d lo, v4d hi) {
  v4f a = __builtin_convertvector(lo, v4f), b = __builtin_convertvector(hi, v4f);
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
}
// The halves of a 16-float vector and back: the double-precision helpers work on 8 floats at a
// time, so a 16-wide kernel runs them twice.
KDV_INLINE void halves(v16f x, v8f& lo, v8f& hi) {
  lo = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  hi = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
}
KDV_INLINE v16f join(v8f lo, v8f hi) {
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// ------------------------------------------------------------------------------------ float

namespace detail {
// The integer vectors of a float vector type (signed, unsigned): the float functions below are
// templates over v8f (SSE2 pairs / AVX2) and v16f (AVX-512), same operations, same bits per lane.
template <class VF>
struct IntOf;
template <>
struct IntOf<v8f> {
  using I = v8i;
  using U = v8u;
};
template <>
struct IntOf<v16f> {
  using I = v16i;
  using U = v16u;
};
template <class VF>
using IntV = typename IntOf<VF>::I;
template <class VF>
using UIntV = typename IntOf<VF>::U;

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;        // 9 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;     // ln 2 - kLn2Hi
constexpr float kRound = 12582912.0f;         // 1.5 * 2^23: x + kRound rounds x to an integer
constexpr float kExpHi = 88.37f;              // n = round(x log2 e) <= 127
constexpr float kExpLo = -87.33654475f;       // = -126 ln 2: n >= -126, 2^n stays normal

// r = x - fn ln2 with fn integral and |fn| <= 150: n * kLn2Hi is exact, so r keeps its digits.
// Templates over float vectors of any width (and exp_poly below), so 4-wide kernels
// (if_neuron.cpp) share them.
template <class VF>
KDV_INLINE VF reduce_r(VF x, VF fn) {
  const VF r = x - fn * kLn2Hi;
  return r - fn * kLn2Lo;
}

// Range reduction shared by vexp and vexpm1: x = n ln2 + r, |r| <= ln2/2 (x already clamped),
// returns r and 2^n (built from the exponent bits, no float->int conversion, so no UB on NaN).
template <class VF>
KDV_INLINE void reduce(VF xc, VF& r, VF& scale) {
  using VU = UIntV<VF>;
  VF t = xc * kLog2e + kRound;
  VF fn = t - kRound;
  VU n = (VU)t - (VU)(VF{} + kRound);  // integer n, as bits (two's complement)
  r = reduce_r(xc, fn);
  scale = (VF)((n + 127u) << 23);
}

// e^r for |r| <= ln2/2 (after the reduction above): Cephes' degree-5 polynomial, <= 1 ulp.
template <class VF>
KDV_INLINE VF exp_poly(VF r) {
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}
}  // namespace detail

template <class VF, class = detail::IntV<VF>>
KDV_INLINE VF vexp(VF x) {
  using namespace detail;
  const VF hi = VF{} + kExpHi, lo = VF{} + kExpLo;
  VF xc = x < lo ? lo : x;  // NaN stays NaN
  xc = xc > hi ? hi : xc;
  VF r, scale;
  reduce(xc, r, scale);
  VF y = exp_poly(r) * scale;
  y = x > hi ? VF{} + std::numeric_limits<float>::infinity() : y;
  y = x < lo ? VF{} : y;
  return y;
}

// exp(x) for x <= 0 (or -inf, or NaN): the kernels' case (logits minus their maximum). Skips the
// overflow side, and gets exact zeros below -87.3 by clamping the exponent bits at 0 (the
// scale 2^n becomes +0.0) instead of a compare and blend.
template <class VF, class = detail::IntV<VF>>
KDV_INLINE VF vexp_nonpos(VF x) {
  using namespace detail;
  using VI = IntV<VF>;
  const VF lo = VF{} - 104.0f;  // exp(-104) < 2^-149: 0 in float anyway
  VF xc = x < lo ? lo : x;      // NaN stays NaN; -inf becomes -104
  VF t = xc * kLog2e + kRound;
  VF fn = t - kRound;
  VI n = (VI)t - (VI)(VF{} + kRound);
  VF r = reduce_r(xc, fn);
  VF y = exp_poly(r);
  VI e = n + 127;
  e = e > 0 ? e : VI{};  // n < -126: scale +0.0, so the result is exactly 0
  return y * (VF)(e << 23);
}

template <class VF, class = detail::IntV<VF>>
KDV_INLINE VF vexpm1(VF x) {
  using namespace detail;
  const VF hi = VF{} + kExpHi, lo = VF{} + kExpLo;
  VF xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  VF r, scale;
  reduce(xc, r, scale);
  // expm1(r) = r + r^2 (1/2 + r/6 + ... + r^6/8!), |r| <= 0.347: truncation < 1e-9 relative.
  VF p = VF{} + 2.48015873e-5f;  // 1/8!
  p = p * r + 1.98412698e-4f;      // 1/7!
  p = p * r + 1.38888889e-3f;      // 1/6!
  p = p * r + 8.33333333e-3f;      // 1/5!
  p = p * r + 4.16666667e-2f;      // 1/4!
  p = p * r + 1.66666667e-1f;      // 1/3!
  p = p * r + 0.5f;
  VF em = p * (r * r) + r;
  VF y = scale * em + (scale - 1.0f);  // n = 0 leaves em untouched: exact near 0
  y = x > hi ? VF{} + std::numeric_limits<float>::infinity() : y;
  y = x < lo ? VF{} - 1.0f : y;
  return y;
}

template <class VF, class = detail::IntV<VF>>
KDV_INLINE VF vlog(VF x) {
  using VI = detail::IntV<VF>;
  const float kMinNormal = 1.17549435e-38f;
  VI sub = x < kMinNormal;
  VF xs = sub ? x * 8388608.0f : x;  // 2^23 lifts subnormals into the normal range
  VI e_adj = sub ? VI{} - 23 : VI{};
  VI bits = (VI)xs;
  VI e = ((bits >> 23) & 0xff) - 126 + e_adj;
  VF m = (VF)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  VI small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  VF f = small ? m + m - 1.0f : m - 1.0f;  // f in [sqrt(1/2) - 1, sqrt(2) - 1)
  VF z = f * f;
  VF p = VF{} + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  VF fe = __builtin_convertvector(e, VF);
  VF y = p * f * z;
  y = y + fe * detail::kLn2Lo;
  y = y - 0.5f * z;
  VF res = f + y;
  res = res + fe * detail::kLn2Hi;
  const float inf = std::numeric_limits<float>::infinity();
  res = x == 0.0f ? VF{} - inf : res;
  res = x < 0.0f ? VF{} + std::numeric_limits<float>::quiet_NaN() : res;
  res = x == inf ? VF{} + inf : res;
  res = x != x ? x : res;  // NaN
  return res;
}

template <class VF, class = detail::IntV<VF>>
KDV_INLINE VF vlog1p(VF u) {
  VF w = u + 1.0f;
  VF lw = vlog(w);
  // log1p(u) = log(w) * u / (w - 1): the quotient corrects the rounding of 1 + u.
  VF dw = w - 1.0f;
  VF res = lw * (u / (dw == 0.0f ? VF{} + 1.0f : dw));
  res = dw == 0.0f ? u : res;
  return u == std::numeric_limits<float>::infinity() ? u : res;
}

#if defined(__x86_64__)
// The same for 16 floats, selects through AVX-512 mask registers. GCC 12 evaluates selects whose
// conditions it has merged (here dw == 0 twice, then u == inf) lane by lane for 512-bit vectors,
// with scalar compares and branches (several times slower); explicit k-masks avoid that. Only
// inlinable into functions compiled for AVX-512 (KD_TARGET_AVX512_FLOAT of cpu_isa.h); plain inline,
// since the generic templates that call it are compiled for the default target first.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) inline v16f vlog1p(
    v16f u) {
  const v16f w = u + 1.0f;
  const v16f lw = vlog(w);
  const v16f dw = w - 1.0f;
  const __mmask16 dw0 = _mm512_cmp_ps_mask((__m512)dw, _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __mmask16 uinf =
      _mm512_cmp_ps_mask((__m512)u, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  const v16f den = (v16f)_mm512_mask_blend_ps(dw0, (__m512)dw, _mm512_set1_ps(1.0f));
  const v16f res = lw * (u / den);
  return (v16f)_mm512_mask_blend_ps(dw0 | uinf, (__m512)res, (__m512)u);
}
#endif

// ------------------------------------------------------------------------------------ double

KDV_INLINE v4d vexp(v4d x) {
  v4d r;
  for (int k = 0; k < 4; ++k) r[k] = std::exp(x[k]);
  return r;
}
KDV_INLINE v4d vexp_nonpos(v4d x) { return vexp(x); }
KDV_INLINE v4d vexpm1(v4d x) {
  v4d r;
  for (int k = 0; k < 4; ++k) r[k] = std::expm1(x[k]);
  return r;
}
KDV_INLINE v4d vlog(v4d x) {
  v4d r;
  for (int k = 0; k < 4; ++k) r[k] = std::log(x[k]);
  return r;
}
KDV_INLINE v4d vlog1p(v4d x) {
  v4d r;
  for (int k = 0; k < 4; ++k) r[k] = std::log1p(x[k]);
  return r;
}

}  // namespace kdvec
