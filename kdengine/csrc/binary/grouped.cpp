// Grouped XNOR popcount GEMM for grouped / depthwise binary convolutions.
//
// Math. g groups; group gi owns rows [gi*M, (gi+1)*M) of a (its im2col rows) and rows
// [gi*Ng, (gi+1)*Ng) of b (its output channels' weights), W words each:
//   out[m, gi*Ng + j] = k - 2 * popcount(a[gi*M + m] XOR b[gi*Ng + j])   (padding bits beyond k
// are masked off the last word of both operands, so they never count).
// Why not g calls of the GEMM: in the depthwise-like case a group has 1..a few channels, i.e. one
// word per tap and Ng = 1 output; a GEMM call per group would spend its time in set-up (panel
// splits, thread dispatch) for a handful of popcounts. Here one pass over output rows does all
// groups, writing the (M, O) layout the epilogue / threshold pass expects.
//
// Layout and traffic. a int32 (g*M, W), b int32 (g*Ng, W), out int32 (M, g*Ng). Each task takes a
// block of m rows and walks every group: b (g*Ng*W words, small in this regime) stays in L1/L2,
// every a word is read Ng times from L1. POPCNT where the CPU has it (checked at run time).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/parallel.h"

namespace {

// Inlined into a plain and a target("popcnt") wrapper: __builtin_popcount becomes a libgcc call or
// one POPCNT instruction.
inline __attribute__((always_inline)) void grouped_rows(const uint32_t* a, const uint32_t* b, int32_t* out,
                                                        int64_t m0, int64_t m1, int64_t M, int64_t G,
                                                        int64_t Ng, int64_t W, int64_t k, uint32_t last) {
  const int64_t O = G * Ng;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const uint32_t* ar = a + (g * M + m) * W;
      for (int64_t j = 0; j < Ng; ++j) {
        const uint32_t* br = b + (g * Ng + j) * W;
        int64_t cnt = 0;
        for (int64_t w = 0; w + 1 < W; ++w) cnt += __builtin_popcount(ar[w] ^ br[w]);
        cnt += __builtin_popcount((ar[W - 1] ^ br[W - 1]) & last);
        out[m * O + g * Ng + j] = static_cast<int32_t>(k - 2 * cnt);
      }
    }
  }
}

void grouped_rows_portable(const uint32_t* a, const uint32_t* b, int32_t* out, int64_t m0, int64_t m1,
                           int64_t M, int64_t G, int64_t Ng, int64_t W, int64_t k, uint32_t last) {
  grouped_rows(a, b, out, m0, m1, M, G, Ng, W, k, last);
}

#if defined(__x86_64__)
__attribute__((target("popcnt"))) void grouped_rows_popcnt(const uint32_t* a, const uint32_t* b,
                                                           int32_t* out, int64_t m0, int64_t m1,
                                                           int64_t M, int64_t G, int64_t Ng, int64_t W,
                                                           int64_t k, uint32_t last) {
  grouped_rows(a, b, out, m0, m1, M, G, Ng, W, k, last);
}
#endif

at::Tensor binary_grouped_gemm(const at::Tensor& a_in, const at::Tensor& b_in, int64_t k, int64_t groups) {
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2 && a_in.scalar_type() == at::kInt &&
                        b_in.scalar_type() == at::kInt && a_in.device().is_cpu() && b_in.device().is_cpu(),
                    "a and b must be 2-D int32 CPU tensors of packed words");
  TORCH_CHECK_VALUE(groups >= 1 && a_in.size(0) % groups == 0 && b_in.size(0) % groups == 0,
                    "groups = ", groups, " must divide the rows of a (", a_in.size(0), ") and b (",
                    b_in.size(0), ")");
  const int64_t W = a_in.size(1);
  TORCH_CHECK_VALUE(b_in.size(1) == W && k >= 1 && W == (k + 31) / 32, "a and b must have ceil(k/32) = ",
                    (k + 31) / 32, " words per row, got ", W, " and ", b_in.size(1));
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0) / groups, Ng = b.size(0) / groups;
  at::Tensor out = at::empty({M, groups * Ng}, a.options());
  if (M == 0 || Ng == 0) return out;
  const int rem = static_cast<int>(k % 32);
  const uint32_t last = rem ? (uint32_t{1} << rem) - 1 : ~0u;
  const uint32_t* ap = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t per_row = std::max<int64_t>(1, groups * Ng * W);
  kdengine::parallel_for(0, M, std::max<int64_t>(1, 65536 / per_row), [&](int64_t m0, int64_t m1) {
#if defined(__x86_64__)
    static const bool hw = __builtin_cpu_supports("popcnt");
    if (hw) return grouped_rows_popcnt(ap, bp, op, m0, m1, M, groups, Ng, W, k, last);
#endif
    grouped_rows_portable(ap, bp, op, m0, m1, M, groups, Ng, W, k, last);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) { m.impl("binary_grouped_gemm", &binary_grouped_gemm); }
