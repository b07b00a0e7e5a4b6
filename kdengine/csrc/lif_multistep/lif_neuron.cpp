// Multi-step leaky integrate-and-fire neuron, CPU: fused forward over all T steps, fused backward
// through time (one reverse loop over T) that also returns the gradients of the leak and the
// threshold. Ops: kdengine::lif_fwd, kdengine::lif_bwd (CPU kernels).
//
// Math (per neuron, state in acc_t = float, or double for float64 input). params = [leak, theta, r]
// (leak: tau when `divide`, else the decay factor k = 1/tau; r: v_reset for the hard reset, 0 for
// the reset by subtraction, also the resting potential):
//   charge  a = x_t - (v_{t-1} - r);  h_t = v_{t-1} + a / tau  (or a * k)           decay_input
//           h_t = v_{t-1} - (v_{t-1} - r) / tau + x_t   (or ... * k + x_t)          otherwise
//   fire    u = h_t - theta;  s_t = [u >= 0] (NaN if u is NaN)
//   reset   v_t = s_t ? h_t - theta : h_t  (soft)   |   s_t ? r : h_t  (hard)
// Backward, carrying c = dL/dv_t from t = T-1 (c = dL/dv_final, or 0) down to 0, q = 1/tau or k:
//   sg = surrogate'(u)   atan: (a/2) / (1 + (pi/2 a u)^2);  sigmoid: a e / (1+e)^2, e = exp(-a|u|)
//   dv_t/dh_t = 1 - theta sg (soft) | (1 - s_t) + (r - h_t) sg (hard); no sg term with detach_reset
//   g = dL/dh_t = gs_t sg + c dv_t/dh_t;  dL/dx_t = g q (decay_input) or g;  c <- g (1 - q)
//   dL/dtheta += -sg (gs_t + c dv_t/ds_t) - c s_t [soft]    (dv/ds = -theta | r - h_t; the c dv/ds
//                term and nothing else goes with detach_reset)
//   dL/dk     += g (x_t - (v_{t-1} - r))  or  -g (v_{t-1} - r);   dL/dtau = -dL/dk / tau^2
// This is autograd of kdengine/ops/lif_multistep/reference.py, written out. The forward does the
// reference's operations in its order, so spikes and potentials are bit-identical; the one
// exception is exact: a / tau is computed as a * (1/tau) when tau is a power of two (the same
// real number, rounded once). The backward is free to round differently (a float64 reference
// checks it): it multiplies by 1/tau, takes reciprocals as a hardware estimate plus one Newton
// step, and lets the compiler fuse multiply-adds.
//
// Layout: x, spikes, grad_spikes, grad_x are contiguous (T, N): step t of neuron n at t*N + n.
// Neurons are independent: kdengine::parallel_for splits n over the cores in groups of 64; each
// task walks blocks of neurons and runs the whole T loop per block with the block's potentials in
// a small array (L1), so every step reads one contiguous run of inputs and writes one run of
// spikes. The parameter gradients are summed per neuron over T in L1, per group of 64 neurons in
// double at the end of a block ((2, N/64) partials) and over groups by one at::sum: the same bits
// whatever the thread count.
//
// Memory traffic (fp32, per element per step): forward reads x and writes s: 8 B (spikes leave
// with non-temporal stores, so no read-for-ownership of the output lines; outputs come from
// output_pool.h, so a repeated call takes no page faults). Backward recomputes h_t (and, for the
// leak gradient, dh_t/dk) from x into per-block buffers of T*B values sized to stay in L2 (the
// same code as the forward, so the same bits), then walks them backwards reading gs and streaming
// gx out: 12 B, with or without the parameter gradients. 20 B for forward + backward, no (T, N)
// buffer kept between them. bf16/fp16 inputs halve every term but the buffers.
// Builds, picked at run time: portable (GCC vector types, SSE2 pairs), AVX2+FMA (8 floats) and
// AVX-512 (16 floats; doubles stay 4-wide). The vector builds may contract multiply-adds; the
// forward's one product (a * k) is kept unfused by opaque(), so all builds give the same spikes.
// Prefetching: each block reads T rows of a few KB, T separate runs that the hardware prefetcher
// picks up late; the forward prefetches row t+1 while it works on row t, and the backward's
// compute-heavy reverse loop prefetches the next step's spike gradients and, one step per row,
// the next block's inputs, so that its recompute (memory-bound, little arithmetic) reads cache.
// Measured, T=16, N=2^20 fp32, one thread, on a shared 2-core AVX-512 Xeon VM (medians, ms), the
// former 8-wide kernel (192 KB buffers, no prefetch) -> this one: forward 13.2 -> 6.9, sigmoid
// backward 31 -> 16, with the tau gradient (multiply form) 41 -> 21.
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

namespace {

using kdvec::v4d;
using kdvec::v8f;
using kdvec::v8i;
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

constexpr int64_t kSurAtan = 0;
constexpr int64_t kSurSigmoid = 1;
constexpr int64_t kGroup = 64;               // neurons per parameter-gradient partial (and split)
constexpr int64_t kFwdBlock = 2048;          // neurons per forward block (8 KB of fp32 state)
constexpr int64_t kBwdBufBytes = 1 << 20;   // recompute buffers per task, kept within L2
constexpr int64_t kBwdBlockMax = 4096;      // neurons per backward block: 16 KB fp32 row runs

// Lanes of each vector type: element E, lane count W, comparison mask M (vec_math.h's traits,
// and the 16-float vector of the AVX-512 build).
template <class VT>
struct Lanes : kdvec::Traits<VT> {};
template <>
struct Lanes<v16f> {
  using E = float;
  using M = v16i;
  static constexpr int W = 16;
};

// The three builds. Each kernel body is one always_inline template instantiated once per build
// inside a function carrying that build's target attribute:
//   Portable: default target (v8f as SSE2 pairs), plain stores, true divisions;
//   Avx2:     target avx2,fma, 8 floats, non-temporal stores of fp32 outputs;
//   Avx512:   target avx512f/bw/vl/dq, 16 floats (doubles stay 4-wide: that path is for accuracy).
// Both vector builds let the compiler contract a*b+c into an FMA; the forward's one product
// (a * k) goes through opaque() so that it is rounded on its own, as in the reference.
struct Portable {
  template <class E>
  using V = std::conditional_t<std::is_same_v<E, double>, v4d, v8f>;
  static constexpr bool kSimd = false;
};
struct Avx2 {
  template <class E>
  using V = std::conditional_t<std::is_same_v<E, double>, v4d, v8f>;
  static constexpr bool kSimd = true;
};
struct Avx512 {
  template <class E>
  using V = std::conditional_t<std::is_same_v<E, double>, v4d, v16f>;
  static constexpr bool kSimd = true;
};

#define LIF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define LIF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

// A value the compiler cannot fuse into a following add (it only exists in a register).
template <class I, class VT>
KDV_INLINE VT opaque(VT v) {
  if constexpr (I::kSimd) asm("" : "+v"(v));
  return v;
}

// n <= W lanes of scalar_t, converted to the state type (the rest 0); and back.
template <class VT, typename scalar_t>
KDV_INLINE VT load_n(const scalar_t* p, int64_t n) {
  using E = typename Lanes<VT>::E;
  constexpr int64_t W = Lanes<VT>::W;
  VT v{};
  if constexpr (std::is_same_v<scalar_t, E>) {
    if (__builtin_expect(n == W, 1)) {
      std::memcpy(&v, p, sizeof(VT));
      return v;
    }
  }
  for (int64_t k = 0; k < n; ++k) v[k] = static_cast<E>(p[k]);
  return v;
}

template <class VT, typename scalar_t>
KDV_INLINE void store_n(scalar_t* p, VT v, int64_t n) {
  using E = typename Lanes<VT>::E;
  constexpr int64_t W = Lanes<VT>::W;
  if constexpr (std::is_same_v<scalar_t, E>) {
    if (__builtin_expect(n == W, 1)) {
      std::memcpy(p, &v, sizeof(VT));
      return;
    }
  }
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(v[k]);
}

// (The x86 builtins below, not the <immintrin.h> wrappers: a wrapper is an always_inline function
// of its own target, which GCC refuses to inline into these templates before they are inlined
// into a function of that target.)
// A (T, N) output row: fp32 rows aligned to the vector leave with non-temporal stores (written
// once, never read back here: streaming skips the read-for-ownership of every line).
template <class I, class VT, typename scalar_t>
KDV_INLINE void store_out(scalar_t* p, VT v, int64_t n, bool stream) {
#if defined(__x86_64__)
  if constexpr (I::kSimd && std::is_same_v<scalar_t, float> && std::is_same_v<VT, v8f>) {
    if (stream && n == 8) return __builtin_ia32_movntps256(p, v);
  }
  if constexpr (I::kSimd && std::is_same_v<scalar_t, float> && std::is_same_v<VT, v16f>) {
    if (stream && n == 16) return __builtin_ia32_movntps512(p, v);
  }
#endif
  (void)stream;
  store_n(p, v, n);
}

template <class I>
KDV_INLINE void stream_fence() {
#if defined(__x86_64__)
  if constexpr (I::kSimd) __builtin_ia32_sfence();  // streamed stores are weakly ordered
#endif
}

template <class VT, typename scalar_t>
KDV_INLINE bool aligned_rows(const scalar_t* base, int64_t N) {
  return std::is_same_v<scalar_t, float> && reinterpret_cast<uintptr_t>(base) % sizeof(VT) == 0 &&
         (N * static_cast<int64_t>(sizeof(scalar_t))) % static_cast<int64_t>(sizeof(VT)) == 0;
}

template <typename E>
struct Params {
  E leak, thr, r;
  bool decay_input, divide;
  // With divide and a power-of-two tau (both it and 1/tau normal), a / tau == a * (1/tau) for
  // every a: the same real number rounded once. Then the forward multiplies (no division).
  bool exact_recip;
  E recip;  // 1/leak with divide, else the leak (the backward's dh/dx, dh/dv = 1 - recip)
};

template <typename E>
Params<E> make_params(E leak, E thr, E r, bool decay_input, bool divide) {
  Params<E> p{leak, thr, r, decay_input, divide, false, divide ? E(1) / leak : leak};
  if (divide) {
    int e = 0;
    const E m = std::frexp(leak, &e);
    p.exact_recip = std::fabs(m) == E(0.5) && std::isnormal(leak) && std::isnormal(p.recip);
  }
  return p;
}

// h_t from v_{t-1} and x_t, in the reference's order of operations; also dh_t/dk (the charge
// a = x - (v - r) with decay_input, else -(v - r)), which the leak's gradient needs.
template <class I, class VT, typename E>
KDV_INLINE VT charge(VT v, VT x, const Params<E>& p, VT* dhdk = nullptr) {
  const VT d = v - p.r;
  if (p.decay_input) {
    const VT a = x - d;
    if (dhdk) *dhdk = a;
    if (p.divide && !p.exact_recip) return v + a / p.leak;
    return v + opaque<I>(a * (p.divide ? p.recip : p.leak));
  }
  if (dhdk) *dhdk = VT{} - d;
  if (p.divide && !p.exact_recip) return v - d / p.leak + x;
  return v - opaque<I>(d * (p.divide ? p.recip : p.leak)) + x;
}

// v_t from h_t (the reset).
template <bool kHard, class VT, typename E>
KDV_INLINE VT reset(VT h, const Params<E>& p) {
  using M = typename Lanes<VT>::M;
  const M fire = (h - p.thr) >= E(0);
  return fire ? (kHard ? VT{} + p.r : h - p.thr) : h;
}

// What integrate_block does with each pre-reset h_t: write the spikes (the forward), or keep h_t
// (and dh_t/dk) in the backward's buffers (rows of B).
enum Emit { kEmitSpikes, kEmitH, kEmitHDk };

template <typename scalar_t, typename E>
struct Sink {
  scalar_t* spikes;
  bool stream;
  E* hb;
  E* kb;
  int64_t B;
};

// The forward trajectory of n neurons at j0 over all T steps, from v_init (or r), in v (W-padded),
// emitting every h_t as kEmit says. The forward and the backward's recompute both run this, so the
// backward's h is the forward's, bit for bit. (No lambdas: the emit code must be compiled for the
// caller's target, and a lambda's body is a function of the default target.)
template <class I, bool kHard, Emit kEmit, class VT, typename scalar_t, typename E>
KDV_INLINE void integrate_block(const scalar_t* __restrict__ x, const E* __restrict__ v_init,
                                E* __restrict__ v, int64_t T, int64_t N, int64_t j0, int64_t n,
                                const Params<E>& p, const Sink<scalar_t, E>& out) {
  constexpr int64_t W = Lanes<VT>::W;
  for (int64_t j = 0; j < n; ++j) v[j] = v_init ? v_init[j0 + j] : p.r;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xt = x + t * N + j0;
    const scalar_t* pf_x = t + 1 < T ? xt + N : nullptr;
    for (int64_t j = 0; j < n; j += W) {
      if (kEmit == kEmitSpikes && pf_x) __builtin_prefetch(pf_x + j, 0, 3);
      const int64_t m = std::min(W, n - j);
      VT dk;
      const VT h = charge<I>(load_n<VT>(v + j, m), load_n<VT>(xt + j, m), p,
                             kEmit == kEmitHDk ? &dk : nullptr);
      if constexpr (kEmit == kEmitSpikes) {
        const VT u = h - p.thr;
        VT s = (u >= E(0)) ? VT{} + E(1) : VT{};
        s = (u != u) ? u : s;  // a NaN potential (or threshold) emits a NaN spike
        store_out<I>(out.spikes + t * N + j0 + j, s, m, out.stream);
      } else {
        std::memcpy(out.hb + t * out.B + j, &h, sizeof(VT));  // room for whole vectors
        if constexpr (kEmit == kEmitHDk) std::memcpy(out.kb + t * out.B + j, &dk, sizeof(VT));
      }
      store_n(v + j, reset<kHard>(h, p), m);
    }
  }
}

template <class I, bool kHard, typename scalar_t, typename E>
KDV_INLINE void fwd_range_impl(const scalar_t* __restrict__ x, scalar_t* __restrict__ spikes,
                               const E* __restrict__ v_init, E* __restrict__ v_out, int64_t T,
                               int64_t N, int64_t begin, int64_t end, const Params<E>& p) {
  using VT = typename I::template V<E>;
  alignas(64) E v[kFwdBlock];
  const Sink<scalar_t, E> out{spikes, aligned_rows<VT>(spikes + begin, N), nullptr, nullptr, 0};
  for (int64_t j0 = begin; j0 < end; j0 += kFwdBlock) {
    const int64_t n = std::min(kFwdBlock, end - j0);
    integrate_block<I, kHard, kEmitSpikes, VT>(x, v_init, v, T, N, j0, n, p, out);
    std::memcpy(v_out + j0, v, static_cast<size_t>(n) * sizeof(E));
  }
  stream_fence<I>();
}

// 1/d for d >= 1 (or +inf, NaN): the vector builds refine the hardware estimate by one Newton
// step (<= 2 ulp; a huge d gives 0, NaN stays NaN), the portable build divides.
template <class I, class VT>
KDV_INLINE VT recip_ge1(VT d) {
  using E = typename Lanes<VT>::E;
#if defined(__x86_64__)
  if constexpr (I::kSimd && std::is_same_v<E, float>) {
    const E big = E(1e30);
    d = d > big ? VT{} + big : d;  // rcp(inf) = 0 would make the Newton step inf * 0
    VT r;
    if constexpr (std::is_same_v<VT, v16f>)
      r = __builtin_ia32_rcp14ps512_mask(d, VT{}, static_cast<unsigned short>(0xffff));
    else
      r = __builtin_ia32_rcpps256(d);
    return r * (E(2) - d * r);
  }
#endif
  return E(1) / d;
}

// e^x for x <= 0 (or NaN), 8 floats (vec_math.h) or 16: the same reduction and polynomial at
// full width (vec_math.h's exp_poly / reduce_r are width-generic; only the exponent bits differ).
template <class VT>
KDV_INLINE VT exp_nonpos(VT x) {
  if constexpr (std::is_same_v<VT, v16f>) {
    using namespace kdvec::detail;
    const v16f lo = v16f{} - 104.0f;  // exp(-104) is 0 in float
    const v16f xc = x < lo ? lo : x;
    const v16f t = xc * kLog2e + kRound;
    const v16f fn = t - kRound;
    v16i e = ((v16i)t - (v16i)(v16f{} + kRound)) + 127;
    e = e > 0 ? e : v16i{};  // 2^n under FLT_MIN: scale +0.0
    return exp_poly(reduce_r(xc, fn)) * (v16f)(e << 23);
  } else {
    return kdvec::vexp_nonpos(x);
  }
}

// The surrogate derivative sg(u).
template <class I, int64_t kSur, class VT, typename E>
KDV_INLINE VT surrogate_grad(VT u, E alpha, E k_atan, E half_alpha) {
  if constexpr (kSur == kSurAtan) {
    const VT z = u * k_atan;
    return half_alpha * recip_ge1<I>(z * z + E(1));
  } else {
    const VT au = u < E(0) ? -u : u;
    const VT e = exp_nonpos(-alpha * au);
    const VT d = e + E(1);
    return alpha * e * recip_ge1<I>(d * d);
  }
}

struct BwdScalars {
  double alpha;
  bool param_grads;
};

// Per task, [begin, end) in blocks of B neurons (a multiple of kGroup): recompute the block's h_t
// (and dh_t/dk for the parameter gradients) into L2-sized buffers with the forward's code, then
// walk them from t = T-1 down to 0 carrying c = dL/dv per neuron in L1. The parameter gradients
// are summed per neuron over t in L1 and then, in double, over each aligned group of kGroup
// neurons into g_part[(2, N / kGroup)]: the same sums whatever the thread count.
template <class I, bool kHard, int64_t kSur, bool kDetach, typename scalar_t, typename E>
KDV_INLINE void bwd_range_impl(const scalar_t* __restrict__ x, const E* __restrict__ v_init,
                               const scalar_t* __restrict__ gs, const E* __restrict__ gv,
                               scalar_t* __restrict__ gx, E* __restrict__ gv_init,
                               double* __restrict__ g_part, int64_t T, int64_t N, int64_t begin,
                               int64_t end, const Params<E>& p, const BwdScalars& bs) {
  using VT = typename I::template V<E>;
  using M = typename Lanes<VT>::M;
  constexpr int64_t W = Lanes<VT>::W;
  const E alpha = static_cast<E>(bs.alpha);
  const E k_atan = static_cast<E>(M_PI / 2 * bs.alpha), half_alpha = static_cast<E>(bs.alpha / 2);
  const bool pg = bs.param_grads;
  const int64_t groups = (N + kGroup - 1) / kGroup;
  const int64_t per = static_cast<int64_t>(sizeof(E)) * T * (pg ? 2 : 1);
  const int64_t B =
      std::max<int64_t>(kGroup, std::min<int64_t>(kBwdBlockMax, kBwdBufBytes / per) / kGroup * kGroup);
  std::vector<E> buf(static_cast<size_t>((1 + T + (pg ? T + 2 : 0)) * B), E(0));
  E* __restrict__ hb = buf.data() + B;
  E* __restrict__ kb = hb + T * B;  // dh/dk, with pg
  E* __restrict__ cb = buf.data();
  E* __restrict__ acc_k = kb + T * B;
  E* __restrict__ acc_t = acc_k + B;
  const bool stream = aligned_rows<VT>(gx + begin, N);
  const E q = p.recip, one_m_q = E(1) - p.recip;
  const VT one = VT{} + E(1);
  for (int64_t j0 = begin; j0 < end; j0 += B) {
    const int64_t n = std::min(B, end - j0);
    const Sink<scalar_t, E> keep{nullptr, false, hb, kb, B};
    if (pg) {
      integrate_block<I, kHard, kEmitHDk, VT>(x, v_init, cb, T, N, j0, n, p, keep);
      std::fill(acc_k, acc_k + 2 * B, E(0));
    } else {
      integrate_block<I, kHard, kEmitH, VT>(x, v_init, cb, T, N, j0, n, p, keep);
    }
    for (int64_t j = 0; j < n; ++j) cb[j] = gv ? gv[j0 + j] : E(0);
    for (int64_t t = T - 1; t >= 0; --t) {
      const E* __restrict__ ht = hb + t * B;
      const E* __restrict__ kt = kb + t * B;
      const scalar_t* __restrict__ gst = gs + t * N + j0;
      // Prefetch what comes next while this loop computes: the spike gradients of step t - 1
      // and one step of the next block's inputs (the recompute then reads them from cache).
      const scalar_t* pf_gs = t > 0 ? gst - N : nullptr;
      const int64_t n_next = std::min(B, end - (j0 + B));
      const scalar_t* pf_x = n_next > 0 ? x + (T - 1 - t) * N + j0 + B : nullptr;
      scalar_t* __restrict__ gxt = gx + t * N + j0;
      for (int64_t j = 0; j < n; j += W) {
        const int64_t m = std::min(W, n - j);
        VT h, c;
        std::memcpy(&h, ht + j, sizeof(VT));
        std::memcpy(&c, cb + j, sizeof(VT));
        const VT u = h - p.thr;
        const M fire = u >= E(0);
        const VT sg = surrogate_grad<I, kSur>(u, alpha, k_atan, half_alpha);
        const VT dvds = kHard ? (VT{} + p.r) - h : VT{} - p.thr;
        VT dvdh;
        if constexpr (kHard) {
          dvdh = fire ? VT{} : one;
        } else {
          dvdh = one;
        }
        if constexpr (!kDetach) dvdh = dvdh + dvds * sg;
        if (pf_gs) __builtin_prefetch(pf_gs + j, 0, 3);
        if (pf_x && j < n_next) __builtin_prefetch(pf_x + j, 0, 2);
        const VT gsv = load_n<VT>(gst + j, m);
        const VT g = gsv * sg + c * dvdh;
        store_out<I>(gxt + j, p.decay_input ? g * q : g, m, stream);
        const VT c_new = g * one_m_q;
        std::memcpy(cb + j, &c_new, sizeof(VT));
        if (pg) {
          VT dth = kDetach ? VT{} - sg * gsv : VT{} - sg * (gsv + c * dvds);
          if constexpr (!kHard) dth = dth - (fire ? c : VT{});
          VT dk, ak, at;
          std::memcpy(&dk, kt + j, sizeof(VT));
          std::memcpy(&ak, acc_k + j, sizeof(VT));
          std::memcpy(&at, acc_t + j, sizeof(VT));
          ak = ak + g * dk;
          at = at + dth;
          std::memcpy(acc_k + j, &ak, sizeof(VT));
          std::memcpy(acc_t + j, &at, sizeof(VT));
        }
      }
    }
    std::memcpy(gv_init + j0, cb, static_cast<size_t>(n) * sizeof(E));
    if (pg) {
      for (int64_t g0 = 0; g0 < n; g0 += kGroup) {
        double sk = 0.0, st = 0.0;
        for (int64_t j = g0; j < std::min(n, g0 + kGroup); ++j) {
          sk += static_cast<double>(acc_k[j]);
          st += static_cast<double>(acc_t[j]);
        }
        const int64_t gi = (j0 + g0) / kGroup;
        g_part[gi] = sk;
        g_part[groups + gi] = st;
      }
    }
  }
  stream_fence<I>();
}

// The builds of the kernels, and the run-time choice between them.
enum class Isa { kPortable, kAvx2, kAvx512 };

// The float family's level (common/cpu_isa.h: the CPU's best, KDENGINE_CPU_PORTABLE, or the
// process-wide test knob), shared with the KD and IF kernels so one knob forces all of them.
Isa isa_in_use() {
  switch (kdengine::cpu_isa(kdengine::kFloat)) {
    case kdengine::kIsaAvx512:
      return Isa::kAvx512;
    case kdengine::kIsaAvx2:
      return Isa::kAvx2;
    default:
      return Isa::kPortable;
  }
}

#if defined(__x86_64__)
template <bool kHard, typename S, typename E>
LIF_TARGET_AVX2 void fwd_avx2(const S* x, S* s, const E* v0, E* vo, int64_t T, int64_t N,
                              int64_t b, int64_t e, const Params<E>& p) {
  fwd_range_impl<Avx2, kHard>(x, s, v0, vo, T, N, b, e, p);
}
template <bool kHard, typename S, typename E>
LIF_TARGET_AVX512 void fwd_avx512(const S* x, S* s, const E* v0, E* vo, int64_t T, int64_t N,
                                  int64_t b, int64_t e, const Params<E>& p) {
  fwd_range_impl<Avx512, kHard>(x, s, v0, vo, T, N, b, e, p);
}
#endif

template <bool kHard, typename S, typename E>
void fwd_range(Isa isa, const S* x, S* s, const E* v0, E* vo, int64_t T, int64_t N, int64_t b,
               int64_t e, const Params<E>& p) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return fwd_avx512<kHard>(x, s, v0, vo, T, N, b, e, p);
  if (isa == Isa::kAvx2) return fwd_avx2<kHard>(x, s, v0, vo, T, N, b, e, p);
#endif
  (void)isa;
  fwd_range_impl<Portable, kHard>(x, s, v0, vo, T, N, b, e, p);
}

#define LIF_BWD_ARGS                                                                            \
  const S *x, const E *v0, const S *gs, const E *gv, S *gx, E *gv0, double *gp, int64_t T,       \
      int64_t N, int64_t b, int64_t e, const Params<E>&p, const BwdScalars &bs
#define LIF_BWD_PASS x, v0, gs, gv, gx, gv0, gp, T, N, b, e, p, bs

template <bool kHard, int64_t kSur, bool kDetach, typename S, typename E>
void bwd_portable(LIF_BWD_ARGS) {
  bwd_range_impl<Portable, kHard, kSur, kDetach>(LIF_BWD_PASS);
}

#if defined(__x86_64__)
template <bool kHard, int64_t kSur, bool kDetach, typename S, typename E>
LIF_TARGET_AVX2 void bwd_avx2(LIF_BWD_ARGS) {
  bwd_range_impl<Avx2, kHard, kSur, kDetach>(LIF_BWD_PASS);
}
template <bool kHard, int64_t kSur, bool kDetach, typename S, typename E>
LIF_TARGET_AVX512 void bwd_avx512(LIF_BWD_ARGS) {
  bwd_range_impl<Avx512, kHard, kSur, kDetach>(LIF_BWD_PASS);
}
#endif

template <bool kHard, int64_t kSur, bool kDetach, typename S, typename E>
void bwd_range(Isa isa, LIF_BWD_ARGS) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return bwd_avx512<kHard, kSur, kDetach>(LIF_BWD_PASS);
  if (isa == Isa::kAvx2) return bwd_avx2<kHard, kSur, kDetach>(LIF_BWD_PASS);
#endif
  (void)isa;
  bwd_portable<kHard, kSur, kDetach>(LIF_BWD_PASS);
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& v_init,
                  const at::Tensor& params, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, op, ": x must be (T, N), got ", x.dim(), " dims");
  TORCH_CHECK(x.size(0) >= 1, op, ": T must be >= 1");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const auto acc = acc_type_of(x.scalar_type());
  if (v_init.has_value() && v_init->defined()) {
    const auto& v = *v_init;
    TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": v_init must be (N,) = (",
                x.size(1), ",)");
    TORCH_CHECK(v.scalar_type() == acc && v.is_contiguous() && v.device().is_cpu(), op,
                ": v_init must be a contiguous CPU ", acc, " tensor");
  }
  TORCH_CHECK(params.dim() == 1 && params.size(0) == 3 && params.scalar_type() == acc &&
                  params.device().is_cpu() && params.is_contiguous(),
              op, ": params must be a contiguous (3,) CPU ", acc, " tensor [leak, v_threshold, r]");
}

template <typename E>
Params<E> read_params(const at::Tensor& params, bool decay_input, bool divide) {
  const E* pp = params.data_ptr<E>();
  return make_params<E>(pp[0], pp[1], pp[2], decay_input, divide);
}

// Neurons split over the cores in whole groups of kGroup (so every task's rows start on a
// vector boundary, and each parameter-gradient partial belongs to one task).
template <class F>
void for_neuron_groups(int64_t T, int64_t N, const F& f) {
  const int64_t groups = (N + kGroup - 1) / kGroup;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (T * kGroup));
  kdengine::parallel_for(0, groups, grain, [&](int64_t gb, int64_t ge) {
    f(gb * kGroup, std::min(N, ge * kGroup));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_fwd_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& v_init, const at::Tensor& params,
    bool hard_reset, bool decay_input, bool divide, bool save_h) {
  TORCH_CHECK_VALUE(!save_h, "lif_fwd: the CPU kernel recomputes h in the backward; save_h must "
                             "be False");
  check_inputs(x, v_init, params, "lif_fwd");
  const int64_t T = x.size(0), N = x.size(1);
  auto spikes = kdengine::pooled_empty(x.sizes(), x.options());
  auto v_out = at::empty({N}, x.options().dtype(acc_type_of(x.scalar_type())));
  const bool has_v = v_init.has_value() && v_init->defined();
  const Isa isa = isa_in_use();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lif_fwd", [&] {
    using E = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    const E* vp = has_v ? v_init->data_ptr<E>() : nullptr;
    E* vo = v_out.data_ptr<E>();
    const Params<E> p = read_params<E>(params, decay_input, divide);
    for_neuron_groups(T, N, [&](int64_t b, int64_t e) {
      if (hard_reset)
        fwd_range<true>(isa, xp, sp, vp, vo, T, N, b, e, p);
      else
        fwd_range<false>(isa, xp, sp, vp, vo, T, N, b, e, p);
    });
  });
  return {spikes, v_out, at::empty({0}, x.options())};
}

template <bool kHard, int64_t kSur, typename S, typename E>
void bwd_dispatch_detach(bool detach, Isa isa, LIF_BWD_ARGS) {
  if (detach)
    bwd_range<kHard, kSur, true>(isa, LIF_BWD_PASS);
  else
    bwd_range<kHard, kSur, false>(isa, LIF_BWD_PASS);
}

// The CPU backward ignores h (it recomputes the potentials from x and v_init).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_bwd_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& /*h*/, const at::Tensor& grad_spikes,
    const c10::optional<at::Tensor>& grad_v, const at::Tensor& params, bool hard_reset,
    bool decay_input, bool divide, int64_t surrogate, double alpha, bool detach_reset,
    bool param_grads) {
  check_inputs(x, v_init, params, "lif_bwd");
  TORCH_CHECK(surrogate == kSurAtan || surrogate == kSurSigmoid,
              "lif_bwd: surrogate must be 0 (atan) or 1 (sigmoid), got ", surrogate);
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(grad_spikes.sizes() == x.sizes() && grad_spikes.scalar_type() == x.scalar_type() &&
                  grad_spikes.is_contiguous(),
              "lif_bwd: grad_spikes must be contiguous, with x's shape and dtype");
  const auto acc = acc_type_of(x.scalar_type());
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv)
    TORCH_CHECK(grad_v->dim() == 1 && grad_v->size(0) == N && grad_v->scalar_type() == acc &&
                    grad_v->is_contiguous(),
                "lif_bwd: grad_v must be contiguous (N,) ", acc);
  auto gx = kdengine::pooled_empty(grad_spikes.sizes(), grad_spikes.options());
  auto gv0 = at::empty({N}, x.options().dtype(acc));
  const int64_t groups = (N + kGroup - 1) / kGroup;
  auto gp = at::empty({param_grads ? 2 : 0, groups}, x.options().dtype(at::kDouble));
  const bool has_v = v_init.has_value() && v_init->defined();
  const BwdScalars bs{alpha, param_grads};
  const Isa isa = isa_in_use();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lif_bwd", [&] {
    using S = scalar_t;
    using E = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const S* xp = x.data_ptr<S>();
    const S* gsp = grad_spikes.data_ptr<S>();
    const E* vp = has_v ? v_init->data_ptr<E>() : nullptr;
    const E* gvp = has_gv ? grad_v->data_ptr<E>() : nullptr;
    S* gxp = gx.data_ptr<S>();
    E* gv0p = gv0.data_ptr<E>();
    double* gpp = param_grads ? gp.data_ptr<double>() : nullptr;
    const Params<E> p = read_params<E>(params, decay_input, divide);
    for_neuron_groups(T, N, [&](int64_t b, int64_t e) {
      if (hard_reset) {
        if (surrogate == kSurAtan)
          bwd_dispatch_detach<true, kSurAtan>(detach_reset, isa, xp, vp, gsp, gvp, gxp, gv0p, gpp,
                                              T, N, b, e, p, bs);
        else
          bwd_dispatch_detach<true, kSurSigmoid>(detach_reset, isa, xp, vp, gsp, gvp, gxp, gv0p,
                                                 gpp, T, N, b, e, p, bs);
      } else {
        if (surrogate == kSurAtan)
          bwd_dispatch_detach<false, kSurAtan>(detach_reset, isa, xp, vp, gsp, gvp, gxp, gv0p,
                                               gpp, T, N, b, e, p, bs);
        else
          bwd_dispatch_detach<false, kSurSigmoid>(detach_reset, isa, xp, vp, gsp, gvp, gxp, gv0p,
                                                  gpp, T, N, b, e, p, bs);
      }
    });
  });
  if (!param_grads) return {gx, gv0, at::empty({0}, x.options().dtype(acc))};
  auto g = gp.sum(1).to(acc);
  if (divide) {  // d/dtau = d/dk * dk/dtau, k = 1/tau
    auto tau = params.select(0, 0);
    g.select(0, 0).div_(tau * tau).neg_();
  }
  return {gx, gv0, g};
}

#undef LIF_BWD_ARGS
#undef LIF_BWD_PASS

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("lif_fwd", &lif_fwd_cpu);
  m.impl("lif_bwd", &lif_bwd_cpu);
}
