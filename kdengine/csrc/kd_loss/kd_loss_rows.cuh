// The row code of the fused KD loss, shared by kd_loss.cu (the CUDA kernels) and kd_loss_emul.cu
// (the same rows run on the host with std::threads as lanes, for tests without a GPU): math
// helpers, the thread-group reduction over an abstract Lanes type, the row sweeps, the row itself
// and the host entry. Everything here is __host__ __device__ or host code; the math, layout and
// memory traffic are described at the top of kd_loss.cu.
#pragma once

// A CPU-only torch wheel ships the c10/cuda headers but not this generated one; it only defines
// C10_CUDA_BUILD_SHARED_LIBS, which matters for Windows dllexport alone. A CUDA wheel has the file,
// so this is a no-op there.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#ifndef C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace kdengine_cuda_kd {

// Enum values of kdengine/ops/kd_loss/config.py (must not be renumbered there).
constexpr int kForwardKL = 0;
constexpr int kReverseKL = 1;
constexpr int kJSD = 2;
constexpr int64_t kNone = 0;
constexpr int64_t kBatchmean = 2;
constexpr int64_t kMean = 3;

constexpr int kMaxBlock = 512;      // threads of a row block (block-per-row mode)
constexpr int kWarpRowMaxV = 1024;  // up to this V a warp owns a row

// ------------------------------------------------------------------------------- math helpers
// Exponentials are base 2 on prescaled logits, z = (x - max) * log2(e)/T: exp2f/log2f map to the
// ex2/lg2 instructions under --use_fast_math (the JIT build's flag; ~2 ulp over the whole range,
// where __expf's argument scaling loses ~1 ulp per unit of |x|). fp64 stays on the libm functions.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

C10_HOST_DEVICE inline float k_exp2(float x) { return exp2f(x); }
C10_HOST_DEVICE inline double k_exp2(double x) { return exp2(x); }
C10_HOST_DEVICE inline float k_log2(float x) { return log2f(x); }
C10_HOST_DEVICE inline double k_log2(double x) { return log2(x); }
C10_HOST_DEVICE inline float k_abs(float x) { return fabsf(x); }
C10_HOST_DEVICE inline double k_abs(double x) { return fabs(x); }

// e^y - 1, accurate relative to itself near 0 (fast-math has no expm1 intrinsic, but the libm
// expm1f is slow; a degree-7 Taylor polynomial truncates at ~2e-9 relative for |y| < 1/4).
C10_HOST_DEVICE inline float k_expm1(float y) {
  if (fabsf(y) < 0.25f) {
    return y * (1.f + y * (0.5f + y * (1.f / 6 + y * (1.f / 24 + y * (1.f / 120 + y * (
               1.f / 720 + y * (1.f / 5040)))))));
  }
  return expf(y) - 1.f;
}
C10_HOST_DEVICE inline double k_expm1(double y) { return expm1(y); }
// log2(1 + u), accurate relative to itself near 0 (log1pf has no fast-math replacement).
C10_HOST_DEVICE inline float k_log1p2(float u) { return log1pf(u) * static_cast<float>(kLog2e); }
C10_HOST_DEVICE inline double k_log1p2(double u) { return log1p(u) * kLog2e; }

template <typename acc_t>
C10_HOST_DEVICE inline acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}
template <typename acc_t>
C10_HOST_DEVICE inline acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// Online sum-exp in base 2: (m, l) = (running max of x, sum 2^((x - m) c)). One exp2 per element
// except when the max moves. -inf entries add nothing (and -inf - -inf would be NaN). m never
// becomes NaN (x > m is false for NaN); a NaN x lands in l instead, which then stays NaN through
// every update and merge (this is the NaN guard: no fmax anywhere).
template <typename acc_t>
C10_HOST_DEVICE inline void ml_add(acc_t& m, acc_t& l, acc_t x, acc_t c) {
  if (x > m) {
    l = l * k_exp2((m - x) * c) + acc_t(1);
    m = x;
  } else if (x != neg_inf<acc_t>()) {
    l += k_exp2((x - m) * c);
  }
}

// The same with a companion sum u = sum 2^((x - m) c) * term that is rescaled with l. A -inf x
// still adds its term, which the caller makes 0 or NaN (NaN marks the row as not "close").
template <typename acc_t>
C10_HOST_DEVICE inline void mlu_add(acc_t& m, acc_t& l, acc_t& u, acc_t x, acc_t c, acc_t term) {
  if (x > m) {
    const acc_t f = k_exp2((m - x) * c);
    l = l * f + acc_t(1);
    u = u * f + term;
    m = x;
  } else if (x != neg_inf<acc_t>()) {
    const acc_t e = k_exp2((x - m) * c);
    l += e;
    u += e * term;
  } else {
    u += term;
  }
}

// Merges (m2, l2[, u2]) into (m, l[, u]). Symmetric in its two operands up to FMA contraction;
// the group reductions broadcast one lane's result so all threads agree bit for bit anyway.
template <typename acc_t>
C10_HOST_DEVICE inline void mlu_merge(acc_t& m, acc_t& l, acc_t* u, acc_t m2, acc_t l2,
                                      const acc_t* u2, acc_t c) {
  const acc_t M = m > m2 ? m : m2;
  if (M == neg_inf<acc_t>()) {
    l = l + l2;  // both halves saw only -inf (l = 0) or NaN (l = NaN)
    if (u != nullptr) *u = *u + *u2;
  } else {
    const acc_t e1 = k_exp2((m - M) * c);
    const acc_t e2 = k_exp2((m2 - M) * c);
    l = l * e1 + l2 * e2;
    if (u != nullptr) *u = *u * e1 + *u2 * e2;  // 0 * NaN = NaN: a poisoned half stays poisoned
  }
  m = M;
}

template <typename acc_t>
C10_HOST_DEVICE inline void ml_merge(acc_t& m, acc_t& l, acc_t m2, acc_t l2, acc_t c) {
  mlu_merge(m, l, static_cast<acc_t*>(nullptr), m2, l2, static_cast<const acc_t*>(nullptr), c);
}

// log2(beta p + (1 - beta) q) from log2 p and log2 q (base-2 logaddexp); -inf if both are -inf
// (m = 0: those entries are masked by the callers' p == 0 / q == 0 guards). NaN stays NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t log2_mix(acc_t lp, acc_t lq, acc_t l2beta, acc_t l2nbeta) {
  if (lp == neg_inf<acc_t>() && lq == neg_inf<acc_t>()) return neg_inf<acc_t>();
  const acc_t x = lp + l2beta;
  const acc_t y = lq + l2nbeta;
  const acc_t mx = x > y ? x : y;
  return mx + k_log1p2(k_exp2(-k_abs(x - y)));
}

// Reduction operators over small arrays of per-thread statistics (identity = a thread that saw
// nothing). Pass 1 at finite T: (m_a, Sa, U) for s with the companion U, (m_b, Sb) for t, (m_1, S1)
// for s at T = 1. Pass 1 at T = inf: (m_1, S1), V', sum d. Later passes: plain sums.
template <typename acc_t>
struct FiniteStatsOp {
  acc_t c, c1;
  C10_HOST_DEVICE void operator()(acc_t (&v)[7], const acc_t (&o)[7]) const {
    mlu_merge(v[0], v[1], &v[2], o[0], o[1], &o[2], c);
    ml_merge(v[3], v[4], o[3], o[4], c);
    ml_merge(v[5], v[6], o[5], o[6], c1);
  }
  C10_HOST_DEVICE void identity(acc_t (&v)[7]) const {
    v[0] = v[3] = v[5] = neg_inf<acc_t>();
    v[1] = v[2] = v[4] = v[6] = acc_t(0);
  }
};

template <typename acc_t>
struct InfStatsOp {
  acc_t c1;
  C10_HOST_DEVICE void operator()(acc_t (&v)[4], const acc_t (&o)[4]) const {
    ml_merge(v[0], v[1], o[0], o[1], c1);
    v[2] += o[2];
    v[3] += o[3];
  }
  C10_HOST_DEVICE void identity(acc_t (&v)[4]) const {
    v[0] = neg_inf<acc_t>();
    v[1] = v[2] = v[3] = acc_t(0);
  }
};

struct SumOp {
  template <typename acc_t, int K>
  C10_HOST_DEVICE void operator()(acc_t (&v)[K], const acc_t (&o)[K]) const {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += o[k];
  }
  template <typename acc_t, int K>
  C10_HOST_DEVICE void identity(acc_t (&v)[K]) const {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = acc_t(0);
  }
};

// ------------------------------------------------------------------------------- thread groups
// A group of `size` threads owns one row: a whole block (64..512 threads) or one warp (32). Its
// reduction is a warp butterfly, a broadcast from lane 0 (so every thread holds the very same bits
// whatever FMA contraction did to the butterfly), and, for more than one warp, a shared-memory
// combine of the per-warp partials that every warp redoes in the same lane order. The primitives
// come from Lanes: DeviceLanes (shuffles, __syncthreads) here, HostLanes (std::threads and a
// barrier) in the host emulation, so the tests run this very algorithm.

template <typename Lanes>
struct Group {
  int rank, size;
  Lanes lanes;

  // The lanes' primitives exist on one side only (device intrinsics, or host threads); each Group
  // is instantiated on that side alone, so the execution-space check is off for these two.
#pragma nv_exec_check_disable
  template <int K, typename acc_t, typename Op>
  C10_HOST_DEVICE void warp_allreduce(acc_t (&v)[K], const Op& op) const {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      acc_t o[K];
#pragma unroll
      for (int k = 0; k < K; ++k) o[k] = lanes.shfl_xor(v[k], off);
      op(v, o);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = lanes.shfl_lane0(v[k]);
  }

#pragma nv_exec_check_disable
  template <int K, typename acc_t, typename Op>
  C10_HOST_DEVICE void allreduce(acc_t (&v)[K], const Op& op) const {
    warp_allreduce(v, op);
    const int nw = size >> 5;
    if (nw <= 1) return;
    acc_t* sm = lanes.template smem<acc_t>();
    const int lane = rank & 31;
    const int w = rank >> 5;
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) sm[w * K + k] = v[k];
    }
    lanes.sync();
    if (lane < nw) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = sm[lane * K + k];
    } else {
      op.identity(v);
    }
    lanes.sync();  // every thread has read its partials: the buffer is free for the next call
    warp_allreduce(v, op);
  }
};

constexpr int kSmemSlots = 32 * 7;  // warps x the widest reduction (FiniteStatsOp)

// ------------------------------------------------------------------------------- row sweeps

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

// Visits the row once: f(i, s_i, t_i, g_s, g_t) with s_i, t_i in acc_t (0 when !READ); with WRITE
// it stores g_s to gs[i] and, when gt != nullptr, g_t to gt[i], each rounded once to scalar_t.
// Elements [0, head) and the tail are scalar; the body is 16-byte vectors strided over the group.
template <int VEC, bool READ, bool WRITE, typename scalar_t, typename F>
C10_HOST_DEVICE __forceinline__ void sweep(const scalar_t* __restrict__ s,
                                             const scalar_t* __restrict__ t,
                                             scalar_t* __restrict__ gs, scalar_t* __restrict__ gt,
                                             int V, int head, int rank, int gsize, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool wt = WRITE && gt != nullptr;
  // One element at a time: the head and the tail.
  auto one = [&](int i) {
    acc_t x = 0, y = 0, a = 0, b = 0;
    if constexpr (READ) {
      x = static_cast<acc_t>(s[i]);
      y = static_cast<acc_t>(t[i]);
    }
    f(i, x, y, a, b);
    if constexpr (WRITE) {
      gs[i] = static_cast<scalar_t>(a);
      if (wt) gt[i] = static_cast<scalar_t>(b);
    }
  };
  for (int i = rank; i < head; i += gsize) one(i);
  using P = VecT<scalar_t, VEC>;
  const int nvec = (V - head) / VEC;
  for (int j = rank; j < nvec; j += gsize) {
    const int base = head + j * VEC;
    P xs, ys, as, bs;
    if constexpr (READ) {
      xs = *reinterpret_cast<const P*>(s + base);
      ys = *reinterpret_cast<const P*>(t + base);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t x = 0, y = 0, a = 0, b = 0;
      if constexpr (READ) {
        x = static_cast<acc_t>(xs.v[k]);
        y = static_cast<acc_t>(ys.v[k]);
      }
      f(base + k, x, y, a, b);
      if constexpr (WRITE) {
        as.v[k] = static_cast<scalar_t>(a);
        bs.v[k] = static_cast<scalar_t>(b);
      }
    }
    if constexpr (WRITE) {
      *reinterpret_cast<P*>(gs + base) = as;
      if (wt) *reinterpret_cast<P*>(gt + base) = bs;
    }
  }
  for (int i = head + nvec * VEC + rank; i < V; i += gsize) one(i);
}

// ------------------------------------------------------------------------------- the row

template <typename scalar_t, typename acc_t>
struct KDParams {
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;  // nullptr: no labels (every row counts)
  scalar_t* grad_s;
  scalar_t* grad_t;  // nullptr unless the teacher gradient is wanted
  acc_t* row_loss;   // (N,) unnormalized L_r
  const acc_t* nrm_dev;  // device scalar 1/denominator (batchmean/mean with labels), else nullptr
  acc_t nrm;             // host normalizer when nrm_dev == nullptr
  int64_t n_rows;
  int V;
  int64_t ignore_index;
  int div;
  bool t_inf;      // T = +inf: centered logits matching
  bool has_kd;     // alpha < 1
  bool has_ce;     // alpha > 0 (labels present)
  bool ce_shares;  // T == 1 and has_kd: the T = 1 statistics are those of a (c == c1)
  acc_t inv_t;     // 1/T (finite T)
  acc_t c;         // log2(e)/T (finite T)
  acc_t c1;        // log2(e): the T = 1 scale of the CE term
  acc_t beta, l2beta, l2nbeta;  // JSD: beta, log2 beta, log2(1 - beta)
  acc_t alpha;       // hard_weight
  acc_t eps;         // label smoothing
  acc_t kd_loss_w;   // weight of D in L: (1-alpha) cT; T = inf: (1-alpha) k
  acc_t kd_grad_w;   // weight of dD/da in grad: (1-alpha) cT / T; T = inf: (1-alpha) k
};

template <int VEC, typename scalar_t, typename acc_t, typename G>
C10_HOST_DEVICE void fill_row(scalar_t* gs, scalar_t* gt, int V, int head, const G& g,
                              acc_t value) {
  const scalar_t* none = nullptr;
  sweep<VEC, false, true>(none, none, gs, gt, V, head, g.rank, g.size,
                          [&](int, acc_t, acc_t, acc_t& a, acc_t& b) {
                            a = value;
                            b = value;
                          });
}

// The label-smoothed hard CE of a row at T = 1, q1 = softmax(s), from m_1 = max_i s_i and
// l21 = log2 S1 (S1 = sum_i 2^((s_i - m_1) log2 e)). Both row kinds gather those in pass 1.
template <typename acc_t>
struct CETerm {
  acc_t eps, one_m_eps, eps_v, v;  // eps, 1 - eps, eps/V, V
  int64_t lab;
  C10_HOST_DEVICE CETerm(acc_t eps_, int V, int64_t lab_)
      : eps(eps_), one_m_eps(acc_t(1) - eps_), eps_v(eps_ / static_cast<acc_t>(V)),
        v(static_cast<acc_t>(V)), lab(lab_) {}
  // dCE/ds_i
  C10_HOST_DEVICE acc_t grad(int i, acc_t q1) const {
    return q1 - (i == lab ? one_m_eps : acc_t(0)) - eps_v;
  }
  // log q1_y = (s_y - m_1) - ln2 l21;  sum_i log q1_i = sum_s - V ln2 l21, where
  // sum_s = sum_i (s_i - m_1) is needed (and summed by the callers) only when eps != 0.
  C10_HOST_DEVICE acc_t loss(acc_t s_y, acc_t m_1, acc_t l21, acc_t sum_s) const {
    const acc_t LN2 = static_cast<acc_t>(kLn2);
    const acc_t lq1_y = (s_y - m_1) - LN2 * l21;
    if (eps == acc_t(0)) return -lq1_y;
    const acc_t sum_lq1 = sum_s - v * (LN2 * l21);
    return -one_m_eps * lq1_y - eps_v * sum_lq1;
  }
};

// Finite temperature, in log2 units (c = log2(e)/T, log2 q = (s - m_a) c - log2 Sa, ...).
//
// Precision: when the teacher is close to the student (the usual late-training case) q - p,
// log q - log p - D etc. cancel, and computing them from separately rounded probabilities or
// log-probabilities loses up to all digits (bf16/fp16 gradients then miss by many ulps; even
// torch's fp32 autograd of the reference does). Everything is therefore written in
// x_i = log2(p_i / q_i): pass 1 also accumulates
// U = sum_i 2^((s_i - m_a) c) (e^((t_i - s_i)/T) - 1),
// each term exact relative to itself, so r = U / Sa = Sb'/Sa' - 1 (unshifted sums) and
// L = log2(1 + r) = log2 Sb' - log2 Sa' keep their digits, and x_i = (t_i - s_i) c - L is exact
// where it matters (t - s is exact for nearby logits). Then q - p = -q (2^x - 1) with an accurate
// 2^x - 1, reverse KL uses q (-x - D), JSD log q - log m = -log2(1 + beta (2^x - 1)). Rows with
// |r| > 1/2 (distributions far apart, or an entry only the teacher has: U is poisoned with NaN)
// take x_i = log2 p_i - log2 q_i from the max-shifted logits; nothing cancels badly there.
// (The same formulation as the Triton backend, kdengine/ops/kd_loss/triton_kernel.py.)
//
// Pass 1: (m_a, Sa, U), (m_b, Sb) and, for the CE term when T != 1, (m_1, S1). Pass 2: D (or
// KL(p||m), KL(q||m)) and sum (s - m_1); it also writes the gradient when that needs no sum
// (forward KL without teacher gradient, or CE only). Pass 3 otherwise.
template <int VEC, typename scalar_t, typename acc_t, typename G>
C10_HOST_DEVICE void row_finite(const KDParams<scalar_t, acc_t>& P, const scalar_t* s,
                                const scalar_t* t, scalar_t* gs, scalar_t* gt, int head,
                                int64_t lab, acc_t nrm, acc_t* out, const G& g) {
  const int V = P.V;
  const bool kd = P.has_kd;
  const bool ce = P.has_ce;
  const bool share = P.ce_shares;
  const int div = P.div;
  const acc_t c = P.c;
  const acc_t c1 = P.c1;
  const acc_t it = P.inv_t;
  const acc_t NEG = neg_inf<acc_t>();
  const acc_t LN2 = static_cast<acc_t>(kLn2);

  // ---- pass 1: row statistics
  acc_t st[7];
  const FiniteStatsOp<acc_t> op1{c, c1};
  op1.identity(st);
  sweep<VEC, true, false>(s, t, gs, gt, V, head, g.rank, g.size,
                          [&](int, acc_t x, acc_t y, acc_t&, acc_t&) {
                            if (kd) {
                              // q_i (p_i/q_i * Sa'/Sb' - 1); an entry only the teacher has -> NaN
                              const acc_t term =
                                  x == NEG ? (y == NEG ? acc_t(0) : quiet_nan<acc_t>())
                                           : k_expm1((y - x) * it);
                              mlu_add(st[0], st[1], st[2], x, c, term);
                              ml_add(st[3], st[4], y, c);
                            }
                            if (ce && !share) ml_add(st[5], st[6], x, c1);
                          });
  g.allreduce(st, op1);
  const acc_t m_a = st[0], m_b = st[3];
  const acc_t l2a = k_log2(st[1]), l2b = k_log2(st[4]);
  const acc_t ia = acc_t(1) / st[1], ib = acc_t(1) / st[4];
  const acc_t m_1 = share ? m_a : st[5];
  const acc_t l21 = share ? l2a : k_log2(st[6]);
  const acc_t i1 = share ? ia : acc_t(1) / st[6];
  // x = kx - ((s - ds) - (t - dt)) c: close rows use L, the others the max-shifted logits.
  const acc_t r = st[2] * ia;
  const bool close = k_abs(r) <= acc_t(0.5);  // false for NaN
  const acc_t kx = close ? -k_log1p2(r) : l2a - l2b;
  const acc_t ds = close ? acc_t(0) : m_a;
  const acc_t dt = close ? acc_t(0) : m_b;

  const CETerm<acc_t> cet(P.eps, V, lab);
  const acc_t cg_kd = nrm * P.kd_grad_w;
  const acc_t cg_ce = nrm * P.alpha;
  const acc_t beta = P.beta;
  const acc_t one_m_beta = acc_t(1) - beta;
  const acc_t l2beta = P.l2beta;
  const acc_t l2nbeta = P.l2nbeta;

  // Per element: q, p, log2 q, log2 p, x = log2(p/q), |x| < 1, and e = 2^x - 1 (only if |x| < 1).
  struct Elem {
    acc_t q, p, lq, lp, x, em;
    bool small;
  };
  auto elem = [&](acc_t xs, acc_t yt) -> Elem {
    Elem e;
    const acc_t za = (xs - m_a) * c;
    const acc_t zb = (yt - m_b) * c;
    e.q = k_exp2(za) * ia;
    e.p = k_exp2(zb) * ib;
    e.lq = za - l2a;
    e.lp = zb - l2b;
    e.x = kx - ((xs - ds) - (yt - dt)) * c;
    e.small = k_abs(e.x) < acc_t(1);  // false for NaN (-inf - -inf entries)
    e.em = e.small ? k_expm1(e.x * LN2) : acc_t(0);
    return e;
  };
  // JSD: (log2 q - log2 m, log2 p - log2 m), from x near p ~ q, else from the logaddexp.
  auto jsd_r = [&](const Elem& e, acc_t& rq, acc_t& rp) {
    if (e.small) {
      rq = -k_log1p2(beta * e.em);
      rp = rq + e.x;
    } else {
      const acc_t lm = log2_mix(e.lp, e.lq, l2beta, l2nbeta);
      rq = e.lq - lm;
      rp = e.lp - lm;
    }
  };
  // dCE/ds_i (q is the student softmax at T, == q1 when share).
  auto ce_grad = [&](int i, acc_t xs, acc_t q) -> acc_t {
    return cet.grad(i, share ? q : k_exp2((xs - m_1) * c1) * i1);
  };

  // ---- pass 2: sums (and the gradient when it needs none)
  const bool fused = !kd || (div == kForwardKL && gt == nullptr);
  acc_t sums[3] = {0, 0, 0};  // D or KL(p||m); KL(q||m) (JSD); sum_i (s_i - m_1)   [log2 units]
  auto pass2 = [&](int i, acc_t xs, acc_t yt, acc_t& out_s, acc_t& out_t) {
    acc_t grad = 0;
    acc_t q = 0;
    if (kd) {
      const Elem e = elem(xs, yt);
      q = e.q;
      if (div == kForwardKL) {
        sums[0] += e.p == acc_t(0) ? acc_t(0) : e.p * e.x;
        grad = cg_kd * (e.small ? -e.q * e.em : e.q - e.p);  // q - p
      } else if (div == kReverseKL) {
        sums[0] -= e.q == acc_t(0) ? acc_t(0) : e.q * e.x;
      } else {
        acc_t rq, rp;
        jsd_r(e, rq, rp);
        sums[0] += e.p == acc_t(0) ? acc_t(0) : e.p * rp;
        sums[1] += e.q == acc_t(0) ? acc_t(0) : e.q * rq;
      }
    }
    if (ce) {
      if (cet.eps != acc_t(0)) sums[2] += xs - m_1;
      grad += cg_ce * ce_grad(i, xs, q);
    }
    out_s = grad;
    out_t = 0;  // written only when !kd (a zero teacher gradient)
  };
  if (fused) {
    sweep<VEC, true, true>(s, t, gs, gt, V, head, g.rank, g.size, pass2);
  } else {
    sweep<VEC, true, false>(s, t, gs, gt, V, head, g.rank, g.size, pass2);
  }
  g.allreduce(sums, SumOp());
  const acc_t kl_pm = sums[0];  // log2 units
  const acc_t kl_qm = sums[1];
  const acc_t d2 = div == kJSD ? beta * kl_pm + one_m_beta * kl_qm : sums[0];

  // ---- pass 3: gradients that need D (or KL(.||m)); the ln 2 turns log2 units into nats
  if (!fused) {
    const acc_t cg_ln2 = cg_kd * LN2;
    sweep<VEC, true, true>(s, t, gs, gt, V, head, g.rank, g.size,
                           [&](int i, acc_t xs, acc_t yt, acc_t& out_s, acc_t& out_t) {
                             const Elem e = elem(xs, yt);
                             acc_t gk_s, gk_t;
                             if (div == kForwardKL) {
                               gk_s = cg_kd * (e.small ? -e.q * e.em : e.q - e.p);
                               gk_t = cg_ln2 * (e.p == acc_t(0) ? acc_t(0) : e.p * (e.x - d2));
                             } else if (div == kReverseKL) {
                               gk_s = cg_ln2 * (e.q == acc_t(0) ? acc_t(0) : e.q * (-e.x - d2));
                               gk_t = cg_kd * (e.small ? e.q * e.em : e.p - e.q);  // p - q
                             } else {
                               acc_t rq, rp;
                               jsd_r(e, rq, rp);
                               gk_s = (cg_ln2 * one_m_beta) *
                                      (e.q == acc_t(0) ? acc_t(0) : e.q * (rq - kl_qm));
                               gk_t = (cg_ln2 * beta) *
                                      (e.p == acc_t(0) ? acc_t(0) : e.p * (rp - kl_pm));
                             }
                             if (ce) gk_s += cg_ce * ce_grad(i, xs, e.q);
                             out_s = gk_s;
                             out_t = gk_t;
                           });
  }

  if (g.rank == 0) {
    acc_t L = 0;
    if (kd) L += P.kd_loss_w * (LN2 * d2);
    if (ce) L += P.alpha * cet.loss(static_cast<acc_t>(s[lab]), m_1, l21, sums[2]);
    *out = L;
  }
}

// T = inf. Pass 1: V' and sum d over kept entries (and the CE statistics of s). Pass 2: centered
// squares and the gradients (they need only the mean), so two passes.
template <int VEC, typename scalar_t, typename acc_t, typename G>
C10_HOST_DEVICE void row_tinf(const KDParams<scalar_t, acc_t>& P, const scalar_t* s,
                              const scalar_t* t, scalar_t* gs, scalar_t* gt, int head, int64_t lab,
                              acc_t nrm, acc_t* out, const G& g) {
  const int V = P.V;
  const bool kd = P.has_kd;
  const bool ce = P.has_ce;
  const acc_t c1 = P.c1;
  const acc_t NEG = neg_inf<acc_t>();

  acc_t st[4];  // (max, sum-exp2) of s at T = 1; V'; sum d
  const InfStatsOp<acc_t> op1{c1};
  op1.identity(st);
  sweep<VEC, true, false>(s, t, gs, gt, V, head, g.rank, g.size,
                          [&](int, acc_t x, acc_t y, acc_t&, acc_t&) {
                            if (kd && !(x == NEG && y == NEG)) {
                              st[2] += acc_t(1);
                              st[3] += x - y;
                            }
                            if (ce) ml_add(st[0], st[1], x, c1);
                          });
  g.allreduce(st, op1);
  const acc_t m_1 = st[0];
  const acc_t l21 = k_log2(st[1]);
  const acc_t i1 = acc_t(1) / st[1];
  const acc_t n_keep = st[2];
  const acc_t mean = st[3] / n_keep;  // 0/0 = NaN for an all-masked row: allowed to be NaN

  const CETerm<acc_t> cet(P.eps, V, lab);
  const acc_t cg_kd = nrm * P.kd_grad_w / n_keep;
  const acc_t cg_ce = nrm * P.alpha;
  acc_t sums[2] = {0, 0};  // sum dc^2; sum (s - m_1)
  sweep<VEC, true, true>(s, t, gs, gt, V, head, g.rank, g.size,
                         [&](int i, acc_t x, acc_t y, acc_t& out_s, acc_t& out_t) {
                           acc_t gk = 0;
                           if (kd) {
                             const bool keep = !(x == NEG && y == NEG);
                             const acc_t dc = keep ? (x - y) - mean : acc_t(0);
                             sums[0] += dc * dc;
                             gk = keep ? cg_kd * dc : acc_t(0);
                           }
                           acc_t grad = gk;
                           if (ce) {
                             if (cet.eps != acc_t(0)) sums[1] += x - m_1;
                             grad += cg_ce * cet.grad(i, k_exp2((x - m_1) * c1) * i1);
                           }
                           out_s = grad;
                           out_t = -gk;
                         });
  g.allreduce(sums, SumOp());
  if (g.rank == 0) {
    acc_t L = 0;
    if (kd) L += P.kd_loss_w * sums[0] / (acc_t(2) * n_keep);
    if (ce) L += P.alpha * cet.loss(static_cast<acc_t>(s[lab]), m_1, l21, sums[1]);
    *out = L;
  }
}

template <int VEC, typename scalar_t, typename acc_t, typename G>
C10_HOST_DEVICE void process_row(const KDParams<scalar_t, acc_t>& P, int64_t row, const G& g) {
  const int V = P.V;
  const int64_t off = row * static_cast<int64_t>(V);
  const scalar_t* s = P.student + off;
  const scalar_t* t = P.teacher + off;
  scalar_t* gs = P.grad_s + off;
  scalar_t* gt = P.grad_t != nullptr ? P.grad_t + off : nullptr;
  acc_t* out = P.row_loss + row;

  // Elements before the first 16-byte boundary. All four base pointers are 0 mod 16 (the host
  // makes sure), so row r of each array has the same misalignment and one head fits all of them.
  int head = 0;
  if (VEC > 1) {
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(s) % 16) / sizeof(scalar_t));
    head = mis == 0 ? 0 : (VEC - mis < V ? VEC - mis : V);
  }

  int64_t lab = 0;
  if (P.labels != nullptr) {
    lab = P.labels[row];
    if (lab == P.ignore_index) {  // w_r = 0: loss 0 and exact zero gradients, logits never read
      fill_row<VEC>(gs, gt, V, head, g, acc_t(0));
      if (g.rank == 0) *out = 0;
      return;
    }
  }
  if (P.has_ce && (lab < 0 || lab >= V)) {  // never index with it: the row is NaN
    fill_row<VEC>(gs, gt, V, head, g, quiet_nan<acc_t>());
    if (g.rank == 0) *out = quiet_nan<acc_t>();
    return;
  }
  const acc_t nrm = P.nrm_dev != nullptr ? *P.nrm_dev : P.nrm;
  if (P.t_inf) {
    row_tinf<VEC>(P, s, t, gs, gt, head, lab, nrm, out, g);
  } else {
    row_finite<VEC>(P, s, t, gs, gt, head, lab, nrm, out, g);
  }
}

// ------------------------------------------------------------------------------- kernels

// Threads per row: a warp up to V = 1024, else about four 16-byte vectors per thread and stream,
// 64..512 (a power of two).
inline int row_threads(int V, int vec) {
  if (V <= kWarpRowMaxV) return 32;
  const int64_t want = (static_cast<int64_t>(V) / vec + 3) / 4;
  int threads = 64;
  while (threads < kMaxBlock && threads < want) threads *= 2;
  return threads;
}


// ------------------------------------------------------------------------------- host entry

// The kernels take one vector head per row for all four arrays, so every base pointer must be
// 0 mod 16. Fresh allocations are (the caching allocator hands out 512-byte aligned blocks); a view
// with an odd storage offset is copied once instead of compiling a second, scalar kernel.
inline at::Tensor aligned16(const at::Tensor& x) {
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 ? x : x.clone();
}

// The op kd_loss_kernel of one backend: checks the arguments, allocates the outputs and runs every
// row with Backend::run_rows(P) under a Backend::Guard of the student's device. Backend names its
// device type (kDevice) and the op in messages (kWhere): CudaRows in kd_loss.cu (the launch),
// HostRows in kd_loss_emul.cu (the host emulation).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    double temperature, bool scale_t2, int64_t divergence, double beta, double hard_weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool need_teacher_grad) {
  constexpr c10::DeviceType device_type = Backend::kDevice;
  const char* const where = Backend::kWhere;
  const typename Backend::Guard guard(student.device());
  TORCH_CHECK_VALUE(student.device().type() == device_type && teacher.device() == student.device(),
                    where, ": student and teacher must be on one ",
                    c10::DeviceTypeName(device_type), " device, got ", student.device(), " and ",
                    teacher.device());
  TORCH_CHECK_VALUE(student.dim() == 2 && student.sizes() == teacher.sizes(), where,
                    ": student and teacher must both be (N, V), got ", student.sizes(), " and ",
                    teacher.sizes());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                       dtype == at::kHalf,
                   where, ": student must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(teacher.scalar_type() == dtype, where,
                   ": teacher must have the student's dtype ", dtype, ", got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(student.is_contiguous() && teacher.is_contiguous(), where,
                    ": student and teacher must be contiguous");
  const int64_t n = student.size(0);
  const int64_t v64 = student.size(1);
  TORCH_CHECK_VALUE(v64 >= 1 && v64 <= std::numeric_limits<int32_t>::max(), where,
                    ": the vocabulary size V must be in [1, 2^31), got ", v64);
  const int V = static_cast<int>(v64);
  if (labels.has_value()) {
    const at::Tensor& lab = *labels;
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, where, ": labels must be int64, got ",
                     lab.scalar_type());
    TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == n && lab.is_contiguous() &&
                          lab.device() == student.device(),
                      where, ": labels must be a contiguous (N,) = (", n, ",) tensor on ",
                      student.device(), ", got ", lab.sizes(), " on ", lab.device());
  }
  TORCH_CHECK_VALUE(temperature > 0.0, where, ": temperature must be > 0 (or inf), got ",
                    temperature);
  const bool t_inf = std::isinf(temperature);
  TORCH_CHECK_VALUE(!t_inf || scale_t2, where, ": temperature=inf needs scale_t2=True");
  TORCH_CHECK_VALUE(divergence >= kForwardKL && divergence <= kJSD, where,
                    ": divergence must be 0 (forward KL), 1 (reverse KL) or 2 (JSD), got ",
                    divergence);
  TORCH_CHECK_VALUE(divergence != kJSD || (beta > 0.0 && beta < 1.0), where,
                    ": beta must be in (0, 1) for JSD, got ", beta);
  TORCH_CHECK_VALUE(hard_weight >= 0.0 && hard_weight <= 1.0, where,
                    ": hard_weight must be in [0, 1], got ", hard_weight);
  TORCH_CHECK_VALUE(hard_weight == 0.0 || labels.has_value(), where,
                    ": hard_weight > 0 needs labels");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing < 1.0, where,
                    ": label_smoothing must be in [0, 1), got ", label_smoothing);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kMean, where,
                    ": reduction must be 0 (none), 1 (sum), 2 (batchmean) or 3 (mean), got ",
                    reduction);

  const at::Tensor s_al = aligned16(student);
  const at::Tensor t_al = aligned16(teacher);
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_s = at::empty_like(student);
  at::Tensor grad_t =
      need_teacher_grad ? at::empty_like(teacher) : at::empty({0}, student.options());
  at::Tensor rows = at::empty({n}, student.options().dtype(acc_dtype));

  // The normalizer: a device scalar when it depends on the labels (no host sync), else a number.
  const bool averaged = reduction == kBatchmean || reduction == kMean;
  at::Tensor denom;          // defined when it lives on the device
  double host_denom = 1.0;
  if (averaged && labels.has_value()) {
    denom = labels->ne(ignore_index).sum().to(acc_dtype).clamp_min(1.0);
    if (reduction == kMean) denom = denom.mul(static_cast<double>(V));
  } else if (averaged) {
    host_denom = static_cast<double>(std::max<int64_t>(n, 1)) *
                 (reduction == kMean ? static_cast<double>(V) : 1.0);
  }
  at::Tensor nrm_dev = denom.defined() ? denom.reciprocal() : at::Tensor();

  const double alpha = hard_weight;
  const double k_inf = divergence == kJSD ? beta * (1.0 - beta) : 1.0;
  const double c_t = (t_inf || !scale_t2) ? 1.0 : temperature * temperature;

  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "kd_loss_kernel", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      KDParams<scalar_t, acc_t> P;
      P.student = s_al.data_ptr<scalar_t>();
      P.teacher = t_al.data_ptr<scalar_t>();
      P.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
      P.grad_s = grad_s.data_ptr<scalar_t>();
      P.grad_t = need_teacher_grad ? grad_t.data_ptr<scalar_t>() : nullptr;
      P.row_loss = rows.data_ptr<acc_t>();
      P.nrm_dev = nrm_dev.defined() ? nrm_dev.data_ptr<acc_t>() : nullptr;
      P.nrm = static_cast<acc_t>(1.0 / host_denom);
      P.n_rows = n;
      P.V = V;
      P.ignore_index = ignore_index;
      P.div = static_cast<int>(divergence);
      P.t_inf = t_inf;
      P.has_kd = alpha < 1.0;
      P.has_ce = alpha > 0.0;
      P.ce_shares = alpha < 1.0 && !t_inf && temperature == 1.0;
      P.inv_t = static_cast<acc_t>(t_inf ? 0.0 : 1.0 / temperature);
      P.c = static_cast<acc_t>(t_inf ? 0.0 : kLog2e / temperature);
      P.c1 = static_cast<acc_t>(kLog2e);
      P.beta = static_cast<acc_t>(beta);
      // log2 beta is only used by JSD, where beta is in (0, 1); keep it finite otherwise.
      P.l2beta = static_cast<acc_t>(divergence == kJSD ? std::log2(beta) : 0.0);
      P.l2nbeta = static_cast<acc_t>(divergence == kJSD ? std::log1p(-beta) * kLog2e : 0.0);
      P.alpha = static_cast<acc_t>(alpha);
      P.eps = static_cast<acc_t>(label_smoothing);
      P.kd_loss_w = static_cast<acc_t>((1.0 - alpha) * (t_inf ? k_inf : c_t));
      P.kd_grad_w = static_cast<acc_t>((1.0 - alpha) * (t_inf ? k_inf : c_t / temperature));
      TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(P.grad_s) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(P.grad_t) % 16 == 0);
      Backend::run_rows(P);
    });
  }

  at::Tensor loss;
  if (reduction == kNone) {
    loss = rows;
  } else {
    loss = rows.sum();  // torch's reduction: fixed order, no atomics
    if (denom.defined()) {
      loss = loss.div(denom);
    } else if (averaged) {
      loss = loss.div(host_denom);
    }
  }
  return std::make_tuple(loss, grad_s, grad_t);
}

}  // namespace kdengine_cuda_kd
