"""Inference runtime: run a saved packed model (safetensors + JSON manifest) with the packed kernels.

:func:`load` reads a file written by :func:`kdengine.serialize.save_packed` (through
:func:`kdengine.serialize.load_packed`: no pickle, hashes checked, every failure a ValueError) and
returns an :class:`InferenceModel`. :meth:`InferenceModel.predict` runs it under
``torch.inference_mode`` (no autograd graph, no version counters).

Execution plans. A loaded model is a tree of ``nn.Sequential`` around a fixed set of leaf layers.
The first call with a new input signature ``(shape, dtype, device)`` flattens that tree and builds a
*plan*: one Python closure per leaf that does only the work that depends on the data. Everything
that depends only on the weights and the input shape is done once, when the plan is built:

* packed and spiking binary layers (:class:`~kdengine.nn.PackedBinaryLinear`,
  :class:`~kdengine.nn.PackedBinaryConv2d`, :mod:`kdengine.snn.binary`): the step is the layer's
  own plan, ``layer.inference_plan(x, out_buffer=True)`` (:mod:`kdengine.nn.plan`), the code the
  layer's ``forward`` runs too: backend resolved once, the packed weights, scale and bias ready in
  the compute dtype, for a binary conv the weights repacked to the channel-word order of the
  im2col GEMM and the zero-padding border correction computed once per input shape, the conv
  output handed on channels-last (no transpose copy);
* ``nn.Linear`` and ``mode="weights"`` binary linear layers write into an output buffer
  preallocated per plan (``torch.addmm(..., out=)`` / ``torch.mm(..., out=)``; the scale and bias
  of a binary layer are applied in place on that buffer: ``out_buffer=True``);
* ``nn.ReLU`` / ``nn.Hardtanh`` run in place when their input is a tensor the plan owns (a
  preallocated buffer or a fresh layer output, never the caller's input);
* ``nn.Flatten`` is a view; ``nn.Identity`` and ``nn.Dropout`` (eval) are dropped from the plan;
* ``nn.BatchNorm*`` (eval, running statistics) calls ``F.batch_norm`` with its tensors captured.

Packed-to-packed chains (:mod:`kdengine.infer.chain`): an XNOR layer whose output reaches another
XNOR layer only through batch norms, hardtanh / ReLU, identities and at most one max-pool hands
on packed channel words: its counts are thresholded straight to bits (the batch norms etc.
folded into per-channel integer thresholds, bisected on those very modules), the max-pool ANDs
words, and the next layer's im2col reads the words. No float activation exists between them.

What still allocates per call: the binary kernels' outputs (helper ops have no ``out=``
argument; for conv also the im2col words), ``nn.Conv2d``, pooling and batch norm outputs. A plan's
preallocated bytes are reported by :meth:`InferenceModel.plan_summary`.

Exactness. Every step performs the same floating-point operations as the module's own
``forward`` (same ATen kernels, same order), so :meth:`InferenceModel.predict` equals
``module(x)`` bit for bit (tested). NaN in: float layers propagate it; a binary layer raises
ValueError (a NaN has no sign bit), like :mod:`kdengine.ops.binary`.

Plans hold buffers, so one :class:`InferenceModel` runs one call at a time (a lock serialises
concurrent callers). Changing the module's weights after a plan was built needs :meth:`reset`.
Up to :data:`MAX_PLANS` input signatures are cached (least recently used is dropped).

Leaf types without a plan that the runtime does not know run through their own ``forward`` (a
generic step).
"""
from __future__ import annotations

import argparse
import math
import os
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine import _dispatch
from kdengine.infer.chain import find_links, post_ops
from kdengine.nn.packed import PackedBinaryConv2d, PackedBinaryLinear
from kdengine.nn.plan import PlannedModule
from kdengine.nn.pool import word_pool_plan

__all__ = ["InferenceModel", "LatencyStats", "load", "MAX_PLANS"]

MAX_PLANS = 8
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
PathLike = Union[str, "os.PathLike[str]"]
Step = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of :meth:`InferenceModel.predict` over ``repeat`` timed calls (ms).

    Percentiles are nearest-rank: ``p50_ms`` is the ``ceil(0.50 n)``-th smallest time and
    ``p99_ms`` the ``ceil(0.99 n)``-th (with fewer than 100 calls, p99 is the maximum).
    """

    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeat: int
    batch: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in (0, 100] of an ascending, non-empty list."""
    n = len(sorted_values)
    return sorted_values[min(n, max(1, math.ceil(q / 100.0 * n))) - 1]


def latency_stats(times_s: list[float], batch: int) -> LatencyStats:
    """:class:`LatencyStats` of per-call wall times in seconds."""
    if not times_s:
        raise ValueError("times_s is empty; need at least one timed call")
    t = sorted(times_s)
    return LatencyStats(
        p50_ms=percentile(t, 50) * 1e3,
        p99_ms=percentile(t, 99) * 1e3,
        mean_ms=sum(t) / len(t) * 1e3,
        min_ms=t[0] * 1e3,
        max_ms=t[-1] * 1e3,
        repeat=len(t),
        batch=batch,
    )


# --------------------------------------------------------------------------- plan


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaves of a tree of ``nn.Sequential`` in execution order; any other module with
    children is one opaque leaf (run through its own forward)."""
    if type(module) is nn.Sequential:
        out: list[tuple[str, nn.Module]] = []
        for name, child in module._modules.items():
            if child is None:
                continue
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or "<root>", module)]


class _Built:
    """What a step factory returns: the step, its output for the building call, whether the
    output is owned by the plan (safe to modify in place), what it preallocated."""

    __slots__ = ("fn", "y", "owned", "prealloc", "precomputed", "kind")

    def __init__(self, fn: Optional[Step], y: Tensor, owned: bool, kind: str, prealloc: int = 0,
                 precomputed: int = 0):
        self.fn, self.y, self.owned, self.kind = fn, y, owned, kind
        self.prealloc, self.precomputed = prealloc, precomputed


def _step_linear(m: nn.Linear, x: Tensor) -> _Built:
    if x.dim() != 2 or x.shape[1] != m.in_features or x.dtype != m.weight.dtype:
        return _step_generic(m, x, owned_out=True)
    w_t = m.weight.t()  # a view: F.linear calls addmm(bias, x, weight.t()) / mm(x, weight.t())
    buf = torch.empty((x.shape[0], m.out_features), dtype=x.dtype, device=x.device)
    if m.bias is not None:
        b = m.bias

        def fn(x: Tensor) -> Tensor:
            return torch.addmm(b, x, w_t, out=buf)
    else:

        def fn(x: Tensor) -> Tensor:
            return torch.mm(x, w_t, out=buf)

    return _Built(fn, fn(x), True, "linear (out= buffer)", buf.numel() * buf.element_size())


def _step_layer_plan(m: nn.Module, x: Tensor) -> _Built:
    """A layer with its own plan (packed and spiking binary layers): the step is its
    :attr:`~kdengine.nn.LayerPlan.run`, the code its ``forward`` runs too."""
    plan = m.inference_plan(x, out_buffer=True)
    return _Built(plan.run, plan.run(x), True, plan.kind, plan.prealloc_bytes, plan.precomputed_bytes)


def _step_bn(m: nn.modules.batchnorm._BatchNorm, x: Tensor) -> _Built:
    if m.training or m.running_mean is None or m.running_var is None:
        return _step_generic(m, x, owned_out=True)
    rm, rv, w, b, eps = m.running_mean, m.running_var, m.weight, m.bias, m.eps
    # nn.BatchNorm's eval forward is exactly this call (momentum is unused when training=False).
    exp = 0.0 if m.momentum is None else m.momentum

    def fn(x: Tensor) -> Tensor:
        return F.batch_norm(x, rm, rv, w, b, False, exp, eps)

    try:
        y = fn(x)
    except (RuntimeError, ValueError):
        return _step_generic(m, x, owned_out=True)  # let the module raise its own message
    return _Built(fn, y, True, "batch norm (eval)")


def _step_act(m: nn.Module, x: Tensor, owned: bool) -> _Built:
    if isinstance(m, nn.ReLU):
        fn: Step = torch.relu_ if owned else torch.relu
        return _Built(fn, fn(x), True, "relu" + (" (in place)" if owned else ""))
    lo, hi = m.min_val, m.max_val
    if owned:
        fn = lambda x: F.hardtanh_(x, lo, hi)  # noqa: E731
    else:
        fn = lambda x: F.hardtanh(x, lo, hi)  # noqa: E731
    return _Built(fn, fn(x), True, "hardtanh" + (" (in place)" if owned else ""))


def _step_generic(m: nn.Module, x: Tensor, owned_out: bool = False) -> _Built:
    fn = m.forward if owned_out else m
    return _Built(fn, fn(x), owned_out, f"{type(m).__name__} forward")


def _make_step(m: nn.Module, x: Tensor, owned: bool) -> _Built:
    t = type(m)
    if t in (nn.Identity, nn.Dropout):
        return _Built(None, x, owned, "skipped (identity at inference)")
    if t is nn.Flatten:
        s, e = m.start_dim, m.end_dim
        fn = lambda x: x.flatten(s, e)  # noqa: E731
        # a view of the input, or a fresh copy if it is not contiguous: owned iff the input is
        return _Built(fn, fn(x), owned, "flatten (view)")
    if t is nn.Linear:
        return _step_linear(m, x)
    if isinstance(m, PlannedModule):
        return _step_layer_plan(m, x)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _step_bn(m, x)
    if t in (nn.ReLU, nn.Hardtanh):
        return _step_act(m, x, owned)
    if t in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d):
        return _step_generic(m, x, owned_out=True)  # fresh output tensors
    return _step_generic(m, x, owned_out=False)  # unknown: it might return its input


class _Plan:
    """Steps of one input signature, and what they preallocated."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.summary: list[dict] = []
        self.prealloc_bytes = 0  # output buffers written with out=
        self.precomputed_bytes = 0  # weight-derived tensors made once per input shape

    def run(self, x: Tensor) -> Tensor:
        for fn in self.steps:
            x = fn(x)
        return x


def _chained_step(idx: int, m: nn.Module, x, links: dict, leaves: list, float_dtype: torch.dtype) -> _Built:
    """The step of a leaf in a packed-to-packed chain (:mod:`kdengine.infer.chain`)."""
    link = links.get(("producer", idx))
    if link is not None:
        post = post_ops([leaves[j] for j in link.post], isinstance(m, PackedBinaryConv2d))
        plan = m.inference_plan(x, out_buffer=True, packed_output=True, post=post, out_dtype=float_dtype)
    elif ("pool", idx) in links:
        plan = word_pool_plan(x, m.kernel_size, m.stride, m.padding, m.dilation,
                              leaves[links[("pool", idx)].producer].backend)
    else:  # a consumer, reading packed signs
        plan = m.inference_plan(x, out_buffer=True, out_dtype=float_dtype)
    return _Built(plan.run, plan.run(x), True, plan.kind, plan.prealloc_bytes, plan.precomputed_bytes)


def _build_plan(module: nn.Module, x: Tensor) -> tuple[_Plan, Tensor]:
    plan = _Plan()
    owned = False  # the caller's tensor is never modified in place
    named = _leaves(module)
    leaves = [m for _, m in named]
    links: dict = {}
    for link in find_links(leaves):
        links[("producer", link.producer)] = link
        links[("consumer", link.consumer)] = link
        if link.pool is not None:
            links[("pool", link.pool)] = link
        for j in link.folded:
            links[("folded", j)] = link
    float_dtype = x.dtype
    for idx, (name, m) in enumerate(named):
        if ("folded", idx) in links:
            producer = named[links[("folded", idx)].producer][0]
            plan.summary.append({"layer": name, "type": type(m).__name__,
                                 "step": f"folded into the thresholds of {producer!r}",
                                 "out_shape": tuple(x.shape), "prealloc_bytes": 0, "precomputed_bytes": 0})
            continue
        try:
            if any((role, idx) in links for role in ("producer", "pool", "consumer")):
                built = _chained_step(idx, m, x, links, leaves, float_dtype)
            else:
                built = _make_step(m, x, owned)
        except ValueError as exc:
            raise ValueError(f"layer {name!r} ({type(m).__name__}): {exc}") from None
        except (RuntimeError, TypeError, IndexError) as exc:
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}) cannot take an input of shape "
                f"{tuple(x.shape)} and dtype {x.dtype}: {exc}"
            ) from None
        if built.fn is not None:
            plan.steps.append(built.fn)
        plan.summary.append({"layer": name, "type": type(m).__name__, "step": built.kind,
                             "out_shape": tuple(built.y.shape), "prealloc_bytes": built.prealloc,
                             "precomputed_bytes": built.precomputed})
        plan.prealloc_bytes += built.prealloc
        plan.precomputed_bytes += built.precomputed
        x, owned = built.y, built.owned
        if isinstance(x, Tensor) and x.is_floating_point():
            float_dtype = x.dtype
    return plan, x


# --------------------------------------------------------------------------- model


_SHAPE_KEEPING = (nn.Identity, nn.Dropout, nn.ReLU, nn.Hardtanh)


def _input_spec(leaves: list[nn.Module]) -> tuple[Optional[tuple], Optional[int]]:
    """What the first shape-bound layer says about one input sample: ``(dims, None)`` with None
    for a free size (a conv's ``(C, None, None)``, a linear layer's ``(F,)``), ``(None, F)`` for
    ``F`` values per sample flattened first, ``(None, None)`` when nothing is known."""
    flat = False
    for m in leaves:
        if isinstance(m, _SHAPE_KEEPING):
            continue
        if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and not flat:
            flat = True
            continue
        if isinstance(m, (nn.Conv2d, PackedBinaryConv2d)) and not flat:
            return (m.in_channels, None, None), None
        if isinstance(m, nn.BatchNorm2d) and not flat:
            return (m.num_features, None, None), None
        n = getattr(m, "in_features", None) if isinstance(m, (nn.Linear, PackedBinaryLinear)) else None
        if n is None and flat and isinstance(m, nn.BatchNorm1d):
            n = m.num_features
        if n is not None:
            return (None, n) if flat else ((n,), None)
        break
    return None, None


class InferenceModel:
    """A packed model ready to run: :meth:`predict`, :meth:`latency`, :meth:`plan_summary`.

    Args:
        module: the model (e.g. from :func:`kdengine.serialize.load_packed`); put in eval mode,
            ``requires_grad`` turned off. Packed binary layers run the packed kernels.
        path: the file it came from (informational).
        input_shape: the shape of one sample without the batch dimension (recorded by
            :func:`kdengine.serialize.save_packed`); without it the expected shape comes from the
            first layer (a conv's channels, a linear layer's features).
    """

    def __init__(self, module: nn.Module, path: Optional[str] = None,
                 input_shape: Optional[tuple[int, ...]] = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.path = path
        self._plans: "OrderedDict[tuple, _Plan]" = OrderedDict()
        self._lock = threading.Lock()
        first = next(iter(self.module.parameters()), None)
        if first is None:
            first = next(iter(self.module.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        if input_shape is not None:
            self._sample, self._sample_values = tuple(int(d) for d in input_shape), None
        else:
            self._sample, self._sample_values = _input_spec([m for _, m in _leaves(self.module)])

    # -- inputs

    def expected_input(self, single: bool = False) -> Optional[str]:
        """The input shapes the model takes, in words (``"(N, 1, H, W)"``; with ``single``, also
        one sample without the batch dimension); None when the first layer does not tell."""
        if self._sample is not None:
            names = ("C", "H", "W") if len(self._sample) == 3 else ("?",) * len(self._sample)
            dims = ", ".join(str(d) if d is not None else names[i] for i, d in enumerate(self._sample))
            one = f"({dims},)" if len(self._sample) == 1 else f"({dims})"
            return f"(N, {dims})" + (f" or {one}" if single else "")
        if self._sample_values is not None:
            f = self._sample_values
            return f"(N, {f}), or (N, ...) with {f} values per sample" + (f", or ({f},)" if single else "")
        return None

    def _check_shape(self, x: Tensor, shown: tuple[int, ...], single: bool = False) -> None:
        """ValueError naming the expected shapes unless ``x`` (batch first) fits the first layer."""
        if self._sample is not None:
            ok = x.dim() == len(self._sample) + 1 and all(
                d is None or d == n for d, n in zip(self._sample, x.shape[1:]))
        elif self._sample_values is not None:
            ok = x.dim() >= 2 and math.prod(x.shape[1:]) == self._sample_values
        else:
            return
        if not ok:
            raise ValueError(f"input has shape {tuple(shown)}; the model expects {self.expected_input(single)}")

    def _check_input(self, x: Any) -> Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be floating (float32/float64/float16/bfloat16), got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the model on {self.device}")
        return x.detach()

    def adapt_input(self, x: Tensor) -> Tensor:
        """Give an image batch the layout the first layer wants (used by the CLI):
        ``(N, H, W)`` -> ``(N, 1, H, W)`` for a conv net with one input channel, one sample without
        the batch dimension -> a batch of one, ``(N, ...)`` -> ``(N, F)`` for a net whose first
        layer is linear with ``F`` inputs. An input that fits none of these is a ValueError that
        names its shape and the shapes the model takes."""
        shown = tuple(x.shape)
        sample, values = self._sample, self._sample_values
        if sample is not None:
            if len(sample) == 3 and sample[0] == 1 and x.dim() == 3:
                x = x.unsqueeze(1)  # (N, H, W) grey images
            elif len(sample) == 3 and sample[0] == 1 and x.dim() == 2:
                x = x.reshape(1, 1, *x.shape)
            elif x.dim() == len(sample):
                x = x.unsqueeze(0)
            elif len(sample) == 1 and x.dim() > 2 and math.prod(x.shape[1:]) == sample[0]:
                x = x.reshape(x.shape[0], sample[0])
            elif len(sample) == 1 and x.dim() == 1 and x.numel() == sample[0]:
                x = x.reshape(1, sample[0])
        elif values is not None and x.dim() >= 1 and x.numel() == values and (
                x.dim() == 1 or math.prod(x.shape[1:]) != values):
            x = x.unsqueeze(0)  # one sample
        if x.dim() >= 1:
            self._check_shape(x, shown, single=True)
        return x

    # -- running

    def _plan_for(self, x: Tensor) -> tuple[_Plan, Optional[Tensor]]:
        # The caller holds self._lock (predict, plan_summary; reset clears under it too): the LRU's
        # get / move_to_end / popitem never race, and a plan's preallocated buffers are used by
        # one call at a time. Plans are per model; the binary ops' own shared caches have locks.
        key = (tuple(x.shape), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan, None
        self._check_shape(x, x.shape)  # a cached plan's signature has passed it
        plan, y = _build_plan(self.module, x)
        self._plans[key] = plan
        while len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)
        return plan, y

    def predict(self, x: Union[Tensor, np.ndarray]) -> Tensor:
        """Logits of ``x`` (batch first: ``(B, ...)``, floating, on the model's device).

        The first call with a new input shape builds the plan (module docstring); later calls
        reuse it. Returns a new tensor (not a view of a plan buffer), not requiring grad.
        """
        x = self._check_input(x)
        with self._lock:
            with torch.inference_mode():
                plan, y = self._plan_for(x)
                if y is None:
                    y = plan.run(x)
            return y.clone()  # outside inference mode: an ordinary tensor, never a plan buffer

    def predict_batches(self, x: Union[Tensor, np.ndarray], batch: int) -> Tensor:
        """:meth:`predict` over ``x`` in chunks of ``batch`` rows, concatenated."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        x = self._check_input(x)
        return torch.cat([self.predict(x[i : i + batch]) for i in range(0, x.shape[0], batch)])

    __call__ = predict

    def latency(self, x: Union[Tensor, np.ndarray], repeat: int = 100, warmup: int = 5) -> LatencyStats:
        """Wall-clock latency of :meth:`predict` on ``x`` (whole calls, plan already built):
        p50 and p99 over ``repeat`` timed calls after ``warmup`` untimed ones."""
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got {repeat!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        x = self._check_input(x)
        cuda = self.device.type == "cuda"
        self.predict(x)  # builds the plan
        for _ in range(warmup):
            self.predict(x)
        times = []
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.predict(x)
            if cuda:  # the call is complete when the GPU is done with it
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return latency_stats(times, int(x.shape[0]))

    def plan_summary(self, x: Union[Tensor, np.ndarray]) -> dict:
        """The plan for ``x``'s signature: one entry per leaf (step kind, output shape, bytes of
        preallocated output buffers, bytes of weight-derived tensors precomputed for this shape)
        and the totals."""
        x = self._check_input(x)
        with self._lock, torch.inference_mode():
            plan, _ = self._plan_for(x)
        return {"input_shape": tuple(x.shape), "steps": list(plan.summary),
                "prealloc_bytes": plan.prealloc_bytes, "precomputed_bytes": plan.precomputed_bytes}

    def reset(self) -> None:
        """Drop every cached plan (needed after changing the module's weights)."""
        with self._lock:
            self._plans.clear()

    # -- description

    def binary_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in _leaves(self.module)
                if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d))]

    def describe(self) -> dict:
        """Layer counts and sizes (bytes of the state; of the packed weight bits)."""
        leaves = _leaves(self.module)
        binary = self.binary_layers()
        state = sum(t.numel() * t.element_size() for t in self.module.state_dict().values())
        return {
            "path": self.path,
            "layers": len(leaves),
            "binary_layers": len(binary),
            "xnor_layers": sum(1 for _, m in binary if m.mode == "both"),
            "state_bytes": state,
            "weight_bits_bytes": sum(m.weight_bits.numel() * 4 for _, m in binary),
            "file_bytes": os.path.getsize(self.path) if self.path and os.path.exists(self.path) else None,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (f"InferenceModel(path={self.path!r}, layers={d['layers']}, "
                f"binary_layers={d['binary_layers']}, device={self.device})")


def load(path: PathLike, device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> InferenceModel:
    """Load a packed model saved by :func:`kdengine.serialize.save_packed` into an
    :class:`InferenceModel` on ``device``.

    Every problem with the file (missing, truncated, altered, unknown version, inconsistent) is
    the ValueError of :func:`kdengine.serialize.load_packed`, naming the file (FileNotFoundError
    if it does not exist). ``backend`` (e.g. ``"cpu"``, ``"reference"``) forces the binary ops'
    backend; None lets the dispatcher choose.
    """
    from kdengine.serialize import load_packed_with_manifest

    if backend is not None and backend not in ("auto", *_dispatch.BACKENDS):
        raise ValueError(f"backend must be one of {_dispatch.BACKENDS} or 'auto', got {backend!r}")
    module, manifest = load_packed_with_manifest(path, device=device)
    if backend is not None:
        for m in module.modules():
            if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d)):
                m.backend = backend
    return InferenceModel(module, path=os.fspath(path), input_shape=manifest.get("input_shape"))


# --------------------------------------------------------------------------- command line

_IMAGE_KEYS = ("images", "x", "inputs", "data")
_LABEL_KEYS = ("labels", "y", "targets")


def _to_float_images(a: Any, where: str) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)  # 8-bit pixels -> [0, 1], as kdengine.data does
    if t.dtype in FLOAT_DTYPES:
        return t.to(torch.float32)
    raise TypeError(f"{where}: images must be uint8 (pixels 0..255) or floating, got dtype {t.dtype}")


def _to_labels(a: Any, n: int, where: str) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{where}: labels must be integers, got dtype {t.dtype}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{where}: labels must have shape ({n},) (one per image), got {tuple(t.shape)}")
    return t.to(torch.int64)


def _pick(d: dict, keys: tuple[str, ...], where: str, what: str, required: bool) -> Any:
    found = [k for k in keys if k in d]
    if len(found) > 1:
        raise ValueError(f"{where}: several {what} entries {found}; keep one of {keys}")
    if found:
        return d[found[0]]
    if required:
        if len(d) == 1:
            return next(iter(d.values()))
        raise ValueError(f"{where}: no {what} entry; expected one of {keys}, found {sorted(d)}")
    return None


def load_input(spec: str, max_input_bytes: Optional[int] = None) -> tuple[Tensor, Optional[Tensor], str]:
    """The INPUT of ``kdengine infer``: ``(images float32 (N, ...), labels int64 (N,) or None,
    description)``.

    * ``mnist:SPLIT[:N]``: the bundled MNIST images of :func:`kdengine.data.load_mnist`
      (``SPLIT``: ``test`` = the 2,000 held-out images of the seeded split, ``train`` or ``all``),
      the first ``N`` of them; labels known.
    * ``*.npy``: one array of images (``allow_pickle=False``: object arrays are refused).
    * ``*.npz`` / ``*.safetensors``: images under ``images`` / ``x`` / ``inputs`` / ``data`` (or
      the only entry), labels (optional) under ``labels`` / ``y`` / ``targets``.

    uint8 images are scaled to ``[0, 1]`` (``/ 255``); floating images are used as they are.

    A file must be a regular file (a directory, FIFO or device is a ValueError at once) whose
    arrays decode to at most ``max_input_bytes`` (default
    :data:`kdengine.infer.inputs.DEFAULT_MAX_INPUT_BYTES`, 256 MiB), checked from the array
    headers before anything is decompressed or allocated (:func:`kdengine.infer.inputs.check_input_file`).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"INPUT must be a file path or mnist:SPLIT[:N], got {spec!r}")
    if spec.startswith("mnist:") or spec == "mnist":
        from kdengine.data import load_mnist

        parts = spec.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "test"
        if split not in ("test", "train", "all") or len(parts) > 3:
            raise ValueError(f"INPUT {spec!r}: expected mnist:test, mnist:train or mnist:all, optionally :N")
        x, y = load_mnist(split)
        if len(parts) == 3:
            try:
                n = int(parts[2])
            except ValueError:
                raise ValueError(f"INPUT {spec!r}: N must be a positive integer, got {parts[2]!r}") from None
            if n < 1:
                raise ValueError(f"INPUT {spec!r}: N must be >= 1, got {n}")
            x, y = x[:n], y[:n]
        return x, y, f"bundled MNIST, split {split!r} (kdengine.data.load_mnist, seed 0), {len(x)} images"
    from kdengine.infer.inputs import DEFAULT_MAX_INPUT_BYTES, check_input_file

    if not os.path.exists(spec):
        raise FileNotFoundError(f"INPUT {spec!r}: no such file (or use mnist:test[:N])")
    low = spec.lower()
    if low.endswith((".npy", ".npz", ".safetensors")):
        check_input_file(spec, DEFAULT_MAX_INPUT_BYTES if max_input_bytes is None else max_input_bytes)
    if low.endswith(".npy"):
        try:
            arr = np.load(spec, allow_pickle=False)
        except (ValueError, EOFError, OSError, MemoryError) as exc:
            raise ValueError(f"{spec}: not a plain .npy array (pickled objects are refused): {exc}") from None
        x, y = _to_float_images(arr, spec), None
    elif low.endswith(".npz"):
        try:
            with np.load(spec, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (ValueError, EOFError, OSError, MemoryError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{spec}: not a plain .npz archive (pickled objects are refused): {exc}") from None
        x = _to_float_images(_pick(d, _IMAGE_KEYS, spec, "images", True), spec)
        lab = _pick(d, _LABEL_KEYS, spec, "labels", False)
        y = None if lab is None else _to_labels(lab, x.shape[0], spec)
    elif low.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            d = load_file(spec)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{spec}: not a readable safetensors file: {exc}") from None
        x = _to_float_images(_pick(d, _IMAGE_KEYS, spec, "images", True), spec)
        lab = _pick(d, _LABEL_KEYS, spec, "labels", False)
        y = None if lab is None else _to_labels(lab, x.shape[0], spec)
    else:
        raise ValueError(f"INPUT {spec!r}: expected a .npy, .npz or .safetensors file, or mnist:SPLIT[:N]")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{spec}: no images (shape {tuple(x.shape)})")
    return x, y, f"{spec}: {x.shape[0]} images of shape {tuple(x.shape[1:])}"


def infer_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kdengine infer`` (every argument with its help text)."""
    ap = argparse.ArgumentParser(prog="kdengine infer", description="Run a packed binary model.")
    ap.add_argument("model", help="a .safetensors file written by kdengine.serialize.save_packed")
    ap.add_argument("input", help="images: .npy / .npz / .safetensors, or mnist:test[:N] (bundled)")
    ap.add_argument("--batch", type=int, default=1, help="batch size of the pass (default 1)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (predictions, accuracy, latency, model info) instead of text")
    ap.add_argument("--repeat", type=int, default=100, help="timed calls per latency figure (default 100)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--backend", default=None, choices=["auto", *_dispatch.BACKENDS],
                    help="backend of the binary ops (default: auto)")
    ap.add_argument("--max-input-mb", type=float, default=None,
                    help="largest decoded INPUT accepted, in MiB (default 256)")
    ap.add_argument("--show", type=int, default=20, help="predictions printed in text mode (default 20)")
    return ap


def infer_main(argv: Optional[list[str]] = None) -> int:
    """``kdengine infer MODEL INPUT [--batch N] [--json] [--repeat R] [--threads T] [--backend B]``.

    Loads MODEL (:func:`load`), runs every image of INPUT (:func:`load_input`) in batches of N,
    prints the predictions, the accuracy when labels are known, and the latency: p50/p99 of
    ``repeat`` timed calls at batch 1 (and at batch N when N > 1) plus the throughput of the whole
    pass. ``--json`` prints one JSON object instead. Returns the exit status (0 ok, 2 bad input).
    """
    import json
    import sys

    a = infer_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"kdengine infer: error: {msg}", file=sys.stderr)
        return 2

    if a.batch < 1:
        return fail(f"--batch must be >= 1, got {a.batch}")
    if a.repeat < 1:
        return fail(f"--repeat must be >= 1, got {a.repeat}")
    if a.max_input_mb is not None and not a.max_input_mb > 0:
        return fail(f"--max-input-mb must be > 0, got {a.max_input_mb}")
    max_input = None if a.max_input_mb is None else int(a.max_input_mb * 2**20)
    if a.threads is not None:
        if a.threads < 1:
            return fail(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    try:
        t0 = time.perf_counter()
        model = load(a.model, backend=a.backend)
        load_s = time.perf_counter() - t0
        x, labels, what = load_input(a.input, max_input_bytes=max_input)
        x = model.adapt_input(x)
        model.predict(x[: a.batch])  # build the plan of the batch size before timing the pass
        t0 = time.perf_counter()
        logits = model.predict_batches(x, a.batch)
        pass_s = time.perf_counter() - t0
        lat1 = model.latency(x[:1], repeat=a.repeat)
        latn = model.latency(x[: a.batch], repeat=a.repeat) if a.batch > 1 and x.shape[0] >= a.batch else None
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        return fail(str(exc) or type(exc).__name__)
    pred = logits.argmax(-1)
    n = int(x.shape[0])
    out: dict[str, Any] = {
        "model": a.model,
        "input": what,
        "n": n,
        "batch": a.batch,
        "threads": torch.get_num_threads(),
        "model_info": model.describe(),
        "load_seconds": round(load_s, 4),
        "predictions": pred.tolist(),
        "latency_batch1_ms": {k: round(v, 4) if isinstance(v, float) else v for k, v in lat1.to_dict().items()},
        "pass_seconds": round(pass_s, 4),
        "throughput_images_per_s": round(n / pass_s, 1) if pass_s > 0 else None,
    }
    if latn is not None:
        out["latency_batchN_ms"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in latn.to_dict().items()}
    if labels is not None:
        correct = int((pred == labels).sum())
        out["accuracy"] = round(correct / n, 6)
        out["correct"] = correct
    if a.json:
        print(json.dumps(out))
        return 0
    info = out["model_info"]
    print(f"model: {a.model} ({info['layers']} layers, {info['binary_layers']} binary of which "
          f"{info['xnor_layers']} XNOR-popcount; {info['file_bytes']} bytes on disk)")
    print(f"input: {what}; layout {tuple(x.shape)}; batch {a.batch}; {out['threads']} threads")
    shown = pred[: max(a.show, 0)].tolist()
    more = f" ... ({n - len(shown)} more; --json prints all)" if n > len(shown) else ""
    print(f"predictions: {' '.join(map(str, shown))}{more}")
    if labels is not None:
        print(f"accuracy: {out['accuracy']:.4f} ({out['correct']}/{n})")
    print(f"latency batch 1: p50 {lat1.p50_ms:.3f} ms, p99 {lat1.p99_ms:.3f} ms ({lat1.repeat} calls)")
    if latn is not None:
        print(f"latency batch {a.batch}: p50 {latn.p50_ms:.3f} ms, p99 {latn.p99_ms:.3f} ms ({latn.repeat} calls)")
    print(f"whole pass: {pass_s:.3f} s, {out['throughput_images_per_s']} images/s")
    return 0
