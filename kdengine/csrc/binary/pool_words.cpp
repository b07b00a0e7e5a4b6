// Binary max-pool on channel words (NHWC words, as Larq Compute Engine's bmaxpool).
//
// Math. Signs: bit 1 = -1, bit 0 = +1, and the max of +-1 values is +1 iff one of them is +1, so
// the max over a window is the AND of its words (bit stays 1 = -1 only where every tap is -1).
// Spikes (bit 1 = 1): the max is the OR. Taps in the padding are skipped, as torch's max_pool2d
// pads with -inf (the identity of the max); a window with no tap inside gives -inf in torch, i.e.
// bit 1 for signs, which is the AND's identity (all ones) the accumulator starts from, and 0 (no
// spike) for spikes. The channel padding bits of the last word are cleared at the end.
//
// Layout and traffic. words int32 (B, H, W, cw) contiguous -> out (B, OH, OW, cw): per output pixel
// kh*kw runs of cw words are read (from L1/L2: neighbouring windows overlap) and cw words written;
// 32 channels per 32-bit op, the inner loop over cw vectorises. Rows of pixels go to ATen's threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/parallel.h"

namespace {

at::Tensor binary_maxpool_words(const at::Tensor& words_in, int64_t k, int64_t kh, int64_t kw,
                                int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                int64_t dw, bool use_or) {
  TORCH_CHECK_VALUE(words_in.dim() == 4 && words_in.device().is_cpu() &&
                        words_in.scalar_type() == at::kInt,
                    "words must be a 4-D int32 CPU tensor (B, H, W, words per pixel), got ",
                    words_in.sizes(), " ", words_in.scalar_type());
  TORCH_CHECK_VALUE(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 &&
                        pw >= 0,
                    "kernel, stride and dilation must be >= 1 and padding >= 0");
  const at::Tensor words = words_in.contiguous();
  const int64_t B = words.size(0), H = words.size(1), W = words.size(2), cw = words.size(3);
  TORCH_CHECK_VALUE(k >= 1 && cw == (k + 31) / 32, "words has ", cw, " words per pixel but k = ", k,
                    " channels need ", (k + 31) / 32);
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(OH >= 1 && OW >= 1, "the window does not fit the input ", words.sizes());
  at::Tensor out = at::empty({B, OH, OW, cw}, words.options());
  const uint32_t* src = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const uint32_t ident = use_or ? 0u : ~0u;
  const int rem = static_cast<int>(k % 32);
  const uint32_t last = rem ? (uint32_t{1} << rem) - 1 : ~0u;
  kdengine::parallel_for(0, B * OH * OW, std::max<int64_t>(1, 4096 / (kh * kw * cw)),
                         [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (OH * OW), q = r % (OH * OW), oh = q / OW, ow = q % OW;
      uint32_t* o = dst + r * cw;
      std::fill(o, o + cw, ident);
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * sh - ph + i * dh;
        if (ih < 0 || ih >= H) continue;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t iw = ow * sw - pw + j * dw;
          if (iw < 0 || iw >= W) continue;
          const uint32_t* s = src + ((b * H + ih) * W + iw) * cw;
          if (use_or)
            for (int64_t w = 0; w < cw; ++w) o[w] |= s[w];
          else
            for (int64_t w = 0; w < cw; ++w) o[w] &= s[w];
        }
      }
      o[cw - 1] &= last;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) { m.impl("binary_maxpool_words", &binary_maxpool_words); }
