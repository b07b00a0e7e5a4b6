"""Packed inference layers and :func:`pack_model`: a trained binary model -> 1 bit per weight.

A :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d` stores

* ``weight_bits``: int32 ``(O, ceil(K / 32))``, the signs of the latent weights as produced by
  :func:`kdengine.ops.pack_signs` (bit 1 = -1, bit 0 = +1, padding bits 0); ``K = in_features``
  or ``C * kh * kw`` (the weight flattened as ``W.flatten(1)`` of ``(O, C, kh, kw)``). That is 32x
  fewer bytes than the fp32 weight (up to the padding of the last word);
* ``scale``: float32 ``(O,)``, the XNOR-Net scale ``mean|W|`` of each output channel;
* ``bias``: float32 ``(O,)`` or absent.

They are buffers (not parameters: nothing is trained any more), so ``state_dict``, ``.to()`` and
:mod:`kdengine.serialize` see them.

How each mode runs (``forward`` runs :meth:`inference_plan`, the same plan :mod:`kdengine.infer`
runs; :mod:`kdengine.nn.plan`):

* ``mode="both"`` (binary activations): the XNOR-popcount kernels. Linear: the backend's
  ``binary_linear`` kernel (what :func:`kdengine.ops.binary_linear` runs, argument checks done once
  per input signature). Conv: the input's sign bits packed along channels per pixel, an im2col of
  words (:func:`kdengine.ops.binary.channel_words`) and the XNOR GEMM, the weights repacked to the
  same word order and the zero-padding correction computed once per input shape
  (:class:`kdengine.nn.plan.ChannelWordConv`); equal to :func:`kdengine.ops.binary_conv2d` bit for
  bit, returned channels-last in memory. Padding after the sign contributes 0, as in the training
  layer. The epilogue is the training layer's arithmetic (exact integer dot -> float32,
  ``* scale``, ``+ bias``, two roundings), and the training layer's float convolution of +-1
  values is exact with the usual direct / GEMM algorithms, so outputs match the training model bit
  for bit in practice (the tests allow float rounding, in case a convolution algorithm is not
  exact). One difference: a NaN input raises ValueError here (a NaN has no sign bit), where the
  training layer propagates the NaN.
* ``mode="weights"`` (real activations, binary weights): the XNOR kernel does not apply, because the
  activations are not +-1. The layer unpacks its weights once into a float +-1 tensor (cached; it is
  rebuilt only if ``weight_bits`` changes, moves device or dtype) and runs a float matmul /
  convolution followed by ``* scale + bias``: the same float operations as the training layer, so
  outputs match it bit for bit. The packed form is what is stored and shipped (32x smaller); the
  run-time copy is float, so in this mode the *memory at run time* is not reduced.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine import _dispatch
from kdengine.nn.binary import (
    BinaryConv2d,
    BinaryLinear,
    _check_groups,
    _check_mode,
    Pair,
    _conv_repr,
    _init_conv,
    _init_linear,
    _linear_repr,
    channel_scale,
)
from kdengine.nn.plan import (
    LayerPlan,
    PlannedModule,
    compute_dtype,
    inference_only,
    nbytes,
    resolve_backend,
)
from kdengine.ops.binary import ConvGeometry, ConvPlan, PackedSigns, SignThresholds, pack_signs, sign_thresholds
from kdengine.ops.binary.conv import check_conv_input, conv_geometry
from kdengine.ops.binary.threshold import threshold_table

__all__ = [
    "PackedBinaryLinear",
    "PackedBinaryConv2d",
    "pack_model",
    "state_nbytes",
    "n_words",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Backends whose binary conv is the channel-word GEMM (the reference convolves floats instead).
GEMM_CONV_BACKENDS = ("cpu", "triton", "cuda")
# The popcount counts are int32: the conv GEMM's K must stay below 2^31.
K_LIMIT = 2**31


def n_words(k: int) -> int:
    """Number of int32 words holding ``k`` sign bits."""
    return (int(k) + 31) // 32


def _vec(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.detach().to(dtype).contiguous()


def _check_float_input(m: nn.Module, x: object) -> Union[Tensor, PackedSigns]:
    if isinstance(x, PackedSigns):
        if getattr(m, "mode", None) != "both" or x.spikes:
            raise ValueError(
                f"{type(m).__name__} takes packed signs only in mode='both' (its input is binarized), "
                f"got a packed {'spikes' if x.spikes else 'signs'} input in mode={getattr(m, 'mode', None)!r}"
            )
    elif not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    elif x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"input of {type(m).__name__} must be floating, got dtype {x.dtype}")
    if x.device != m.weight_bits.device:
        raise ValueError(f"weight is on {m.weight_bits.device} but x on {x.device}; expected one device")
    return x


class PackedLayerBase(PlannedModule):
    """Buffers, the cached unpacked weight and the plan cache shared by the packed binary layers
    and the spiking binary layers (:mod:`kdengine.snn.binary`): ``weight_bits`` int32
    ``(O, ceil(K / 32))`` (:func:`kdengine.ops.pack_signs` of the weight flattened to ``(O, K)``),
    ``scale`` float32 ``(O,)``, ``bias`` float32 ``(O,)`` or None, ``backend`` (None: auto)."""

    def _init_buffers(self, out: int, k: int, bias: bool, device) -> None:
        self.k = int(k)
        self.register_buffer("weight_bits", torch.zeros(out, n_words(k), dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out, dtype=torch.float32, device=device))
        else:
            self.bias = None
        self.backend: Optional[str] = None
        self._dense_cache: Optional[tuple[Tensor, int, Tensor]] = None

    @torch.no_grad()
    def _copy_weights(self, sign_weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> None:
        """Pack ``sign_weight`` (its signs; ``(O, ...)``) into ``weight_bits``; copy the scale
        and the bias (as float32)."""
        self.weight_bits.copy_(pack_signs(sign_weight.detach().flatten(1)).bits)
        self.scale.copy_(scale.detach().to(torch.float32))
        if bias is not None:
            self.bias.copy_(bias.detach().to(torch.float32))

    @classmethod
    @torch.no_grad()
    def _from_trained(cls, layer: nn.Module, trained: type, sizes: tuple[str, ...],
                      keywords: tuple[str, ...] = ()):
        """The packed layer of a trained binary layer of type ``trained``: its sizes (the
        attributes ``sizes``, and ``keywords`` passed by name), bias and mode; the signs of its
        latent weights and its scale."""
        if not isinstance(layer, trained):
            raise TypeError(f"layer must be a {trained.__name__}, got {type(layer).__name__}")
        w = layer.weight.detach()
        out = cls(*(getattr(layer, n) for n in sizes), layer.bias is not None, layer.mode, w.device,
                  **{n: getattr(layer, n) for n in keywords})
        # The scale is computed by the same expression as in training, so it is the same float.
        out._copy_weights(w, channel_scale(w), layer.bias)
        return out

    @property
    def packed_weight(self) -> PackedSigns:
        """The weights as :class:`kdengine.ops.PackedSigns` (logical shape ``(O, K)``)."""
        return PackedSigns(self.weight_bits, self.k)

    def sign_weight(self) -> Tensor:
        """The +-1 weights float32, in the layer's weight shape (unpacked)."""
        return self.packed_weight.unpack(torch.float32).view(self.weight_shape)

    def _dense_pm1(self, dtype: torch.dtype) -> Tensor:
        """Unpacked +-1 weights ``(O, K)`` in ``dtype``, cached until the bits change."""
        bits = self.weight_bits
        c = self._dense_cache
        # The cache holds the bits tensor itself (identity + in-place version counter), so a
        # replaced, reloaded or moved buffer is always noticed.
        if c is None or c[0] is not bits or c[1] != bits._version or c[2].dtype != dtype:
            with torch.no_grad():
                dense = self.packed_weight.unpack(dtype)
            self._dense_cache = (bits, bits._version, dense)
            c = self._dense_cache
        return c[2]

    def prepare(self) -> "PackedLayerBase":
        """Build the run-time form now (``mode="weights"``: the unpacked +-1 weights)."""
        if getattr(self, "mode", None) == "weights":
            self._dense_pm1(torch.float32)
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self._dense_cache = None

    def forward(self, x):
        return self._forward_plan(x).run(x)

    def _backend_epilogue(self, op: str, x) -> tuple[str, Optional[Tensor], Optional[Tensor], torch.dtype]:
        """Shared plan set-up of the XNOR paths: the backend of ``op``, the padding-bit check,
        the scale and bias in the compute dtype, and the output's float dtype for ``x``."""
        backend = resolve_backend(op, x.device, self.backend)
        self.packed_weight  # noqa: B018 - checks the padding bits once
        out_dtype = x.dtype if isinstance(x, Tensor) else torch.float32
        ct = compute_dtype(out_dtype)
        return backend, _vec(self.scale, ct), _vec(self.bias, ct), out_dtype

    def _thresholds(self, sc: Optional[Tensor], bi: Optional[Tensor], out_dtype: torch.dtype,
                    post: Optional[Callable[[Tensor], Tensor]]) -> SignThresholds:
        """Per output channel, the count thresholds of ``sign(post(count * scale + bias))``."""
        return sign_thresholds(sc, bi, self.k, channels=self.weight_bits.shape[0],
                               compute_dtype=compute_dtype(out_dtype), out_dtype=out_dtype, post=post,
                               device=self.weight_bits.device)


class PackedBinaryLinear(PackedLayerBase):
    """Inference linear layer with 1-bit weights: ``y = (a @ sign(W)^T) * scale + bias``.

    ``a = sign(x)`` via the XNOR-popcount kernel (``mode="both"``) or ``a = x`` with a float matmul
    on the cached unpacked weights (``mode="weights"``). ``x``: ``(..., in_features)`` floating;
    ``y``: ``(..., out_features)`` float32 (``mode="both"``) or ``x``'s dtype (``"weights"``).
    ``forward`` runs :meth:`inference_plan`. With ``packed_output = True`` (``mode="both"``) it
    returns the signs of ``y`` packed instead, and it takes packed signs as ``x`` too.
    """

    packed_output: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "weights",
                 device=None) -> None:
        super().__init__()
        _init_linear(self, in_features, out_features)
        self.mode = _check_mode(mode)
        self._init_buffers(self.out_features, self.in_features, bias, device)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_binary(cls, layer: BinaryLinear) -> "PackedBinaryLinear":
        """Pack a trained :class:`BinaryLinear` (its latent weights' signs, scale and bias)."""
        return cls._from_trained(layer, BinaryLinear, ("in_features", "out_features"))

    def inference_plan(self, x: Union[Tensor, PackedSigns], *, out_buffer: bool = False,
                       packed_output: Optional[bool] = None, post: Optional[Callable[[Tensor], Tensor]] = None,
                       out_dtype: Optional[torch.dtype] = None) -> LayerPlan:
        """The forward for ``x``'s signature (:mod:`kdengine.nn.plan`).

        ``x``: floats ``(..., in_features)``, or (``mode="both"``) packed signs of that logical
        shape. ``packed_output`` (default: the attribute ``self.packed_output``): return the
        output's signs packed (:class:`PackedSigns` ``(..., out_features)``), thresholded from the
        counts with the float ops ``post`` (per-feature monotone, e.g. a batch norm) folded in.
        ``out_dtype``: the float dtype the output would have (default x's; float32 for packed x).
        """
        x = _check_float_input(self, x)
        if len(x.shape) < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        k, n = self.in_features, self.out_features
        lead = tuple(x.shape[:-1])
        packed_output = self.packed_output if packed_output is None else packed_output
        if self.mode == "both" and (packed_output or isinstance(x, PackedSigns)):
            return self._packed_plan(x, lead, bool(packed_output), post, out_dtype)
        if packed_output:
            raise ValueError("packed_output needs mode='both' (the layer's input is binarized)")
        if self.mode == "both":
            impl = _dispatch.implementation("binary_linear", resolve_backend("binary_linear", x.device, self.backend))
            self.packed_weight  # noqa: B018 - checks the padding bits once
            bits = self.weight_bits.contiguous()
            ct = compute_dtype(x.dtype)
            sc, bi = _vec(self.scale, ct), _vec(self.bias, ct)
            name = type(self).__name__
            if x.numel() == 0:
                run = lambda x: torch.zeros((*lead, n), dtype=x.dtype, device=x.device)  # noqa: E731
            elif x.dim() == 2:

                def run(x: Tensor) -> Tensor:
                    return impl(x if x.is_contiguous() else x.contiguous(), bits, k, sc, bi)
            else:

                def run(x: Tensor) -> Tensor:
                    return impl(x.reshape(-1, k).contiguous(), bits, k, sc, bi).reshape(*lead, n)

            return LayerPlan(inference_only(run, name), (*lead, n), "binary linear, xnor-popcount kernel")
        # mode "weights": float matmul on the unpacked +-1 weights, then * scale (+ bias) in place
        dense = self._dense_pm1(x.dtype)
        scale, bias = self.scale.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        if out_buffer and x.dim() == 2:
            # F.linear without bias is mm(x, W^T): the same kernel, into a buffer the plan keeps
            dense_t = dense.t()
            buf = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)

            def run(x: Tensor) -> Tensor:
                y = torch.mm(x, dense_t, out=buf).mul_(scale)
                return y if bias is None else y.add_(bias)

            return LayerPlan(run, (*lead, n), "binary-weight linear (unpacked +-1, out= buffer)",
                             prealloc_bytes=nbytes(buf))

        def run(x: Tensor) -> Tensor:
            y = F.linear(x, dense).mul_(scale)
            return y if bias is None else y.add_(bias)

        return LayerPlan(run, (*lead, n), "binary-weight linear (unpacked +-1)")

    def _packed_plan(self, x: Union[Tensor, PackedSigns], lead: tuple[int, ...], packed_output: bool,
                     post: Optional[Callable[[Tensor], Tensor]], out_dtype: Optional[torch.dtype]) -> LayerPlan:
        """Packed input and/or output: XNOR GEMM on words, then the float epilogue or thresholds."""
        backend, _, _, odt = self._backend_epilogue("binary_linear", x)
        odt = out_dtype or odt
        ct = compute_dtype(odt)
        sc, bi = _vec(self.scale, ct), _vec(self.bias, ct)
        k, n, bits = self.in_features, self.out_features, self.weight_bits.contiguous()
        pack = _dispatch.implementation("binary_pack", backend)

        def words(x: Union[Tensor, PackedSigns]) -> Tensor:
            if isinstance(x, PackedSigns):
                return x.bits.reshape(-1, x.bits.shape[-1]).contiguous()
            return pack(x.reshape(-1, k).contiguous(), False)

        empty = any(d == 0 for d in lead)
        if packed_output:
            table, flip = threshold_table(self._thresholds(sc, bi, odt, post))
            signs = _dispatch.implementation("xnor_signs", backend)
            nw = n_words(n)

            def run(x):
                if empty:
                    return PackedSigns._trusted(torch.zeros((*lead, nw), dtype=torch.int32, device=x.device), n)
                return PackedSigns._trusted(signs(words(x), bits, k, table, flip).reshape(*lead, nw), n)

            kind = "binary linear, xnor GEMM thresholded to packed signs"
        else:
            gemm = _dispatch.implementation("xnor_matmul", backend)

            def run(x):
                if empty:
                    return torch.zeros((*lead, n), dtype=odt, device=x.device)
                y = gemm(words(x), bits, k).to(ct)
                if sc is not None:
                    y.mul_(sc)
                if bi is not None:
                    y.add_(bi)
                return y.to(odt).reshape(*lead, n)

            kind = "binary linear, xnor GEMM on packed input"
        if isinstance(x, Tensor):
            run = inference_only(run, type(self).__name__)
        return LayerPlan(run, (*lead, n), kind)

    def extra_repr(self) -> str:
        return f"{_linear_repr(self)}, mode={self.mode!r}"


class PackedBinaryConv2d(PackedLayerBase):
    """Inference 2-d convolution with 1-bit weights (zero padding, optional groups).

    ``y = conv2d(a, sign(W), groups) * scale[o] + bias[o]``; ``a = sign(x)`` on the channel-word
    XNOR GEMM (``mode="both"``; padded positions contribute 0; the result is channels-last in
    memory, a permuted view of the GEMM output), or ``a = x`` with ``F.conv2d`` on the cached
    unpacked weights (``mode="weights"``). ``x``: ``(N, C, H, W)``, or in ``mode="both"`` packed
    channel words (:func:`kdengine.ops.binary.pack_channels`; a previous binary layer's packed
    output). With ``packed_output = True`` the output's signs come back as channel words
    (:class:`PackedSigns` ``(N, OH, OW, O)``), thresholded from the integer counts.
    ``forward`` runs :meth:`inference_plan`.
    """

    packed_output: bool = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair = 1,
                 padding: Pair = 0, dilation: Pair = 1, bias: bool = False, mode: str = "weights",
                 device=None, groups: int = 1) -> None:
        super().__init__()
        _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.groups = _check_groups(groups, self.in_channels, self.out_channels)
        self.mode = _check_mode(mode)
        k = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(self.out_channels, k, bias, device)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_binary(cls, layer: BinaryConv2d) -> "PackedBinaryConv2d":
        """Pack a trained :class:`BinaryConv2d` (signs of ``W.flatten(1)``, scale, bias, groups)."""
        return cls._from_trained(layer, BinaryConv2d, ("in_channels", "out_channels", "kernel_size",
                                                       "stride", "padding", "dilation"), ("groups",))

    def geometry(self, x: Union[Tensor, PackedSigns]) -> ConvGeometry:
        """The :class:`kdengine.ops.binary.ConvGeometry` of ``x`` (``(N, C, H, W)``, or packed
        channel words of logical shape ``(N, H, W, C)``), checked."""
        if isinstance(x, PackedSigns):
            x, shape = check_conv_input(x)
        elif x.dim() == 4:
            shape = tuple(x.shape)
        else:
            shape = ()
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if min(shape[2:]) < 1:
            raise ValueError(
                f"the kernel (size {self.kernel_size}, dilation {self.dilation}) does not fit the "
                f"input {tuple(shape[2:])} + padding {self.padding}"
            )
        return conv_geometry(shape, self.out_channels, self.k, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups)

    def inference_plan(self, x: Union[Tensor, PackedSigns], *, out_buffer: bool = False,
                       packed_output: Optional[bool] = None, post: Optional[Callable[[Tensor], Tensor]] = None,
                       out_dtype: Optional[torch.dtype] = None) -> LayerPlan:
        """The forward for ``x``'s signature (:mod:`kdengine.nn.plan`).

        ``packed_output`` (default: the attribute ``self.packed_output``; ``mode="both"`` only):
        channel words of ``sign(post(y))`` instead of ``y``; ``post``: per-channel monotone float
        ops on ``(L, O)`` values (a folded batch norm, a hardtanh) evaluated into the thresholds.
        ``out_dtype``: the float dtype ``y`` would have (default x's; float32 for packed x).
        """
        x = _check_float_input(self, x)
        geo = self.geometry(x)
        o, (oh, ow), b = self.out_channels, geo.out_hw, geo.batch
        out_shape = (b, o, oh, ow)
        packed_output = bool(self.packed_output if packed_output is None else packed_output)
        if self.mode == "weights":
            if packed_output:
                raise ValueError("packed_output needs mode='both' (the layer's input is binarized)")
            w = self._dense_pm1(x.dtype).view(self.weight_shape)
            scale = self.scale.to(x.dtype).view(1, -1, 1, 1)
            bias = None if self.bias is None else self.bias.to(x.dtype).view(1, -1, 1, 1)
            stride, padding, dilation, groups = self.stride, self.padding, self.dilation, self.groups

            def run(x: Tensor) -> Tensor:
                y = F.conv2d(x, w, None, stride, padding, dilation, groups).mul_(scale)
                return y if bias is None else y.add_(bias)

            return LayerPlan(run, out_shape, "binary-weight conv (unpacked +-1)")
        backend, _, _, odt = self._backend_epilogue("binary_conv2d", x)
        odt = out_dtype or odt
        ct = compute_dtype(odt)
        sc, bi = _vec(self.scale, ct), _vec(self.bias, ct)
        th = self._thresholds(sc, bi, odt, post) if packed_output else None
        bits = self.weight_bits.contiguous()
        name = type(self).__name__
        if b == 0:
            if packed_output:
                empty = torch.zeros((0, oh, ow, n_words(o)), dtype=torch.int32, device=x.device)
                return LayerPlan(lambda x: PackedSigns._trusted(empty, o), (0, oh, ow, o), "empty batch")
            return LayerPlan(lambda x: torch.zeros(out_shape, dtype=odt, device=x.device), out_shape,
                             "empty batch")
        pre = 0
        if backend not in GEMM_CONV_BACKENDS:  # the reference convolves floats
            if packed_output:
                impl = _dispatch.implementation("binary_conv2d_signs", backend)
                run = lambda x: PackedSigns._trusted(impl(x, bits, geo, th), o)  # noqa: E731
            else:
                impl = _dispatch.implementation("binary_conv2d", backend)
                run = lambda x: impl(x, bits, geo, sc, bi)  # noqa: E731
            kind = f"binary conv ({backend} kernel)" + (", thresholded to packed channel words"
                                                         if packed_output else "")
        else:
            # Weight repacking and border correction once. A float output is handed on as a
            # channels-last view (no transpose copy): the pooling / BN that follow run faster on
            # it, and the next binary conv packs each pixel's channels from contiguous memory.
            plan = ConvPlan(bits, geo, backend)
            pre = plan.nbytes
            if packed_output:
                table, flip = plan.signs_table(th)
                pre += nbytes(table)
                run = lambda x: PackedSigns._trusted(plan.run_signs(x, table, flip), o)  # noqa: E731
                kind = "binary conv, xnor-popcount GEMM thresholded to packed channel words"
            else:
                run = lambda x: plan.run(x, sc, bi, channels_last_out=True, out_dtype=odt)  # noqa: E731
                kind = "binary conv, xnor-popcount GEMM (weights repacked once)"
        if isinstance(x, PackedSigns):
            kind += ", packed input"
        if isinstance(x, Tensor):
            run = inference_only(run, name)
        return LayerPlan(run, (b, oh, ow, o) if packed_output else out_shape, kind, precomputed_bytes=pre)

    def extra_repr(self) -> str:
        return f"{_conv_repr(self)}, mode={self.mode!r}"


def pack_model(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """An inference copy of ``model`` whose binary layers hold packed weights.

    Every :class:`BinaryLinear` / :class:`BinaryConv2d` becomes a :class:`PackedBinaryLinear` /
    :class:`PackedBinaryConv2d`; every other module (full-precision first/last layers, ReLU,
    pooling, dropout, flatten, batch norm...) is deep-copied as it is. The result is in eval mode
    with ``requires_grad=False`` everywhere; ``model`` is not modified. ``backend`` is passed to
    the packed ops (``None``: the dispatcher's default).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (BinaryLinear, BinaryConv2d)):
        packed = _pack_layer(model)
        packed.backend = backend
        return packed.eval().prepare()
    out = copy.deepcopy(model)
    targets = [n for n, m in out.named_modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]
    for name in targets:
        layer = out.get_submodule(name)
        packed = _pack_layer(layer)
        packed.backend = backend
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, packed.prepare())
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _pack_layer(layer: nn.Module) -> nn.Module:
    if isinstance(layer, BinaryLinear):
        return PackedBinaryLinear.from_binary(layer)
    return PackedBinaryConv2d.from_binary(layer)


def state_nbytes(model: nn.Module) -> int:
    """Bytes of everything in ``model.state_dict()`` (parameters and persistent buffers)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel())
        if key in seen and t.numel() > 0:
            continue  # shared (tied) tensors count once
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
