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
//   g = dL/dh_t = gs_t sg + c dv_t/dh_t;  dL/dx_t = g q (decay_input) or g;  c <- g - g q
//   dL/dtheta += -sg (gs_t + c dv_t/ds_t) - c s_t [soft]    (dv/ds = -theta | r - h_t; the c dv/ds
//                term and nothing else goes with detach_reset)
//   dL/dk     += g (x_t - (v_{t-1} - r))  or  -g (v_{t-1} - r);   dL/dtau = -dL/dk / tau^2
// This is autograd of kdengine/ops/lif_multistep/reference.py, written out; the operations of
// the forward are the reference's, in its order, so spikes and potentials are bit-identical.
//
// Layout: x, spikes, grad_spikes, grad_x are contiguous (T, N): step t of neuron n at t*N + n.
// Neurons are independent: kdengine::parallel_for splits n over the cores; each task walks blocks
// of neurons and runs the whole T loop per block with the block's potentials in a small array (L1),
// so every step reads one contiguous run of inputs and writes one run of spikes. The parameter
// gradients are summed per neuron over T in the kernel ((2, N) partials, written once per block)
// and over neurons by one at::sum: deterministic whatever the thread count.
//
// Memory traffic (fp32, per element per step): forward reads x and writes s: 8 B. Backward
// recomputes h_t from x into a per-block buffer of T*B values sized to stay in L2 (the same code as
// the forward, so the same bits), then walks it backwards reading gs and writing gx: 12 B; the
// leak gradient with decay_input reads x once more (16 B). 20 B for forward + backward, no (T, N)
// buffer kept between them. bf16/fp16 inputs halve every term but the buffer.
// Vectors: 8 floats / 4 doubles (GCC vector types, vec_math.h); the same source is compiled for
// the default target (SSE2 pairs) and for AVX2 (picked at run time; no FMA: a contracted multiply-
// add would round differently from the reference and change spikes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

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

constexpr int64_t kSurAtan = 0;
constexpr int64_t kSurSigmoid = 1;
constexpr int64_t kFwdBlock = 2048;          // neurons per forward block (8 KB of fp32 state)
constexpr int64_t kBwdBufBytes = 192 << 10;  // recompute buffer per task, kept within L2

template <typename acc_t>
using VecOf = std::conditional_t<std::is_same_v<acc_t, double>, v4d, v8f>;

// n <= W lanes of scalar_t, converted to the state type (the rest 0); and back.
template <class VT, typename scalar_t>
KDV_INLINE VT load_n(const scalar_t* p, int64_t n) {
  using E = typename kdvec::Traits<VT>::E;
  constexpr int64_t W = kdvec::Traits<VT>::W;
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
  using E = typename kdvec::Traits<VT>::E;
  constexpr int64_t W = kdvec::Traits<VT>::W;
  if constexpr (std::is_same_v<scalar_t, E>) {
    if (__builtin_expect(n == W, 1)) {
      std::memcpy(p, &v, sizeof(VT));
      return;
    }
  }
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(v[k]);
}

template <typename E>
struct Params {
  E leak, thr, r;
  bool decay_input, divide;
};

// h_t from v_{t-1} and x_t, in the reference's order of operations.
template <class VT, typename E>
KDV_INLINE VT charge(VT v, VT x, const Params<E>& p) {
  if (p.decay_input) {
    const VT a = x - (v - p.r);
    return v + (p.divide ? a / p.leak : a * p.leak);
  }
  const VT d = v - p.r;
  return v - (p.divide ? d / p.leak : d * p.leak) + x;
}

// v_t from h_t (the reset), and whether it fired.
template <bool kHard, class VT, typename E>
KDV_INLINE VT reset(VT h, const Params<E>& p) {
  using M = typename kdvec::Traits<VT>::M;
  const M fire = (h - p.thr) >= E(0);
  return fire ? (kHard ? VT{} + p.r : h - p.thr) : h;
}

// The forward trajectory of n neurons at j0 over all T steps, from v_init (or r), in v: emit(t, j,
// h, m) sees each pre-reset h_t of the m <= W neurons at j. The forward and the backward's
// recompute both run this, so the backward's h is the forward's, bit for bit.
template <bool kHard, class VT, typename scalar_t, typename E, typename Emit>
KDV_INLINE void integrate_block(const scalar_t* __restrict__ x, const E* __restrict__ v_init,
                                E* __restrict__ v, int64_t T, int64_t N, int64_t j0, int64_t n,
                                const Params<E>& p, Emit&& emit) {
  constexpr int64_t W = kdvec::Traits<VT>::W;
  for (int64_t j = 0; j < n; ++j) v[j] = v_init ? v_init[j0 + j] : p.r;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xt = x + t * N + j0;
    for (int64_t j = 0; j < n; j += W) {
      const int64_t m = std::min(W, n - j);
      const VT h = charge(load_n<VT>(v + j, m), load_n<VT>(xt + j, m), p);
      emit(t, j, h, m);
      store_n(v + j, reset<kHard>(h, p), m);
    }
  }
}

template <bool kHard, typename scalar_t, typename E>
KDV_INLINE void fwd_range_impl(const scalar_t* __restrict__ x, scalar_t* __restrict__ spikes,
                               const E* __restrict__ v_init, E* __restrict__ v_out, int64_t T,
                               int64_t N, int64_t begin, int64_t end, const Params<E>& p) {
  using VT = VecOf<E>;
  alignas(64) E v[kFwdBlock];
  for (int64_t j0 = begin; j0 < end; j0 += kFwdBlock) {
    const int64_t n = std::min(kFwdBlock, end - j0);
    integrate_block<kHard, VT>(x, v_init, v, T, N, j0, n, p, [&](int64_t t, int64_t j, VT h, int64_t m) {
      const VT u = h - p.thr;
      VT s = (u >= E(0)) ? VT{} + E(1) : VT{};
      s = (u != u) ? u : s;  // a NaN potential (or threshold) emits a NaN spike
      store_n(spikes + t * N + j0 + j, s, m);
    });
    std::memcpy(v_out + j0, v, static_cast<size_t>(n) * sizeof(E));
  }
}

template <bool kHard, typename scalar_t, typename E>
void fwd_range_portable(const scalar_t* x, scalar_t* s, const E* v0, E* vo, int64_t T, int64_t N,
                        int64_t b, int64_t e, const Params<E>& p) {
  fwd_range_impl<kHard>(x, s, v0, vo, T, N, b, e, p);
}

#if defined(__x86_64__)
template <bool kHard, typename scalar_t, typename E>
__attribute__((target("avx2"))) void fwd_range_avx2(const scalar_t* x, scalar_t* s, const E* v0,
                                                    E* vo, int64_t T, int64_t N, int64_t b,
                                                    int64_t e, const Params<E>& p) {
  fwd_range_impl<kHard>(x, s, v0, vo, T, N, b, e, p);
}
#endif

// AVX2 where the CPU has it and KDENGINE_CPU_PORTABLE is unset, empty or "0" (read per call, so
// tests can compare both builds in one process).
bool use_avx2() {
#if defined(__x86_64__)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
  }();
  const char* force = std::getenv("KDENGINE_CPU_PORTABLE");
  return avx2 && !(force != nullptr && force[0] != '\0' && force[0] != '0');
#else
  return false;
#endif
}

// The surrogate derivative sg(u).
template <int64_t kSur, class VT, typename E>
KDV_INLINE VT surrogate_grad(VT u, E alpha, E k_atan, E half_alpha) {
  if constexpr (kSur == kSurAtan) {
    const VT z = u * k_atan;
    return half_alpha / (z * z + E(1));
  } else {
    const VT au = u < E(0) ? -u : u;
    const VT e = kdvec::vexp_nonpos(-alpha * au);
    const VT d = e + E(1);
    return alpha * e / (d * d);
  }
}

struct BwdScalars {
  double alpha;
  bool param_grads;
};

template <bool kHard, int64_t kSur, bool kDetach, typename scalar_t, typename E>
KDV_INLINE void bwd_range_impl(const scalar_t* __restrict__ x, const E* __restrict__ v_init,
                               const scalar_t* __restrict__ gs, const E* __restrict__ gv,
                               scalar_t* __restrict__ gx, E* __restrict__ gv_init,
                               E* __restrict__ g_leak, E* __restrict__ g_thr, int64_t T, int64_t N,
                               int64_t begin, int64_t end, const Params<E>& p,
                               const BwdScalars& bs) {
  using VT = VecOf<E>;
  using M = typename kdvec::Traits<VT>::M;
  constexpr int64_t W = kdvec::Traits<VT>::W;
  const E alpha = static_cast<E>(bs.alpha);
  const E k_atan = static_cast<E>(M_PI / 2 * bs.alpha), half_alpha = static_cast<E>(bs.alpha / 2);
  const bool pg = bs.param_grads;
  int64_t B = kBwdBufBytes / (static_cast<int64_t>(sizeof(E)) * T);
  B = std::max<int64_t>(W, std::min<int64_t>(1024, B / W * W));
  std::vector<E> hbuf(static_cast<size_t>(T * B));
  std::vector<E> cbuf(static_cast<size_t>(B));
  E* __restrict__ hb = hbuf.data();
  E* __restrict__ cb = cbuf.data();
  const VT one = VT{} + E(1);
  for (int64_t j0 = begin; j0 < end; j0 += B) {
    const int64_t n = std::min(B, end - j0);
    integrate_block<kHard, VT>(x, v_init, cb, T, N, j0, n, p, [&](int64_t t, int64_t j, VT h, int64_t) {
      std::memcpy(hb + t * B + j, &h, sizeof(VT));  // the buffer has room for whole vectors
    });
    for (int64_t j = 0; j < n; ++j) cb[j] = gv ? gv[j0 + j] : E(0);
    if (pg) {
      std::fill(g_leak + j0, g_leak + j0 + n, E(0));
      std::fill(g_thr + j0, g_thr + j0 + n, E(0));
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      const E* __restrict__ ht = hb + t * B;
      const scalar_t* __restrict__ gst = gs + t * N + j0;
      scalar_t* __restrict__ gxt = gx + t * N + j0;
      for (int64_t j = 0; j < n; j += W) {
        const int64_t m = std::min(W, n - j);
        VT h, c;
        std::memcpy(&h, ht + j, sizeof(VT));
        c = load_n<VT>(cb + j, m);
        const VT u = h - p.thr;
        const M fire = u >= E(0);
        const VT sg = surrogate_grad<kSur>(u, alpha, k_atan, half_alpha);
        const VT dvds = kHard ? (VT{} + p.r) - h : VT{} - p.thr;
        VT dvdh;
        if constexpr (kHard) {
          dvdh = fire ? VT{} : one;
        } else {
          dvdh = one;
        }
        if constexpr (!kDetach) dvdh = dvdh + dvds * sg;
        const VT gsv = load_n<VT>(gst + j, m);
        const VT g = gsv * sg + c * dvdh;
        const VT gq = p.divide ? g / p.leak : g * p.leak;
        store_n(gxt + j, p.decay_input ? gq : g, m);
        store_n(cb + j, g - gq, m);
        if (pg) {
          VT dth = kDetach ? VT{} - sg * gsv : VT{} - sg * (gsv + c * dvds);
          if constexpr (!kHard) dth = dth - (fire ? c : VT{});
          VT vprev;
          if (t > 0) {
            VT hp;
            std::memcpy(&hp, hb + (t - 1) * B + j, sizeof(VT));
            vprev = reset<kHard>(hp, p);
          } else {
            vprev = v_init ? load_n<VT>(v_init + j0 + j, m) : VT{} + p.r;
          }
          const VT dhdk = p.decay_input ? load_n<VT>(x + t * N + j0 + j, m) - (vprev - p.r)
                                        : VT{} - (vprev - p.r);
          store_n(g_leak + j0 + j, load_n<VT>(g_leak + j0 + j, m) + g * dhdk, m);
          store_n(g_thr + j0 + j, load_n<VT>(g_thr + j0 + j, m) + dth, m);
        }
      }
    }
    std::memcpy(gv_init + j0, cb, static_cast<size_t>(n) * sizeof(E));
  }
}

template <bool kHard, int64_t kSur, bool kDetach, typename scalar_t, typename E>
void bwd_range_portable(const scalar_t* x, const E* v0, const scalar_t* gs, const E* gv,
                        scalar_t* gx, E* gv0, E* gl, E* gt, int64_t T, int64_t N, int64_t b,
                        int64_t e, const Params<E>& p, const BwdScalars& bs) {
  bwd_range_impl<kHard, kSur, kDetach>(x, v0, gs, gv, gx, gv0, gl, gt, T, N, b, e, p, bs);
}

#if defined(__x86_64__)
template <bool kHard, int64_t kSur, bool kDetach, typename scalar_t, typename E>
__attribute__((target("avx2"))) void bwd_range_avx2(const scalar_t* x, const E* v0,
                                                    const scalar_t* gs, const E* gv, scalar_t* gx,
                                                    E* gv0, E* gl, E* gt, int64_t T, int64_t N,
                                                    int64_t b, int64_t e, const Params<E>& p,
                                                    const BwdScalars& bs) {
  bwd_range_impl<kHard, kSur, kDetach>(x, v0, gs, gv, gx, gv0, gl, gt, T, N, b, e, p, bs);
}
#endif

template <bool kHard, int64_t kSur, bool kDetach, typename scalar_t, typename E>
void bwd_range(const scalar_t* x, const E* v0, const scalar_t* gs, const E* gv, scalar_t* gx,
               E* gv0, E* gl, E* gt, int64_t T, int64_t N, int64_t b, int64_t e,
               const Params<E>& p, const BwdScalars& bs) {
#if defined(__x86_64__)
  if (use_avx2()) {
    bwd_range_avx2<kHard, kSur, kDetach>(x, v0, gs, gv, gx, gv0, gl, gt, T, N, b, e, p, bs);
    return;
  }
#endif
  bwd_range_portable<kHard, kSur, kDetach>(x, v0, gs, gv, gx, gv0, gl, gt, T, N, b, e, p, bs);
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
  return Params<E>{pp[0], pp[1], pp[2], decay_input, divide};
}

int64_t grain_for(int64_t T) { return std::max<int64_t>(64, (int64_t{1} << 15) / T); }

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lif_fwd", [&] {
    using E = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    const E* vp = has_v ? v_init->data_ptr<E>() : nullptr;
    E* vo = v_out.data_ptr<E>();
    const Params<E> p = read_params<E>(params, decay_input, divide);
    const bool avx2 = use_avx2();
    kdengine::parallel_for(0, N, grain_for(T), [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
      if (avx2) {
        if (hard_reset)
          fwd_range_avx2<true>(xp, sp, vp, vo, T, N, b, e, p);
        else
          fwd_range_avx2<false>(xp, sp, vp, vo, T, N, b, e, p);
        return;
      }
#endif
      (void)avx2;
      if (hard_reset)
        fwd_range_portable<true>(xp, sp, vp, vo, T, N, b, e, p);
      else
        fwd_range_portable<false>(xp, sp, vp, vo, T, N, b, e, p);
    });
  });
  return {spikes, v_out, at::empty({0}, x.options())};
}

template <bool kHard, int64_t kSur, typename scalar_t, typename E>
void bwd_dispatch_detach(bool detach, const scalar_t* x, const E* v0, const scalar_t* gs,
                         const E* gv, scalar_t* gx, E* gv0, E* gl, E* gt, int64_t T, int64_t N,
                         int64_t b, int64_t e, const Params<E>& p, const BwdScalars& bs) {
  if (detach)
    bwd_range<kHard, kSur, true>(x, v0, gs, gv, gx, gv0, gl, gt, T, N, b, e, p, bs);
  else
    bwd_range<kHard, kSur, false>(x, v0, gs, gv, gx, gv0, gl, gt, T, N, b, e, p, bs);
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
  auto gp = param_grads ? at::empty({2, N}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  const bool has_v = v_init.has_value() && v_init->defined();
  const BwdScalars bs{alpha, param_grads};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lif_bwd", [&] {
    using E = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gsp = grad_spikes.data_ptr<scalar_t>();
    const E* vp = has_v ? v_init->data_ptr<E>() : nullptr;
    const E* gvp = has_gv ? grad_v->data_ptr<E>() : nullptr;
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    E* gv0p = gv0.data_ptr<E>();
    E* glp = param_grads ? gp.data_ptr<E>() : nullptr;
    E* gtp = param_grads ? glp + N : nullptr;
    const Params<E> p = read_params<E>(params, decay_input, divide);
    kdengine::parallel_for(0, N, grain_for(T), [&](int64_t b, int64_t e) {
      if (hard_reset) {
        if (surrogate == kSurAtan)
          bwd_dispatch_detach<true, kSurAtan>(detach_reset, xp, vp, gsp, gvp, gxp, gv0p, glp, gtp,
                                              T, N, b, e, p, bs);
        else
          bwd_dispatch_detach<true, kSurSigmoid>(detach_reset, xp, vp, gsp, gvp, gxp, gv0p, glp,
                                                 gtp, T, N, b, e, p, bs);
      } else {
        if (surrogate == kSurAtan)
          bwd_dispatch_detach<false, kSurAtan>(detach_reset, xp, vp, gsp, gvp, gxp, gv0p, glp,
                                               gtp, T, N, b, e, p, bs);
        else
          bwd_dispatch_detach<false, kSurSigmoid>(detach_reset, xp, vp, gsp, gvp, gxp, gv0p, glp,
                                                  gtp, T, N, b, e, p, bs);
      }
    });
  });
  if (!param_grads) return {gx, gv0, gp};
  auto g = gp.sum(1);
  if (divide) {  // d/dtau = d/dk * dk/dtau, k = 1/tau
    auto tau = params.select(0, 0);
    g.select(0, 0).div_(tau * tau).neg_();
  }
  return {gx, gv0, g};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("lif_fwd", &lif_fwd_cpu);
  m.impl("lif_bwd", &lif_bwd_cpu);
}
