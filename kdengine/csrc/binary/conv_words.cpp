// im2col of channel-packed sign words for the binary conv2d (one pass instead of ~8 ATen ops).
//
// Math. For input x (B, C, H, W), any float dtype and strides: per pixel, the C signs packed
// into cw = ceil(C/32) int32 words (bit c%32 of word c/32 = x < 0, i.e. -1; channel padding bits
// 0), then for every output pixel (b, oh, ow) and tap (i, j) in (kh, kw) order the cw words of
// input pixel (oh*sh - ph + i*dh, ow*sw - pw + j*dw), or cw zero words (+1 signs) where that
// pixel is in the zero padding -- exactly kdengine.ops.binary.channel_words, whose callers
// subtract the border correction. NaN raises.
//
// Layout and traffic. Output int32 (B*OH*OW, kh*kw*cw), row-major. Pass 1 reads x once
// (channels_last: each pixel's C values are contiguous; NCHW: channel-major sweeps over
// contiguous pixel runs, OR-ing bits into the words) into a (B*H*W, cw) word buffer; pass 2
// copies cw-word runs into the rows (kh*kw*cw*4 bytes written per output pixel). Both passes go
// over ATen's threads. binary_im2col_words is pass 2 alone, for words a binary layer wrote packed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace {

#if defined(__x86_64__)
// One pixel's C contiguous fp32 values -> cw words, 8 signs per compare + movemask (AVX2).
__attribute__((target("avx2"))) bool pack_pixel_f32_avx2(const float* px, int64_t C, uint32_t* o) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 unord = zero;
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 v = _mm256_loadu_ps(px + c);
    unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    o[c >> 5] |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)))
                 << (c & 31);
  }
  bool bad = _mm256_movemask_ps(unord) != 0;
  for (; c < C; ++c) {
    const float v = px[c];
    bad |= (v != v);
    o[c >> 5] |= static_cast<uint32_t>(v < 0.0f) << (c & 31);
  }
  return bad;
}

bool has_avx2() { return kdengine::cpu_isa(kdengine::kBinary) >= kdengine::kIsaAvx2; }
#endif

template <typename scalar_t>
void pack_pixels(const at::Tensor& x, uint32_t* words, int64_t cw, std::atomic<bool>& nan) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sb = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t P = B * H * W;
  kdengine::parallel_for(0, P, std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1)),
                         [&](int64_t p0, int64_t p1) {
    bool bad = false;
    std::memset(words + p0 * cw, 0, sizeof(uint32_t) * (p1 - p0) * cw);
    if (sc == 1) {  // channels_last: the C values of a pixel are contiguous
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / (H * W), r = p % (H * W), h = r / W, w = r % W;
        const scalar_t* px = xp + b * sb + h * sh + w * sw;
        uint32_t* o = words + p * cw;
#if defined(__x86_64__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (has_avx2()) {
            bad |= pack_pixel_f32_avx2(px, C, o);
            continue;
          }
        }
#endif
        for (int64_t c = 0; c < C; ++c) {
          const float v = static_cast<float>(px[c]);
          bad |= (v != v);
          o[c >> 5] |= static_cast<uint32_t>(v < 0.0f) << (c & 31);
        }
      }
    } else {  // channel-major: for each channel, a run of pixels
      for (int64_t c = 0; c < C; ++c) {
        const uint32_t bit = uint32_t{1} << (c & 31);
        const int64_t word = c >> 5;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / (H * W), r = p % (H * W), h = r / W, w = r % W;
          const float v = static_cast<float>(xp[b * sb + c * sc + h * sh + w * sw]);
          bad |= (v != v);
          if (v < 0.0f) words[p * cw + word] |= bit;
        }
      }
    }
    if (bad) nan.store(true);
  });
}

// Pass 2: for every output pixel and tap (i, j), the cw words of the input pixel it reads, or cw
// zero words (+1 signs) in the zero padding; rows of kh*kw*cw words in (kh, kw, C) order.
void im2col_words(const uint32_t* wp, int64_t B, int64_t H, int64_t W, int64_t cw, int64_t kh,
                  int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                  int64_t OH, int64_t OW, uint32_t* op) {
  const int64_t row = kh * kw * cw, R = B * OH * OW;
  kdengine::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1)),
                         [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (OH * OW), q = r % (OH * OW), oh = q / OW, ow = q % OW;
      uint32_t* dst = op + r * row;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * sh - ph + i * dh;
        for (int64_t j = 0; j < kw; ++j, dst += cw) {
          const int64_t iw = ow * sw - pw + j * dw;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W)
            std::memset(dst, 0, sizeof(uint32_t) * cw);
          else
            std::memcpy(dst, wp + ((b * H + ih) * W + iw) * cw, sizeof(uint32_t) * cw);
        }
      }
    }
  });
}

void check_geometry(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    int64_t dh, int64_t dw) {
  TORCH_CHECK_VALUE(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 &&
                        pw >= 0,
                    "kernel, stride and dilation must be >= 1 and padding >= 0");
}

at::Tensor binary_conv_words(const at::Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                             int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.device().is_cpu() && x.is_floating_point(),
                    "x must be a 4-D floating CPU tensor (B, C, H, W), got ", x.sizes(), " ",
                    x.scalar_type());
  check_geometry(kh, kw, sh, sw, ph, pw, dh, dw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t cw = (C + 31) / 32;
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(C >= 1 && OH >= 1 && OW >= 1, "the kernel does not fit the input ", x.sizes());
  at::Tensor words = at::empty({B * H * W, cw}, x.options().dtype(at::kInt));
  uint32_t* wp = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  std::atomic<bool> nan{false};
  // With 8+ channels a channels_last copy (one transpose pass) makes each pixel's signs one
  // contiguous compare + movemask sweep; fewer channels are packed straight from NCHW.
  const at::Tensor xs = (x.stride(1) != 1 && C >= 8) ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "binary_conv_words",
                                  [&] { pack_pixels<scalar_t>(xs, wp, cw, nan); });
  TORCH_CHECK_VALUE(!nan.load(),
                    "x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits");
  at::Tensor out = at::empty({B * OH * OW, kh * kw * cw}, x.options().dtype(at::kInt));
  im2col_words(wp, B, H, W, cw, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW,
               reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
  return out;
}

// The im2col of words that are already packed per pixel (a binary layer's packed output):
// words int32 (B, H, W, cw), channel padding bits as they are -> (B*OH*OW, kh*kw*cw).
at::Tensor binary_im2col_words(const at::Tensor& words_in, int64_t kh, int64_t kw, int64_t sh,
                               int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK_VALUE(words_in.dim() == 4 && words_in.device().is_cpu() &&
                        words_in.scalar_type() == at::kInt,
                    "words must be a 4-D int32 CPU tensor (B, H, W, words per pixel), got ",
                    words_in.sizes(), " ", words_in.scalar_type());
  check_geometry(kh, kw, sh, sw, ph, pw, dh, dw);
  const at::Tensor words = words_in.contiguous();
  const int64_t B = words.size(0), H = words.size(1), W = words.size(2), cw = words.size(3);
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(cw >= 1 && OH >= 1 && OW >= 1, "the kernel does not fit the input ", words.sizes());
  at::Tensor out = at::empty({B * OH * OW, kh * kw * cw}, words.options());
  im2col_words(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), B, H, W, cw, kh, kw, sh,
               sw, ph, pw, dh, dw, OH, OW, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("binary_conv_words", &binary_conv_words);
  m.impl("binary_im2col_words", &binary_im2col_words);
}
