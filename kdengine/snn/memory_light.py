"""Memory-light BPTT: synapse + neuron blocks that keep their input spikes as 1 bit for backward.

Trained with plain autograd, a spiking layer ``s_out = neuron(synapse(s_in))`` keeps, from its
forward until its backward, the input spikes ``s_in`` ``(T, B, ...)`` as float (the synapse's
weight gradient needs them), the neuron's input current (its backward recomputes the membrane
from it), and whatever the layers in between save (a batch norm's input, a max-pool's int64
indices): several float tensors of T x B x neurons each, per layer. A :class:`SpikingBlock`
instead runs its forward without a graph and keeps only

* the input spikes, packed to 1 bit each (:func:`pack_spike_bits`: 32x smaller than float32),
* the parameters (already alive) and the neuron's initial state (carried from a previous chunk),
* the random-number state (so a dropout draws the same mask again) and, for submodules in eval
  mode, a copy of their buffers (a batch norm's running statistics, per channel);

and its backward unpacks the spikes, re-runs the synapse and the neuron's *forward* under
autograd on them (the fused IF kernel's own backward then recomputes the membrane from the
current) and takes the vector-Jacobian product of that local graph. It runs the very same ops on
the very same values as the plain path, so every gradient -- input, weights, bias, batch-norm
affine, and learnable neuron parameters such as a LIF's tau -- is bit-identical to the unpacked
path's (``memory_light=False``, plain autograd through the same layers). The price: one more
forward of the block per backward. The peak shifts from the sum over layers of their saved
activations to one layer's working set plus 1 bit per input spike of every layer (so the gain in
peak memory grows with depth; in a net dominated by one layer it is small). On CPU, kdengine's
kernel output pool keeps freed spike / gradient buffers resident for reuse
(:mod:`kdengine.cpu_pool`): set ``KDENGINE_CPU_POOL_MB=0`` when memory is what matters.

The neuron is pluggable: any multi-step module ``(T, B, ...) currents -> (T, B, ...) spikes``
(:class:`kdengine.snn.IFNeuron`, a LIF / PLIF module, SpikingJelly's multi-step nodes), or a plain
callable with the same contract (``functools.partial(if_multistep, v_threshold=0.5)``). Its
parameters get gradients; the state of a :class:`kdengine.snn.Stateful` neuron (``IFNeuron.v``)
is carried between calls with its graph, so chunked BPTT works as with the plain path. Side
effects of the re-run (batch-norm running statistics, spike counters, the neuron's state) are
undone: after backward every module holds what it held before it.

Requirements on the layers: the synapse treats batch rows independently (conv, linear, pooling,
flatten, batch norm: its statistics over T x B match the plain path's), and nothing inside the
block reads state that changes between forward and backward except through the attributes and
buffers restored here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdengine.snn.layers import IFNeuron, Stateful

__all__ = [
    "PackedSpikeBits",
    "pack_spike_bits",
    "unpack_spike_bits",
    "memory_light_block",
    "SpikingBlock",
    "SpikingLinearBlock",
    "SpikingConvBlock",
]

Neuron = Union[nn.Module, Callable[[Tensor], Tensor]]
_ROW = 4096  # spikes per packed row: rows pack in parallel, and 4096 is a whole number of words


# --------------------------------------------------------------------------- 1-bit storage


@dataclass(frozen=True)
class PackedSpikeBits:
    """A 0/1 tensor stored as 1 bit per element.

    ``words``: int32 ``(ceil(numel / 32),)``, the elements in the tensor's *memory* order, bit
    ``j`` of word ``w`` = element ``32 w + j`` (padding bits 0). ``shape``/``perm`` rebuild a
    tensor with the original strides (``perm``: the dims in memory order, outermost first).
    ``dtype``/``device``: of the original.
    """

    words: Tensor
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4


def _memory_order(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(x.permute(perm), perm)`` with the permuted tensor contiguous (dims sorted by stride),
    so that dense layouts (contiguous, channels-last) pack without a copy; others get one."""
    if x.is_contiguous():
        return x, tuple(range(x.dim()))
    perm = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d])))
    xp = x.permute(perm)
    if not xp.is_contiguous():
        return x.contiguous(), tuple(range(x.dim()))
    return xp, perm


def _spike_mask(x: Tensor, name: str) -> Tensor:
    """``x != 0`` as bool after checking that ``x`` holds only 0 and 1 (ValueError otherwise)."""
    mask = x.ne(0)
    bad = mask & x.ne(1)  # NaN is != 0 and != 1
    if bool(bad.any()):
        first = x[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold spikes (only 0 and 1): a memory-light block stores its input as 1 bit "
            f"per element, but found {first}. Give analog input (images, currents) to a block built "
            f"with time_steps=T (direct encoding: the input is kept as is), or use memory_light=False"
        )
    return mask


def pack_spike_bits(x: Tensor, *, name: str = "x") -> PackedSpikeBits:
    """Pack a 0/1 floating tensor (any shape, any dense layout) to 1 bit per element.

    ValueError (naming ``name``) for any value other than 0 and 1, NaN included. Packing runs on
    :func:`kdengine.ops.binary.pack_spikes` (its C++ kernel where built) in rows of 4096.
    """
    from kdengine.ops.binary import pack_spikes

    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor of 0/1 spikes, got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    xp, perm = _memory_order(x.detach())
    flat = _spike_mask(xp, name).reshape(-1)
    n = flat.numel()
    full = n // _ROW
    parts = []
    if full:
        parts.append(pack_spikes(flat[: full * _ROW].view(full, _ROW)).bits.reshape(-1))
    if n - full * _ROW:
        parts.append(pack_spikes(flat[full * _ROW:].view(1, -1)).bits.reshape(-1))
    words = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.int32)
    return PackedSpikeBits(words, tuple(xp.shape), perm, x.dtype)


def unpack_spike_bits(p: PackedSpikeBits) -> Tensor:
    """The tensor packed by :func:`pack_spike_bits`: same values, dtype, shape and strides."""
    if sys.byteorder == "little":  # one byte of temporary per element instead of an int32
        shifts = torch.arange(8, dtype=torch.uint8, device=p.words.device)
        bits = (p.words.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=p.words.device)
        bits = (p.words.unsqueeze(-1) >> shifts) & 1
    xp = bits.reshape(-1)[: p.numel].to(p.dtype).view(p.shape)
    inv = [0] * len(p.perm)
    for i, d in enumerate(p.perm):
        inv[d] = i
    return xp.permute(inv)


# --------------------------------------------------------------------------- side effects


def _modules_of(things: Sequence[Any]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for t in things:
        if isinstance(t, nn.Module):
            for m in t.modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


def _attributes(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, dict]]:
    """Every module's attributes, dict-valued ones copied one level (SpikingJelly keeps a neuron's
    state in such a dict): rebinding an attribute (``self.v = ...``, ``self.count += ...``) after
    this is undone by :func:`_restore_attributes`."""
    return [(m, {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(m).items()}) for m in modules]


def _restore_attributes(saved: Sequence[tuple[nn.Module, dict]]) -> None:
    for m, attrs in saved:
        d = vars(m)
        d.clear()
        d.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in attrs.items()})


def _buffers(modules: Sequence[nn.Module], *, eval_only: bool) -> list[tuple[Tensor, Tensor]]:
    """(buffer, copy) pairs: the running statistics an in-place update changes."""
    out = []
    for m in modules:
        if eval_only and m.training:
            continue
        for b in m._buffers.values():
            if b is not None:
                out.append((b, b.detach().clone()))
    return out


def _restore_buffers(saved: Sequence[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)


# --------------------------------------------------------------------------- the block function


def _state_slots(neuron: Neuron) -> list[tuple[Stateful, str]]:
    """(module, attribute) of every carried state of a :class:`Stateful` neuron."""
    if not isinstance(neuron, nn.Module):
        return []
    return [(m, n) for m in neuron.modules() if isinstance(m, Stateful) for n in m._state_names]


class _Plan:
    """What one call needs besides tensors: the layers, how to run them, which states it carries."""

    def __init__(self, synapse: nn.Module, neuron: Neuron, time_steps: Optional[int]) -> None:
        self.synapse, self.neuron, self.time_steps = synapse, neuron, time_steps
        self.modules = _modules_of([synapse, neuron])
        self.slots = _state_slots(neuron)
        self.init_slots: list[tuple[Stateful, str]] = []
        self.final_slots: list[tuple[Stateful, str]] = []

    def run(self, x: Tensor) -> Tensor:
        return _run(self.synapse, self.neuron, x, self.time_steps)


def _run(synapse: nn.Module, neuron: Neuron, x: Tensor, time_steps: Optional[int]) -> Tensor:
    """The block's math: the synapse on every step (T folded into the batch), then the neuron over
    the T steps. Direct encoding (``time_steps``): the synapse runs once on the static ``(B, ...)``
    input and its output is the current at every step."""
    if time_steps is not None:
        c = synapse(x)
        cur = c.unsqueeze(0).expand(time_steps, *c.shape)
    else:
        t, b = x.shape[0], x.shape[1]
        cur = synapse(x.flatten(0, 1)).unflatten(0, (t, b))
    return neuron(cur)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


class _MemoryLightFn(torch.autograd.Function):
    """``apply(plan, x, n_params, *params, *init_states) -> (spikes, *final_states)``."""

    @staticmethod
    def forward(ctx, plan: _Plan, x: Tensor, n_params: int, *tensors: Tensor):
        ctx.plan, ctx.n_params = plan, n_params
        ctx.attrs = _attributes(plan.modules)  # before the run: the initial neuron state included
        ctx.eval_buffers = _buffers(plan.modules, eval_only=True)
        rng = _rng_state(x.device)
        if plan.time_steps is None:
            packed = pack_spike_bits(x)
            ctx.packed_meta = (packed.shape, packed.perm, packed.dtype)
            stored = packed.words
        else:
            ctx.packed_meta = None
            stored = x
        spikes = plan.run(x)
        finals = []
        plan.final_slots = []
        for m, n in plan.slots:
            v = getattr(m, n)
            if isinstance(v, Tensor):
                plan.final_slots.append((m, n))
                finals.append(v)
        ctx.final_slots = list(plan.final_slots)
        ctx.save_for_backward(stored, rng, *tensors, *(c for _, c in ctx.eval_buffers))
        ctx.set_materialize_grads(False)
        return (spikes, *finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_spikes: Optional[Tensor], *g_finals: Optional[Tensor]):
        plan, n_params = ctx.plan, ctx.n_params
        saved = ctx.saved_tensors
        stored, rng = saved[0], saved[1]
        n_states = len(plan.init_slots)
        params = saved[2:2 + n_params]
        states = saved[2 + n_params:2 + n_params + n_states]
        buffer_copies = saved[2 + n_params + n_states:]
        need = ctx.needs_input_grad
        need_x, need_p = need[1], need[3:3 + n_params]
        need_s = need[3 + n_params:3 + n_params + n_states]
        none = (None,) * (3 + n_params + n_states)
        if not any(need) or (g_spikes is None and all(g is None for g in g_finals)):
            return none
        if ctx.packed_meta is None:
            x = stored.detach()
        else:
            shape, perm, dtype = ctx.packed_meta
            x = unpack_spike_bits(PackedSpikeBits(stored, shape, perm, dtype))
        now_attrs = _attributes(plan.modules)
        now_buffers = _buffers(plan.modules, eval_only=False)
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            _restore_attributes(ctx.attrs)
            _restore_buffers([(b, c) for (b, _), c in zip(ctx.eval_buffers, buffer_copies)])
            with torch.enable_grad(), torch.random.fork_rng(devices=devices):
                if devices:
                    torch.cuda.set_rng_state(rng, x.device)
                else:
                    torch.set_rng_state(rng)
                x = x.requires_grad_(need_x)
                leaves = [s.detach().requires_grad_(ns) for s, ns in zip(states, need_s)]
                for (m, n), leaf in zip(plan.init_slots, leaves):
                    setattr(m, n, leaf)
                spikes = plan.run(x)
                outs, seeds = [], []
                if g_spikes is not None:
                    outs.append(spikes)
                    seeds.append(g_spikes)
                for (m, n), g in zip(ctx.final_slots, g_finals):
                    if g is not None:
                        outs.append(getattr(m, n))
                        seeds.append(g)
                wrt = ([x] if need_x else []) + [p for p, np_ in zip(params, need_p) if np_] + \
                      [leaf for leaf, ns in zip(leaves, need_s) if ns]
                pairs = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
                if pairs and wrt:
                    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [s for _, s in pairs],
                                                   allow_unused=True))
                else:
                    got = iter([None] * len(wrt))
        finally:
            _restore_attributes(now_attrs)
            _restore_buffers(now_buffers)
        gx = next(got) if need_x else None
        gp = [next(got) if np_ else None for np_ in need_p]
        gs = [next(got) if ns else None for ns in need_s]
        return (None, gx, None, *gp, *gs)


def _check_input(x: object, time_steps: Optional[int]) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if time_steps is None:
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (T, B, ...) with T >= 1 time steps first, got shape "
                             f"{tuple(x.shape)}")
    elif x.dim() < 1:
        raise ValueError("x must have shape (B, ...) (a static input, shown at every step), got a 0-dim tensor")
    return x


def _check_time_steps(time_steps: Optional[int]) -> Optional[int]:
    if time_steps is None:
        return None
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be None (spike input) or an int >= 1, got {time_steps!r}")
    return time_steps


def _parameters(synapse: nn.Module, neuron: Neuron) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in (synapse, neuron):
        if isinstance(m, nn.Module):
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def memory_light_block(x: Tensor, synapse: nn.Module, neuron: Neuron, *,
                       time_steps: Optional[int] = None) -> Tensor:
    """``neuron(synapse(x))`` over T steps, keeping ``x`` as 1 bit per spike for the backward.

    Args:
        x: ``(T, B, ...)`` input spikes (0/1, floating) -- or, with ``time_steps``, a static
            analog ``(B, ...)`` input shown at every step (direct encoding; kept as is, it has no
            T dimension).
        synapse: a stateless per-step layer on ``(T * B, ...)`` (``(B, ...)`` with
            ``time_steps``): conv, linear, pooling, flatten, batch norm, or a Sequential of them.
        neuron: a multi-step neuron, ``(T, B, ...) -> (T, B, ...)`` spikes (see the module doc).
        time_steps: None for spike input, else T for a static input.

    Returns:
        The neuron's output ``(T, B, ...)``. Gradients reach ``x``, the parameters of ``synapse``
        and ``neuron`` and a carried :class:`Stateful` neuron state, bit-identical to plain
        autograd through ``neuron(synapse(...))``. Without anything to differentiate (no grad
        mode, or no input and no parameter requiring grad) it is the plain forward.

    Raises:
        ValueError: ``x`` (spike input) holds a value other than 0 and 1; the shape is wrong.
        RuntimeError: double backward (``create_graph=True``) through the block.
    """
    time_steps = _check_time_steps(time_steps)
    x = _check_input(x, time_steps)
    if not isinstance(synapse, nn.Module):
        raise TypeError(f"synapse must be an nn.Module, got {type(synapse).__name__}")
    if not callable(neuron):
        raise TypeError(f"neuron must be a multi-step neuron module or callable, got {type(neuron).__name__}")
    params = [p for p in _parameters(synapse, neuron) if p.requires_grad]
    plan = _Plan(synapse, neuron, time_steps)
    init = [(m, n) for m, n in plan.slots if isinstance(getattr(m, n), Tensor)]
    tracked = [getattr(m, n) for m, n in init]
    if not torch.is_grad_enabled() or not (x.requires_grad or params or any(s.requires_grad for s in tracked)):
        if time_steps is None:
            _spike_mask(x, "x")  # the same contract with and without grad
        return plan.run(x)
    plan.init_slots = init
    out = _MemoryLightFn.apply(plan, x, len(params), *params, *tracked)
    for (m, n), v in zip(plan.final_slots, out[1:]):
        setattr(m, n, v)
    return out[0]


# --------------------------------------------------------------------------- modules


class SpikingBlock(nn.Module):
    """``neuron(synapse(x))`` over ``(T, B, ...)``, memory-light in training (see the module doc).

    Args:
        synapse: stateless per-step layer(s) (T folded into the batch).
        neuron: multi-step neuron module or callable; default :class:`kdengine.snn.IFNeuron` ()
            (threshold 1, reset by subtraction, atan surrogate).
        memory_light: True: keep the input as 1 bit and recompute in the backward; False: plain
            autograd through the same layers (the reference; same values, same gradients).
        time_steps: None: ``x`` is ``(T, B, ...)`` spikes. An int T: ``x`` is a static analog
            ``(B, ...)`` input shown at T steps (direct encoding, for a first layer): the synapse
            runs once per input instead of T times.
    """

    def __init__(self, synapse: nn.Module, neuron: Optional[Neuron] = None, *, memory_light: bool = True,
                 time_steps: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(synapse, nn.Module):
            raise TypeError(f"synapse must be an nn.Module, got {type(synapse).__name__}")
        if not isinstance(memory_light, bool):
            raise TypeError(f"memory_light must be a bool, got {type(memory_light).__name__}")
        self.synapse = synapse
        self.neuron = IFNeuron() if neuron is None else neuron
        if not callable(self.neuron):
            raise TypeError(f"neuron must be a multi-step neuron module or callable, got {type(neuron).__name__}")
        self.memory_light = memory_light
        self.time_steps = _check_time_steps(time_steps)

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_light:
            return memory_light_block(x, self.synapse, self.neuron, time_steps=self.time_steps)
        return _run(self.synapse, self.neuron, _check_input(x, self.time_steps), self.time_steps)

    def extra_repr(self) -> str:
        enc = "" if self.time_steps is None else f", time_steps={self.time_steps} (static input)"
        return f"memory_light={self.memory_light}{enc}"


class SpikingLinearBlock(SpikingBlock):
    """Linear synapse + multi-step neuron: ``(T, B, in_features)`` spikes -> ``(T, B, out_features)``."""

    def __init__(self, in_features: int, out_features: int, neuron: Optional[Neuron] = None, *,
                 bias: bool = True, memory_light: bool = True, time_steps: Optional[int] = None) -> None:
        super().__init__(nn.Linear(in_features, out_features, bias=bias), neuron, memory_light=memory_light,
                         time_steps=time_steps)


class SpikingConvBlock(SpikingBlock):
    """[max-pool] - Conv2d - [BatchNorm2d] synapse + multi-step neuron on ``(T, B, C, H, W)`` spikes.

    ``pool`` > 1 max-pools the input spikes first (a max of spikes is a spike, and pooling inside
    the block keeps neither the unpooled float spikes nor the pooling indices for the backward);
    ``batch_norm`` adds ``BatchNorm2d(out_channels)`` after the conv (statistics over T x B).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, tuple[int, int]],
                 neuron: Optional[Neuron] = None, *, stride: Union[int, tuple[int, int]] = 1,
                 padding: Union[int, tuple[int, int]] = 0, bias: bool = True, batch_norm: bool = False,
                 pool: int = 1, memory_light: bool = True, time_steps: Optional[int] = None) -> None:
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {pool!r}")
        layers: list[nn.Module] = [nn.MaxPool2d(pool)] if pool > 1 else []
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        super().__init__(nn.Sequential(*layers), neuron, memory_light=memory_light, time_steps=time_steps)
