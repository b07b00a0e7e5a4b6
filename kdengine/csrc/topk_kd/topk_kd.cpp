// Top-k sparse-teacher KD loss, CPU helpers for the student side (kdengine/llm/topk.py).
//
// Math (spec: kdengine/llm/reference_topk.py; formulas in the kdengine/llm/topk.py docstring).
// The teacher side is (N, k) and stays in torch; what is N x V is the student's softmax at
// temperature T: a = x / T, log p_i = a_i - lse. These two ops do exactly that part:
//
//   topk_student_stats(x (N, V) float32, indices (N, k) int64, inv_t, need_rest)
//       -> (rowmax (N,) float32   m = max_i x_i,
//           logsum (N,) float64   log sum_i exp((x_i - m) inv_t)   so lse = m inv_t + logsum,
//           logrest (N,) float64  log(sum_{i not in K} p_i) = log R  (empty when not need_rest),
//           sumx (N,) float64     sum_i x_i)
//   topk_student_grad(x, rowmax, logsum, c1 (N,) float32, c0 (N,) float32, inv_t)
//       -> g (N, V) float32,  g_i = c1_r exp((x_i - m_r) inv_t - logsum_r) + c0_r = c1_r p_i + c0_r
//
// The caller overwrites the k entries of each row of g afterwards (their formula differs) and
// folds T^2 / T and the reduction into c1, c0.
// R is summed over the tokens outside K directly (a per-thread 0/1 weight row with zeros at K),
// never as 1 - sum_K p_j, which cancels when the student puts almost all its mass on K.
//
// Passes over one row (rows are independent; chunks of 8 rows handed out to threads on demand,
// so a descheduled thread on a shared machine does not hold the others up): stats reads the row twice
// (the maximum, then the exps; the 128 KB row of V = 32000 is L2-resident for the second read,
// so DRAM sees one read); grad reads it once and writes g once. One exp per element and pass.
//
// Precision: x_i - m is exact-ish (same magnitude) before the scaling by 1/T; exps in float
// vectors (kdvec::vexp_nonpos, <= 1 ulp), sums per block of 512 in float, then in double.
// NaN anywhere in a row gives NaN stats (exp keeps NaN); an all -inf row gives NaN like torch's
// log_softmax. Memory/layout: x, g contiguous row-major (N, V); indices contiguous (N, k) in
// [0, V) (checked by the Python caller, out-of-range indices are skipped here, never read).
// g comes from kdengine's output pool (common/output_pool.h), like kd_loss's gradients.
// Vector code is compiled three times, portable, target("avx2,fma") (8 floats per vector) and
// AVX-512 (16 floats), chosen per call by common/cpu_isa.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cpu_isa.h"
#include "common/output_pool.h"
#include "common/parallel.h"
#include "common/vec_math.h"

namespace {

using kdvec::v16f;
using kdvec::v8f;
constexpr int64_t kBlock = 512;

struct StatsOut {
  float rowmax;
  double logsum;
  double logrest;
  double sumx;
};

template <class VT>
KDV_INLINE StatsOut stats_row_impl(const float* x, int64_t V, float inv_t, const float* w) {
  using namespace kdvec;
  constexpr int W = Traits<VT>::W;
  // pass 1: maximum (NaN kept out of the max; it reaches the sums through exp) and sum of x
  VT vm = bcast<VT>(-std::numeric_limits<float>::infinity());
  double sx = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t be = std::min(V, b + kBlock);
    VT acc{};
    for (int64_t i = b; i < be; i += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, be - i));
      VT v = load<VT>(x + i, n, -std::numeric_limits<float>::infinity());
      vm = v > vm ? v : vm;
      VT vz = load<VT>(x + i, n, 0.0f);
      acc += vz;
    }
    sx += hsum(acc);
  }
  const float m = hmax(vm);
  const VT vmb = bcast<VT>(m);
  const VT vt = bcast<VT>(inv_t);
  double s_all = 0.0, s_off = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t be = std::min(V, b + kBlock);
    VT acc{}, acco{};
    for (int64_t i = b; i < be; i += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, be - i));
      VT v = load<VT>(x + i, n, -std::numeric_limits<float>::infinity());
      VT e = vexp_nonpos((v - vmb) * vt);
      acc += e;
      if (w != nullptr) acco += e * load<VT>(w + i, n, 0.0f);
    }
    s_all += hsum(acc);
    if (w != nullptr) s_off += hsum(acco);
  }
  StatsOut o;
  o.rowmax = m;
  o.logsum = std::log(s_all);
  o.logrest = w != nullptr ? std::log(s_off) - o.logsum : 0.0;
  o.sumx = sx;
  return o;
}

template <class VT>
KDV_INLINE void grad_row_impl(const float* x, float* g, int64_t V, float m, float inv_t,
                              float logsum, float c1, float c0) {
  using namespace kdvec;
  constexpr int W = Traits<VT>::W;
  const VT vmb = bcast<VT>(m), vt = bcast<VT>(inv_t), vls = bcast<VT>(logsum);
  const VT v1 = bcast<VT>(c1), v0 = bcast<VT>(c0);
  for (int64_t i = 0; i < V; i += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, V - i));
    VT v = load<VT>(x + i, n, -std::numeric_limits<float>::infinity());
    VT p = vexp_nonpos((v - vmb) * vt - vls);
    store<VT>(g + i, v1 * p + v0, n);
  }
}

using StatsFn = StatsOut (*)(const float*, int64_t, float, const float*);
using GradFn = void (*)(const float*, float*, int64_t, float, float, float, float, float);

__attribute__((noinline)) StatsOut stats_portable(const float* x, int64_t V, float t, const float* w) {
  return stats_row_impl<v8f>(x, V, t, w);
}
__attribute__((noinline)) void grad_portable(const float* x, float* g, int64_t V, float m, float t,
                                             float ls, float c1, float c0) {
  grad_row_impl<v8f>(x, g, V, m, t, ls, c1, c0);
}
#if defined(__x86_64__) || defined(__i386__)
#define TOPK_HAVE_AVX2 1
__attribute__((noinline, target("avx2,fma"))) StatsOut stats_avx2(const float* x, int64_t V, float t,
                                                                  const float* w) {
  return stats_row_impl<v8f>(x, V, t, w);
}
__attribute__((noinline, target("avx2,fma"))) void grad_avx2(const float* x, float* g, int64_t V,
                                                             float m, float t, float ls, float c1,
                                                             float c0) {
  grad_row_impl<v8f>(x, g, V, m, t, ls, c1, c0);
}
__attribute__((noinline)) KD_TARGET_AVX512_FLOAT StatsOut stats_avx512(const float* x, int64_t V, float t,
                                                                       const float* w) {
  return stats_row_impl<v16f>(x, V, t, w);
}
__attribute__((noinline)) KD_TARGET_AVX512_FLOAT void grad_avx512(const float* x, float* g, int64_t V,
                                                                  float m, float t, float ls, float c1,
                                                                  float c0) {
  grad_row_impl<v16f>(x, g, V, m, t, ls, c1, c0);
}
#endif

// The row functions of the build common/cpu_isa.h picks for the float kernels.
struct RowFns {
  StatsFn stats;
  GradFn grad;
};

RowFns row_fns() {
#ifdef TOPK_HAVE_AVX2
  const int64_t isa = kdengine::cpu_isa(kdengine::kFloat);
  if (isa >= kdengine::kIsaAvx512) return {&stats_avx512, &grad_avx512};
  if (isa >= kdengine::kIsaAvx2) return {&stats_avx2, &grad_avx2};
#endif
  return {&stats_portable, &grad_portable};
}

void check_student(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "topk student ops: student must be a contiguous float32 (N, V) CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_student_stats(
    const at::Tensor& x, const at::Tensor& indices, double inv_t, bool need_rest) {
  check_student(x);
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.is_contiguous() &&
                  indices.size(0) == x.size(0),
              "topk_student_stats: indices must be a contiguous int64 (N, k) tensor");
  const int64_t N = x.size(0), V = x.size(1), K = indices.size(1);
  auto f64 = x.options().dtype(at::kDouble);
  at::Tensor rowmax = at::empty({N}, x.options());
  at::Tensor logsum = at::empty({N}, f64);
  at::Tensor logrest = need_rest ? at::empty({N}, f64) : at::empty({0}, f64);
  at::Tensor sumx = at::empty({N}, f64);
  const float* xp = x.data_ptr<float>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  float* rm = rowmax.data_ptr<float>();
  double* ls = logsum.data_ptr<double>();
  double* lr = need_rest ? logrest.data_ptr<double>() : nullptr;
  double* sx = sumx.data_ptr<double>();
  const StatsFn fn = row_fns().stats;
  const float it = static_cast<float>(inv_t);
  kdengine::parallel_for_dynamic(0, N, 8, [&](int64_t b, int64_t e) {
    // 0/1 weights of the tokens outside K: all ones between rows (each row restores them)
    thread_local std::vector<float> w;
    if (need_rest && w.size() != static_cast<size_t>(V)) w.assign(static_cast<size_t>(V), 1.0f);
    for (int64_t r = b; r < e; ++r) {
      const int64_t* idx = ip + r * K;
      if (need_rest)
        for (int64_t j = 0; j < K; ++j)
          if (idx[j] >= 0 && idx[j] < V) w[idx[j]] = 0.0f;
      StatsOut o = fn(xp + r * V, V, it, need_rest ? w.data() : nullptr);
      if (need_rest)
        for (int64_t j = 0; j < K; ++j)
          if (idx[j] >= 0 && idx[j] < V) w[idx[j]] = 1.0f;
      rm[r] = o.rowmax;
      ls[r] = o.logsum;
      if (need_rest) lr[r] = o.logrest;
      sx[r] = o.sumx;
    }
  });
  return {rowmax, logsum, logrest, sumx};
}

at::Tensor topk_student_grad(const at::Tensor& x, const at::Tensor& rowmax, const at::Tensor& logsum,
                             const at::Tensor& c1, const at::Tensor& c0, double inv_t) {
  check_student(x);
  const int64_t N = x.size(0), V = x.size(1);
  TORCH_CHECK(rowmax.scalar_type() == at::kFloat && rowmax.numel() == N && rowmax.is_contiguous(),
              "topk_student_grad: rowmax must be float32 (N,)");
  TORCH_CHECK(logsum.scalar_type() == at::kDouble && logsum.numel() == N && logsum.is_contiguous(),
              "topk_student_grad: logsum must be float64 (N,)");
  TORCH_CHECK(c1.scalar_type() == at::kFloat && c1.numel() == N && c1.is_contiguous() &&
                  c0.scalar_type() == at::kFloat && c0.numel() == N && c0.is_contiguous(),
              "topk_student_grad: c1 and c0 must be float32 (N,)");
  // pooled: a fresh N x V block costs more in page faults than the pass itself (output_pool.h)
  at::Tensor g = kdengine::pooled_empty({N, V}, x.options());
  const float* xp = x.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  const float* rm = rowmax.data_ptr<float>();
  const double* ls = logsum.data_ptr<double>();
  const float* a1 = c1.data_ptr<float>();
  const float* a0 = c0.data_ptr<float>();
  const GradFn fn = row_fns().grad;
  const float it = static_cast<float>(inv_t);
  kdengine::parallel_for_dynamic(0, N, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      fn(xp + r * V, gp + r * V, V, rm[r], it, static_cast<float>(ls[r]), a1[r], a0[r]);
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("topk_student_stats", &topk_student_stats);
  m.impl("topk_student_grad", &topk_student_grad);
}
