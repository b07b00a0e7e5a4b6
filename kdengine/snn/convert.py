"""ANN -> SNN conversion (Lu & Sengupta 2020, docs/papers.md section 3; Diehl 2015, Rueckauer 2017).

``convert(model, calibration_data, percentile=99.9, ...)`` turns a ReLU network (float, or with
binary weights from :mod:`kdengine.nn`) into a :class:`SpikingNetwork` of integrate-and-fire
neurons that runs on ``(T, B, ...)`` tensors:

1. **Parse.** ``model`` must be an ``nn.Sequential`` (nested ones are flattened) of: ``nn.Conv2d``,
   ``nn.Linear``, :class:`~kdengine.nn.BinaryConv2d` / :class:`~kdengine.nn.BinaryLinear`
   (``mode="weights"``), :class:`~kdengine.nn.PackedBinaryConv2d` /
   :class:`~kdengine.nn.PackedBinaryLinear` (``mode="weights"``), ``nn.BatchNorm1d/2d``,
   ``nn.ReLU``, ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``, ``nn.MaxPool2d``, ``nn.Flatten``,
   ``nn.Dropout*`` and ``nn.Identity`` (the last two are dropped: inference). Anything else is a
   ValueError naming the layer. ``mode="both"`` binary layers are rejected: their nonlinearity is
   ``sign``, not a ReLU, so rate coding does not apply.
2. **Fold BatchNorm** (eval statistics) into the preceding conv/linear, through any pooling in
   between (average pooling commutes with a per-channel affine map; max pooling only with a
   positive scale, else ValueError). For a binary layer ``W = alpha * sign(W)`` the BN scale ``k``
   goes into ``alpha <- alpha |k|`` and flips the sign bits of the channels where ``k < 0``: the
   layer stays binary. Biases are supported (scaled as below), not required.
3. **Calibrate** (:func:`calibrate`): run the folded ANN on ``calibration_data`` and keep, per
   ReLU, its positive activations; ``lambda_l`` = their ``percentile``-th percentile (nearest
   rank; 100 = the max). Zeros are left out: a dead ReLU says nothing about the scale of the live
   ones, and including them drags the percentile down on sparse layers (as SNN-Toolbox does).
4. **Normalise** (Diehl 2015 / Rueckauer 2017) so that a rate of 1 spike per step stands for
   ``lambda_l``: ``normalize="weights"`` (default): the weight layers of block ``l`` compute
   ``f_l(lambda_{l-1} s) / lambda_l`` — in a one-layer block ``W <- W lambda_{l-1} / lambda_l``,
   ``b <- b / lambda_l`` — and every IF threshold is 1; ``normalize="threshold"``: weights keep
   their scale, ``b <- b / lambda_{l-1}`` and the threshold is ``lambda_l / lambda_{l-1}``
   (threshold balancing; the same spikes up to float rounding). ``lambda_0 = 1``: the first
   layer receives the analog input (or Poisson spikes of rate = input). The output layer is
   scaled by ``lambda_{L-1}`` only, so its potential divided by t estimates the ANN's logits.
5. **Build**: every ReLU becomes an :class:`IFNeuron` (reset by subtraction, no leak); linear
   layers run through :class:`MultiStep`; pooling sits where the ANN has it (before the ReLU, as
   in the paper, so a conv + average pool is one linear map feeding the IF neurons); max pooling
   becomes :class:`CumulativeMaxPool2d` (rate-exact: the accumulated output is the max of the
   accumulated inputs); the output layer is :class:`IntegrateOutput`.
   Binary-weight layers whose input is spikes run as :class:`SpikingBinaryConv2d` /
   :class:`SpikingBinaryLinear` (packed spikes x packed signs, AND-popcount, times the
   per-channel scale) — ``binary="packed"``; a binary layer fed by analog values (the first
   layer, or after average pooling of spikes) runs as a float layer of +-alpha weights and is
   listed in ``snn.notes``.

Encodings: ``"direct"``: the analog image is the first layer's input at every step (the stateless
layers before the first IF neuron are then computed once per chunk, not once per step);
``"poisson"``: each step, pixel ``x`` emits a spike with probability ``|x|`` and sign ``sign(x)``
(inputs must lie in [-1, 1]), from a ``torch.Generator`` seeded with ``seed`` at every
:meth:`SpikingNetwork.reset`.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine.nn.binary import BinaryConv2d, BinaryLinear, channel_scale
from kdengine.nn.packed import PackedBinaryConv2d, PackedBinaryLinear
from kdengine.snn.binary import SpikingBinaryConv2d, SpikingBinaryLinear
from kdengine.snn.layers import (
    CumulativeMaxPool2d,
    IFNeuron,
    IntegrateOutput,
    MultiStep,
    Stateful,
    keep_states,
    reset_states,
)

__all__ = [
    "convert",
    "calibrate",
    "Calibration",
    "SpikingNetwork",
    "fold_batchnorm",
    "ENCODINGS",
    "NORMALIZATIONS",
]

ENCODINGS = ("direct", "poisson")
NORMALIZATIONS = ("weights", "threshold")
_DROP = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


# --------------------------------------------------------------------------- parsed layers


@dataclass
class _Weight:
    """A conv/linear layer after BN folding. Binary layers keep ``sign`` (+-1) and ``alpha``."""

    kind: str  # "conv" | "linear"
    name: str
    weight: Optional[Tensor]  # float layers
    sign: Optional[Tensor]  # binary layers: +-1, same shape as the weight
    alpha: Optional[Tensor]  # binary layers: (O,)
    bias: Optional[Tensor]
    conv_args: dict = field(default_factory=dict)  # stride, padding, dilation, groups

    @property
    def binary(self) -> bool:
        return self.sign is not None

    @property
    def out_channels(self) -> int:
        return int((self.sign if self.binary else self.weight).shape[0])

    def effective_weight(self) -> Tensor:
        if not self.binary:
            return self.weight
        return self.sign * self.alpha.view(-1, *([1] * (self.sign.dim() - 1)))

    def forward(self, x: Tensor) -> Tensor:
        w = self.effective_weight()
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    def scaled(self, w_factor: float, b_factor: float) -> "_Weight":
        """A copy with the weights times ``w_factor`` (binary: the scale) and bias times ``b_factor``."""
        out = copy.copy(self)
        if self.binary:
            out.alpha = self.alpha * w_factor
        else:
            out.weight = self.weight * w_factor
        if self.bias is not None:
            out.bias = self.bias * b_factor
        return out

    def fold_affine(self, k: Tensor, c: Tensor) -> None:
        """In place: this layer followed by ``y * k + c`` (per output channel)."""
        if self.binary:
            neg = k < 0
            self.sign = torch.where(neg.view(-1, *([1] * (self.sign.dim() - 1))), -self.sign, self.sign)
            self.alpha = self.alpha * k.abs()
        else:
            self.weight = self.weight * k.view(-1, *([1] * (self.weight.dim() - 1)))
        b = self.bias if self.bias is not None else torch.zeros_like(k)
        self.bias = b * k + c

    def float_module(self) -> nn.Module:
        """An ``nn.Conv2d`` / ``nn.Linear`` computing this layer in float (no grad)."""
        w = self.effective_weight().detach()
        if self.kind == "conv":
            a = self.conv_args
            m = nn.Conv2d(w.shape[1] * a["groups"], w.shape[0], tuple(w.shape[2:]), stride=a["stride"],
                          padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                          bias=self.bias is not None, device=w.device, dtype=w.dtype)
        else:
            m = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None, device=w.device,
                          dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        m.requires_grad_(False)
        return m


@dataclass
class _Op:
    """One parsed layer: ``kind`` in weight | avgpool | maxpool | flatten | relu."""

    kind: str
    name: str
    weight: Optional[_Weight] = None
    module: Optional[nn.Module] = None


def _flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out.extend(_flatten_sequential(child, full + "."))
        else:
            out.append((full, child))
    return out


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A detached copy in the parameter's own dtype (``fold_batchnorm`` of a float64 model stays
    float64; the SNN is built in float32)."""
    return None if t is None else t.detach().clone()


def _weight_from(name: str, m: nn.Module) -> Optional[_Weight]:
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: only padding_mode='zeros' convolutions can be "
                             f"converted, got {m.padding_mode!r}")
        args = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        return _Weight("conv", name, _f32(m.weight), None, None, _f32(m.bias), args)
    if type(m) is nn.Linear:
        return _Weight("linear", name, _f32(m.weight), None, None, _f32(m.bias))
    if isinstance(m, (BinaryConv2d, BinaryLinear, PackedBinaryConv2d, PackedBinaryLinear)):
        if m.mode != "weights":
            raise ValueError(
                f"layer {name!r} is a binary layer with mode={m.mode!r}: only binary *weights* "
                "(mode='weights', ReLU activations) can be converted to spiking neurons; a "
                "mode='both' network has sign activations, which rate coding cannot express"
            )
        if isinstance(m, (BinaryConv2d, BinaryLinear)):
            w = m.weight.detach()
            sign = torch.where(w >= 0, 1, -1).to(w.dtype)
            alpha = channel_scale(w).detach().clone()
        else:
            pm = m.packed_weight.unpack(torch.float32)
            if isinstance(m, PackedBinaryConv2d):
                pm = pm.reshape(m.out_channels, m.in_channels, *m.kernel_size)
            sign, alpha = pm, _f32(m.scale)
        if isinstance(m, (BinaryConv2d, PackedBinaryConv2d)):
            args = dict(stride=tuple(m.stride), padding=tuple(m.padding), dilation=tuple(m.dilation),
                        groups=1)
            return _Weight("conv", name, None, sign, alpha, _f32(m.bias), args)
        return _Weight("linear", name, None, sign, alpha, _f32(m.bias))
    return None


def _bn_affine(name: str, bn: nn.Module) -> tuple[Tensor, Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"BatchNorm {name!r} has no running statistics (track_running_stats=False): "
                         "it normalises with batch statistics, which cannot be folded")
    k = 1.0 / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().to(torch.float64)
    c = -bn.running_mean.detach().to(torch.float64) * k
    if bn.bias is not None:
        c = c + bn.bias.detach().to(torch.float64)
    return k, c  # float64; cast to the target layer's dtype when folded


def _parse(model: nn.Module) -> list[_Op]:
    """Flatten, drop dropout/identity, fold BN; returns the op list (weights in float32 copies)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"model must be an nn.Sequential (a chain of layers; nested Sequentials are fine), got "
            f"{type(model).__name__}: conversion needs to know the order of the layers, which a "
            "custom forward() hides. Express the network as nn.Sequential"
        )
    ops: list[_Op] = []
    for name, m in _flatten_sequential(model):
        if isinstance(m, _DROP):
            continue
        w = _weight_from(name, m)
        if w is not None:
            ops.append(_Op("weight", name, weight=w))
        elif type(m) is nn.ReLU:
            ops.append(_Op("relu", name))
        elif type(m) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            ops.append(_Op("avgpool", name, module=copy.deepcopy(m)))
        elif type(m) is nn.MaxPool2d:
            if m.return_indices:
                raise ValueError(f"layer {name!r}: MaxPool2d(return_indices=True) is not supported")
            ops.append(_Op("maxpool", name, module=copy.deepcopy(m)))
        elif type(m) is nn.Flatten:
            ops.append(_Op("flatten", name, module=copy.deepcopy(m)))
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            _fold_bn_into(ops, name, m)
        else:
            raise ValueError(
                f"unsupported layer {name!r} ({type(m).__name__}) for ANN->SNN conversion; supported: "
                "Conv2d, Linear, BinaryConv2d/BinaryLinear/PackedBinary* (mode='weights'), "
                "BatchNorm1d/2d (folded), ReLU, AvgPool2d, AdaptiveAvgPool2d, MaxPool2d, Flatten, "
                "Dropout, Identity"
            )
    return ops


def _fold_bn_into(ops: list[_Op], name: str, bn: nn.Module) -> None:
    k, c = _bn_affine(name, bn)
    between = []
    for op in reversed(ops):
        if op.kind == "weight":
            break
        between.append(op)
    else:
        raise ValueError(f"BatchNorm {name!r} has no preceding conv/linear layer to fold into")
    target = next(op for op in reversed(ops) if op.kind == "weight").weight
    for op in between:
        if op.kind == "relu":
            raise ValueError(
                f"BatchNorm {name!r} follows a ReLU: only BN right after a conv/linear (possibly "
                "through pooling) can be folded; a BN after the ReLU is an affine map of spikes"
            )
        if op.kind == "flatten":
            raise ValueError(f"BatchNorm {name!r} follows a Flatten: a per-feature BN after "
                             "flattening a conv output cannot be folded into the conv")
        if op.kind == "maxpool" and bool((k < 0).any()):
            raise ValueError(f"BatchNorm {name!r} has negative scales after a max pooling: max "
                             "does not commute with a sign flip, so it cannot be folded")
        if (op.kind == "avgpool" and type(op.module) is nn.AvgPool2d and op.module.count_include_pad
                and op.module.padding not in (0, (0, 0))):
            raise ValueError(f"BatchNorm {name!r} follows an AvgPool2d that counts padding: the BN "
                             "shift does not commute with it; set count_include_pad=False")
    if k.numel() != target.out_channels:
        raise ValueError(f"BatchNorm {name!r} has {k.numel()} features but layer {target.name!r} "
                         f"has {target.out_channels} outputs")
    dt = (target.sign if target.binary else target.weight).dtype
    target.fold_affine(k.to(dt), c.to(dt))


def _blocks(ops: list[_Op]) -> list[list[_Op]]:
    """Split at ReLUs: hidden blocks end with their ReLU; the last block is the output block."""
    blocks, cur = [], []
    for op in ops:
        cur.append(op)
        if op.kind == "relu":
            blocks.append(cur)
            cur = []
    if not any(op.kind == "weight" for op in cur):
        raise ValueError(
            "the model must end with a conv/linear output layer after its last ReLU (the output "
            "layer only integrates; there is no spiking output to read a ReLU from)"
        )
    blocks.append(cur)
    for i, b in enumerate(blocks[:-1]):
        if not any(op.kind == "weight" for op in b):
            raise ValueError(
                f"hidden block {i} ({[op.name for op in b]}) has no conv/linear layer before its "
                "ReLU; every ReLU must follow a weight layer to be normalised"
            )
    return blocks


def _run_op(op: _Op, x: Tensor) -> Tensor:
    if op.kind == "weight":
        return op.weight.forward(x)
    if op.kind == "relu":
        return torch.relu(x)
    return op.module(x)


def fold_batchnorm(model: nn.Module) -> nn.Sequential:
    """The parsed, BN-folded float equivalent of ``model`` (``nn.Sequential`` of Conv2d / Linear /
    pooling / Flatten / ReLU; binary layers as float layers of ``alpha * sign`` weights). Its
    outputs equal ``model.eval()``'s up to float rounding."""
    layers = []
    for op in _parse(model):
        if op.kind == "weight":
            layers.append(op.weight.float_module())
        elif op.kind == "relu":
            layers.append(nn.ReLU())
        else:
            layers.append(copy.deepcopy(op.module))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- calibration


def _batches(data: Any, batch_size: int) -> Iterable[Tensor]:
    if data is None:
        raise ValueError("calibration_data is required: a tensor (N, ...) or an iterable of batches "
                         "of training inputs, to measure each layer's activation scale")
    if isinstance(data, Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"calibration_data must be a non-empty tensor (N, ...), got shape "
                             f"{tuple(data.shape)}")
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    if (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
            and not data[1].is_floating_point() and data[1].dim() == 1
            and data[1].shape[0] == data[0].shape[0]):
        yield from _batches(data[0], batch_size)  # an (images, labels) pair
        return
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"calibration_data must be a tensor or an iterable of batches, got "
                        f"{type(data).__name__}") from None
    for item in it:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor):
            raise TypeError(f"calibration batches must be tensors (or (x, ...) tuples), got "
                            f"{type(item).__name__}")
        yield item


def _nearest_rank(values: Tensor, p: float) -> float:
    """The ``p``-th percentile (nearest rank) of sorted ``values``; p = 100 is the max."""
    n = values.numel()
    r = min(n, max(1, math.ceil(p / 100.0 * n)))
    return float(values[r - 1])


def _check_percentile(p: object, name: str = "percentile") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 100], got {type(p).__name__}")
    p = float(p)
    if not (0.0 < p <= 100.0):
        raise ValueError(f"{name} must be in (0, 100] (100 = the max activation), got {p}")
    return p


class Calibration:
    """The parsed, BN-folded model and the sorted positive activations of each ReLU on the
    calibration data (from :func:`calibrate`); :func:`convert` accepts it in place of data, so a
    search over percentiles and scales calibrates once.

    Attributes: ``blocks`` (parsed layers split at the ReLUs), ``activations`` (one sorted 1-d
    float32 tensor per hidden block; at most ``max_values`` values, a seeded uniform subsample
    beyond), ``n_samples`` (calibration inputs seen), ``input_shape``, ``positive_fraction`` and
    ``n_values`` (per hidden block: share of positive outputs, and all outputs counted, zeros too).
    """

    def __init__(self, blocks: list[list[_Op]], activations: list[Tensor], n_samples: int,
                 input_shape: tuple[int, ...], positive_fraction: list[float],
                 n_values: Optional[list[int]] = None) -> None:
        self.blocks = blocks
        self.activations = activations
        self.n_samples = n_samples
        self.input_shape = input_shape
        self.positive_fraction = positive_fraction
        self.n_values = n_values

    @property
    def n_hidden(self) -> int:
        """Number of hidden (IF) layers."""
        return len(self.blocks) - 1

    def lambdas(self, percentile: Union[float, Sequence[float]] = 99.9,
                scale: Union[float, Sequence[float]] = 1.0) -> list[float]:
        """``lambda_l = scale_l * percentile_l-th percentile`` of each hidden layer (lists: one
        entry per hidden layer)."""
        ps = _per_layer(percentile, self.n_hidden, "percentile", _check_percentile)
        ss = _per_layer(scale, self.n_hidden, "threshold_scale", _check_scale)
        lams = []
        for i, (acts, p, s) in enumerate(zip(self.activations, ps, ss)):
            if acts.numel() == 0:
                warnings.warn(f"hidden layer {i} never activated on the calibration data; "
                              "using lambda = 1", stacklevel=2)
                lam = 1.0
            else:
                lam = _nearest_rank(acts, p)
            lams.append(lam * s)
        return lams

    def lambdas_with_zeros(self, percentile: float = 99.7) -> list[float]:
        """Each hidden layer's ``percentile``-th percentile of *all* its ReLU outputs, zeros
        included, interpolated linearly as ``numpy.percentile`` does: the calibration of Lu &
        Sengupta's released code, which on a sparse layer lands lower than :meth:`lambdas` (the
        zeros take up the bottom ranks). Exact while no layer was subsampled (``max_values``);
        beyond, the positive ranks are read from the uniform subsample."""
        p = _check_percentile(percentile)
        if self.n_values is None:
            raise ValueError("this Calibration has no n_values (the count of all outputs): build it "
                             "with kdengine.snn.calibrate")
        lams = []
        for i, (acts, tot, frac) in enumerate(zip(self.activations, self.n_values, self.positive_fraction)):
            n_pos = round(frac * tot)
            pos = p / 100.0 * (tot - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            v_lo, v_hi = (_rank_with_zeros(acts, tot - n_pos, n_pos, r) for r in (lo, hi))
            lam = v_lo + (pos - lo) * (v_hi - v_lo)
            if lam <= 0.0:
                warnings.warn(f"hidden layer {i}: the {p}th percentile with zeros is 0 (fewer than "
                              f"{100 - p:.2g} % of its outputs are positive); using lambda = 1",
                              stacklevel=2)
                lam = 1.0
            lams.append(lam)
        return lams


def _rank_with_zeros(acts: Tensor, n_zero: int, n_pos: int, rank: int) -> float:
    """The ``rank``-th (0-based) smallest of ``n_zero`` zeros followed by the ``n_pos`` sorted
    positives, of which ``acts`` holds all or a uniform subsample."""
    if rank < n_zero:
        return 0.0
    k = rank - n_zero
    if acts.numel() != n_pos:
        k = min(acts.numel() - 1, int(k * acts.numel() / max(n_pos, 1)))
    return float(acts[k])


def _check_scale(s: object, name: str = "threshold_scale") -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(s).__name__}")
    s = float(s)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{name} must be finite and > 0, got {s}")
    return s


def _per_layer(v, n: int, name: str, check) -> list[float]:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{name} must be a number or a list of {n} (one per hidden layer), "
                             f"got {len(v)} values")
        return [check(e, name) for e in v]
    return [check(v, name)] * n


@torch.no_grad()
def calibrate(model: nn.Module, calibration_data: Any, *, batch_size: int = 256,
              max_values: int = 1 << 22, seed: int = 0) -> Calibration:
    """Parse and BN-fold ``model`` and record each ReLU's positive activations on the data.

    Args:
        model: see :func:`convert`.
        calibration_data: tensor ``(N, ...)`` of inputs, an ``(inputs, labels)`` pair, or an
            iterable of batches (tensors or ``(x, ...)`` tuples, e.g. a DataLoader).
        batch_size: batch size when ``calibration_data`` is a tensor.
        max_values: per layer, at most this many positive values are kept (a seeded uniform
            subsample beyond: the 99.99th percentile of 4M values is still set by 400 of them).
        seed: seed of that subsample.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    blocks = _blocks(_parse(model))
    dev = _device_of(blocks)
    kept: list[list[Tensor]] = [[] for _ in blocks[:-1]]
    pos = [0] * (len(blocks) - 1)
    tot = [0] * (len(blocks) - 1)
    n = 0
    shape = None
    for xb in _batches(calibration_data, batch_size):
        if not xb.is_floating_point():
            raise TypeError(f"calibration inputs must be floating tensors, got dtype {xb.dtype}")
        if xb.numel() == 0:
            continue
        if shape is None:
            shape = tuple(xb.shape[1:])
        h = xb.to(device=dev, dtype=_dtype_of(blocks))
        for i, block in enumerate(blocks[:-1]):
            for op in block:
                h = _run_op(op, h)
            v = h[h > 0]
            pos[i] += v.numel()
            tot[i] += h.numel()
            kept[i].append(v.flatten().float().cpu())
        n += xb.shape[0]
    if n == 0:
        raise ValueError("calibration_data is empty: at least one input is needed")
    gen = torch.Generator().manual_seed(seed)
    acts = []
    for vals in kept:
        v = torch.cat(vals) if vals else torch.zeros(0)
        if v.numel() > max_values:
            v = v[torch.randperm(v.numel(), generator=gen)[:max_values]]
        if bool(torch.isnan(v).any()):
            raise ValueError("the model produced NaN activations on the calibration data")
        acts.append(torch.sort(v).values)
    frac = [p / t if t else 0.0 for p, t in zip(pos, tot)]
    return Calibration(blocks, acts, n, shape, frac, tot)


def _dtype_of(blocks: list[list[_Op]]) -> torch.dtype:
    for b in blocks:
        for op in b:
            if op.kind == "weight":
                return op.weight.effective_weight().dtype
    return torch.float32


def _device_of(blocks: list[list[_Op]]) -> torch.device:
    for b in blocks:
        for op in b:
            if op.kind == "weight":
                return op.weight.effective_weight().device
    return torch.device("cpu")


# --------------------------------------------------------------------------- the SNN


class SpikingNetwork(nn.Module):
    """A converted SNN: multi-step layers ending in :class:`IntegrateOutput`.

    * ``forward(x, T)``: ``x`` the static input ``(B, ...)`` (encoded per ``encoding``) or, with
      ``T=None``, an already-encoded ``(T, B, ...)`` input sequence -> the output potentials
      ``(T, B, K)`` (float64, accumulated from the last :meth:`reset`). Calls continue the state:
      feed a long run in chunks.
    * ``encode(x, T)``: the ``(T, B, ...)`` input sequence of ``T`` steps (Poisson draws advance
      the generator).
    * :meth:`reset` before a new input; :meth:`keep` to drop finished batch rows.
    * ``info``: the conversion's lambdas, thresholds, percentiles, layer kinds; ``notes``:
      binary layers that run in float and why.
    """

    def __init__(self, layers: Sequence[nn.Module], *, encoding: str = "direct", seed: int = 0,
                 static_prefix: int = 0, info: Optional[dict] = None,
                 notes: Optional[list[str]] = None) -> None:
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if not layers or not isinstance(layers[-1], IntegrateOutput):
            raise ValueError("a SpikingNetwork must end with an IntegrateOutput layer")
        self.layers = nn.ModuleList(layers)
        self.encoding = encoding
        self.seed = int(seed)
        self.static_prefix = int(static_prefix) if encoding == "direct" else 0
        self.info = dict(info or {})
        self.notes = list(notes or [])
        self._gen: Optional[torch.Generator] = None
        self._seed_offset = 0

    def reset(self, seed_offset: int = 0) -> None:
        """Forget all state (potentials, running sums, output); the Poisson encoder restarts from
        ``seed + seed_offset`` (:func:`~kdengine.snn.run.run_snn` gives each batch its offset)."""
        reset_states(self)
        self._gen = None
        self._seed_offset = int(seed_offset)

    def keep(self, index: Tensor) -> None:
        """Keep only batch rows ``index`` of every state (early exit)."""
        keep_states(self, index)

    @property
    def neurons(self) -> list[IFNeuron]:
        return [m for m in self.layers if isinstance(m, IFNeuron)]

    def encode(self, x: Tensor, T: int) -> Tensor:
        """``(T, B, ...)`` input sequence for the static input ``x`` ``(B, ...)``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating tensor (B, ...)")
        if self.encoding == "direct":
            return x.unsqueeze(0).expand(T, *x.shape)
        if bool((x.abs() > 1).any()) or bool(torch.isnan(x).any()):
            raise ValueError("Poisson encoding needs inputs in [-1, 1] (the spike probability is |x|)")
        if self._gen is None:
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed + self._seed_offset)
        u = torch.rand((T, *x.shape), generator=self._gen, device=x.device, dtype=x.dtype)
        return (u < x.abs()).to(x.dtype) * torch.sign(x)

    def forward(self, x: Tensor, T: Optional[int] = None) -> Tensor:
        if T is None:
            seq, start = x, 0
            if not isinstance(seq, Tensor) or seq.dim() < 2:
                raise ValueError("with T=None, x must be an encoded (T, B, ...) input sequence")
        else:
            if isinstance(T, bool) or not isinstance(T, int) or T < 1:
                raise ValueError(f"T must be a positive int, got {T!r}")
            if self.encoding == "direct" and self.static_prefix > 0:
                h = x.unsqueeze(0)  # the stateless layers before the first neuron: once, not T times
                for m in self.layers[: self.static_prefix]:
                    h = m(h)
                seq, start = h.expand(T, *h.shape[1:]), self.static_prefix
            else:
                seq, start = self.encode(x, T), 0
        h = seq
        for m in self.layers[start:]:
            h = m(h)
        return h

    def extra_repr(self) -> str:
        return f"encoding={self.encoding!r}, static_prefix={self.static_prefix}"


def convert(
    model: nn.Module,
    calibration_data: Any,
    percentile: Union[float, Sequence[float]] = 99.9,
    *,
    encoding: str = "direct",
    normalize: str = "weights",
    threshold_scale: Union[float, Sequence[float]] = 1.0,
    init_potential: float = 0.0,
    binary: str = "packed",
    seed: int = 0,
    batch_size: int = 256,
    backend: Optional[str] = None,
    if_backend: Optional[str] = None,
    count_spikes: bool = False,
    lambdas: Optional[Sequence[float]] = None,
) -> SpikingNetwork:
    """Convert a ReLU network (float or binary-weight) to a :class:`SpikingNetwork`.

    Args:
        model: ``nn.Sequential`` ANN (see the module doc for the supported layers); not modified.
        calibration_data: inputs for the percentiles (see :func:`calibrate`), or a
            :class:`Calibration` from an earlier :func:`calibrate` (reused as is).
        percentile: ``p`` in (0, 100] (100 = max), or one per hidden layer.
        encoding: ``"direct"`` (analog input every step) or ``"poisson"`` (seeded rate code).
        normalize: ``"weights"`` (W_l <- W_l lambda_{l-1}/lambda_l, thresholds 1) or
            ``"threshold"`` (threshold balancing).
        threshold_scale: multiplies each lambda (one number or one per hidden layer): < 1 fires
            earlier (lower latency) at the price of clipping the largest activations.
        init_potential: initial membrane potential as a fraction of the threshold (0 or 0.5
            typically; 0.5 centres the rounding error of the rate code).
        binary: ``"packed"``: binary-weight layers fed by spikes run on the AND-popcount kernel;
            ``"float"``: they run as float layers of +-alpha weights (for comparison).
        seed: Poisson generator seed.
        batch_size: calibration batch size for tensor data.
        backend: backend of the binary ops (None: auto); ``if_backend``: of the IF op.
        count_spikes: make the IF layers count spikes (firing-rate statistics).
        lambdas: one activation scale per hidden layer, used as given in place of the percentiles
            (e.g. :meth:`Calibration.lambdas_with_zeros`); ``threshold_scale`` still multiplies them.

    Returns:
        :class:`SpikingNetwork` on the model's device (float32).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if binary not in ("packed", "float"):
        raise ValueError(f"binary must be 'packed' or 'float', got {binary!r}")
    ip = float(init_potential)
    if not (math.isfinite(ip) and 0.0 <= ip < 1.0):
        raise ValueError(f"init_potential must be in [0, 1) (a fraction of the threshold), got {init_potential}")
    if isinstance(calibration_data, Calibration):
        cal = calibration_data
    else:
        # validate the cheap arguments before running the calibration pass
        if isinstance(percentile, (list, tuple)):
            [_check_percentile(p) for p in percentile]
        else:
            _check_percentile(percentile)
        cal = calibrate(model, calibration_data, batch_size=batch_size)
    if lambdas is None:
        lams = cal.lambdas(percentile, threshold_scale)
    else:
        if len(lambdas) != cal.n_hidden:
            raise ValueError(f"lambdas needs one value per hidden layer ({cal.n_hidden}), got {len(lambdas)}")
        ss = _per_layer(threshold_scale, cal.n_hidden, "threshold_scale", _check_scale)
        lams = []
        for i, (lam, sc) in enumerate(zip(lambdas, ss)):
            lam = float(lam)
            if not (math.isfinite(lam) and lam > 0):
                raise ValueError(f"lambdas[{i}] must be a finite number > 0, got {lam}")
            lams.append(lam * sc)
        percentile = "given"
    return _build(cal, lams, encoding=encoding, normalize=normalize, init_potential=ip,
                  binary=binary, seed=seed, backend=backend, if_backend=if_backend,
                  count_spikes=count_spikes, percentile=percentile, threshold_scale=threshold_scale)


def _build(cal: Calibration, lams: list[float], *, encoding: str, normalize: str,
           init_potential: float, binary: str, seed: int, backend: Optional[str],
           if_backend: Optional[str], count_spikes: bool, percentile, threshold_scale) -> SpikingNetwork:
    layers: list[nn.Module] = []
    notes: list[str] = []
    kinds: list[str] = []
    thresholds: list[float] = []
    static_prefix = None
    spikes_in = False  # the input of the first block is analog (direct) or +-1 Poisson spikes
    n_blocks = len(cal.blocks)
    for bi, block in enumerate(cal.blocks):
        lam_in = 1.0 if bi == 0 else lams[bi - 1]
        output = bi == n_blocks - 1
        if output:
            out_f, thr = 1.0, None
        elif normalize == "weights":
            out_f, thr = 1.0 / lams[bi], 1.0
        else:
            out_f, thr = 1.0 / lam_in, lams[bi] / lam_in
        widx = [i for i, op in enumerate(block) if op.kind == "weight"]
        first, last = widx[0], widx[-1]
        for i, op in enumerate(block):
            if op.kind == "weight":
                w_f = (lam_in if i == first else 1.0) * (out_f if i == last else 1.0)
                b_f = out_f if i == last else 1.0
                wl = op.weight.scaled(w_f, b_f)
                if wl.binary and binary == "packed" and spikes_in:
                    if wl.kind == "conv":
                        a = wl.conv_args
                        layers.append(SpikingBinaryConv2d.from_signs(
                            wl.sign, wl.alpha, wl.bias, a["stride"], a["padding"], a["dilation"],
                            backend=backend, check_spikes=False))
                    else:
                        layers.append(SpikingBinaryLinear.from_signs(wl.sign, wl.alpha, wl.bias,
                                                                     backend=backend, check_spikes=False))
                    kinds.append(f"{op.name}: binary {wl.kind} on spike_matmul")
                else:
                    if wl.binary:
                        why = ("binary='float'" if binary == "float" else
                               "its input is not spikes (analog input or pooled spikes)")
                        notes.append(f"binary layer {op.name!r} runs as a float layer of +-alpha "
                                     f"weights: {why}")
                    layers.append(MultiStep(wl.float_module().float(), channels_last=wl.kind == "conv"))
                    kinds.append(f"{op.name}: {'binary-as-float' if wl.binary else 'float'} {wl.kind}")
                spikes_in = False
            elif op.kind == "relu":
                if static_prefix is None:
                    static_prefix = len(layers)
                layers.append(IFNeuron(thr, None, init_potential=init_potential, backend=if_backend,
                                       count_spikes=count_spikes))
                thresholds.append(thr)
                kinds.append(f"{op.name}: IF (threshold {thr:.4g}, soft reset)")
                spikes_in = True
            elif op.kind == "maxpool":
                layers.append(CumulativeMaxPool2d.from_maxpool(op.module))
                kinds.append(f"{op.name}: cumulative max pool")
                # spikes stay spikes; currents stay currents
            elif op.kind == "avgpool":
                layers.append(MultiStep(copy.deepcopy(op.module)))
                kinds.append(f"{op.name}: avg pool")
                spikes_in = False
            elif op.kind == "flatten":
                layers.append(MultiStep(copy.deepcopy(op.module)))
                kinds.append(f"{op.name}: flatten")
    layers.append(IntegrateOutput())
    kinds.append("output: integrate (no spikes), prediction = argmax of potential")
    if static_prefix is None:
        static_prefix = len(layers) - 1
    # the static prefix must be stateless (a max pool before the first neuron is stateful)
    for i, m in enumerate(layers[:static_prefix]):
        if isinstance(m, Stateful):
            static_prefix = i
            break
    info = {
        "lambdas": lams,
        "thresholds": thresholds,
        "percentile": percentile,
        "threshold_scale": threshold_scale,
        "normalize": normalize,
        "init_potential": init_potential,
        "encoding": encoding,
        "binary": binary,
        "layers": kinds,
        "calibration_samples": cal.n_samples,
    }
    return SpikingNetwork(layers, encoding=encoding, seed=seed, static_prefix=static_prefix,
                          info=info, notes=notes)
