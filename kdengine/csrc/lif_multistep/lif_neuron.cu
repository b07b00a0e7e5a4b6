// Multi-step leaky integrate-and-fire neuron, CUDA: one thread per neuron loops over all T steps
// with the potential in a register; the backward walks T-1..0 in one kernel and also returns the
// per-neuron gradients of the leak and the threshold. CUDA kernels of kdengine::lif_fwd / lif_bwd.
//
// Math (per neuron; state acc_t = float, or double for float64 input; params = [leak, theta, r],
// leak = tau when `divide`, else the decay factor k = 1/tau; r = v_reset (hard) or 0 (soft)):
//   h_t = v + (x_t - (v - r)) / tau  (or * k)   decay_input   |   v - (v - r) / tau + x_t   otherwise
//   u = h_t - theta;  s_t = [u >= 0] (NaN if u is NaN);  v_t = s_t ? h_t - theta : h_t (soft) | r (hard)
// Backward, c = dL/dv_t carried from t = T-1 (c = dL/dv_final or 0) down to 0, q = 1/tau or k:
//   sg = surrogate'(u);  dv_t/dh_t = 1 - theta sg (soft) | (1 - s_t) + (r - h_t) sg (hard), no sg
//   term with detach_reset;  g = gs_t sg + c dv_t/dh_t;  dL/dx_t = g q (decay_input) or g;
//   c <- g - g q;  dL/dtheta += -sg (gs_t + c dv/ds) - c s_t [soft];  dL/dk += g dh_t/dk
// (autograd of kdengine/ops/lif_multistep/reference.py, written out; see lif_neuron.cpp).
//
// Layout: x, spikes, h, grad_spikes, grad_x contiguous (T, N): neuron n at step t is t*N + n, so
// consecutive threads touch consecutive addresses at every step (coalesced). params lives in
// device memory (a learned tau or threshold needs no host round trip).
// Memory traffic (fp32, per element per step): forward reads x, writes s: 8 B, +4 B writing the
// pre-reset potential h when autograd needs it; backward reads h and gs, writes gx: 12 B (+4 B
// reading x for the leak gradient with decay_input). The per-neuron parameter partials (2, N)
// are summed by the caller (a deterministic torch reduction, not atomics).
// A CPU-only torch install ships the c10/cuda headers without their CMake-generated config
// header; this switch (part of c10/cuda/CUDAMacros.h) makes them usable for a compile check.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kSurAtan = 0;
constexpr int64_t kSurSigmoid = 1;

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// The forward's operations in the reference's order (no contraction: __fmul_rn / __fadd_rn are
// what a plain expression would round to, and they keep nvcc from fusing into FMAs that would
// change spikes against the CPU backends).
template <typename acc_t>
__device__ __forceinline__ acc_t add_rn(acc_t a, acc_t b) {
  if constexpr (std::is_same_v<acc_t, float>) return __fadd_rn(a, b); else return __dadd_rn(a, b);
}
template <typename acc_t>
__device__ __forceinline__ acc_t sub_rn(acc_t a, acc_t b) {
  if constexpr (std::is_same_v<acc_t, float>) return __fsub_rn(a, b); else return __dsub_rn(a, b);
}
template <typename acc_t>
__device__ __forceinline__ acc_t mul_rn(acc_t a, acc_t b) {
  if constexpr (std::is_same_v<acc_t, float>) return __fmul_rn(a, b); else return __dmul_rn(a, b);
}
template <typename acc_t>
__device__ __forceinline__ acc_t div_rn(acc_t a, acc_t b) {
  if constexpr (std::is_same_v<acc_t, float>) return __fdiv_rn(a, b); else return __ddiv_rn(a, b);
}

template <typename acc_t>
__device__ __forceinline__ acc_t charge(acc_t v, acc_t x, acc_t leak, acc_t r, bool decay_input,
                                        bool divide) {
  if (decay_input) {
    const acc_t a = sub_rn(x, sub_rn(v, r));
    return add_rn(v, divide ? div_rn(a, leak) : mul_rn(a, leak));
  }
  const acc_t d = sub_rn(v, r);
  return add_rn(sub_rn(v, divide ? div_rn(d, leak) : mul_rn(d, leak)), x);
}

template <typename acc_t, bool kHard>
__device__ __forceinline__ acc_t reset(acc_t h, acc_t thr, acc_t r) {
  return (h - thr >= acc_t(0)) ? (kHard ? r : h - thr) : h;
}

template <typename scalar_t, typename acc_t, bool kHard, bool kSaveH>
__global__ void lif_fwd_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init,
                               const acc_t* __restrict__ params, scalar_t* __restrict__ spikes,
                               acc_t* __restrict__ v_out, acc_t* __restrict__ h_out, int64_t T,
                               int64_t N, bool decay_input, bool divide) {
  const acc_t leak = params[0], thr = params[1], r = params[2];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += stride) {
    acc_t v = v_init ? v_init[n] : r;
    int64_t i = n;
    for (int64_t t = 0; t < T; ++t, i += N) {
      const acc_t h = charge(v, static_cast<acc_t>(x[i]), leak, r, decay_input, divide);
      const acc_t u = h - thr;
      const acc_t s = (u != u) ? u : (u >= acc_t(0) ? acc_t(1) : acc_t(0));  // NaN -> NaN spike
      spikes[i] = static_cast<scalar_t>(s);
      if (kSaveH) h_out[i] = h;
      v = reset<acc_t, kHard>(h, thr, r);
    }
    v_out[n] = v;
  }
}

template <typename scalar_t, typename acc_t, bool kHard, int64_t kSur, bool kDetach>
__global__ void lif_bwd_kernel(const acc_t* __restrict__ h_in, const scalar_t* __restrict__ gs,
                               const acc_t* __restrict__ gv, const scalar_t* __restrict__ x,
                               const acc_t* __restrict__ v_init, const acc_t* __restrict__ params,
                               scalar_t* __restrict__ gx, acc_t* __restrict__ gv0,
                               acc_t* __restrict__ gp, int64_t T, int64_t N, bool decay_input,
                               bool divide, bool param_grads, acc_t alpha, acc_t k_atan,
                               acc_t half_alpha) {
  const acc_t leak = params[0], thr = params[1], r = params[2];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += stride) {
    acc_t c = gv ? gv[n] : acc_t(0);
    acc_t g_leak = 0, g_thr = 0;
    int64_t i = (T - 1) * N + n;
    acc_t h = h_in[i];
    for (int64_t t = T - 1; t >= 0; --t, i -= N) {
      // h_{t-1} is read one step ahead: the leak gradient needs v_{t-1} = reset(h_{t-1}).
      const acc_t h_prev = t > 0 ? h_in[i - N] : acc_t(0);
      const acc_t u = h - thr;
      acc_t sg;
      if constexpr (kSur == kSurAtan) {
        const acc_t z = u * k_atan;
        sg = half_alpha / (acc_t(1) + z * z);
      } else {
        const acc_t e = exp_acc(-alpha * (u < acc_t(0) ? -u : u));
        const acc_t d = acc_t(1) + e;
        sg = alpha * e / (d * d);
      }
      const bool fire = u >= acc_t(0);
      const acc_t dvds = kHard ? r - h : -thr;
      acc_t dvdh = kHard ? (fire ? acc_t(0) : acc_t(1)) : acc_t(1);
      if constexpr (!kDetach) dvdh += dvds * sg;
      const acc_t gsv = static_cast<acc_t>(gs[i]);
      const acc_t g = gsv * sg + c * dvdh;
      const acc_t gq = divide ? g / leak : g * leak;
      gx[i] = static_cast<scalar_t>(decay_input ? gq : g);
      if (param_grads) {
        acc_t dth = kDetach ? -sg * gsv : -sg * (gsv + c * dvds);
        if (!kHard && fire) dth -= c;
        g_thr += dth;
        const acc_t vprev = t > 0 ? reset<acc_t, kHard>(h_prev, thr, r) : (v_init ? v_init[n] : r);
        g_leak += g * (decay_input ? static_cast<acc_t>(x[i]) - (vprev - r) : -(vprev - r));
      }
      c = g - gq;
      h = h_prev;
    }
    gv0[n] = c;
    if (param_grads) {
      gp[n] = g_leak;
      gp[N + n] = g_thr;
    }
  }
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

int blocks_for(int64_t N) {
  const int64_t want = (N + kThreads - 1) / kThreads;
  // ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers that a bare nvcc may lack.
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

void check_params(const at::Tensor& params, at::ScalarType acc, const char* op) {
  TORCH_CHECK(params.is_cuda() && params.dim() == 1 && params.size(0) == 3 &&
                  params.scalar_type() == acc && params.is_contiguous(),
              op, ": params must be a contiguous (3,) CUDA ", acc, " tensor [leak, v_threshold, r]");
}

template <typename scalar_t, typename acc_t, bool kHard>
void launch_fwd(bool save_h, dim3 grid, cudaStream_t stream, const scalar_t* x, const acc_t* v0,
                const acc_t* p, scalar_t* s, acc_t* v, acc_t* h, int64_t T, int64_t N,
                bool decay_input, bool divide) {
  if (save_h)
    lif_fwd_kernel<scalar_t, acc_t, kHard, true><<<grid, kThreads, 0, stream>>>(
        x, v0, p, s, v, h, T, N, decay_input, divide);
  else
    lif_fwd_kernel<scalar_t, acc_t, kHard, false><<<grid, kThreads, 0, stream>>>(
        x, v0, p, s, v, h, T, N, decay_input, divide);
}

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const acc_t* h;
  const scalar_t* gs;
  const acc_t* gv;
  const scalar_t* x;
  const acc_t* v0;
  const acc_t* p;
  scalar_t* gx;
  acc_t* gv0;
  acc_t* gp;
  int64_t T, N;
  bool decay_input, divide, param_grads;
  acc_t alpha, k_atan, half_alpha;
};

template <bool kHard, int64_t kSur, typename scalar_t, typename acc_t>
void launch_bwd(bool detach, dim3 grid, cudaStream_t stream, const BwdArgs<scalar_t, acc_t>& a) {
  if (detach)
    lif_bwd_kernel<scalar_t, acc_t, kHard, kSur, true><<<grid, kThreads, 0, stream>>>(
        a.h, a.gs, a.gv, a.x, a.v0, a.p, a.gx, a.gv0, a.gp, a.T, a.N, a.decay_input, a.divide,
        a.param_grads, a.alpha, a.k_atan, a.half_alpha);
  else
    lif_bwd_kernel<scalar_t, acc_t, kHard, kSur, false><<<grid, kThreads, 0, stream>>>(
        a.h, a.gs, a.gv, a.x, a.v0, a.p, a.gx, a.gv0, a.gp, a.T, a.N, a.decay_input, a.divide,
        a.param_grads, a.alpha, a.k_atan, a.half_alpha);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_fwd_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& v_init, const at::Tensor& params,
    bool hard_reset, bool decay_input, bool divide, bool save_h) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous(),
              "lif_fwd: x must be a contiguous (T, N) CUDA tensor with T >= 1");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  check_params(params, acc, "lif_fwd");
  const bool has_v = v_init.has_value() && v_init->defined();
  if (has_v)
    TORCH_CHECK(v_init->is_cuda() && v_init->dim() == 1 && v_init->size(0) == N &&
                    v_init->scalar_type() == acc && v_init->is_contiguous(),
                "lif_fwd: v_init must be a contiguous (N,) ", acc, " CUDA tensor");
  auto spikes = at::empty_like(x);
  auto v_out = at::empty({N}, x.options().dtype(acc));
  const std::vector<int64_t> h_shape = save_h ? std::vector<int64_t>{T, N} : std::vector<int64_t>{0};
  auto h = at::empty(h_shape, x.options().dtype(acc));
  if (N == 0) return {spikes, v_out, h};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lif_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* vp = has_v ? v_init->data_ptr<acc_t>() : nullptr;
    acc_t* hp = save_h ? h.data_ptr<acc_t>() : nullptr;
    const dim3 grid(blocks_for(N));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* pp = params.data_ptr<acc_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    acc_t* vo = v_out.data_ptr<acc_t>();
    if (hard_reset)
      launch_fwd<scalar_t, acc_t, true>(save_h, grid, stream, xp, vp, pp, sp, vo, hp, T, N, decay_input, divide);
    else
      launch_fwd<scalar_t, acc_t, false>(save_h, grid, stream, xp, vp, pp, sp, vo, hp, T, N, decay_input, divide);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {spikes, v_out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_bwd_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& h_opt, const at::Tensor& grad_spikes,
    const c10::optional<at::Tensor>& grad_v, const at::Tensor& params, bool hard_reset,
    bool decay_input, bool divide, int64_t surrogate, double alpha, bool detach_reset,
    bool param_grads) {
  TORCH_CHECK_VALUE(h_opt.has_value() && h_opt->defined(),
                    "lif_bwd: the CUDA kernel needs h, saved by lif_fwd(save_h=True)");
  const at::Tensor& h = *h_opt;
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.is_contiguous(),
              "lif_bwd: h must be the contiguous (T, N) CUDA tensor saved by lif_fwd");
  TORCH_CHECK(surrogate == kSurAtan || surrogate == kSurSigmoid,
              "lif_bwd: surrogate must be 0 (atan) or 1 (sigmoid), got ", surrogate);
  const at::cuda::CUDAGuard guard(h.device());
  const int64_t T = h.size(0), N = h.size(1);
  const auto acc = h.scalar_type();
  check_params(params, acc, "lif_bwd");
  TORCH_CHECK(grad_spikes.sizes() == h.sizes() && grad_spikes.is_contiguous() &&
                  acc_type_of(grad_spikes.scalar_type()) == acc,
              "lif_bwd: grad_spikes must be contiguous (T, N) in the input dtype");
  if (param_grads && decay_input)
    TORCH_CHECK(x.sizes() == h.sizes() && x.is_contiguous() &&
                    x.scalar_type() == grad_spikes.scalar_type(),
                "lif_bwd: the leak gradient with decay_input needs x, contiguous (T, N)");
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv)
    TORCH_CHECK(grad_v->dim() == 1 && grad_v->size(0) == N && grad_v->scalar_type() == acc &&
                    grad_v->is_contiguous(),
                "lif_bwd: grad_v must be contiguous (N,) in h's dtype");
  const bool has_v = v_init.has_value() && v_init->defined();
  auto gx = at::empty_like(grad_spikes);
  auto gv0 = at::empty({N}, h.options());
  const std::vector<int64_t> gp_shape = param_grads ? std::vector<int64_t>{2, N} : std::vector<int64_t>{0};
  auto gp = at::zeros(gp_shape, h.options());
  if (N > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, grad_spikes.scalar_type(), "lif_bwd_cuda", [&] {
          using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          const acc_t* gvp = has_gv ? grad_v->data_ptr<acc_t>() : nullptr;
          const acc_t* vp = has_v ? v_init->data_ptr<acc_t>() : nullptr;
          const scalar_t* xp = (param_grads && decay_input) ? x.data_ptr<scalar_t>() : nullptr;
          const auto a = static_cast<acc_t>(alpha);
          const auto k = static_cast<acc_t>(M_PI / 2 * alpha);
          const auto ha = static_cast<acc_t>(alpha / 2);
          const dim3 grid(blocks_for(N));
          const acc_t* hp = h.data_ptr<acc_t>();
          const acc_t* pp = params.data_ptr<acc_t>();
          const scalar_t* gsp = grad_spikes.data_ptr<scalar_t>();
          scalar_t* gxp = gx.data_ptr<scalar_t>();
          acc_t* gv0p = gv0.data_ptr<acc_t>();
          acc_t* gpp = param_grads ? gp.data_ptr<acc_t>() : nullptr;
          const BwdArgs<scalar_t, acc_t> args{hp, gsp, gvp, xp, vp, pp, gxp, gv0p, gpp, T, N,
                                              decay_input, divide, param_grads, a, k, ha};
          if (hard_reset) {
            if (surrogate == kSurAtan)
              launch_bwd<true, kSurAtan>(detach_reset, grid, stream, args);
            else
              launch_bwd<true, kSurSigmoid>(detach_reset, grid, stream, args);
          } else {
            if (surrogate == kSurAtan)
              launch_bwd<false, kSurAtan>(detach_reset, grid, stream, args);
            else
              launch_bwd<false, kSurSigmoid>(detach_reset, grid, stream, args);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  if (!param_grads) return {gx, gv0, gp};
  auto g = gp.sum(1);
  if (divide) {  // d/dtau = d/dk * dk/dtau, k = 1/tau
    auto tau = params.select(0, 0);
    g.select(0, 0).div_(tau * tau).neg_();
  }
  return {gx, gv0, g};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("lif_fwd", &lif_fwd_cuda);
  m.impl("lif_bwd", &lif_bwd_cuda);
}
