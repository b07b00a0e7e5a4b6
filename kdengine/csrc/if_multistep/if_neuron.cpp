// Multi-step integrate-and-fire neuron, CPU: fused forward over all T steps, fused backward
// through time (one reverse loop over T). Ops: kdengine::if_fwd, kdengine::if_bwd (CPU kernels).
//
// Math (per neuron, state v in acc_t = float, or double for float64 input):
//   h_t = v_{t-1} + x_t;  s_t = [h_t >= theta] (NaN if h_t is NaN);
//   v_t = s_t ? h_t - theta : h_t            (soft reset)   |   s_t ? v_reset : h_t   (hard reset)
// Backward, carrying c = dL/dv_t from t = T-1 (c = dL/dv_final, or 0) down to 0:
//   sg_t = surrogate'(h_t - theta)   atan: (a/2) / (1 + (pi/2 a u)^2);  sigmoid: a e / (1+e)^2, e = exp(-a|u|)
//   dv_t/dh_t = 1 - theta sg_t (soft) | (1 - s_t) + (v_reset - h_t) sg_t (hard); the sg term is
//               dropped with detach_reset
//   g_t = dL/dh_t = gs_t sg_t + c dv_t/dh_t;   dL/dx_t = g_t;   c <- g_t;   dL/dv_init = c at the end.
// This is autograd of kdengine/ops/if_multistep/reference.py, written out.
//
// Layout: x, spikes, grad_spikes, grad_x are contiguous (T, N): step t of neuron n at t*N + n.
// Neurons are independent: kdengine::parallel_for (parallel.h) splits n over the cores; each task walks blocks of B
// neurons, and for each block runs the whole T loop with the block's potentials in a small array
// (L1, loaded into 16-byte vector registers a few neurons at a time), so every step reads one
// contiguous run of B inputs and writes one run of B spikes.
//
// Memory traffic (fp32, per element per step): forward reads x and writes s: 8 B (the floor).
// Backward does not use a stored h: it recomputes h_t from x (the same code, so bit-identical to
// the forward) into a per-block buffer of T*B values sized to stay in L2, then walks it backwards:
// reads x, gs, writes gx: 12 B. Storing h in the forward instead would cost 4 B more written in
// the forward, 4 B read in the backward (x is not needed then, so 12 B too), i.e. 24 B in all vs
// 20 B here, and keep a (T, N) fp32 buffer alive between forward and backward (x is alive anyway
// whenever its producer is part of the graph). bf16/fp16 inputs halve every term but the buffer.
// fp32 forward on AVX2 / AVX-512 CPUs (common/cpu_isa.h, per call): 8 / 16 neurons per vector, the
// same operations (so the same bits), and spikes written with non-temporal stores, which skip the read-for-ownership a
// plain store does on each fresh line: 8 B of DRAM traffic per element and step instead of 12.
// Outputs >= 8 MB come from output_pool.h, which reuses freed buffers: a repeated call does not
// pay the OS's page faults and zeroing on a fresh output again (measured at T=16, N=2^20 fp32:
// ~7 ms of faults with THP, vs ~9 ms for the forward's own traffic).
// fp32 backward on AVX-512 CPUs: the same code with 16 neurons per vector (bwd_f32_avx512).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "common/output_pool.h"
#include "common/parallel.h"
#include "common/vec_math.h"
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>


#if defined(__x86_64__)
#include <immintrin.h>
#endif

// No a * b + c contracted into an FMA anywhere below: the AVX-512 backward must give the bits of
// the portable build (whose default x86-64 target has no FMA).
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int64_t kSurAtan = 0;
constexpr int64_t kSurSigmoid = 1;
constexpr int64_t kFwdBlock = 2048;         // neurons per block in the forward (8 KB of fp32 state)
constexpr int64_t kBwdBufBytes = 192 << 10;  // recompute buffer per task, kept within L2

// 16-byte vectors of the state type (GCC/Clang vector extensions: SSE2 on any x86-64, NEON on
// arm64). Written out because GCC's auto-vectorizer keeps the scalar, branchy version of these
// select-heavy loops: measured 3.3 ns/element scalar vs 0.3 ns/element with these vectors (L1).
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float v __attribute__((vector_size(16)));
  typedef int32_t m __attribute__((vector_size(16)));
  static constexpr int64_t L = 4;
};
template <>
struct Vec<double> {
  typedef double v __attribute__((vector_size(16)));
  typedef int64_t m __attribute__((vector_size(16)));
  static constexpr int64_t L = 2;
};
// 64-byte float vectors: the AVX-512 backward (16 neurons per vector, same operations per lane).
struct VecF16 {
  typedef float v __attribute__((vector_size(64)));
  typedef int32_t m __attribute__((vector_size(64)));
  static constexpr int64_t L = 16;
};

// The integer vector of a float vector's width (bit tricks in exp_vec / abs_vec).
template <typename VF>
struct IntVec;
template <>
struct IntVec<Vec<float>::v> {
  typedef Vec<float>::m type;
};
template <>
struct IntVec<VecF16::v> {
  typedef VecF16::m type;
};
template <>
struct IntVec<Vec<double>::v> {
  typedef Vec<double>::m type;
};

#define IF_INLINE inline __attribute__((always_inline))

// Loads / stores one vector VS::v of acc_t lanes from / to scalar_t elements.
template <typename acc_t, typename VS = Vec<acc_t>, typename scalar_t>
IF_INLINE typename VS::v load_vec(const scalar_t* p) {
  typename VS::v r;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&r, p, sizeof(r));
  } else {
    for (int64_t k = 0; k < VS::L; ++k) r[k] = static_cast<acc_t>(p[k]);
  }
  return r;
}

template <typename scalar_t, typename acc_t, typename VS = Vec<acc_t>>
IF_INLINE void store_vec(scalar_t* p, typename VS::v r) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(p, &r, sizeof(r));
  } else {
    for (int64_t k = 0; k < VS::L; ++k) p[k] = static_cast<scalar_t>(r[k]);
  }
}

// exp(x) for x <= 0 (all the sigmoid surrogate needs: x = -alpha |u|), float vectors, without
// libm calls (GCC will not vectorize std::exp without -ffast-math). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, and vec_math.h's polynomial for e^r (<= 1 ulp), 2^n assembled in
// the exponent bits. x is clamped below at -87, where 2^n is still a normal float:
// the surrogate's tail under e^-87 (~1e-38) is not flushed to 0, which nothing can tell apart.
// NaN stays NaN. (~55 SSE instructions per 4 values; the loop is compute-bound at ~3 ns/element
// on one loaded core here, vs ~0.8 for atan, so every instruction counts.)
template <typename vf, typename = std::enable_if_t<sizeof(vf{}[0]) == sizeof(float)>>
IF_INLINE vf exp_vec(vf x) {
  typedef typename IntVec<vf>::type vi;
  const vf lo = vf{} - 87.0f;
  x = x < lo ? lo : x;
  const vf t = x * kdvec::detail::kLog2e;
  const vi n = __builtin_convertvector(t - 0.5f, vi);  // t <= 0: truncation of t - 1/2 rounds
  const vf fn = __builtin_convertvector(n, vf);
  const vf p = kdvec::detail::exp_poly(kdvec::detail::reduce_r(x, fn));
  const vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// |u| by clearing the sign bit (one AND instead of compare + blend).
template <typename VF>
IF_INLINE VF abs_vec(VF u) {
  typedef typename IntVec<VF>::type VI;
  VI b;
  std::memcpy(&b, &u, sizeof(b));
  b &= sizeof(u[0]) == 4 ? 0x7fffffff : 0x7fffffffffffffffLL;
  std::memcpy(&u, &b, sizeof(u));
  return u;
}

IF_INLINE Vec<double>::v exp_vec(Vec<double>::v x) {
  for (int64_t k = 0; k < 2; ++k) x[k] = std::exp(x[k]);
  return x;
}

IF_INLINE float exp_scalar(float x) {
  Vec<float>::v v = Vec<float>::v{} + x;
  return exp_vec(v)[0];
}
inline double exp_scalar(double x) { return std::exp(x); }

// The surrogate derivative sg(u), for a vector or a scalar u (same formulas).
template <int64_t kSur, typename T, typename acc_t>
IF_INLINE T surrogate_grad(T u, acc_t alpha, acc_t k_atan, acc_t half_alpha) {
  if constexpr (kSur == kSurAtan) {
    const T z = u * k_atan;
    return half_alpha / (z * z + acc_t(1));
  } else {
    T e;
    if constexpr (std::is_same_v<T, acc_t>) {
      e = exp_scalar(-alpha * std::abs(u));
    } else {
      e = exp_vec(-alpha * abs_vec(u));
    }
    const T d = e + acc_t(1);
    return alpha * e / (d * d);
  }
}

// The forward trajectory of the block of n neurons at j0 over all T steps, from v_init (or rest),
// in v: emit(t, j, h, fire) sees each h_t = v_{t-1} + x_t before the reset, as a vector of L
// neurons at j, then one neuron at a time for the tail. The forward and the backward's recompute
// both run this, so the backward's h is the forward's, bit for bit.
template <bool kHard, typename VS, typename scalar_t, typename acc_t, typename Emit>
IF_INLINE void integrate_block(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init, acc_t* __restrict__ v,
    int64_t T, int64_t N, int64_t j0, int64_t n, acc_t thr, acc_t reset, acc_t rest, Emit&& emit) {
  typedef typename VS::v V;
  constexpr int64_t L = VS::L;
  const V thr_v = V{} + thr, reset_v = V{} + reset;
  const int64_t nv = n / L * L;
  for (int64_t j = 0; j < n; ++j) v[j] = v_init ? v_init[j0 + j] : rest;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xt = x + t * N + j0;
    for (int64_t j = 0; j < nv; j += L) {
      V h;
      std::memcpy(&h, v + j, sizeof(V));
      h += load_vec<acc_t, VS>(xt + j);
      const auto fire = h >= thr_v;
      emit(t, j, h, fire);
      h = fire ? (kHard ? reset_v : h - thr_v) : h;
      std::memcpy(v + j, &h, sizeof(V));
    }
    for (int64_t j = nv; j < n; ++j) {  // the same step, one neuron at a time
      const acc_t h = v[j] + static_cast<acc_t>(xt[j]);
      const bool fire = h >= thr;
      emit(t, j, h, fire);
      v[j] = fire ? (kHard ? reset : h - thr) : h;
    }
  }
}

template <typename scalar_t, typename acc_t, bool kHard>
void fwd_range(const scalar_t* __restrict__ x, scalar_t* __restrict__ spikes,
               const acc_t* __restrict__ v_init, acc_t* __restrict__ v_out, int64_t T, int64_t N,
               int64_t begin, int64_t end, acc_t thr, acc_t reset, acc_t rest) {
  alignas(64) acc_t v[kFwdBlock];
  for (int64_t j0 = begin; j0 < end; j0 += kFwdBlock) {
    const int64_t n = std::min(kFwdBlock, end - j0);
    integrate_block<kHard, Vec<acc_t>>(x, v_init, v, T, N, j0, n, thr, reset, rest,
                           [&](int64_t t, int64_t j, auto h, auto fire) {
                             using H = decltype(h);
                             H s = fire ? H{} + acc_t(1) : H{};
                             s = (h != h) ? h : s;  // a NaN potential emits a NaN spike
                             scalar_t* st = spikes + t * N + j0 + j;
                             if constexpr (std::is_same_v<H, acc_t>) {
                               *st = static_cast<scalar_t>(s);
                             } else {
                               store_vec<scalar_t, acc_t>(st, s);
                             }
                           });
    for (int64_t j = 0; j < n; ++j) v_out[j0 + j] = v[j];
  }
}

#if defined(__x86_64__)
// fp32 forward, 8 neurons per AVX2 vector, the same operations as fwd_range (so bit-identical).
// Spikes leave with non-temporal stores where the row is 32-byte aligned: the (T, N) spike tensor
// is written once and not read back here, and streaming skips the read-for-ownership of each
// line (a plain store reads it from memory first): 1/3 less traffic on the output.
template <bool kHard>
__attribute__((target("avx2"))) void fwd_range_f32_avx2(
    const float* __restrict__ x, float* __restrict__ spikes, const float* __restrict__ v_init,
    float* __restrict__ v_out, int64_t T, int64_t N, int64_t begin, int64_t end, float thr,
    float reset, float rest) {
  alignas(64) float v[kFwdBlock];
  const __m256 thr_v = _mm256_set1_ps(thr), one = _mm256_set1_ps(1.0f), reset_v = _mm256_set1_ps(reset);
  for (int64_t j0 = begin; j0 < end; j0 += kFwdBlock) {
    const int64_t n = std::min(kFwdBlock, end - j0);
    const int64_t nv = n / 8 * 8;
    for (int64_t j = 0; j < n; ++j) v[j] = v_init ? v_init[j0 + j] : rest;
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict__ xt = x + t * N + j0;
      float* __restrict__ st = spikes + t * N + j0;
      const bool stream = (reinterpret_cast<uintptr_t>(st) & 31) == 0;
      for (int64_t j = 0; j < nv; j += 8) {
        __m256 h = _mm256_add_ps(_mm256_load_ps(v + j), _mm256_loadu_ps(xt + j));
        const __m256 fire = _mm256_cmp_ps(h, thr_v, _CMP_GE_OQ);
        __m256 s = _mm256_and_ps(fire, one);
        s = _mm256_blendv_ps(s, h, _mm256_cmp_ps(h, h, _CMP_UNORD_Q));  // NaN potential: NaN spike
        if (stream)
          _mm256_stream_ps(st + j, s);
        else
          _mm256_storeu_ps(st + j, s);
        h = kHard ? _mm256_blendv_ps(h, reset_v, fire) : _mm256_sub_ps(h, _mm256_and_ps(fire, thr_v));
        _mm256_store_ps(v + j, h);
      }
      for (int64_t j = nv; j < n; ++j) {
        const float h = v[j] + xt[j];
        const bool fire = h >= thr;
        st[j] = (h != h) ? h : (fire ? 1.0f : 0.0f);
        v[j] = fire ? (kHard ? reset : h - thr) : h;
      }
    }
    for (int64_t j = 0; j < n; ++j) v_out[j0 + j] = v[j];
  }
  _mm_sfence();  // streamed stores are weakly ordered: make them visible before the task returns
}
#endif

#if defined(__x86_64__)
// fp32 forward, 16 neurons per AVX-512 vector: fwd_range_f32_avx2's operations with mask
// registers (so the same bits), and the same non-temporal stores (64-byte aligned rows).
template <bool kHard>
KD_TARGET_AVX512_FLOAT void fwd_range_f32_avx512(
    const float* __restrict__ x, float* __restrict__ spikes, const float* __restrict__ v_init,
    float* __restrict__ v_out, int64_t T, int64_t N, int64_t begin, int64_t end, float thr,
    float reset, float rest) {
  alignas(64) float v[kFwdBlock];
  const __m512 thr_v = _mm512_set1_ps(thr), one = _mm512_set1_ps(1.0f), reset_v = _mm512_set1_ps(reset);
  for (int64_t j0 = begin; j0 < end; j0 += kFwdBlock) {
    const int64_t n = std::min(kFwdBlock, end - j0);
    const int64_t nv = n / 16 * 16;
    for (int64_t j = 0; j < n; ++j) v[j] = v_init ? v_init[j0 + j] : rest;
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict__ xt = x + t * N + j0;
      float* __restrict__ st = spikes + t * N + j0;
      const bool stream = (reinterpret_cast<uintptr_t>(st) & 63) == 0;
      for (int64_t j = 0; j < nv; j += 16) {
        __m512 h = _mm512_add_ps(_mm512_load_ps(v + j), _mm512_loadu_ps(xt + j));
        const __mmask16 fire = _mm512_cmp_ps_mask(h, thr_v, _CMP_GE_OQ);
        __m512 s = _mm512_maskz_mov_ps(fire, one);
        s = _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(h, h, _CMP_UNORD_Q), h);  // NaN potential: NaN spike
        if (stream)
          _mm512_stream_ps(st + j, s);
        else
          _mm512_storeu_ps(st + j, s);
        h = kHard ? _mm512_mask_mov_ps(h, fire, reset_v) : _mm512_mask_sub_ps(h, fire, h, thr_v);
        _mm512_store_ps(v + j, h);
      }
      for (int64_t j = nv; j < n; ++j) {
        const float h = v[j] + xt[j];
        const bool fire = h >= thr;
        st[j] = (h != h) ? h : (fire ? 1.0f : 0.0f);
        v[j] = fire ? (kHard ? reset : h - thr) : h;
      }
    }
    for (int64_t j = 0; j < n; ++j) v_out[j0 + j] = v[j];
  }
  _mm_sfence();
}
#endif

template <typename scalar_t, typename acc_t>
void fwd_task(const scalar_t* x, scalar_t* s, const acc_t* v0, acc_t* vo, int64_t T, int64_t N,
              int64_t b, int64_t e, acc_t thr, acc_t reset, acc_t rest, bool hard) {
  if (hard)
    fwd_range<scalar_t, acc_t, true>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
  else
    fwd_range<scalar_t, acc_t, false>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
}

#if defined(__x86_64__)
template <>
void fwd_task<float, float>(const float* x, float* s, const float* v0, float* vo, int64_t T,
                            int64_t N, int64_t b, int64_t e, float thr, float reset, float rest,
                            bool hard) {
  const int64_t isa = kdengine::cpu_isa(kdengine::kFloat);
  if (isa >= kdengine::kIsaAvx512) {
    if (hard)
      fwd_range_f32_avx512<true>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
    else
      fwd_range_f32_avx512<false>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
  } else if (isa < kdengine::kIsaAvx2) {
    if (hard)
      fwd_range<float, float, true>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
    else
      fwd_range<float, float, false>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
  } else if (hard) {
    fwd_range_f32_avx2<true>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
  } else {
    fwd_range_f32_avx2<false>(x, s, v0, vo, T, N, b, e, thr, reset, rest);
  }
}
#endif

struct BwdParams {
  double thr, reset, rest, alpha;
};

// VS: the vector type (Vec<acc_t>: 16 bytes, any target; VecF16: inlined into the AVX-512 build).
template <typename scalar_t, typename acc_t, bool kHard, int64_t kSur, bool kDetach, typename VS>
IF_INLINE void bwd_range(const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init,
                         const scalar_t* __restrict__ gs, const acc_t* __restrict__ gv,
                         scalar_t* __restrict__ gx, acc_t* __restrict__ gv_init, int64_t T, int64_t N,
                         int64_t begin, int64_t end, const BwdParams& p) {
  typedef typename VS::v V;
  constexpr int64_t L = VS::L;
  const acc_t thr = static_cast<acc_t>(p.thr), reset = static_cast<acc_t>(p.reset);
  const acc_t rest = static_cast<acc_t>(p.rest), alpha = static_cast<acc_t>(p.alpha);
  const acc_t k_atan = static_cast<acc_t>(M_PI / 2 * p.alpha);
  const acc_t half_alpha = static_cast<acc_t>(p.alpha / 2);
  const V thr_v = V{} + thr, reset_v = V{} + reset, one = V{} + acc_t(1);
  // Block size: T*B states must fit the buffer; at least one vector per block.
  int64_t B = kBwdBufBytes / (static_cast<int64_t>(sizeof(acc_t)) * T);
  B = std::max<int64_t>(L, std::min<int64_t>(1024, B / L * L));
  std::vector<acc_t> hbuf(static_cast<size_t>(T * B));
  std::vector<acc_t> vb(static_cast<size_t>(B));
  acc_t* __restrict__ hb = hbuf.data();
  acc_t* __restrict__ v = vb.data();
  for (int64_t j0 = begin; j0 < end; j0 += B) {
    const int64_t n = std::min(B, end - j0);
    const int64_t nv = n / L * L;
    // Recompute the forward trajectory of this block (h_t into the buffer).
    integrate_block<kHard, VS>(x, v_init, v, T, N, j0, n, thr, reset, rest,
                           [&](int64_t t, int64_t j, auto h, auto) {
                             std::memcpy(hb + t * B + j, &h, sizeof(h));
                           });
    // Reverse loop; v now carries dL/dv_t.
    for (int64_t j = 0; j < n; ++j) v[j] = gv ? gv[j0 + j] : acc_t(0);
    for (int64_t t = T - 1; t >= 0; --t) {
      const acc_t* __restrict__ ht = hb + t * B;
      const scalar_t* __restrict__ gst = gs + t * N + j0;
      scalar_t* __restrict__ gxt = gx + t * N + j0;
      for (int64_t j = 0; j < nv; j += L) {
        V h, c;
        std::memcpy(&h, ht + j, sizeof(V));
        std::memcpy(&c, v + j, sizeof(V));
        const V sg = surrogate_grad<kSur>(h - thr_v, alpha, k_atan, half_alpha);
        V dvdh;
        if constexpr (kHard) {
          dvdh = (h >= thr_v) ? V{} : one;
          if constexpr (!kDetach) dvdh = dvdh + (reset_v - h) * sg;
        } else {
          dvdh = kDetach ? one : one - thr_v * sg;
        }
        const V g = load_vec<acc_t, VS>(gst + j) * sg + c * dvdh;
        store_vec<scalar_t, acc_t, VS>(gxt + j, g);
        std::memcpy(v + j, &g, sizeof(V));
      }
      for (int64_t j = nv; j < n; ++j) {
        const acc_t h = ht[j];
        const acc_t sg = surrogate_grad<kSur>(h - thr, alpha, k_atan, half_alpha);
        acc_t dvdh;
        if constexpr (kHard) {
          dvdh = (h >= thr) ? acc_t(0) : acc_t(1);
          if constexpr (!kDetach) dvdh = dvdh + (reset - h) * sg;
        } else {
          dvdh = kDetach ? acc_t(1) : acc_t(1) - thr * sg;
        }
        const acc_t g = static_cast<acc_t>(gst[j]) * sg + v[j] * dvdh;
        gxt[j] = static_cast<scalar_t>(g);
        v[j] = g;
      }
    }
    for (int64_t j = 0; j < n; ++j) gv_init[j0 + j] = v[j];
  }
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& v_init, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, op, ": x must be (T, N), got ", x.dim(), " dims");
  TORCH_CHECK(x.size(0) >= 1, op, ": T must be >= 1");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  if (v_init.has_value() && v_init->defined()) {
    const auto& v = *v_init;
    TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": v_init must be (N,) = (",
                x.size(1), ",)");
    TORCH_CHECK(v.scalar_type() == acc_type_of(x.scalar_type()) && v.is_contiguous(), op,
                ": v_init must be contiguous ", acc_type_of(x.scalar_type()));
  }
}

int64_t grain_for(int64_t T) { return std::max<int64_t>(64, (int64_t{1} << 15) / T); }

std::tuple<at::Tensor, at::Tensor> if_fwd_cpu(const at::Tensor& x,
                                              const c10::optional<at::Tensor>& v_init,
                                              double v_threshold, bool hard_reset,
                                              double v_reset) {
  check_inputs(x, v_init, "if_fwd");
  const int64_t T = x.size(0), N = x.size(1);
  // x is contiguous (check_inputs): a pooled block of the same shape is the same layout
  auto spikes = kdengine::pooled_empty(x.sizes(), x.options());
  auto v_out = at::empty({N}, x.options().dtype(acc_type_of(x.scalar_type())));
  const bool has_v = v_init.has_value() && v_init->defined();
  const double rest = hard_reset ? v_reset : 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "if_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    const acc_t* vp = has_v ? v_init->data_ptr<acc_t>() : nullptr;
    acc_t* vo = v_out.data_ptr<acc_t>();
    const acc_t thr = static_cast<acc_t>(v_threshold), rs = static_cast<acc_t>(v_reset);
    const acc_t rst = static_cast<acc_t>(rest);
    kdengine::parallel_for(0, N, grain_for(T), [&](int64_t b, int64_t e) {
      fwd_task<scalar_t, acc_t>(xp, sp, vp, vo, T, N, b, e, thr, rs, rst, hard_reset);
    });
  });
  return {spikes, v_out};
}

template <typename scalar_t, typename acc_t, bool kHard, int64_t kSur>
__attribute__((noinline)) void bwd_dispatch_detach(bool detach, const scalar_t* x, const acc_t* v0,
                                                   const scalar_t* gs, const acc_t* gv, scalar_t* gx,
                                                   acc_t* gv0, int64_t T, int64_t N, int64_t b,
                                                   int64_t e, const BwdParams& p) {
  if (detach)
    bwd_range<scalar_t, acc_t, kHard, kSur, true, Vec<acc_t>>(x, v0, gs, gv, gx, gv0, T, N, b, e, p);
  else
    bwd_range<scalar_t, acc_t, kHard, kSur, false, Vec<acc_t>>(x, v0, gs, gv, gx, gv0, T, N, b, e, p);
}

#if defined(__x86_64__)
// The fp32 backward with 16 neurons per AVX-512 vector. The file is compiled with fp-contract
// off (top of the file), so a * b + c stays a multiply and an add, as in the portable build:
// the same bits.
template <bool kHard, int64_t kSur>
__attribute__((noinline)) KD_TARGET_AVX512_FLOAT void bwd_f32_avx512(
    bool detach, const float* x, const float* v0, const float* gs, const float* gv, float* gx,
    float* gv0, int64_t T, int64_t N, int64_t b, int64_t e, const BwdParams& p) {
  if (detach)
    bwd_range<float, float, kHard, kSur, true, VecF16>(x, v0, gs, gv, gx, gv0, T, N, b, e, p);
  else
    bwd_range<float, float, kHard, kSur, false, VecF16>(x, v0, gs, gv, gx, gv0, T, N, b, e, p);
}

// Where common/cpu_isa.h picks AVX-512 for the float kernels: the fp32 backward of one task
// (true), else false (below: other dtypes always).
bool bwd_task_avx512(bool hard, int64_t sur, bool detach, const float* x, const float* v0,
                     const float* gs, const float* gv, float* gx, float* gv0, int64_t T, int64_t N,
                     int64_t b, int64_t e, const BwdParams& p) {
  if (kdengine::cpu_isa(kdengine::kFloat) < kdengine::kIsaAvx512) return false;
  if (hard) {
    if (sur == kSurAtan)
      bwd_f32_avx512<true, kSurAtan>(detach, x, v0, gs, gv, gx, gv0, T, N, b, e, p);
    else
      bwd_f32_avx512<true, kSurSigmoid>(detach, x, v0, gs, gv, gx, gv0, T, N, b, e, p);
  } else {
    if (sur == kSurAtan)
      bwd_f32_avx512<false, kSurAtan>(detach, x, v0, gs, gv, gx, gv0, T, N, b, e, p);
    else
      bwd_f32_avx512<false, kSurSigmoid>(detach, x, v0, gs, gv, gx, gv0, T, N, b, e, p);
  }
  return true;
}
#endif

template <typename scalar_t, typename acc_t>
bool bwd_task_avx512(bool, int64_t, bool, const scalar_t*, const acc_t*, const scalar_t*, const acc_t*,
                     scalar_t*, acc_t*, int64_t, int64_t, int64_t, int64_t, const BwdParams&) {
  return false;
}

std::tuple<at::Tensor, at::Tensor> if_bwd_cpu(const at::Tensor& x,
                                              const c10::optional<at::Tensor>& v_init,
                                              const at::Tensor& grad_spikes,
                                              const c10::optional<at::Tensor>& grad_v,
                                              double v_threshold, bool hard_reset, double v_reset,
                                              int64_t surrogate, double alpha,
                                              bool detach_reset) {
  check_inputs(x, v_init, "if_bwd");
  TORCH_CHECK(surrogate == kSurAtan || surrogate == kSurSigmoid,
              "if_bwd: surrogate must be 0 (atan) or 1 (sigmoid), got ", surrogate);
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(grad_spikes.sizes() == x.sizes() && grad_spikes.scalar_type() == x.scalar_type() &&
                  grad_spikes.is_contiguous(),
              "if_bwd: grad_spikes must be contiguous, with x's shape and dtype");
  const auto acc = acc_type_of(x.scalar_type());
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv)
    TORCH_CHECK(grad_v->dim() == 1 && grad_v->size(0) == N && grad_v->scalar_type() == acc &&
                    grad_v->is_contiguous(),
                "if_bwd: grad_v must be contiguous (N,) ", acc);
  auto gx = kdengine::pooled_empty(grad_spikes.sizes(), grad_spikes.options());
  auto gv0 = at::empty({N}, x.options().dtype(acc));
  const bool has_v = v_init.has_value() && v_init->defined();
  const BwdParams p{v_threshold, v_reset, hard_reset ? v_reset : 0.0, alpha};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "if_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gsp = grad_spikes.data_ptr<scalar_t>();
    const acc_t* vp = has_v ? v_init->data_ptr<acc_t>() : nullptr;
    const acc_t* gvp = has_gv ? grad_v->data_ptr<acc_t>() : nullptr;
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    acc_t* gv0p = gv0.data_ptr<acc_t>();
    kdengine::parallel_for(0, N, grain_for(T), [&](int64_t b, int64_t e) {
      if (bwd_task_avx512(hard_reset, surrogate, detach_reset, xp, vp, gsp, gvp, gxp, gv0p, T, N, b, e, p))
        return;
      if (hard_reset) {
        if (surrogate == kSurAtan)
          bwd_dispatch_detach<scalar_t, acc_t, true, kSurAtan>(detach_reset, xp, vp, gsp, gvp,
                                                               gxp, gv0p, T, N, b, e, p);
        else
          bwd_dispatch_detach<scalar_t, acc_t, true, kSurSigmoid>(detach_reset, xp, vp, gsp, gvp,
                                                                  gxp, gv0p, T, N, b, e, p);
      } else {
        if (surrogate == kSurAtan)
          bwd_dispatch_detach<scalar_t, acc_t, false, kSurAtan>(detach_reset, xp, vp, gsp, gvp,
                                                                gxp, gv0p, T, N, b, e, p);
        else
          bwd_dispatch_detach<scalar_t, acc_t, false, kSurSigmoid>(detach_reset, xp, vp, gsp,
                                                                   gvp, gxp, gv0p, T, N, b, e, p);
      }
    });
  });
  return {gx, gv0};
}

// The schema shared with the CUDA kernels (kdengine/ops/if_multistep/schema.py): the CPU forward
// keeps no pre-reset potential (its backward recomputes it from x and v_init), so it returns an
// empty h and refuses save_h.
std::tuple<at::Tensor, at::Tensor, at::Tensor> if_fwd_op(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& v_init,
                                                         double v_threshold, bool hard_reset,
                                                         double v_reset, bool save_h) {
  TORCH_CHECK_VALUE(!save_h, "if_fwd: the CPU kernel recomputes h in the backward; save_h must be "
                             "False");
  auto [spikes, v_out] = if_fwd_cpu(x, v_init, v_threshold, hard_reset, v_reset);
  return {spikes, v_out, at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> if_bwd_op(const at::Tensor& x,
                                             const c10::optional<at::Tensor>& v_init,
                                             const c10::optional<at::Tensor>& /*h*/,
                                             const at::Tensor& grad_spikes,
                                             const c10::optional<at::Tensor>& grad_v,
                                             double v_threshold, bool hard_reset, double v_reset,
                                             int64_t surrogate, double alpha, bool detach_reset) {
  return if_bwd_cpu(x, v_init, grad_spikes, grad_v, v_threshold, hard_reset, v_reset, surrogate,
                    alpha, detach_reset);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("if_fwd", &if_fwd_op);
  m.impl("if_bwd", &if_bwd_op);
}
