"""Crossbar (in-memory computing) simulation of the XNOR layers of a packed binary model.

What is modelled (PAPERS/ANCHORS "In-memory computing": XNOR-RRAM 128 x 128 arrays with 3-bit
sense amplifiers, XNOR-SRAM 256 rows with an 11-level flash ADC, K split across tiles summed
digitally, stored-bit flips):

Mapping. Each :class:`~kdengine.nn.PackedBinaryLinear` / :class:`~kdengine.nn.PackedBinaryConv2d`
in ``mode="both"`` (binary weights *and* activations) is put on crossbar arrays. Its weight matrix
``W`` (``N`` outputs x ``K`` inputs; ``K = C*kh*kw`` in (C, kh, kw) order for a convolution) is
stored as sign bits: crossbar *rows* are the ``K`` inputs, split into ``T = ceil(K / rows)`` row
tiles of ``rows`` rows (the last one holds the remaining ``K - (T-1)*rows``); *columns* are the
``N`` output channels (split into ``ceil(N / cols)`` column tiles when ``cols`` is given: columns
are independent, so this only changes the counts). One *input vector* drives the rows: ``sign(x)``
of one sample (linear) or of one receptive field (conv; a zero-padded tap is an undriven row and
contributes 0, exactly as in :func:`kdengine.ops.binary_conv2d`).

Analog partial sum. Column ``n`` of row tile ``t`` produces
``p = sum_{r in tile t} a_r * w[n, r]`` with ``a_r, w in {-1, +1}`` (0 for undriven rows): the
XNOR-popcount dot product of that tile, ``p = 2 * matches - driven_rows``, ``|p| <= n_t`` where
``n_t`` is the number of rows of the tile.

ADC model (``adc_bits = b``; ``None`` = ideal, exact). Per tile, a uniform quantizer with
``L = 2**b`` levels that include both ends of a window ``[-c, c]``:

* ``c = n_t`` (the tile's full range) by default, or ``c = min(adc_clip, n_t)`` with ``adc_clip``
  (one number for every layer, or ``{layer name: number}``);
* ``step = 2c / (L - 1)``; ``code = round((clamp(p, -c, c) + c) / step)`` (round half to even,
  ``torch.round``; the clamp is the saturation); output ``-c + code * step``.

So ``b = 1`` is a comparator (``p > 0`` -> ``+c``, ``p <= 0`` -> ``-c``: the tie ``p = 0`` rounds
half to even, i.e. down), and ``|output - p| <= step / 2`` inside the window. The quantizer is
computed in float64. Even at ``b = 8`` the output is not an integer in general (256 levels over
``[-128, 128]``): only ``adc_bits=None`` reproduces the packed kernels.

Digital periphery. The ``T`` converted partial sums of a column are added (float64, exact for the
ideal ADC), then ``y = sum * scale[n] + bias[n]`` with the packed kernels' epilogue
(:func:`kdengine.reference.binary.epilogue`: float32 multiply, then add, in x's compute dtype).
With ``adc_bits=None`` and ``bit_error_rate=0`` the output equals the packed kernels bit for bit
(tested): the tile sums are exact integers and the epilogue is the same.

Stored-bit flips. With ``bit_error_rate = q``, each stored weight bit (the ``N*K`` valid bits;
never the padding bits of the last word) is flipped independently with probability ``q``, once per
:func:`simulate` call: the masks come from one ``torch.Generator`` seeded with ``seed`` and drawn
layer by layer in module order, so the same seed gives the same faulty arrays. The flips are
applied to the packed words (``weight_bits XOR mask``), i.e. to what the array stores.

Layers that are not mapped: full-precision layers, batch norm, pooling, and packed binary layers
in ``mode="weights"`` (their inputs are real numbers, which an XNOR array cannot take) run
digitally as in the model; the stats list the latter under ``digital_binary_layers``.

Counts (per mapped layer and in total): ``vectors`` (input vectors applied), ``tile_activations``
(arrays driven: ``vectors * T * col_tiles``), ``adc_conversions`` (``vectors * T * N``),
``digital_adds`` (``vectors * (T-1) * N``), ``saturations`` (conversions with ``|p| > c``),
``weight_bits`` / ``flipped_bits``, the RMS and maximum of ``|p|`` and the mean absolute ADC error.
"""
from __future__ import annotations

import copy
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine.nn.packed import PackedBinaryConv2d, PackedBinaryLinear
from kdengine.ops.binary import pack_spikes
from kdengine.ops.binary import reference as ref

__all__ = ["simulate", "adc_quantize", "calibrate_adc_clip", "CrossbarStats", "LayerStats"]

MAX_ADC_BITS = 24
_CHUNK_ELEMS = 1 << 22  # partial sums (T * M * N) per matmul chunk: 16 MiB in float32


# --------------------------------------------------------------------------- stats


@dataclass
class LayerStats:
    """Counts of one mapped layer (module docstring)."""

    name: str
    kind: str  # "linear" or "conv"
    k: int
    n: int
    rows: int
    row_tiles: int
    col_tiles: int
    vectors: int = 0
    tile_activations: int = 0
    adc_conversions: int = 0
    digital_adds: int = 0
    saturations: int = 0
    weight_bits: int = 0
    flipped_bits: int = 0
    psum_sq_sum: float = 0.0
    psum_absmax: float = 0.0
    adc_abs_err_sum: float = 0.0

    @property
    def arrays(self) -> int:
        """Crossbar arrays holding this layer's weights (row tiles x column tiles)."""
        return self.row_tiles * self.col_tiles

    @property
    def psum_rms(self) -> float:
        return math.sqrt(self.psum_sq_sum / self.adc_conversions) if self.adc_conversions else 0.0

    @property
    def adc_mean_abs_error(self) -> float:
        return self.adc_abs_err_sum / self.adc_conversions if self.adc_conversions else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(arrays=self.arrays, psum_rms=self.psum_rms, adc_mean_abs_error=self.adc_mean_abs_error)
        return d


@dataclass
class CrossbarStats:
    """Configuration, per-layer :class:`LayerStats` and totals of one :func:`simulate` call."""

    rows: int
    cols: Optional[int]
    adc_bits: Optional[int]
    adc_clip: Any
    bit_error_rate: float
    seed: int
    layers: list[LayerStats] = field(default_factory=list)
    digital_binary_layers: list[str] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(getattr(s, key) for s in self.layers)

    @property
    def tile_activations(self) -> int:
        return self.total("tile_activations")

    @property
    def adc_conversions(self) -> int:
        return self.total("adc_conversions")

    @property
    def flipped_bits(self) -> int:
        return self.total("flipped_bits")

    def to_dict(self) -> dict:
        keys = ("vectors", "tile_activations", "adc_conversions", "digital_adds", "saturations",
                "weight_bits", "flipped_bits", "arrays")
        return {
            "rows": self.rows, "cols": self.cols, "adc_bits": self.adc_bits,
            "adc_clip": self.adc_clip, "bit_error_rate": self.bit_error_rate, "seed": self.seed,
            "layers": [s.to_dict() for s in self.layers],
            "digital_binary_layers": list(self.digital_binary_layers),
            "totals": {k: sum(getattr(s, k) for s in self.layers) for k in keys},
        }


# --------------------------------------------------------------------------- ADC


def adc_quantize(p: Tensor, n_rows: Union[int, Tensor], bits: int, clip: Optional[float] = None) -> Tensor:
    """The ADC of the module docstring applied to partial sums ``p`` (float64 result).

    Args:
        p: partial sums (any shape, real).
        n_rows: rows of the tile (int, or a tensor broadcasting against ``p``, >= 1).
        bits: ``b >= 1``: ``2**b`` levels.
        clip: half-width of the window (``min(clip, n_rows)``), None for the full range.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= MAX_ADC_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_ADC_BITS}, got {bits!r}")
    p = p.to(torch.float64)
    c = torch.as_tensor(n_rows, dtype=torch.float64, device=p.device)
    if clip is not None:
        c = torch.clamp(c, max=float(clip))
    levels = float(2 ** int(bits))
    step = 2.0 * c / (levels - 1.0)
    code = torch.round((torch.maximum(torch.minimum(p, c), -c) + c) / step).clamp_(0.0, levels - 1.0)
    return code * step - c


# --------------------------------------------------------------------------- crossbar layer


def _check_signs(x: Tensor) -> Tensor:
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot drive a crossbar row")
    return torch.where(x < 0, -1.0, 1.0).to(torch.float32)


class _CrossbarLayer(nn.Module):
    """A packed ``mode="both"`` layer run on simulated crossbar tiles (module docstring)."""

    def __init__(self, name: str, layer: nn.Module, rows: int, cols: Optional[int], adc_bits: Optional[int],
                 clip: Optional[float], q: float, gen: Optional[torch.Generator]) -> None:
        super().__init__()
        self.layer_name = name
        self.conv = isinstance(layer, PackedBinaryConv2d)
        k, n = layer.k, layer.weight_bits.shape[0]
        bits = layer.weight_bits
        flipped = 0
        if q > 0:
            mask = torch.rand((n, k), generator=gen, dtype=torch.float64) < q
            flipped = int(mask.sum())
            bits = bits ^ pack_spikes(mask).bits.to(bits.device)
        w = ref.unpack_reference(bits, k, dtype=torch.float32)  # (N, K) +-1
        t = -(-k // rows)
        wp = torch.zeros((n, t * rows), dtype=torch.float32, device=w.device)
        wp[:, :k] = w
        self.wt = wp.view(n, t, rows).permute(1, 2, 0).contiguous()  # (T, R, N)
        tile_rows = torch.full((t,), float(rows), dtype=torch.float64, device=w.device)
        tile_rows[-1] = k - (t - 1) * rows
        self.tile_rows = tile_rows.view(t, 1, 1)
        self.k, self.n, self.rows, self.t = k, n, rows, t
        self.scale, self.bias = layer.scale, layer.bias
        self.adc_bits, self.clip = adc_bits, clip
        self.geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation) if self.conv else None
        self.stats = LayerStats(
            name=name, kind="conv" if self.conv else "linear", k=k, n=n, rows=rows, row_tiles=t,
            col_tiles=1 if cols is None else -(-n // cols), weight_bits=n * k, flipped_bits=flipped,
        )

    def _dots(self, a: Tensor) -> Tensor:
        """``a``: (M, K) in {-1, 0, +1} float32 -> (M, N) float64 digital sums of the ADC outputs."""
        m = a.shape[0]
        st = self.stats
        ap = F.pad(a, (0, self.t * self.rows - self.k)).view(m, self.t, self.rows).transpose(0, 1)
        out = torch.empty((m, self.n), dtype=torch.float64, device=a.device)
        step = max(1, _CHUNK_ELEMS // max(1, self.t * self.n))
        for i in range(0, m, step):
            p = torch.bmm(ap[:, i : i + step], self.wt).to(torch.float64)  # (T, m', N), exact integers
            st.psum_sq_sum += float((p * p).sum())
            st.psum_absmax = max(st.psum_absmax, float(p.abs().max()))
            if self.adc_bits is None:
                q = p
            else:
                q = adc_quantize(p, self.tile_rows, self.adc_bits, self.clip)
                c = self.tile_rows if self.clip is None else torch.clamp(self.tile_rows, max=self.clip)
                st.saturations += int((p.abs() > c).sum())
                st.adc_abs_err_sum += float((q - p).abs().sum())
            out[i : i + step] = q.sum(0)
        st.vectors += m
        st.tile_activations += m * self.t * st.col_tiles
        st.adc_conversions += m * self.t * self.n
        st.digital_adds += m * (self.t - 1) * self.n
        return out

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv:
            if x.shape[-1] != self.k:
                raise ValueError(f"layer {self.layer_name!r}: x must have shape (..., {self.k}), got {tuple(x.shape)}")
            lead = x.shape[:-1]
            dot = self._dots(_check_signs(x.reshape(-1, self.k)))
            return ref.epilogue(dot, self.scale, self.bias, x.dtype).reshape(*lead, self.n)
        (kh, kw), stride, padding, dilation = self.geometry
        if x.dim() != 4 or x.shape[1] * kh * kw != self.k:
            raise ValueError(f"layer {self.layer_name!r}: x must have shape (B, {self.k // (kh * kw)}, H, W), "
                             f"got {tuple(x.shape)}")
        b, _, h, w = x.shape
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"layer {self.layer_name!r}: the kernel does not fit the input {tuple(x.shape)}")
        # sign first, then zero padding: a padded tap is an undriven row (0), as in the kernels
        cols = F.unfold(_check_signs(x), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        a = cols.transpose(1, 2).reshape(b * oh * ow, self.k)
        dot = self._dots(a).view(b, oh, ow, self.n).permute(0, 3, 1, 2)
        return ref.epilogue(dot, self.scale, self.bias, x.dtype, channel_dim=1).contiguous()


# --------------------------------------------------------------------------- simulate


def _resolve_model(model: Any) -> nn.Module:
    if isinstance(model, (str, os.PathLike)):
        from kdengine.serialize import load_packed

        return load_packed(model)
    inner = getattr(model, "module", None)
    if not isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        return inner  # an InferenceModel
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, an InferenceModel or a path, got {type(model).__name__}")
    return model


def _int_arg(name: str, v: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")
    return int(v)


def _clip_for(adc_clip: Any, name: str) -> Optional[float]:
    if adc_clip is None:
        return None
    v = adc_clip.get(name) if isinstance(adc_clip, Mapping) else adc_clip
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"adc_clip for layer {name!r} must be a positive finite number, got {v!r}")
    return float(v)


def simulate(
    model: Any,
    x: Tensor,
    rows: int = 128,
    adc_bits: Optional[int] = None,
    bit_error_rate: float = 0.0,
    seed: int = 0,
    *,
    adc_clip: Union[None, float, Mapping[str, float]] = None,
    cols: Optional[int] = None,
    batch_size: int = 512,
) -> tuple[Tensor, CrossbarStats]:
    """Run ``model`` on ``x`` with its XNOR layers on simulated crossbars (module docstring).

    Args:
        model: a packed model (``nn.Module`` from :func:`kdengine.nn.pack_model` /
            :func:`kdengine.serialize.load_packed`), an :class:`kdengine.infer.InferenceModel`
            or the path of a saved model. It is not modified (a copy is simulated).
        x: the model's input, batch first, floating.
        rows: crossbar rows per tile ``R`` (>= 1; e.g. 128 or 256).
        adc_bits: ADC resolution ``b`` in 1..24, or None for an ideal (exact) ADC.
        bit_error_rate: probability in [0, 1] that each stored weight bit is flipped.
        seed: seed of the bit flips.
        adc_clip: ADC window half-width (partial-sum units), one for all layers or per layer name
            (layers not in the mapping use the full range); needs ``adc_bits``.
        cols: columns per array, only for the array and activation counts (None: all outputs).
        batch_size: samples per chunk (bounds the memory of the im2col and partial sums).

    Returns:
        ``(outputs, stats)``: the model's output for ``x`` and a :class:`CrossbarStats`.
    """
    rows = _int_arg("rows", rows, 1, 1 << 24)
    if adc_bits is not None:
        adc_bits = _int_arg("adc_bits", adc_bits, 1, MAX_ADC_BITS)
    elif adc_clip is not None:
        raise ValueError("adc_clip needs adc_bits (an ideal ADC, adc_bits=None, neither clips nor quantizes)")
    if isinstance(bit_error_rate, bool) or not isinstance(bit_error_rate, numbers.Real):
        raise TypeError(f"bit_error_rate must be a number, got {type(bit_error_rate).__name__}")
    if not 0.0 <= float(bit_error_rate) <= 1.0:
        raise ValueError(f"bit_error_rate must be in [0, 1], got {bit_error_rate}")
    seed = _int_arg("seed", seed, 0)
    if cols is not None:
        cols = _int_arg("cols", cols, 1)
    batch_size = _int_arg("batch_size", batch_size, 1)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if adc_clip is not None and not isinstance(adc_clip, Mapping):
        _clip_for(adc_clip, "<all layers>")

    src = _resolve_model(model)
    sim = copy.deepcopy(src).eval()
    stats = CrossbarStats(rows=rows, cols=cols, adc_bits=adc_bits,
                          adc_clip=dict(adc_clip) if isinstance(adc_clip, Mapping) else adc_clip,
                          bit_error_rate=float(bit_error_rate), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    q = float(bit_error_rate)
    targets = [(n, m) for n, m in sim.named_modules() if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d))]
    if isinstance(adc_clip, Mapping):
        unknown = set(adc_clip) - {n for n, _ in targets}
        if unknown:
            raise ValueError(f"adc_clip names layers that are not packed binary layers: {sorted(unknown)}")
    for name, m in targets:
        if m.mode != "both":
            stats.digital_binary_layers.append(name)
            continue
        xb = _CrossbarLayer(name, m, rows, cols, adc_bits, _clip_for(adc_clip, name) if adc_bits else None, q, gen)
        stats.layers.append(xb.stats)
        parent_name, _, child = name.rpartition(".")
        if name == "":
            sim = xb
        else:
            setattr(sim.get_submodule(parent_name) if parent_name else sim, child, xb)
    with torch.no_grad():
        outs = [sim(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs), stats


def calibrate_adc_clip(model: Any, x: Tensor, rows: int = 128, n_sigma: float = 3.0) -> dict[str, float]:
    """Per-layer ADC windows ``{layer name: n_sigma * RMS of the partial sums}`` measured with an
    ideal ADC on calibration inputs ``x`` (at least 1): a window that fits the partial sums'
    spread instead of the tile's full range, as designers of XNOR arrays pick the sense range."""
    if isinstance(n_sigma, bool) or not isinstance(n_sigma, numbers.Real) or not n_sigma > 0:
        raise ValueError(f"n_sigma must be a positive number, got {n_sigma!r}")
    _, st = simulate(model, x, rows=rows)
    return {s.name: max(1.0, float(n_sigma) * s.psum_rms) for s in st.layers}
