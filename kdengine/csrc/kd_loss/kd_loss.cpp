// Fused temperature softmax-KL distillation loss, CPU backend: loss and gradient(s) in one call.
//
// Math (spec: kdengine/ops/kd_loss/reference.py and the backend contract in kdengine/ops/kd_loss/op.py).
// Per row, a = s/T, b = t/T, q = softmax(a) (student), p = softmax(b) (teacher). With the row
// maxima ms, mt: xa = (s - ms)/T, xb = (t - mt)/T (<= 0), ea = exp(xa), eb = exp(xb),
// Sa = sum ea, Sb = sum eb, so q = ea/Sa, log q = xa - log Sa (likewise p).
//   forward KL D = sum eb (xb - xa) / Sb + log(Sa/Sb)     dD/da = q - p
//                                                         dD/db = p (log p - log q - D)
//   reverse KL D = sum ea (xa - xb) / Sa + log(Sb/Sa)     dD/da = q (log q - log p - D)
//                                                         dD/db = p - q
//   JSD(beta)  rho = log p - log q, m = beta p + (1-beta) q:
//              log p - log m = -log1p((1-beta) expm1(-rho)) for rho >= 0,
//              log q - log m = -log1p(beta expm1(rho))      for rho < 0 (the other is that -+ rho),
//              accurate when p ~ q (no 1 - 1 cancellation); D = beta KL(p||m) + (1-beta) KL(q||m).
//   Zero-probability entries (masked -inf logits) contribute 0: selects test `e != 0`, so a NaN
//   (e = NaN) still propagates. T = inf: the centered logits-matching limit on entries that are
//   not -inf in both inputs. Hard CE at T = 1: CE = -(1-eps) log q1_y - (eps/V) sum log q1.
//   grad_s = nrm w (alpha dCE/ds + K/T dD/da), grad_t = nrm w K/T dD/db, K = (1 - alpha) T^2.
//
// Passes over one row (rows are independent and spread over threads):
//   P1  per block of 512: the block maxima (this read streams the row from memory, the block then
//       sits in L1), the running maxima and a rescale of the sums when they grow (online
//       softmax), then ea and eb against the running maxima: staged, and summed. One exp per
//       element and input, never recomputed.
//   P2  only for reverse KL, JSD and the forward-KL teacher gradient: the mean that the gradient
//       subtracts (E_q[log p - log q], E_p[...]) or the JSD terms; reads s, t and staged values.
//   P3  the gradient(s): staged exps times a per-block factor exp((m_block - m)/T) to the final
//       maxima. Forward KL without the teacher gradient reads only the staged ea, eb here.
// ea is staged in the grad_s row itself and eb in grad_t or a per-thread row, so for fp32 at
// V = 32000 the working set is ~512 KB (s, t, grad_s, eb; L2-resident between passes) and DRAM
// sees one read of s and t and one write of grad_s.
//
// Precision. Math in float (double for float64 inputs); bf16/fp16 rows are widened into a
// per-thread float row and the gradient is rounded once at the store. Sums accumulate in float
// vectors over blocks of 512 elements, then in double. Where a gradient is q (log p - log q - mean)
// the log-ratio and its mean are formed in double: the terms (~|logits|/T) cancel there. For
// bf16/fp16 outputs ("precise") p - q is computed as -q expm1(log p - log q), exact where s == t.
// The per-row losses go to an (N,) double buffer summed in row order afterwards, so the result does
// not depend on the number of threads.
//
// Vector code: vec_math.h (GCC vector types, exp/log/expm1/log1p that keep NaN and inf). The row
// kernel is compiled three times: portable (8 floats per vector, SSE2 pairs), target("avx2,fma")
// (8 floats) and AVX-512 (16 floats: half the instructions per element for the exps, which bound
// the kernel once the row is in L1/L2); common/cpu_isa.h picks one per call. The three differ in
// the order of the float block sums (and FMA contraction), so they agree to rounding, not bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cpu_isa.h"
#include "common/output_pool.h"
#include "common/parallel.h"
#include "common/vec_math.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif


namespace {

using kdvec::bcast;
using kdvec::hmax;
using kdvec::hsum;
using kdvec::load;
using kdvec::store;
using kdvec::Traits;
using kdvec::v4d;
using kdvec::v16f;
using kdvec::v8f;

#define KD_INLINE inline __attribute__((always_inline))

enum Div : int { FORWARD_KL = 0, REVERSE_KL = 1, JSD = 2 };  // KDConfig's values
enum Red : int { NONE = 0, SUM = 1, BATCHMEAN = 2, MEAN = 3 };

constexpr int64_t kBlock = 512;  // elements summed in float before the double accumulator
// Software prefetch distance in P1 (elements): the block after next is requested from memory
// while this one is computed (measured ~5% on 1024 x 32000 fp32, single thread).
constexpr int64_t kPrefetch = 2048;

// Settings shared by every row (already validated).
struct RowArgs {
  int64_t V;
  int mode;        // Mode below
  bool do_ce;      // alpha > 0
  bool need_gt;    // write the teacher gradient
  bool precise;    // p - q from log-ratios (bf16/fp16 outputs), see LOG_RATIO
  bool ce_shared;  // T == 1 with the CE term: its softmax is the student's, not recomputed
  double invT;     // 1/T (finite T)
  double beta;
  double alpha;
  double eps;      // label smoothing
  double K;        // (1 - alpha) * (T^2 or 1); T = inf: (1 - alpha) * k
  double nrm;      // 1/count, 1/(count V) or 1
};

enum Mode : int { M_FKL = 0, M_RKL = 1, M_JSD = 2, M_INF = 3, M_CE_ONLY = 4 };

// Row buffers handed to the row kernel. gs/gt are the outputs (gt null unless need_gt); the
// scratch rows hold at least V elements each: [0] eb unless it is staged in gt, [1] the T = 1
// student exps for CE, [2] log q - log m and [3] log p - log m for JSD. blk holds two
// values per block of kBlock elements (the running maxima the block's exps were taken against).
template <class E>
struct RowIO {
  const E* s;
  const E* t;
  E* gs;
  E* gt;
  E* scratch[4];
  E* blk;
  // Widened (bf16/fp16) rows: the caller's next row of s and t (pf_bytes each, null if none). P1
  // requests it into L2 a slice per block, so that its read from memory overlaps this row's exps
  // instead of stalling the next widening pass.
  const char* pf[2] = {nullptr, nullptr};
  int64_t pf_bytes = 0;
};

// Row sums of P1, relative to the row maxima ms (student) and mt (teacher).
struct RowSums {
  double Sa = 0, Sb = 0;  // sum exp((s - ms)/T), sum exp((t - mt)/T)   [T = inf: sum d, V']
  double D = 0;           // forward KL: sum eb (xb - xa); reverse KL: sum ea (xa - xb)
  double U = 0;           // precise: sum ea expm1((t - s)/T)
  double S1 = 0, X = 0;   // CE: sum exp(s - ms), sum (s - ms)
};

// Lane-wise selections that need two comparisons. Written plainly for 8-float and double
// vectors; for 16 floats through AVX-512 mask registers, because GCC 12 evaluates a select whose
// conditions it merged (AND / OR of compares) lane by lane for 512-bit vectors, with scalar
// compares and branches (measured 1.6x slower for the whole bf16 row). (Plain inline: an
// always_inline target function cannot be inlined into the template bodies, which are compiled
// for the default target before they are inlined into the AVX-512 row function.)
// a where e != 0 (NaN counts as != 0) and |r| < half (r not NaN), else b.
template <class VT>
KD_INLINE VT near(VT e, VT r, VT half, VT a, VT b) {
  return e != 0 ? (r < half ? (r > -half ? a : b) : b) : b;
}
// a where s or t is not -inf (an entry kept by the T = inf limit), else b.
template <class VT, class E>
KD_INLINE VT kept(VT s, VT t, VT a, VT b, E ninf) {
  return s != ninf ? a : (t != ninf ? a : b);
}
#if defined(__x86_64__) || defined(__i386__)
KD_TARGET_AVX512_FLOAT inline v16f near(v16f e, v16f r, v16f half, v16f a, v16f b) {
  const __m512 absr = _mm512_abs_ps((__m512)r);
  const __mmask16 m = _mm512_cmp_ps_mask((__m512)e, _mm512_setzero_ps(), _CMP_NEQ_UQ) &
                      _mm512_cmp_ps_mask(absr, (__m512)half, _CMP_LT_OQ);
  return (v16f)_mm512_mask_blend_ps(m, (__m512)b, (__m512)a);
}
KD_TARGET_AVX512_FLOAT inline v16f kept(v16f s, v16f t, v16f a, v16f b, float ninf) {
  const __m512 vn = _mm512_set1_ps(ninf);
  const __mmask16 m = _mm512_cmp_ps_mask((__m512)s, vn, _CMP_NEQ_UQ) | _mm512_cmp_ps_mask((__m512)t, vn, _CMP_NEQ_UQ);
  return (v16f)_mm512_mask_blend_ps(m, (__m512)b, (__m512)a);
}

// Forward-KL precise P3 over one block for 16-float vectors: g = -(cA ea) expm1(r) on the lanes
// that `near` picks, cA ea - cB eb elsewhere; the same per-lane arithmetic as the generic loop,
// so the same bits. In random logit rows a fifth of the lanes are near, spread over nearly every
// vector, so a per-vector branch saves nothing; instead the near lanes' (r, -(cA ea)) are
// compressed into dense vectors, expm1 runs once per 16 near lanes, and the results are expanded
// back into place (a fifth of the expm1 work).
KD_TARGET_AVX512_FLOAT inline void fkl_precise_block16(const float* s, const float* t, const float* st_a,
                                                       const float* st_b, float* g, int64_t i0, int64_t i1,
                                                       float cA, float cB, float cF, float invT) {
  constexpr int W = 16;
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float buf_r[kBlock + W], buf_q[kBlock + W];
  __mmask16 masks[kBlock / W];
  const __m512 vhalf = _mm512_set1_ps(0.5f);
  int cnt = 0, k = 0;
  for (int64_t i = i0; i < i1; i += W, ++k) {
    const int n = i1 - i >= W ? W : int(i1 - i);
    const v16f ea = load<v16f>(st_a + i, n, 0), eb = load<v16f>(st_b + i, n, 0);
    const v16f xs = load<v16f>(s + i, n, ninf), xt = load<v16f>(t + i, n, ninf);
    const v16f r = (xt - xs) * invT - cF;
    const v16f b = cA * ea - cB * eb;
    const v16f nq = -(cA * ea);
    const __mmask16 m = _mm512_cmp_ps_mask((__m512)ea, _mm512_setzero_ps(), _CMP_NEQ_UQ) &
                        _mm512_cmp_ps_mask(_mm512_abs_ps((__m512)r), vhalf, _CMP_LT_OQ);
    store<v16f>(g + i, b, n);
    masks[k] = m;
    _mm512_storeu_ps(buf_r + cnt, _mm512_maskz_compress_ps(m, (__m512)r));
    _mm512_storeu_ps(buf_q + cnt, _mm512_maskz_compress_ps(m, (__m512)nq));
    cnt += __builtin_popcount(m);
  }
  _mm512_storeu_ps(buf_r + cnt, _mm512_setzero_ps());  // the last dense vector's unused lanes
  _mm512_storeu_ps(buf_q + cnt, _mm512_setzero_ps());
  for (int j = 0; j < cnt; j += W) {
    v16f r, nq;
    std::memcpy(&r, buf_r + j, sizeof(r));
    std::memcpy(&nq, buf_q + j, sizeof(nq));
    const v16f v = nq * kdvec::vexpm1(r);
    std::memcpy(buf_r + j, &v, sizeof(v));
  }
  int pos = 0;
  k = 0;
  for (int64_t i = i0; i < i1; i += W, ++k) {
    const __mmask16 m = masks[k];
    if (m == 0) continue;
    _mm512_mask_storeu_ps(g + i, m, _mm512_maskz_expand_ps(m, _mm512_loadu_ps(buf_r + pos)));
    pos += __builtin_popcount(m);
  }
}
#endif

template <class E>
KD_INLINE double block_factor(E ref, E m, double scale) {
  // exp((ref - m) * scale): converts values staged against the running maximum `ref` to the
  // final maximum m. ref = -inf marks blocks staged before any finite logit: their values are
  // 0 (or NaN, which stays NaN).
  if (ref == -std::numeric_limits<E>::infinity()) return 0.0;
  return std::exp((static_cast<double>(ref) - static_cast<double>(m)) * scale);
}

// The passes of one row instance (vector type, mode, CE term on): P1, then everything after it.
// Static members, so both see the same element types and constants without restating them.
template <class VT, int MODE, bool CE>
struct RowPasses {
  using E = typename Traits<VT>::E;
  using M = typename Traits<VT>::M;
  static constexpr int W = Traits<VT>::W;
  static constexpr bool KD = MODE <= M_JSD;  // a divergence at finite T
  static constexpr E ninf = -std::numeric_limits<E>::infinity();

  static KD_INLINE void pass1(const RowIO<E>& io, const RowArgs& A, E* st_a, E* st_b, E* st_1,
                              E& ms_out, E& mt_out, RowSums& R);
  static KD_INLINE double finish_row(const RowIO<E>& io, int64_t y, const RowArgs& A, E* st_a,
                                     E* st_b, E* st_1, E ms, E mt, const RowSums& R);
};

// ---------------------------------------------------------------------------------------- P1
// One sweep: per block of kBlock elements, the block maxima (the block then sits in L1), the
// running maxima and a rescale of the sums when they grow (online softmax, one exp per block),
// then the exps against the running maxima, staged, and the block sums. Streaming the row once
// from memory replaces a separate max pass.
template <class VT, int MODE, bool CE>
KD_INLINE void RowPasses<VT, MODE, CE>::pass1(const RowIO<E>& io, const RowArgs& A, E* st_a,
                                              E* st_b, E* st_1, E& ms_out, E& mt_out, RowSums& R) {
  const VT zero = VT{};
  const int64_t V = A.V;
  const E* s = io.s;
  const E* t = io.t;
  E* blk = io.blk;
  const E invT = static_cast<E>(A.invT);
  const bool precise = A.precise;
  const bool cesh = CE && KD && A.ce_shared;
  const bool eps_on = CE && A.eps > 0;
  const M iota = Traits<VT>::iota();
  E ms = ninf, mt = ninf;
  double Sa = 0, Sb = 0, D = 0, U = 0, S1 = 0, X = 0;
  int64_t k = 0;
  for (int64_t i0 = 0; i0 < V; i0 += kBlock, ++k) {
    const int64_t i1 = std::min(V, i0 + kBlock);
    if (KD || CE) {
      VT vs = bcast<VT>(ninf), vt = bcast<VT>(ninf);
      for (int64_t i = i0; i < i1; i += W) {
        const int n = i1 - i >= W ? W : int(i1 - i);
        VT xs = load<VT>(s + i, n, ninf);
        vs = xs > vs ? xs : vs;  // a NaN is skipped here and reaches the sums through exp
        if (KD) {
          VT xt = load<VT>(t + i, n, ninf);
          vt = xt > vt ? xt : vt;
        }
      }
      const E ns = std::max(ms, hmax(vs));
      const E nt = KD ? std::max(mt, hmax(vt)) : ninf;
      // Rescale what was summed against the old maxima (nothing to do while they were -inf:
      // the sums are then 0, or NaN, or +inf for a teacher-only mass, all scale-free).
      const double ds = (ms == ninf || ns == ms) ? 0.0 : static_cast<double>(ns) - ms;
      const double dt = (!KD || mt == ninf || nt == mt) ? 0.0 : static_cast<double>(nt) - mt;
      if (ds != 0.0 || dt != 0.0) {
        const double da = ds * A.invT, db = dt * A.invT;
        const double fa = std::exp(-da), fb = std::exp(-db);
        if (MODE == M_FKL) D = fb * (D + (da - db) * Sb);
        if (MODE == M_RKL) D = fa * (D + (db - da) * Sa);
        Sa *= fa;
        Sb *= fb;
        U *= fa;
        if (CE) {
          S1 *= std::exp(-ds);
          X -= ds * static_cast<double>(i0);
        }
      }
      ms = ns;
      mt = nt;
      blk[2 * k] = ms;
      blk[2 * k + 1] = mt;
    }
    if (io.pf[0] != nullptr) {
      const int64_t lo = io.pf_bytes * i0 / V / 64 * 64, hi = io.pf_bytes * i1 / V;
      for (int64_t off = lo; off < hi; off += 64) {
        __builtin_prefetch(io.pf[0] + off, 0, 2);
        if (io.pf[1] != nullptr) __builtin_prefetch(io.pf[1] + off, 0, 2);
      }
    }
    const E msr = ms == ninf ? E(0) : ms;  // the exps' reference: all-(-inf) so far gives 0
    const E mtr = mt == ninf ? E(0) : mt;
    VT aSa = zero, aSb = zero, aD = zero, aU = zero, aS1 = zero, aX = zero;
    for (int64_t i = i0; i < i1; i += W) {
      const int n = i1 - i >= W ? W : int(i1 - i);
      VT xs = load<VT>(s + i, n, ninf);
      VT x1 = zero;
      if (kPrefetch > 0) {  // the block after next, from memory, while this one is computed
        __builtin_prefetch(s + i + kPrefetch);
        if (KD || MODE == M_INF) __builtin_prefetch(t + i + kPrefetch);
      }
      if (KD) {
        VT xt = load<VT>(t + i, n, ninf);
        VT xa = (xs - msr) * invT, xb = (xt - mtr) * invT;
        VT ea = kdvec::vexp_nonpos(xa), eb = kdvec::vexp_nonpos(xb);
        aSa += ea;
        aSb += eb;
        if (MODE == M_FKL) aD += eb != 0 ? eb * (xb - xa) : zero;
        if (MODE == M_RKL) aD += ea != 0 ? ea * (xa - xb) : zero;
        if (precise) aU += ea != 0 ? ea * kdvec::vexpm1((xt - xs) * invT) : zero;
        store<VT>(st_a + i, ea, n);
        store<VT>(st_b + i, eb, n);
        x1 = xa;
      }
      if (MODE == M_INF) {
        VT xt = load<VT>(t + i, n, ninf);
        aSa += kept(xs, xt, xs - xt, zero, ninf);  // sum of d = s - t over kept entries
        aSb += kept(xs, xt, VT{} + 1, zero, ninf);  // V' (exact: at most kBlock per lane sum)
      }
      if (CE) {
        if (!cesh) {
          x1 = xs - msr;
          VT e1 = kdvec::vexp_nonpos(x1);
          aS1 += e1;
          store<VT>(st_1 + i, e1, n);
        }
        if (eps_on) aX += (iota < n) ? x1 : zero;  // padding lanes stay out
      }
    }
    Sa += hsum(aSa);
    Sb += hsum(aSb);
    D += hsum(aD);
    U += hsum(aU);
    S1 += hsum(aS1);
    X += hsum(aX);
  }
  if (cesh) S1 = Sa;
  ms_out = ms;
  mt_out = mt;
  R.Sa = Sa;
  R.Sb = Sb;
  R.D = D;
  R.U = U;
  R.S1 = S1;
  R.X = X;
}

// log p_i - log q_i in double: where the gradient is q (log p - log q - mean), terms of size
// ~|logits|/T cancel, and fp32 would leave their rounding (~1e-7 |logits|/T) in every element.
struct LogRatioD {
  double ms, mt, invT, c;
  bool precise;
  KD_INLINE v4d operator()(v4d s, v4d t) const {
    return precise ? (t - s) * invT - c : ((t - mt) * invT - (s - ms) * invT) - c;
  }
};
// Weighted means in double: aw += w, awx += (w != 0 ? w x : 0), lane-wise. A gradient of the
// form w (x - mean_w x) is evaluated as w * (x - awx/aw) with the same float w and x values that
// went into the sums; then, where w is nearly one-hot, the rounding of x_j and of w_j cancels
// (x_j - mean = sum_{i != j} w_i (x_j - x_i) / sum w) instead of being left as eps |x| in the
// result, which is what a float evaluation of q (log q - log p - D) does when q is peaked.
KD_INLINE void acc_wx(v4d& aw, v4d& awx, v4d w, v4d x) {
  aw += w;
  awx += w != 0 ? w * x : v4d{};
}
KD_INLINE void acc_wx(v4d& aw, v4d& awx, v8f w, v8f x) {
  v4d w0, w1, x0, x1;
  kdvec::widen(w, w0, w1);
  kdvec::widen(x, x0, x1);
  acc_wx(aw, awx, w0, x0);
  acc_wx(aw, awx, w1, x1);
}
KD_INLINE void acc_wx(v4d& aw, v4d& awx, v16f w, v16f x) {  // 16-wide: two 8-float halves
  v8f w0, w1, x0, x1;
  kdvec::halves(w, w0, w1);
  kdvec::halves(x, x0, x1);
  acc_wx(aw, awx, w0, x0);
  acc_wx(aw, awx, w1, x1);
}
KD_INLINE void acc_wlr(v4d& aw, v4d& awx, v4d w, v4d s, v4d t, const LogRatioD& L) {
  acc_wx(aw, awx, w, L(s, t));
}
KD_INLINE void acc_wlr(v4d& aw, v4d& awx, v8f w, v8f s, v8f t, const LogRatioD& L) {
  v4d w0, w1, s0, s1, t0, t1;
  kdvec::widen(w, w0, w1);
  kdvec::widen(s, s0, s1);
  kdvec::widen(t, t0, t1);
  acc_wx(aw, awx, w0, L(s0, t0));
  acc_wx(aw, awx, w1, L(s1, t1));
}
KD_INLINE void acc_wlr(v4d& aw, v4d& awx, v16f w, v16f s, v16f t, const LogRatioD& L) {
  v8f w0, w1, s0, s1, t0, t1;
  kdvec::halves(w, w0, w1);
  kdvec::halves(s, s0, s1);
  kdvec::halves(t, t0, t1);
  acc_wlr(aw, awx, w0, s0, t0, L);
  acc_wlr(aw, awx, w1, s1, t1, L);
}
// lr - C and x - C, formed in double and rounded once to the element type.
KD_INLINE v4d lr_minus(v4d s, v4d t, double C, const LogRatioD& L) { return L(s, t) - C; }
KD_INLINE v8f lr_minus(v8f s, v8f t, double C, const LogRatioD& L) {
  v4d s0, s1, t0, t1;
  kdvec::widen(s, s0, s1);
  kdvec::widen(t, t0, t1);
  return kdvec::narrow(L(s0, t0) - C, L(s1, t1) - C);
}
KD_INLINE v16f lr_minus(v16f s, v16f t, double C, const LogRatioD& L) {
  v8f s0, s1, t0, t1;
  kdvec::halves(s, s0, s1);
  kdvec::halves(t, t0, t1);
  return kdvec::join(lr_minus(s0, t0, C, L), lr_minus(s1, t1, C, L));
}
KD_INLINE v4d minus_d(v4d x, double C) { return x - C; }
KD_INLINE v8f minus_d(v8f x, double C) {
  v4d x0, x1;
  kdvec::widen(x, x0, x1);
  return kdvec::narrow(x0 - C, x1 - C);
}
KD_INLINE v16f minus_d(v16f x, double C) {
  v8f x0, x1;
  kdvec::halves(x, x0, x1);
  return kdvec::join(minus_d(x0, C), minus_d(x1, C));
}

// log p_i - log q_i in float (for k = cF). Default: on the shifted logits, (t - mt)/T - (s - ms)/T
// minus the small constant cLR = log(Sb/Sa). Precise: (t - s)/T - cLR with cLR = lse(b) - lse(a),
// exact where s == t, which is where a rounded p - q is most sensitive.
#define LOG_RATIO(xs, xt, k) \
  (precise ? ((xt) - (xs)) * invT - (k) : (((xt) - mt) * invT - ((xs) - ms) * invT) - (k))

// ---------------------------------------------------------------------------------------- P2+P3
// Everything after P1 for one mode; returns the row loss.
template <class VT, int MODE, bool CE>
KD_INLINE double RowPasses<VT, MODE, CE>::finish_row(const RowIO<E>& io, int64_t y,
                                                     const RowArgs& A, E* st_a, E* st_b, E* st_1,
                                                     E ms, E mt, const RowSums& R) {
  const VT zero = VT{};
  const VT half = VT{} + E(0.5);  // |log-ratio| below which p - q is formed as q expm1(...)
  const int64_t V = A.V;
  const E* s = io.s;
  const E* t = io.t;
  E* gs = io.gs;
  E* gt = io.gt;
  const E* blk = io.blk;
  const bool need_gt = A.need_gt;
  const bool precise = A.precise;
  const bool cesh = CE && KD && A.ce_shared;
  const E invT = static_cast<E>(A.invT);
  const double nrm = A.nrm;

  double loss = 0.0;
  if (CE) {
    const double x1y = static_cast<double>(s[y]) - static_cast<double>(ms);
    const double CEr = -(1.0 - A.eps) * x1y + std::log(R.S1) - (A.eps / V) * R.X;
    loss += A.alpha * CEr;
  }
  // CE gradient: nrm alpha (q1 - eps/V), and -nrm alpha (1 - eps) at the label (added last).
  const double cC = CE ? nrm * A.alpha / R.S1 : 0.0;
  const E cE = static_cast<E>(CE ? nrm * A.alpha * A.eps / V : 0.0);

  if (KD) {
    const double Sa = R.Sa, Sb = R.Sb;
    const double lSa = std::log(Sa), lSb = std::log(Sb);
    double D = 0;
    if (MODE == M_FKL) D = R.D / Sb + (lSa - lSb);
    if (MODE == M_RKL) D = R.D / Sa + (lSb - lSa);
    double cLR = lSb - lSa;
    if (precise) {
      // lse(b) - lse(a) two ways: directly, and as log1p(sum q expm1((t - s)/T)), to which
      // entries with s == t add exactly 0 (accurate when p ~ q). The second is taken only where
      // it is well conditioned: u = sum q expm1(.) is summed in float, so its absolute error is
      // ~1e-7, and log1p(u) near u = -1 turns that into a large error (u = -0.99998: ~3e-3 in
      // cLR, and in every p - q of the row). It also misses entries whose q underflowed; if the
      // two disagree beyond rounding, keep the direct one.
      const double direct = (static_cast<double>(mt) - ms) * A.invT + (lSb - lSa);
      const double u = R.U / Sa;
      const double diff = std::log1p(u);
      cLR = std::fabs(u) <= 0.5 && std::fabs(diff - direct) <= 1e-4 * (1.0 + std::fabs(direct)) ? diff : direct;
    }
    const E cF = static_cast<E>(cLR);
    const double ck = nrm * A.K * A.invT;  // d/ds = (1/T) dD/da, times K nrm
    const E ckE = static_cast<E>(ck);

    double KLp = 0, KLq = 0;
    E* st_lq = io.scratch[2];  // log q - log m
    E* st_lp = io.scratch[3];  // log p - log m (only with grad_t)
    if (MODE == M_JSD) {
      // P2: KL(q||m) = E_q[log q - log m] and KL(p||m) as weighted means (see acc_wx); the
      // per-element log-ratios are staged for P3.
      const E bt = static_cast<E>(A.beta), bt1 = static_cast<E>(1.0 - A.beta);
      double Wq = 0, Wp = 0;
      int64_t k = 0;
      for (int64_t i0 = 0; i0 < V; i0 += kBlock, ++k) {
        const int64_t i1 = std::min(V, i0 + kBlock);
        const E rSa = static_cast<E>(block_factor(blk[2 * k], ms, A.invT) / Sa);
        const E rSb = static_cast<E>(block_factor(blk[2 * k + 1], mt, A.invT) / Sb);
        v4d wq = v4d{}, wqx = v4d{}, wp = v4d{}, wpx = v4d{};
        for (int64_t i = i0; i < i1; i += W) {
          const int n = i1 - i >= W ? W : int(i1 - i);
          VT xs = load<VT>(s + i, n, ninf), xt = load<VT>(t + i, n, ninf);
          VT ea = load<VT>(st_a + i, n, 0), eb = load<VT>(st_b + i, n, 0);
          VT rho = LOG_RATIO(xs, xt, cF);  // log p - log q
          M pos = rho >= 0;
          VT z = pos ? -rho : rho;  // -|rho| (NaN stays NaN)
          VT em = kdvec::vexpm1(z);
          VT L = -kdvec::vlog1p((pos ? VT{} + bt1 : VT{} + bt) * em);
          VT lpm = pos ? L : L + rho;  // log p - log m
          VT lqm = pos ? L - rho : L;  // log q - log m
          acc_wx(wq, wqx, ea * rSa, lqm);
          acc_wx(wp, wpx, eb * rSb, lpm);
          store<VT>(st_lq + i, lqm, n);
          if (need_gt) store<VT>(st_lp + i, lpm, n);
        }
        Wq += hsum(wq);
        KLq += hsum(wqx);
        Wp += hsum(wp);
        KLp += hsum(wpx);
      }
      KLq /= Wq;  // sum q = 1 up to rounding; dividing by the float q's own sum is what cancels
      KLp /= Wp;
      D = A.beta * KLp + (1.0 - A.beta) * KLq;
    }
    loss += A.K * D;

    // P2 (reverse KL; forward KL with the teacher gradient): the gradient needs log p - log q
    // minus its mean under q (resp. p), which cancels to ~0 where q (p) is nearly one-hot. Both
    // are formed in double from the same per-element expression (LogRatioD), so what is left is
    // the rounding of the result, not that of |log p - log q| (which can be ~|logits|/T).
    const LogRatioD LD{static_cast<double>(ms), static_cast<double>(mt), A.invT, cLR, precise};
    double Cm = 0, Wm = 0;
    if (MODE == M_RKL || (MODE == M_FKL && need_gt)) {
      int64_t k = 0;
      for (int64_t i0 = 0; i0 < V; i0 += kBlock, ++k) {
        const int64_t i1 = std::min(V, i0 + kBlock);
        const E* st = MODE == M_RKL ? st_a : st_b;
        const E m = MODE == M_RKL ? ms : mt;
        const E r = static_cast<E>(block_factor(blk[2 * k + (MODE == M_RKL ? 0 : 1)], m, A.invT) /
                                   (MODE == M_RKL ? Sa : Sb));
        v4d aw = v4d{}, awx = v4d{};
        for (int64_t i = i0; i < i1; i += W) {
          const int n = i1 - i >= W ? W : int(i1 - i);
          VT xs = load<VT>(s + i, n, ninf), xt = load<VT>(t + i, n, ninf);
          VT e = load<VT>(st + i, n, 0);
          acc_wlr(aw, awx, e * r, xs, xt, LD);
        }
        Wm += hsum(aw);
        Cm += hsum(awx);
      }
      Cm /= Wm;
    }

    // P3: the gradients. Per block: the factors that take the staged exps to the final maxima.
    const E cq = static_cast<E>(ck * (1.0 - A.beta)), cp = static_cast<E>(ck * A.beta);
    int64_t k = 0;
    for (int64_t i0 = 0; i0 < V; i0 += kBlock, ++k) {
      const int64_t i1 = std::min(V, i0 + kBlock);
      const double fa = block_factor(blk[2 * k], ms, A.invT);
      const double fb = block_factor(blk[2 * k + 1], mt, A.invT);
      const E rSa = static_cast<E>(fa / Sa), rSb = static_cast<E>(fb / Sb);
      const E cA = static_cast<E>(ck * fa / Sa), cB = static_cast<E>(ck * fb / Sb);
      const E c1 = static_cast<E>(CE ? cC * (cesh ? fa : block_factor(blk[2 * k], ms, 1.0)) : 0.0);
      bool g_done = false;  // grad_s of this block already written (and ea with it overwritten)
#if defined(__x86_64__) || defined(__i386__)
      if constexpr (MODE == M_FKL && !CE && std::is_same<VT, v16f>::value) {
        if (precise) {
          fkl_precise_block16(s, t, st_a, st_b, gs, i0, i1, cA, cB, cF, invT);
          if (!need_gt) continue;
          g_done = true;
        }
      }
#endif
      for (int64_t i = i0; i < i1; i += W) {
        const int n = i1 - i >= W ? W : int(i1 - i);
        VT ea = load<VT>(st_a + i, n, 0);
        VT g;
        if (MODE == M_FKL) {  // dD/da = q - p
          VT eb = load<VT>(st_b + i, n, 0);
          if (g_done) {
            g = zero;  // not stored
          } else if (precise) {
            // q - p = -q expm1(log p - log q): no cancellation where p ~ q. Only for small
            // log-ratios: a large one (|logits|/T ~ 100) overflows expm1 to inf, and inf times
            // a q that rounds to 0 in cA * ea is NaN; there p and q differ, nothing cancels.
            VT xs = load<VT>(s + i, n, ninf), xt = load<VT>(t + i, n, ninf);
            VT r = LOG_RATIO(xs, xt, cF);
            g = near(ea, r, half, -(cA * ea) * kdvec::vexpm1(r), cA * ea - cB * eb);
          } else {
            g = cA * ea - cB * eb;
          }
          if (need_gt) {  // dD/db = p (log p - log q - D)
            VT xs = load<VT>(s + i, n, ninf), xt = load<VT>(t + i, n, ninf);
            VT h = eb != 0 ? (eb * rSb) * lr_minus(xs, xt, Cm, LD) : zero;
            store<VT>(gt + i, ckE * h, n);
          }
        } else if (MODE == M_RKL) {  // dD/da = q (log q - log p - D)
          VT xs = load<VT>(s + i, n, ninf), xt = load<VT>(t + i, n, ninf);
          g = ea != 0 ? ckE * ((ea * rSa) * -lr_minus(xs, xt, Cm, LD)) : zero;
          if (need_gt) {  // dD/db = p - q
            VT eb = load<VT>(st_b + i, n, 0);
            VT h;
            if (precise) {  // p - q, from the log-ratio where it is small (as for grad_s above)
              VT r = LOG_RATIO(xs, xt, cF);
              h = near(ea, r, half, (cA * ea) * kdvec::vexpm1(r), cB * eb - cA * ea);
            } else {
              h = cB * eb - cA * ea;
            }
            store<VT>(gt + i, h, n);
          }
        } else {  // JSD: dD/da = (1-beta) q (log q - log m - KL(q||m)), dD/db likewise
          VT lq = load<VT>(st_lq + i, n, 0);
          g = ea != 0 ? cq * ((ea * rSa) * minus_d(lq, KLq)) : zero;
          if (need_gt) {
            VT eb = load<VT>(st_b + i, n, 0), lp = load<VT>(st_lp + i, n, 0);
            store<VT>(gt + i, eb != 0 ? cp * ((eb * rSb) * minus_d(lp, KLp)) : zero, n);
          }
        }
        if (CE) {
          VT e1 = cesh ? ea : load<VT>(st_1 + i, n, 0);
          g += c1 * e1 - cE;
        }
        if (!g_done) store<VT>(gs + i, g, n);
      }
    }
  } else if (MODE == M_INF) {
    // dc = d - mean(d) on kept entries; KD = K sum dc^2 / (2 V'); dKD/ds = K dc / V' = -dKD/dt.
    const double vkeep = R.Sb;
    const E md = static_cast<E>(R.Sa / vkeep);
    const E cg = static_cast<E>(nrm * A.K / vkeep);
    double sq = 0;
    int64_t k = 0;
    for (int64_t i0 = 0; i0 < V; i0 += kBlock, ++k) {
      const int64_t i1 = std::min(V, i0 + kBlock);
      const E c1 = static_cast<E>(CE ? cC * block_factor(blk[2 * k], ms, 1.0) : 0.0);
      VT aq = zero;
      for (int64_t i = i0; i < i1; i += W) {
        const int n = i1 - i >= W ? W : int(i1 - i);
        VT xs = load<VT>(s + i, n, ninf), xt = load<VT>(t + i, n, ninf);
        VT dc = kept(xs, xt, (xs - xt) - md, zero, ninf);
        aq += dc * dc;
        VT g = cg * dc;
        if (CE) g += c1 * load<VT>(st_1 + i, n, 0) - cE;
        if (need_gt) store<VT>(gt + i, -(cg * dc), n);
        store<VT>(gs + i, g, n);
      }
      sq += hsum(aq);
    }
    loss += A.K * sq / (2.0 * vkeep);
  } else {  // CE only (alpha == 1): the teacher is not read
    int64_t k = 0;
    for (int64_t i0 = 0; i0 < V; i0 += kBlock, ++k) {
      const int64_t i1 = std::min(V, i0 + kBlock);
      const E c1 = static_cast<E>(cC * block_factor(blk[2 * k], ms, 1.0));
      for (int64_t i = i0; i < i1; i += W) {
        const int n = i1 - i >= W ? W : int(i1 - i);
        store<VT>(gs + i, c1 * load<VT>(st_1 + i, n, 0) - cE, n);
      }
    }
    if (need_gt) std::fill(gt, gt + V, E(0));
  }
  if (CE) gs[y] -= static_cast<E>(nrm * A.alpha * (1.0 - A.eps));
  return loss;
}
#undef LOG_RATIO

template <class VT, int MODE, bool CE>
KD_INLINE double kd_row_mode(const RowIO<typename Traits<VT>::E>& io, int64_t y,
                             const RowArgs& A) {
  using E = typename Traits<VT>::E;
  // Staging: ea in the grad_s row, eb in the grad_t row (or scratch), the T = 1 student exps
  // for CE in scratch (or in grad_s when no other exps are staged there; or ea itself at T = 1).
  E* st_a = io.gs;
  E* st_b = A.need_gt ? io.gt : io.scratch[0];
  E* st_1 = MODE <= M_JSD ? (A.ce_shared ? st_a : io.scratch[1]) : io.gs;
  E ms, mt;
  RowSums R;
  using P = RowPasses<VT, MODE, CE>;
  P::pass1(io, A, st_a, st_b, st_1, ms, mt, R);
  return P::finish_row(io, y, A, st_a, st_b, st_1, ms, mt, R);
}

// One row: writes gs (and gt) and returns the row loss alpha CE + K D (before w and reduction).
template <class VT>
KD_INLINE double kd_row(const RowIO<typename Traits<VT>::E>& io_in, int64_t y,
                        const RowArgs& A_in) {
  // Local copies: the stores go through memcpy (char-typed, may alias anything), so fields read
  // through a reference would be reloaded in every loop iteration.
  const RowArgs A = A_in;
  const auto io = io_in;
  const bool ce = A.do_ce;
  switch (A.mode) {
    case M_FKL:
      return ce ? kd_row_mode<VT, M_FKL, true>(io, y, A) : kd_row_mode<VT, M_FKL, false>(io, y, A);
    case M_RKL:
      return ce ? kd_row_mode<VT, M_RKL, true>(io, y, A) : kd_row_mode<VT, M_RKL, false>(io, y, A);
    case M_JSD:
      return ce ? kd_row_mode<VT, M_JSD, true>(io, y, A) : kd_row_mode<VT, M_JSD, false>(io, y, A);
    case M_INF:
      return ce ? kd_row_mode<VT, M_INF, true>(io, y, A) : kd_row_mode<VT, M_INF, false>(io, y, A);
    default:
      return kd_row_mode<VT, M_CE_ONLY, true>(io, y, A);
  }
}

// bf16 rows to float and back, W lanes at a time: widening is a 16-bit shift; narrowing rounds to
// nearest even exactly as c10::BFloat16 does (NaN -> 0x7fc0), so every build stores the same bits.
template <int W>
struct Bf16Vec;
template <>
struct Bf16Vec<8> {
  typedef uint16_t vh __attribute__((vector_size(16)));
  typedef kdvec::v8u vu;
  typedef kdvec::v8i vi;
  typedef kdvec::v8f vf;
};
template <>
struct Bf16Vec<16> {
  typedef uint16_t vh __attribute__((vector_size(32)));
  typedef kdvec::v16u vu;
  typedef kdvec::v16i vi;
  typedef kdvec::v16f vf;
};

template <int W>
KD_INLINE void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  using vh = typename Bf16Vec<W>::vh;
  using vu = typename Bf16Vec<W>::vu;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vh h;
    std::memcpy(&h, src + i, sizeof(h));
    const vu u = __builtin_convertvector(h, vu) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}
KD_INLINE uint16_t narrow_bf16_one(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if (x != x) return 0x7fc0;
  return static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
}
template <int W>
KD_INLINE void narrow_bf16(const float* src, uint16_t* dst, int64_t n) {
  using vf = typename Bf16Vec<W>::vf;
  using vh = typename Bf16Vec<W>::vh;
  using vu = typename Bf16Vec<W>::vu;
  using vi = typename Bf16Vec<W>::vi;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vf x;
    std::memcpy(&x, src + i, sizeof(x));
    vu u;
    std::memcpy(&u, &x, sizeof(u));
    const vu r = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
    const vi nan = x != x;
    const vu out = nan ? vu{} + 0x7fc0u : r;
    const vh h = __builtin_convertvector(out, vh);
    std::memcpy(dst + i, &h, sizeof(h));
  }
  for (; i < n; ++i) dst[i] = narrow_bf16_one(src[i]);
}

// Out-of-line instances of the row kernel: float (portable, AVX2+FMA with 8-float vectors,
// AVX-512 with 16-float vectors) and double; and of the bf16 conversions per build.
using RowFnF = double (*)(const RowIO<float>&, int64_t, const RowArgs&);
using WidenFn = void (*)(const uint16_t*, float*, int64_t);
using NarrowFn = void (*)(const float*, uint16_t*, int64_t);
struct RowFns {
  RowFnF row;
  WidenFn widen;
  NarrowFn narrow;
};

__attribute__((noinline)) void widen_portable(const uint16_t* s, float* d, int64_t n) { widen_bf16<8>(s, d, n); }
__attribute__((noinline)) void narrow_portable(const float* s, uint16_t* d, int64_t n) { narrow_bf16<8>(s, d, n); }

__attribute__((noinline)) double row_f32_portable(const RowIO<float>& io, int64_t y,
                                                  const RowArgs& a) {
  return kd_row<v8f>(io, y, a);
}

#if defined(__x86_64__) || defined(__i386__)
#define KD_HAVE_AVX2_BUILD 1
__attribute__((noinline, target("avx2,fma"))) double row_f32_avx2(const RowIO<float>& io,
                                                                   int64_t y, const RowArgs& a) {
  return kd_row<v8f>(io, y, a);
}
__attribute__((noinline)) KD_TARGET_AVX512_FLOAT double row_f32_avx512(const RowIO<float>& io,
                                                                        int64_t y, const RowArgs& a) {
  return kd_row<v16f>(io, y, a);
}
__attribute__((noinline, target("avx2,fma"))) void widen_avx2(const uint16_t* s, float* d, int64_t n) {
  widen_bf16<8>(s, d, n);
}
__attribute__((noinline, target("avx2,fma"))) void narrow_avx2(const float* s, uint16_t* d, int64_t n) {
  narrow_bf16<8>(s, d, n);
}
__attribute__((noinline)) KD_TARGET_AVX512_FLOAT void widen_avx512(const uint16_t* s, float* d, int64_t n) {
  widen_bf16<16>(s, d, n);
}
__attribute__((noinline)) KD_TARGET_AVX512_FLOAT void narrow_avx512(const float* s, uint16_t* d, int64_t n) {
  narrow_bf16<16>(s, d, n);
}
#endif

__attribute__((noinline)) double row_f64(const RowIO<double>& io, int64_t y, const RowArgs& a) {
  return kd_row<v4d>(io, y, a);
}

// The build that common/cpu_isa.h picks for the float kernels.
RowFns pick_row_fns() {
#ifdef KD_HAVE_AVX2_BUILD
  const int64_t isa = kdengine::cpu_isa(kdengine::kFloat);
  if (isa >= kdengine::kIsaAvx512) return {&row_f32_avx512, &widen_avx512, &narrow_avx512};
  if (isa >= kdengine::kIsaAvx2) return {&row_f32_avx2, &widen_avx2, &narrow_avx2};
#endif
  return {&row_f32_portable, &widen_portable, &narrow_portable};
}

template <class IN>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

// Rows [b, e) of one input dtype. Ignored rows get zero gradients and loss 0; a label outside
// [0, V) (with the CE term on) gives a NaN row.
template <class IN>
void run_rows(const IN* s, const IN* t, const int64_t* lab, IN* gs, IN* gt, double* row_loss,
              int64_t b, int64_t e, int64_t ignore_index, const RowArgs& A, const RowFns& fns) {
  using E = typename MathOf<IN>::type;
  constexpr bool kWiden = !std::is_same<IN, E>::value;  // bf16 / fp16: widen rows to float
  const int64_t V = A.V;
  const int64_t Vp = (V + 7) / 8 * 8;
  const int64_t nblk = (V + kBlock - 1) / kBlock;
  const int nbuf = 4 + (kWiden ? 4 : 0);
  // Per-thread scratch kept between calls: a fresh value-initialised vector (1 MB for bf16 rows at
  // V = 32000, allocated per task of a few rows) cost a memset and, above malloc's mmap threshold,
  // page faults in every task. Every element is written before it is read.
  thread_local std::vector<E> buf;
  const size_t need = static_cast<size_t>(Vp) * nbuf + 2 * nblk;
  if (buf.size() < need) buf.resize(need);
  E* scratch = buf.data();
  E* blk = scratch + Vp * nbuf;
  E* ws = scratch + 4 * Vp;
  E* wt = ws + Vp;
  E* wgs = wt + Vp;
  E* wgt = wgs + Vp;
  const E nan = std::numeric_limits<E>::quiet_NaN();
  for (int64_t r = b; r < e; ++r) {
    const IN* sr = s + r * V;
    const IN* tr = t + r * V;
    IN* gsr = gs + r * V;
    IN* gtr = A.need_gt ? gt + r * V : nullptr;
    int64_t y = 0;
    if (lab != nullptr) {
      y = lab[r];
      if (y == ignore_index) {
        std::fill(gsr, gsr + V, IN(0));
        if (gtr) std::fill(gtr, gtr + V, IN(0));
        row_loss[r] = 0.0;
        continue;
      }
      if (A.do_ce && (y < 0 || y >= V)) {
        std::fill(gsr, gsr + V, IN(nan));
        if (gtr) std::fill(gtr, gtr + V, IN(nan));
        row_loss[r] = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
    }
    RowIO<E> io;
    if constexpr (std::is_same<IN, c10::BFloat16>::value) {  // vector conversions of this build
      fns.widen(reinterpret_cast<const uint16_t*>(sr), ws, V);
      if (A.mode != M_CE_ONLY) fns.widen(reinterpret_cast<const uint16_t*>(tr), wt, V);
      io.s = ws;
      io.t = wt;
      io.gs = wgs;
      io.gt = gtr ? wgt : nullptr;
    } else if constexpr (kWiden) {
      for (int64_t i = 0; i < V; ++i) ws[i] = static_cast<float>(sr[i]);
      if (A.mode != M_CE_ONLY)
        for (int64_t i = 0; i < V; ++i) wt[i] = static_cast<float>(tr[i]);
      io.s = ws;
      io.t = wt;
      io.gs = wgs;
      io.gt = gtr ? wgt : nullptr;
    } else {
      io.s = reinterpret_cast<const E*>(sr);
      io.t = reinterpret_cast<const E*>(tr);
      io.gs = reinterpret_cast<E*>(gsr);
      io.gt = reinterpret_cast<E*>(gtr);
    }
    io.scratch[0] = scratch;
    io.scratch[1] = scratch + Vp;
    io.scratch[2] = scratch + 2 * Vp;
    io.scratch[3] = scratch + 3 * Vp;
    io.blk = blk;
    if (kWiden && r + 1 < e) {
      io.pf[0] = reinterpret_cast<const char*>(sr + V);
      io.pf[1] = A.mode != M_CE_ONLY ? reinterpret_cast<const char*>(tr + V) : nullptr;
      io.pf_bytes = V * static_cast<int64_t>(sizeof(IN));
    }
    double loss;
    if constexpr (std::is_same<E, double>::value) {
      loss = row_f64(io, y, A);
    } else {
      loss = fns.row(io, y, A);
    }
    if constexpr (std::is_same<IN, c10::BFloat16>::value) {  // the one rounding of the gradient
      fns.narrow(wgs, reinterpret_cast<uint16_t*>(gsr), V);
      if (gtr) fns.narrow(wgt, reinterpret_cast<uint16_t*>(gtr), V);
    } else if constexpr (kWiden) {  // the one rounding of the gradient
      for (int64_t i = 0; i < V; ++i) gsr[i] = static_cast<IN>(wgs[i]);
      if (gtr)
        for (int64_t i = 0; i < V; ++i) gtr[i] = static_cast<IN>(wgt[i]);
    }
    row_loss[r] = loss;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    double temperature, bool scale_t2, int64_t divergence, double beta, double hard_weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool need_teacher_grad) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student must be (N, V), got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have the student's shape ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the student's dtype ", student.scalar_type(), ", got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(),
                    "student and teacher must be CPU tensors");
  const auto st = student.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                   "student must be float32, float64, bfloat16 or float16, got ", st);
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(V >= 1, "student needs V >= 1, got V = ", V);
  TORCH_CHECK_VALUE(!(temperature <= 0) && !std::isnan(temperature),
                    "temperature must be > 0 or inf, got ", temperature);
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2, "divergence must be 0, 1 or 2, got ",
                    divergence);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 3, "reduction must be 0..3, got ", reduction);
  TORCH_CHECK_VALUE(hard_weight >= 0 && hard_weight <= 1, "hard_weight must be in [0, 1], got ",
                    hard_weight);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1,
                    "label_smoothing must be in [0, 1), got ", label_smoothing);
  TORCH_CHECK_VALUE(divergence != JSD || (beta > 0 && beta < 1),
                    "beta must be in (0, 1) for JSD, got ", beta);
  const bool t_inf = std::isinf(temperature);
  TORCH_CHECK_VALUE(!t_inf || scale_t2, "temperature=inf needs scale_t2=True");
  at::Tensor lab;
  if (labels.has_value()) {
    lab = labels->contiguous();
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, "labels must be int64, got ",
                     lab.scalar_type());
    TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == N, "labels must have shape (", N,
                      "), got ", lab.sizes());
    TORCH_CHECK_VALUE(lab.device().is_cpu(), "labels must be a CPU tensor");
  }
  TORCH_CHECK_VALUE(hard_weight == 0 || lab.defined(), "hard_weight > 0 needs labels");

  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const int64_t* lp = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;

  int64_t count = N;
  if (lp) {
    count = 0;
    for (int64_t r = 0; r < N; ++r) count += lp[r] != ignore_index;
  }
  const double cnt = static_cast<double>(std::max<int64_t>(count, 1));
  RowArgs A;
  A.V = V;
  A.mode = hard_weight >= 1.0 ? M_CE_ONLY : t_inf ? M_INF : static_cast<int>(divergence);
  A.do_ce = hard_weight > 0.0;
  A.ce_shared = !t_inf && temperature == 1.0;
  A.need_gt = need_teacher_grad;
  A.precise = st == at::kBFloat16 || st == at::kHalf;
  A.invT = t_inf ? 0.0 : 1.0 / temperature;
  A.beta = beta;
  A.alpha = hard_weight;
  A.eps = label_smoothing;
  if (t_inf) {
    const double k = divergence == JSD ? beta * (1.0 - beta) : 1.0;
    A.K = (1.0 - hard_weight) * k;
  } else {
    A.K = (1.0 - hard_weight) * (scale_t2 ? temperature * temperature : 1.0);
  }
  A.nrm = reduction == BATCHMEAN ? 1.0 / cnt
          : reduction == MEAN    ? 1.0 / (cnt * static_cast<double>(V))
                                 : 1.0;

  // s and t are contiguous: a pooled block of their shape has their layout. The gradients are
  // the largest outputs (N x V); from the reuse pool a training loop stops paying page faults on
  // them every step (output_pool.h).
  at::Tensor gs = kdengine::pooled_empty(s.sizes(), s.options());
  at::Tensor gt = need_teacher_grad ? kdengine::pooled_empty(t.sizes(), t.options())
                                    : at::empty({0}, s.options());
  at::Tensor row_loss = at::empty({N}, s.options().dtype(at::kDouble));
  double* rl = row_loss.data_ptr<double>();
  // Enough rows per task that a task is worth a thread (~64K elements), and up to N / (8 threads):
  // with longer runs of consecutive rows, a widened row's next row is prefetched during this one
  // (RowIO::pf; measured ~10% on 1024 x 32000 bf16). Rows are independent: no effect on results.
  const int64_t grain = std::max<int64_t>({1, 65536 / V, N / (8 * static_cast<int64_t>(at::get_num_threads()))});

  const RowFns fns = pick_row_fns();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "kd_loss_fwd_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* gsp = gs.data_ptr<scalar_t>();
    scalar_t* gtp = need_teacher_grad ? gt.data_ptr<scalar_t>() : nullptr;
    kdengine::parallel_for_dynamic(0, N, grain, [&](int64_t b, int64_t e) {
      run_rows<scalar_t>(sp, tp, lp, gsp, gtp, rl, b, e, ignore_index, A, fns);
    });
  });

  const auto loss_dtype = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss;
  if (reduction == NONE) {
    loss = row_loss.to(loss_dtype);
  } else {
    double total = 0.0;  // in row order: deterministic
    for (int64_t r = 0; r < N; ++r) total += rl[r];
    if (reduction == BATCHMEAN) total /= cnt;
    if (reduction == MEAN) total /= cnt * static_cast<double>(V);
    loss = at::scalar_tensor(total, s.options().dtype(loss_dtype));
  }
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) { m.impl("kd_loss_kernel", &kd_loss_fwd_cpu); }
