// Binary (XNOR / AND) popcount GEMM, bit packing and fused binary linear epilogue, CUDA.
//
// Math. Rows of A (M) and B (N) are K bits in 32-bit words (bit j of word w = element 32w + j;
// sign bits: 1 = -1, spikes: 1 = spike; padding bits 0, and the GEMM masks them off anyway):
//   mode 0 (xnor):  out[m,n] = K - 2 * popc(a XOR b)        = sum_k sign(a) sign(b)
//   mode 1 (spike): out[m,n] = popc(a) - 2 * popc(a AND b)   = sum_k s sign(w)
// Exact int32 results (K < 2^31).
//
// Packing: one warp per output word; lane j tests element 32w + j and __ballot_sync gathers the
// 32 predicates into the word (bit j = lane j), so reads are coalesced and nothing is shuffled.
//
// GEMM: a 256-thread block owns a 64 x 64 output tile; K is walked in steps of 16 words, staged
// in shared memory transposed (As[k][m], Bs[k][n]) so that the 4 x 4 register micro-tile of each
// thread reads 4 consecutive A and 4 consecutive B words per k (broadcast-free, conflict-free).
// Per staged word pair: one XOR/AND + one __popc + one add (the CUDA-core popcount ceiling; on
// H100 ~16 popc/clk/SM). Global traffic: each A word is read N/64 times and each B word M/64 times
// (through L2); the shared stage is 2 x 16 x 64 words = 8 KiB.
//
// The binary-tensor-core path (PTX mma .b1 xor/and.popc, sm_75+/sm_80+) is not implemented: it
// could not be measured here (no GPU when this was written).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <optional>
#include <type_traits>

namespace kdengine_binary_cuda {
namespace {

constexpr int TM = 64, TN = 64, TKW = 16, THREADS = 256;

template <typename T>
__device__ __forceinline__ bool kd_is_negative(T v) {
  return static_cast<float>(v) < 0.0f;  // exact for half/bfloat16/float
}
template <>
__device__ __forceinline__ bool kd_is_negative<double>(double v) {
  return v < 0.0;
}

// bit = x < 0 (signs) for floating T; bit = x != 0 for uint8 (spikes / bool).
template <typename T, bool SPIKES>
__global__ void pack_kernel(const T* __restrict__ x, int32_t* __restrict__ out, int64_t R, int64_t K,
                            int64_t W) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t total = R * W;
  for (int64_t word = blockIdx.x * warps_per_block + threadIdx.x / 32; word < total;
       word += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t r = word / W, w = word % W;
    const int64_t k = 32 * w + lane;
    bool bit = false;
    if (k < K) {
      const T v = x[r * K + k];
      if constexpr (SPIKES)
        bit = v != 0;
      else
        bit = kd_is_negative<T>(v);
    }
    const unsigned bits = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) out[word] = static_cast<int32_t>(bits);
  }
}

template <bool AND>
__global__ void __launch_bounds__(THREADS)
gemm_kernel(const uint32_t* __restrict__ A, const uint32_t* __restrict__ B, int32_t* __restrict__ C,
            int64_t M, int64_t N, int64_t W, int32_t K) {
  __shared__ uint32_t As[TKW][TM];
  __shared__ uint32_t Bs[TKW][TN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads, 4 x 4 outputs each
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TM, n0 = static_cast<int64_t>(blockIdx.x) * TN;
  int acc[4][4] = {};
  int pa[4] = {};
  // padding bits of each row's last word never count (PackedSigns.bits may be edited after packing)
  const uint32_t last = (K % 32) ? ((1u << (K % 32)) - 1u) : ~0u;
  for (int64_t k0 = 0; k0 < W; k0 += TKW) {
    // stage: 64 rows x 16 words per operand = 1024 words, 4 per thread; consecutive threads read
    // consecutive words of a row (coalesced), stored transposed.
    for (int i = threadIdx.x; i < TM * TKW; i += THREADS) {
      const int row = i / TKW, kk = i % TKW;
      const int64_t gk = k0 + kk;
      const int64_t gm = m0 + row, gn = n0 + row;
      const uint32_t keep = gk == W - 1 ? last : ~0u;
      As[kk][row] = (gm < M && gk < W) ? (A[gm * W + gk] & keep) : 0u;
      Bs[kk][row] = (gn < N && gk < W) ? (B[gn * W + gk] & keep) : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TKW; ++kk) {
      uint32_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (AND) pa[i] += __popc(a[i]);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += __popc(AND ? (a[i] & b[j]) : (a[i] ^ b[j]));
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < N) C[m * N + n] = (AND ? pa[i] : K) - 2 * acc[i][j];
    }
  }
}

// Rounding to the output type with CUDA's intrinsics (c10's float -> bfloat16 conversion is a
// host constexpr path that nvcc warns about in device code).
template <typename out_t>
__device__ __forceinline__ out_t from_acc(float v) { return static_cast<out_t>(v); }
template <>
__device__ __forceinline__ c10::Half from_acc<c10::Half>(float v) { return c10::Half(__float2half_rn(v)); }
template <>
__device__ __forceinline__ c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  return c10::BFloat16(__float2bfloat16_rn(v));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// y = dot * scale + bias with separate roundings (no FMA, like torch), stored as out_t;
// acc_t = double for double outputs, else float.
template <typename out_t>
__global__ void epilogue_kernel(const int32_t* __restrict__ dot,
                                const std::conditional_t<std::is_same_v<out_t, double>, double, float>* __restrict__ scale,
                                const std::conditional_t<std::is_same_v<out_t, double>, double, float>* __restrict__ bias,
                                out_t* __restrict__ y, int64_t total, int64_t N) {
  using acc_t = std::conditional_t<std::is_same_v<out_t, double>, double, float>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i % N;
    acc_t v = static_cast<acc_t>(dot[i]);
    if (scale) v = mul_rn(v, scale[n]);
    if (bias) v = add_rn(v, bias[n]);
    if constexpr (std::is_same_v<acc_t, double>)
      y[i] = v;
    else
      y[i] = from_acc<out_t>(v);
  }
}

// Only device-generic c10 headers are used (DeviceGuard, Stream::native_handle): CPU builds of
// torch ship no c10/cuda headers, and this file must still compile there (tests/test_cuda_compile).
cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

int blocks_for(int64_t work, int per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

void check_cuda_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows, K), got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

at::Tensor pack_impl(const at::Tensor& x_in, bool spikes) {
  check_cuda_2d(x_in, spikes ? "s" : "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1), W = (K + 31) / 32;
  TORCH_CHECK_VALUE(K >= 1, "K must be >= 1, got 0");
  at::Tensor out = at::empty({R, W}, x.options().dtype(at::kInt));
  if (R == 0) return out;
  const c10::DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream(x.device());
  const int grid = blocks_for(R * W, THREADS / 32);
  if (spikes) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kBool || x.scalar_type() == at::kByte,
                      "s must be bool or uint8, got ", x.scalar_type());
    pack_kernel<uint8_t, true><<<grid, THREADS, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(x.data_ptr()), out.data_ptr<int32_t>(), R, K, W);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "binary_pack_signs_cuda", [&] {
      pack_kernel<scalar_t, false><<<grid, THREADS, 0, stream>>>(x.data_ptr<scalar_t>(),
                                                                 out.data_ptr<int32_t>(), R, K, W);
    });
  }
  check_launch();
  return out;
}

void check_bits(const at::Tensor& t, const char* name, int64_t k) {
  check_cuda_2d(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, " must be int32 packed words, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(k >= 1 && k < (int64_t(1) << 31), "k must be in [1, 2^31), got ", k);
  TORCH_CHECK_VALUE(t.size(1) == (k + 31) / 32, name, " has ", t.size(1), " words per row but k = ", k,
                    " needs ", (k + 31) / 32);
}

at::Tensor gemm_impl(const at::Tensor& a, const at::Tensor& b, int64_t k, int64_t mode) {
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return c;
  TORCH_CHECK_VALUE((M + TM - 1) / TM <= 65535, "too many rows for one launch: ", M);
  const c10::DeviceGuard guard(a.device());
  const cudaStream_t stream = current_stream(a.device());
  const dim3 grid(static_cast<unsigned>((N + TN - 1) / TN), static_cast<unsigned>((M + TM - 1) / TM));
  const auto* ap = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
  const auto* bp = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  if (mode == 1)
    gemm_kernel<true><<<grid, THREADS, 0, stream>>>(ap, bp, c.data_ptr<int32_t>(), M, N, W, static_cast<int32_t>(k));
  else
    gemm_kernel<false><<<grid, THREADS, 0, stream>>>(ap, bp, c.data_ptr<int32_t>(), M, N, W, static_cast<int32_t>(k));
  check_launch();
  return c;
}

// ----------------------------------------------------------------------------------------- ops

at::Tensor binary_pack_signs(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_floating_point(), "x must be a floating tensor, got ", x.scalar_type());
  return pack_impl(x, false);
}

at::Tensor binary_pack_bool(const at::Tensor& s) { return pack_impl(s, true); }

at::Tensor binary_gemm(const at::Tensor& a, const at::Tensor& b, int64_t k, int64_t mode) {
  check_bits(a, "a", k);
  check_bits(b, "b", k);
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (xnor) or 1 (spike AND), got ", mode);
  TORCH_CHECK_VALUE(a.device() == b.device(), "a and b must be on one device");
  return gemm_impl(a, b, k, mode);
}

at::Tensor binary_linear(const at::Tensor& x, const at::Tensor& w, int64_t k,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  check_cuda_2d(x, "x");
  check_bits(w, "weight", k);
  TORCH_CHECK_VALUE(x.is_floating_point(), "x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == k, "x has K = ", x.size(1), " features but weight has k = ", k);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = w.size(0);
  for (const auto* opt : {&scale, &bias}) {
    if (opt->has_value()) {
      const at::Tensor& t = opt->value();
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N && t.scalar_type() == acc && t.is_contiguous() &&
                            t.device() == x.device(),
                        opt == &scale ? "scale" : "bias", " must be a contiguous (N,) = (", N,
                        ",) tensor of dtype ", acc, " on x's device");
    }
  }
  const at::Tensor a = pack_impl(x, false);
  const at::Tensor dot = gemm_impl(a, w, k, 0);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const int64_t total = dot.numel();
  if (total == 0) return y;
  const c10::DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream(x.device());
  const int grid = blocks_for(total, THREADS);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "binary_linear_epilogue_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    epilogue_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        dot.data_ptr<int32_t>(), scale.has_value() ? scale->data_ptr<acc_t>() : nullptr,
        bias.has_value() ? bias->data_ptr<acc_t>() : nullptr, y.data_ptr<scalar_t>(), total, N);
  });
  check_launch();
  return y;
}

}  // namespace
}  // namespace kdengine_binary_cuda

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("binary_pack_signs", &kdengine_binary_cuda::binary_pack_signs);
  m.impl("binary_pack_bool", &kdengine_binary_cuda::binary_pack_bool);
  m.impl("binary_gemm", &kdengine_binary_cuda::binary_gemm);
  m.impl("binary_linear", &kdengine_binary_cuda::binary_linear);
}
