"""Registers the implementations of every backend of the binary ops (see the contract in
:mod:`kdengine.ops.binary.op`)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine.ops.binary import reference as ref
from kdengine.ops.binary.conv import ConvGeometry, _act_dtype, conv_signs_via_gemm, conv_via_gemm
from kdengine.ops.binary.op import PackedSigns, _cpu_ops
from kdengine.ops.binary.threshold import SignThresholds, threshold_pack_reference


@_dispatch.register("binary_pack", "reference")
def _pack_reference(x: Tensor, spikes: bool) -> Tensor:
    return ref.pack_bool_reference(x) if spikes else ref.pack_signs_reference(x)


@_dispatch.register("xnor_matmul", "reference")
def _xnor_reference(a: Tensor, b: Tensor, k: int) -> Tensor:
    return ref.xnor_matmul_reference(a, b, k)


@_dispatch.register("spike_matmul", "reference")
def _spike_reference(s: Tensor, w: Tensor, k: int) -> Tensor:
    return ref.spike_matmul_reference(s, w, k)


@_dispatch.register("binary_linear", "reference")
def _linear_reference(x, w, k, scale, bias):
    return ref.binary_linear_reference(x, w, k, scale, bias)


def _float_input(x, out_dtype: torch.dtype) -> Tensor:
    """The reference convolves floats: packed channel words become their +-1 values."""
    return x.unpack(out_dtype).permute(0, 3, 1, 2) if isinstance(x, PackedSigns) else x


@_dispatch.register("binary_conv2d", "reference")
def _conv_reference(x, w, geo: ConvGeometry, scale, bias):
    out_dtype = _act_dtype(x, scale, bias)
    return ref.binary_conv2d_reference(
        _float_input(x, out_dtype), w, geo.kernel, scale, bias, geo.stride, geo.padding, geo.dilation,
        geo.groups, out_dtype,
    )


@_dispatch.register("binary_conv2d_signs", "reference")
def _conv_signs_reference(x, w, geo: ConvGeometry, th: SignThresholds):
    dot = ref.binary_conv2d_dot(_float_input(x, torch.float64), w, geo.kernel, geo.stride, geo.padding,
                                geo.dilation, geo.groups)
    return ref.pack_bool_reference(th.bits_of(dot.permute(0, 2, 3, 1).to(torch.int64)))


@_dispatch.register("binary_threshold_pack", "reference")
def _threshold_reference(counts, table, flip):
    return threshold_pack_reference(counts, table, flip)


@_dispatch.register("xnor_signs", "reference")
def _xnor_signs_reference(a, b, k, table, flip):
    return threshold_pack_reference(ref.xnor_matmul_reference(a, b, k), table, flip)


@_dispatch.register("xnor_grouped_matmul", "reference")
def _grouped_reference(a, b, k, groups):
    return ref.xnor_grouped_matmul_reference(a, b, k, groups)


@_dispatch.register("binary_max_pool2d", "reference")
def _maxpool_reference(bits, k, spikes, kernel, stride, padding, dilation):
    return ref.binary_max_pool2d_reference(bits, k, spikes, kernel, stride, padding, dilation)


def per_group(gemm: Callable, a: Tensor, b: Tensor, k: int, groups: int) -> Tensor:
    """A grouped XNOR GEMM as one ``gemm(a_i, b_i, k)`` per group, side by side: ``(M, g*Ng)``."""
    m, ng = a.shape[0] // groups, b.shape[0] // groups
    return torch.cat([gemm(a[i * m:(i + 1) * m], b[i * ng:(i + 1) * ng], k) for i in range(groups)], dim=1)


# cpu: the C++ kernels of csrc/binary/ (AVX2 where the CPU has it, else POPCNT/portable)


@_dispatch.register("binary_pack", "cpu", native_ops=("binary_pack_signs", "binary_pack_bool"))
def _pack_cpu(x: Tensor, spikes: bool) -> Tensor:
    ops = _cpu_ops()
    return ops.binary_pack_bool(x) if spikes else ops.binary_pack_signs(x)


@_dispatch.register("binary_linear", "cpu", native_ops=("binary_linear",))
def _linear_cpu(x, w, k, scale, bias):
    return _cpu_ops().binary_linear(x, w, k, scale, bias)


@_dispatch.register("binary_threshold_pack", "cpu", native_ops=("binary_threshold_pack",))
def _threshold_cpu(counts, table, flip):
    return _cpu_ops().binary_threshold_pack(counts, table, flip)


@_dispatch.register("xnor_signs", "cpu", native_ops=("binary_gemm_signs",))
def _xnor_signs_cpu(a, b, k, table, flip):
    return _cpu_ops().binary_gemm_signs(a, b, k, table, flip)


# Groups with at least this many output channels and words per row take the optimized GEMM once
# per group; smaller (depthwise-like) groups the one-pass grouped kernel (csrc/binary/grouped.cpp).
GROUP_GEMM_MIN_ROWS = 32
GROUP_GEMM_MIN_WORDS = 4


@_dispatch.register("xnor_grouped_matmul", "cpu", native_ops=("binary_grouped_gemm", "binary_gemm"))
def _grouped_cpu(a, b, k, groups):
    ops = _cpu_ops()
    if b.shape[0] // groups >= GROUP_GEMM_MIN_ROWS and a.shape[1] >= GROUP_GEMM_MIN_WORDS:
        return per_group(lambda a, b, k: ops.binary_gemm(a, b, k, 0), a, b, k, groups)
    return ops.binary_grouped_gemm(a, b, k, groups)


@_dispatch.register("binary_max_pool2d", "cpu", native_ops=("binary_maxpool_words",))
def _maxpool_cpu(bits, k, spikes, kernel, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return _cpu_ops().binary_maxpool_words(bits, k, kh, kw, sh, sw, ph, pw, dh, dw, spikes)


# triton: triton_kernel.py (SWAR popcount, runs in the interpreter too)


def _triton():
    from kdengine.ops.binary import triton_kernel as kb

    return kb


@_dispatch.register("binary_pack", "triton")
def _pack_triton(x: Tensor, spikes: bool) -> Tensor:
    if not spikes and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits")
    return _triton().pack_triton(x, spikes)


@_dispatch.register("xnor_matmul", "triton")
def _xnor_triton(a: Tensor, b: Tensor, k: int) -> Tensor:
    return _triton().gemm_triton(a, b, k, spike=False)


@_dispatch.register("spike_matmul", "triton")
def _spike_triton(s: Tensor, w: Tensor, k: int) -> Tensor:
    return _triton().gemm_triton(s, w, k, spike=True)


@_dispatch.register("binary_linear", "triton")
def _linear_triton(x, w, k, scale, bias):
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be binarized")
    return _triton().linear_triton(x, w, k, scale, bias)


_dispatch.register("binary_conv2d", "triton")(partial(conv_via_gemm, backend="triton"))
_dispatch.register("binary_conv2d_signs", "triton")(partial(conv_signs_via_gemm, backend="triton"))


@_dispatch.register("binary_threshold_pack", "triton")
def _threshold_triton(counts, table, flip):
    return _triton().threshold_triton(counts, table, flip)


@_dispatch.register("xnor_signs", "triton")
def _xnor_signs_triton(a, b, k, table, flip):
    return _triton().threshold_triton(_triton().gemm_triton(a, b, k, spike=False), table, flip)


@_dispatch.register("xnor_grouped_matmul", "triton")
def _grouped_triton(a, b, k, groups):
    return per_group(partial(_triton().gemm_triton, spike=False), a, b, k, groups)


@_dispatch.register("binary_max_pool2d", "triton")
def _maxpool_triton(bits, k, spikes, kernel, stride, padding, dilation):
    return _triton().maxpool_triton(bits, k, spikes, kernel, stride, padding, dilation)


# cuda: csrc/binary/xnor.cu (__popc)


def _cuda_ops():
    from kdengine import _native

    return _native.ops("cuda")


@_dispatch.register("binary_pack", "cuda", native_ops=("binary_pack_signs", "binary_pack_bool"))
def _pack_cuda(x: Tensor, spikes: bool) -> Tensor:
    if spikes:
        return _cuda_ops().binary_pack_bool(x)
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits")
    return _cuda_ops().binary_pack_signs(x)


@_dispatch.register("binary_linear", "cuda", native_ops=("binary_linear",))
def _linear_cuda(x, w, k, scale, bias):
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be binarized")
    return _cuda_ops().binary_linear(x, w, k, scale, bias)


# cpu and cuda alike: both matmuls are the one binary_gemm kernel (its last argument picks AND
# with spikes over XNOR), and conv2d is pack + that GEMM.


def _native_gemm(ops: Callable, spike: int) -> Callable:
    def gemm(a: Tensor, b: Tensor, k: int) -> Tensor:
        return ops().binary_gemm(a, b, k, spike)

    return gemm


for _backend, _ops in (("cpu", _cpu_ops), ("cuda", _cuda_ops)):
    for _op, _spike in (("xnor_matmul", 0), ("spike_matmul", 1)):
        _dispatch.register(_op, _backend, native_ops=("binary_gemm",))(_native_gemm(_ops, _spike))
    _dispatch.register("binary_conv2d", _backend, native_ops=("binary_gemm",))(
        partial(conv_via_gemm, backend=_backend)
    )
    _dispatch.register("binary_conv2d_signs", _backend, native_ops=("binary_gemm",))(
        partial(conv_signs_via_gemm, backend=_backend)
    )


# cuda: the thresholding and the grouped GEMM are torch around the cuda GEMM (no kernels of their own)
@_dispatch.register("xnor_signs", "cuda", native_ops=("binary_gemm",))
def _xnor_signs_cuda(a, b, k, table, flip):
    return threshold_pack_reference(_cuda_ops().binary_gemm(a, b, k, 0), table, flip)


@_dispatch.register("binary_threshold_pack", "cuda")
def _threshold_cuda(counts, table, flip):
    return threshold_pack_reference(counts, table, flip)


@_dispatch.register("xnor_grouped_matmul", "cuda", native_ops=("binary_gemm",))
def _grouped_cuda(a, b, k, groups):
    return per_group(lambda a, b, k: _cuda_ops().binary_gemm(a, b, k, 0), a, b, k, groups)
