"""Binary ops: packed sign bits, XNOR / AND popcount matmuls, binary linear and conv2d (grouped,
packed in and out), output thresholding to packed bits, max-pool on packed channel words.

``op`` holds the packed container and the matmul/linear entry points, ``conv`` binary conv2d,
``threshold`` the count -> packed-bit thresholds, ``pool`` the max-pool on words,
``reference`` the float64 specification, ``triton_kernel`` the Triton kernels and ``backends`` the
per-backend registrations (C++ kernels: ``kdengine/csrc/binary/``).
"""
from kdengine.ops.binary.op import (  # noqa: F401  (re-exported)
    FLOAT_DTYPES,
    K_LIMIT,
    PackedSigns,
    binary_linear,
    check_k_limit,
    pack_signs,
    pack_spikes,
    spike_matmul,
    xnor_matmul,
)
from kdengine.ops.binary.conv import (  # noqa: F401  (re-exported)
    _PLANS,
    ConvGeometry,
    ConvPlan,
    binary_conv2d,
    border_correction,
    channel_words,
    conv_plan,
    conv_via_gemm,
    im2col_words,
    weight_channel_words,
)
from kdengine.ops.binary.threshold import (  # noqa: F401  (re-exported)
    SignThresholds,
    sign_thresholds,
    threshold_pack,
    xnor_matmul_signs,
)
from kdengine.ops.binary.pool import (  # noqa: F401  (re-exported)
    binary_max_pool2d,
    pack_channels,
    unpack_channels,
)
from kdengine.ops.binary import backends as _backends  # noqa: F401  (registers every backend)

__all__ = [
    "PackedSigns",
    "pack_signs",
    "pack_spikes",
    "xnor_matmul",
    "spike_matmul",
    "binary_linear",
    "binary_conv2d",
    "binary_max_pool2d",
    "pack_channels",
    "unpack_channels",
    "SignThresholds",
    "sign_thresholds",
    "threshold_pack",
    "xnor_matmul_signs",
]
