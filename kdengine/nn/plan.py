"""Layer plans: one forward path per layer, shared by the layer's ``forward`` and :mod:`kdengine.infer`.

A layer with a plan (the packed layers of :mod:`kdengine.nn.packed`, the spiking binary layers of
:mod:`kdengine.snn.binary`) has ``inference_plan(x, *, out_buffer=False) -> LayerPlan``: every check
and every tensor that depends only on the weights and on ``x``'s signature (shape, dtype, device) is
done once there -- the backend is resolved, the argument checks of the public ops run, the
scale/bias are converted to the compute dtype, conv weights are repacked to the channel-word order
-- and :attr:`LayerPlan.run` does only the work that depends on the data. ``forward`` runs the plan
of its input's signature (:class:`PlannedModule` caches a few, keyed by the weights' versions), and
the runtime builds one per leaf of its own execution plan, so both run the same code.

``out_buffer=True`` (the runtime, which clones the final output itself) lets ``run`` write into a
buffer preallocated by the plan and return that same buffer on every call; ``forward`` never asks
for it, so its outputs are fresh tensors.

:class:`ChannelWordConv` is the binary convolution on channel words shared by the packed XNOR conv
and the spiking conv: the im2col is :func:`kdengine.ops.binary.channel_words` (the input's bits
packed along channels per pixel, zero words for the padding), the weights go through the same
function once, and the GEMM is the backend's XNOR or AND popcount kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine import _dispatch
from kdengine.ops.binary import ConvGeometry, channel_words

__all__ = ["LayerPlan", "PlannedModule", "ChannelWordConv", "resolve_backend", "compute_dtype",
           "inference_only"]

# Cached forward plans per layer: enough for a train/eval pair of batch sizes and two dtypes.
MAX_FORWARD_PLANS = 4


@dataclass(frozen=True)
class LayerPlan:
    """One layer's forward for one input signature.

    ``run(x)``: the output for an input of the signature the plan was built for (no checks that
    depend only on the signature). ``out_shape``: the output shape. ``kind``: what runs, in words.
    ``prealloc_bytes``: the output buffer ``run`` reuses (``out_buffer=True`` only).
    ``precomputed_bytes``: weight-derived tensors made for this signature.
    """

    run: Callable[[Tensor], Tensor]
    out_shape: tuple[int, ...]
    kind: str
    prealloc_bytes: int = 0
    precomputed_bytes: int = 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the popcount epilogue computes in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(op: str, device: torch.device, backend: Optional[str]) -> str:
    """The backend that runs ``op`` on ``device``; one that cannot run here is a ValueError."""
    try:
        return _dispatch.resolve(op, device, backend)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def inference_only(run: Callable[[Tensor], Tensor], layer: str) -> Callable[[Tensor], Tensor]:
    """``run`` for a step on the popcount kernels, which define no gradient: its input is detached
    (the output never requires grad), and inside ``torch.func`` gradient transforms (where it would
    silently give zero gradients) it raises RuntimeError. A plan built under
    ``torch.inference_mode`` (the runtime's; the forward cache keys on the mode) is run there,
    where nothing requires grad: ``run`` is returned as it is, without the per-call guard."""
    if torch.is_inference_mode_enabled():
        return run

    def guarded(x: Tensor) -> Tensor:
        if torch._C._functorch.is_gradtrackingtensor(x):
            raise RuntimeError(
                f"{layer} runs the popcount kernels, which are inference-only and define no "
                "gradient, so it cannot run inside torch.func gradient transforms (grad, vjp, "
                "jacrev, ...); train with the straight-through layers of kdengine.nn "
                "(BinaryLinear, BinaryConv2d)"
            )
        return run(x.detach())

    return guarded


def nbytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PlannedModule(nn.Module):
    """A module whose ``forward`` is the :attr:`LayerPlan.run` of its input's signature.

    Subclasses define ``inference_plan(x, *, out_buffer=False)``. The plans are cached per
    signature, per version of every buffer (an in-place change, a reload or a move builds a new
    plan), per run option (``backend``, ``mode``, ``check_spikes``, ``packed_output``), per input
    kind (a tensor or packed signs) and per inference mode (a plan built
    under ``torch.inference_mode`` holds inference tensors, which autograd cannot save).
    """

    def inference_plan(self, x: Tensor, *, out_buffer: bool = False) -> LayerPlan:
        raise NotImplementedError

    def _forward_plan(self, x: Tensor) -> LayerPlan:
        try:
            state = tuple((id(t), t._version) for t in self._buffers.values() if t is not None)
        except RuntimeError:  # inference tensors carry no version counter: no caching
            return self.inference_plan(x)
        # and the run options a plan bakes in
        key = (type(x), tuple(x.shape), getattr(x, "dtype", None), x.device,
               torch.is_inference_mode_enabled(), state, getattr(self, "backend", None),
               getattr(self, "mode", None), getattr(self, "check_spikes", None),
               getattr(self, "packed_output", None))
        cache = self.__dict__.setdefault("_forward_plans", {})
        plan = cache.get(key)
        if plan is None:
            plan = self.inference_plan(x)
            if len(cache) >= MAX_FORWARD_PLANS:
                try:  # the oldest; another thread may have dropped it already
                    cache.pop(next(iter(cache)), None)
                except (StopIteration, RuntimeError):
                    pass
            cache[key] = plan
        return plan

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_forward_plans", None)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_forward_plans", None)  # plans hold closures: rebuilt on first use
        return state


class ChannelWordConv:
    """A binary conv2d as channel words, im2col of words and a popcount GEMM, for one geometry.

    ``sign_weight``: ``(O, C, kh, kw)`` +-1. ``spikes=False`` (XNOR conv of ``sign(x)``): the
    padding words hold bit 0, i.e. +1, so the GEMM counts every padded tap as a +1 agreement or
    disagreement; the correction subtracted is the sum of ``sign(W)`` over the taps outside the
    image plus ``Kp - K`` for the channel padding bits (0 in both operands, so XNOR counts them as
    agreements). ``spikes=True`` (AND conv of 0/1 spikes): a zero word is "no spike", which adds 0,
    so nothing is corrected.

    :meth:`counts` gives the exact integer sums, ``(B*OH*OW, O)`` in the compute dtype; the
    epilogue (``* scale + bias``) is the caller's, in that same (pixels, O) layout.
    """

    def __init__(self, sign_weight: Tensor, geo: ConvGeometry, backend: str, *, spikes: bool) -> None:
        o, c, kh, kw = (int(v) for v in sign_weight.shape)
        self.geo, self.backend, self.out_channels = geo, backend, o
        self.out_hw = geo.out_hw
        with torch.no_grad():
            w = sign_weight.detach().to(torch.float32)
            # the weights are an im2col with one window per output channel: the same word order
            wgeo = ConvGeometry(o, c, kh, kw, kernel=(kh, kw), stride=(1, 1), padding=(0, 0),
                                dilation=(1, 1))
            self.wq = channel_words(w, wgeo, backend).contiguous()
            self.kp = self.wq.shape[1] * 32
            self.sub = None if spikes else self._xnor_correction(w.to(torch.float64), geo, self.kp)
        self._gemm = _dispatch.implementation("spike_matmul" if spikes else "xnor_matmul", backend)
        self._sub_by_dtype: dict[torch.dtype, Tensor] = {}

    @staticmethod
    def _xnor_correction(w: Tensor, geo: ConvGeometry, kp: int) -> Optional[Tensor]:
        o, c, kh, kw = w.shape
        shift = kp - c * kh * kw
        if geo.padding == (0, 0):
            return torch.tensor(shift, dtype=torch.int32, device=w.device) if shift else None
        # per output position, the sum of sign(W) over the taps that fall inside the image
        ones = torch.ones(1, c, geo.height, geo.width, dtype=w.dtype, device=w.device)
        inside = F.conv2d(ones, w, None, geo.stride, geo.padding, geo.dilation)[0]
        outside = w.sum((1, 2, 3))[:, None, None] - inside  # exact: integers in float64
        return (outside.round().to(torch.int32) + shift).permute(1, 2, 0).reshape(-1, o).contiguous()

    @property
    def nbytes(self) -> int:
        return nbytes(self.wq, self.sub)

    def counts(self, x: Tensor, ct: torch.dtype) -> Tensor:
        """``x`` ``(B, C, H, W)`` (floating; for spikes, ``-s``: the sign packer's bit is ``x < 0``)
        -> exact sums ``(B*OH*OW, O)`` in ``ct``."""
        y = self._gemm(channel_words(x, self.geo, self.backend), self.wq, self.kp).to(ct)
        if self.sub is not None:
            sub = self._sub_by_dtype.get(ct)
            if sub is None:
                sub = self._sub_by_dtype[ct] = self.sub.to(ct)
            y = y.view(x.shape[0], -1, self.out_channels).sub_(sub).view(-1, self.out_channels)
        return y
