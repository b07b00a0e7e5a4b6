// Multi-step integrate-and-fire neuron, CUDA: one thread per neuron loops over all T steps with
// the potential in a register; the backward walks T-1..0 in one kernel. CUDA kernels of
// kdengine::if_fwd and kdengine::if_bwd.
//
// Math (per neuron; state acc_t = float, or double for float64 input):
//   h_t = v_{t-1} + x_t;  s_t = [h_t >= theta] (NaN if h_t is NaN);
//   v_t = s_t ? h_t - theta : h_t   (soft reset)   |   s_t ? v_reset : h_t   (hard reset)
// Backward, c = dL/dv_t carried from t = T-1 (c = dL/dv_final or 0) down to 0:
//   sg = surrogate'(h_t - theta)  atan: (a/2) / (1 + (pi/2 a u)^2); sigmoid: a e / (1+e)^2, e = exp(-a|u|)
//   dv_t/dh_t = 1 - theta sg (soft) | (1 - s_t) + (v_reset - h_t) sg (hard); no sg term if detach_reset
//   g_t = gs_t sg + c dv_t/dh_t;  dL/dx_t = g_t;  c <- g_t;  dL/dv_init = c
// (autograd of kdengine/ops/if_multistep/reference.py, written out).
//
// Layout: x, spikes, h, grad_spikes, grad_x contiguous (T, N): neuron n at step t is t*N + n, so
// consecutive threads touch consecutive addresses at every step (coalesced).
// Memory traffic (fp32, per element per step): forward reads x, writes s: 8 B, +4 B writing the
// pre-reset potential h when autograd needs it; backward reads h and gs, writes gx: 12 B. A
// thread cannot keep h for arbitrary T in registers, and recomputing it from x would need a
// scratch buffer or a checkpointed second pass; storing h (fp32) is the simple choice here
// (24 B per element-step for forward + backward; the CPU backend recomputes: 20 B).
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

namespace {

constexpr int kThreads = 256;
constexpr int64_t kSurAtan = 0;
constexpr int64_t kSurSigmoid = 1;

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename scalar_t, typename acc_t, bool kHard, bool kSaveH>
__global__ void if_fwd_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ v_init,
                              scalar_t* __restrict__ spikes, acc_t* __restrict__ v_out,
                              acc_t* __restrict__ h_out, int64_t T, int64_t N, acc_t thr,
                              acc_t reset, acc_t rest) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += stride) {
    acc_t v = v_init ? v_init[n] : rest;
    int64_t i = n;
    for (int64_t t = 0; t < T; ++t, i += N) {
      const acc_t h = v + static_cast<acc_t>(x[i]);
      const bool fire = h >= thr;
      const acc_t s = (h != h) ? h : (fire ? acc_t(1) : acc_t(0));  // NaN potential -> NaN spike
      spikes[i] = static_cast<scalar_t>(s);
      if (kSaveH) h_out[i] = h;
      v = fire ? (kHard ? reset : h - thr) : h;
    }
    v_out[n] = v;
  }
}

template <typename scalar_t, typename acc_t, bool kHard, int64_t kSur, bool kDetach>
__global__ void if_bwd_kernel(const acc_t* __restrict__ h_in, const scalar_t* __restrict__ gs,
                              const acc_t* __restrict__ gv, scalar_t* __restrict__ gx,
                              acc_t* __restrict__ gv0, int64_t T, int64_t N, acc_t thr,
                              acc_t reset, acc_t alpha, acc_t k_atan, acc_t half_alpha) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += stride) {
    acc_t c = gv ? gv[n] : acc_t(0);
    int64_t i = (T - 1) * N + n;
    for (int64_t t = T - 1; t >= 0; --t, i -= N) {
      const acc_t h = h_in[i];
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
      acc_t dvdh;
      if constexpr (kHard) {
        dvdh = (h >= thr) ? acc_t(0) : acc_t(1);
        if constexpr (!kDetach) dvdh += (reset - h) * sg;
      } else {
        dvdh = kDetach ? acc_t(1) : acc_t(1) - thr * sg;
      }
      const acc_t g = static_cast<acc_t>(gs[i]) * sg + c * dvdh;
      gx[i] = static_cast<scalar_t>(g);
      c = g;
    }
    gv0[n] = c;
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

template <typename scalar_t, typename acc_t, bool kHard>
void launch_fwd(bool save_h, dim3 grid, cudaStream_t stream, const scalar_t* x, const acc_t* v0,
                scalar_t* s, acc_t* v, acc_t* h, int64_t T, int64_t N, acc_t thr, acc_t reset,
                acc_t rest) {
  if (save_h)
    if_fwd_kernel<scalar_t, acc_t, kHard, true><<<grid, kThreads, 0, stream>>>(
        x, v0, s, v, h, T, N, thr, reset, rest);
  else
    if_fwd_kernel<scalar_t, acc_t, kHard, false><<<grid, kThreads, 0, stream>>>(
        x, v0, s, v, h, T, N, thr, reset, rest);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> if_fwd_cuda(const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& v_init,
                                                           double v_threshold, bool hard_reset,
                                                           double v_reset, bool save_h) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous(),
              "if_fwd: x must be a contiguous (T, N) CUDA tensor with T >= 1");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  const bool has_v = v_init.has_value() && v_init->defined();
  if (has_v)
    TORCH_CHECK(v_init->is_cuda() && v_init->dim() == 1 && v_init->size(0) == N &&
                    v_init->scalar_type() == acc && v_init->is_contiguous(),
                "if_fwd: v_init must be a contiguous (N,) ", acc, " CUDA tensor");
  auto spikes = at::empty_like(x);
  auto v_out = at::empty({N}, x.options().dtype(acc));
  auto h = save_h ? at::empty({T, N}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  if (N == 0) return {spikes, v_out, h};
  const double rest = hard_reset ? v_reset : 0.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "if_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* vp = has_v ? v_init->data_ptr<acc_t>() : nullptr;
    acc_t* hp = save_h ? h.data_ptr<acc_t>() : nullptr;
    const auto thr = static_cast<acc_t>(v_threshold), rs = static_cast<acc_t>(v_reset);
    const auto rst = static_cast<acc_t>(rest);
    const dim3 grid(blocks_for(N));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    acc_t* vo = v_out.data_ptr<acc_t>();
    if (hard_reset)
      launch_fwd<scalar_t, acc_t, true>(save_h, grid, stream, xp, vp, sp, vo, hp, T, N, thr, rs, rst);
    else
      launch_fwd<scalar_t, acc_t, false>(save_h, grid, stream, xp, vp, sp, vo, hp, T, N, thr, rs, rst);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {spikes, v_out, h};
}

template <typename scalar_t, typename acc_t, bool kHard, int64_t kSur>
void launch_bwd(bool detach, dim3 grid, cudaStream_t stream, const acc_t* h, const scalar_t* gs,
                const acc_t* gv, scalar_t* gx, acc_t* gv0, int64_t T, int64_t N, acc_t thr,
                acc_t reset, acc_t alpha, acc_t k_atan, acc_t half_alpha) {
  if (detach)
    if_bwd_kernel<scalar_t, acc_t, kHard, kSur, true><<<grid, kThreads, 0, stream>>>(
        h, gs, gv, gx, gv0, T, N, thr, reset, alpha, k_atan, half_alpha);
  else
    if_bwd_kernel<scalar_t, acc_t, kHard, kSur, false><<<grid, kThreads, 0, stream>>>(
        h, gs, gv, gx, gv0, T, N, thr, reset, alpha, k_atan, half_alpha);
}

std::tuple<at::Tensor, at::Tensor> if_bwd_cuda(const at::Tensor& h,
                                               const at::Tensor& grad_spikes,
                                               const c10::optional<at::Tensor>& grad_v,
                                               double v_threshold, bool hard_reset,
                                               double v_reset, int64_t surrogate, double alpha,
                                               bool detach_reset) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.is_contiguous(),
              "if_bwd: h must be the contiguous (T, N) CUDA tensor saved by if_fwd");
  TORCH_CHECK(surrogate == kSurAtan || surrogate == kSurSigmoid,
              "if_bwd: surrogate must be 0 (atan) or 1 (sigmoid), got ", surrogate);
  const at::cuda::CUDAGuard guard(h.device());
  const int64_t T = h.size(0), N = h.size(1);
  TORCH_CHECK(grad_spikes.sizes() == h.sizes() && grad_spikes.is_contiguous() &&
                  acc_type_of(grad_spikes.scalar_type()) == h.scalar_type(),
              "if_bwd: grad_spikes must be contiguous (T, N) in the input dtype");
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv)
    TORCH_CHECK(grad_v->dim() == 1 && grad_v->size(0) == N &&
                    grad_v->scalar_type() == h.scalar_type() && grad_v->is_contiguous(),
                "if_bwd: grad_v must be contiguous (N,) in h's dtype");
  auto gx = at::empty_like(grad_spikes);
  auto gv0 = at::empty({N}, h.options());
  if (N == 0) return {gx, gv0};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_spikes.scalar_type(), "if_bwd_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const acc_t* gvp = has_gv ? grad_v->data_ptr<acc_t>() : nullptr;
        const auto thr = static_cast<acc_t>(v_threshold), rs = static_cast<acc_t>(v_reset);
        const auto a = static_cast<acc_t>(alpha);
        const auto k = static_cast<acc_t>(M_PI / 2 * alpha);
        const auto ha = static_cast<acc_t>(alpha / 2);
        const dim3 grid(blocks_for(N));
        const acc_t* hp = h.data_ptr<acc_t>();
        const scalar_t* gsp = grad_spikes.data_ptr<scalar_t>();
        scalar_t* gxp = gx.data_ptr<scalar_t>();
        acc_t* gv0p = gv0.data_ptr<acc_t>();
        if (hard_reset) {
          if (surrogate == kSurAtan)
            launch_bwd<scalar_t, acc_t, true, kSurAtan>(detach_reset, grid, stream, hp, gsp, gvp,
                                                        gxp, gv0p, T, N, thr, rs, a, k, ha);
          else
            launch_bwd<scalar_t, acc_t, true, kSurSigmoid>(detach_reset, grid, stream, hp, gsp,
                                                           gvp, gxp, gv0p, T, N, thr, rs, a, k, ha);
        } else {
          if (surrogate == kSurAtan)
            launch_bwd<scalar_t, acc_t, false, kSurAtan>(detach_reset, grid, stream, hp, gsp, gvp,
                                                         gxp, gv0p, T, N, thr, rs, a, k, ha);
          else
            launch_bwd<scalar_t, acc_t, false, kSurSigmoid>(detach_reset, grid, stream, hp, gsp,
                                                            gvp, gxp, gv0p, T, N, thr, rs, a, k,
                                                            ha);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {gx, gv0};
}

// The schema shared with the CPU kernels (kdengine/ops/if_multistep/schema.py): the CUDA backward
// reads the pre-reset potential h saved by the forward, never x or v_init.
std::tuple<at::Tensor, at::Tensor> if_bwd_op(const at::Tensor& /*x*/,
                                             const c10::optional<at::Tensor>& /*v_init*/,
                                             const c10::optional<at::Tensor>& h,
                                             const at::Tensor& grad_spikes,
                                             const c10::optional<at::Tensor>& grad_v,
                                             double v_threshold, bool hard_reset, double v_reset,
                                             int64_t surrogate, double alpha, bool detach_reset) {
  TORCH_CHECK_VALUE(h.has_value() && h->defined(),
                    "if_bwd: the CUDA kernel needs h, saved by if_fwd(save_h=True)");
  return if_bwd_cuda(*h, grad_spikes, grad_v, v_threshold, hard_reset, v_reset, surrogate, alpha,
                     detach_reset);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("if_fwd", &if_fwd_cuda);
  m.impl("if_bwd", &if_bwd_op);
}
