"""Registers the implementations of every backend of the binary ops (see the contract in
:mod:`kdengine.ops.binary.op`)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine.ops.binary import reference as ref
from kdengine.ops.binary.conv import ConvGeometry, conv_via_gemm
from kdengine.ops.binary.op import _cpu_ops


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


@_dispatch.register("binary_conv2d", "reference")
def _conv_reference(x, w, geo: ConvGeometry, scale, bias):
    return ref.binary_conv2d_reference(
        x, w, geo.kernel, scale, bias, geo.stride, geo.padding, geo.dilation
    )


# cpu: the C++ kernels of csrc/binary/ (AVX2 where the CPU has it, else POPCNT/portable)


@_dispatch.register("binary_pack", "cpu", native_ops=("binary_pack_signs", "binary_pack_bool"))
def _pack_cpu(x: Tensor, spikes: bool) -> Tensor:
    ops = _cpu_ops()
    return ops.binary_pack_bool(x) if spikes else ops.binary_pack_signs(x)


@_dispatch.register("binary_linear", "cpu", native_ops=("binary_linear",))
def _linear_cpu(x, w, k, scale, bias):
    return _cpu_ops().binary_linear(x, w, k, scale, bias)


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
