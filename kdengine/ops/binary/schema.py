"""Schemas of the native binary kernels (``kdengine::binary_*``), defined once per process by
:mod:`kdengine._schemas`; ``csrc/binary/*.cpp`` (CPU) and ``xnor.cu`` (CUDA) only register kernels
for them. ``binary_conv_words``, ``binary_im2col_words``, ``binary_threshold_pack``,
``binary_gemm_signs``, ``binary_maxpool_words`` and ``binary_grouped_gemm`` have CPU kernels only
(the other backends do that work in torch or Triton)."""

SCHEMAS = (
    "binary_pack_signs(Tensor x) -> Tensor",
    "binary_pack_bool(Tensor s) -> Tensor",
    "binary_gemm(Tensor a, Tensor b, int k, int mode) -> Tensor",
    "binary_linear(Tensor x, Tensor w, int k, Tensor? scale, Tensor? bias) -> Tensor",
    "binary_conv_words(Tensor x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw)"
    " -> Tensor",
    "binary_im2col_words(Tensor words, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw)"
    " -> Tensor",
    "binary_threshold_pack(Tensor counts, Tensor thresholds, Tensor flip) -> Tensor",
    "binary_gemm_signs(Tensor a, Tensor b, int k, Tensor thresholds, Tensor flip) -> Tensor",
    "binary_maxpool_words(Tensor words, int k, int kh, int kw, int sh, int sw, int ph, int pw, int dh,"
    " int dw, bool use_or) -> Tensor",
    "binary_grouped_gemm(Tensor a, Tensor b, int k, int groups) -> Tensor",
)
