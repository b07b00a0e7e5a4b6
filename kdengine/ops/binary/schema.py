"""Schemas of the native binary kernels (``kdengine::binary_*``), defined once per process by
:mod:`kdengine._schemas`; ``csrc/binary/*.cpp`` (CPU) and ``xnor.cu`` (CUDA) only register kernels
for them. ``binary_conv_words`` has a CPU kernel only (the other backends build the words in
torch, :func:`kdengine.ops.binary.conv.channel_words`)."""

SCHEMAS = (
    "binary_pack_signs(Tensor x) -> Tensor",
    "binary_pack_bool(Tensor s) -> Tensor",
    "binary_gemm(Tensor a, Tensor b, int k, int mode) -> Tensor",
    "binary_linear(Tensor x, Tensor w, int k, Tensor? scale, Tensor? bias) -> Tensor",
    "binary_conv_words(Tensor x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw)"
    " -> Tensor",
)
