"""``lif_multistep``: the fused multi-step leaky integrate-and-fire neuron (all T steps in one
kernel), with learnable time constant and threshold.

It validates the inputs, flattens the neurons to ``(T, N)``, packs the scalars into one
``params = [leak, v_threshold, r]`` tensor of the state dtype (differentiable when tau, the decay
factor or the threshold are tensors that require grad), picks a backend (:mod:`kdengine._dispatch`)
and runs it. Kernel backends go through two torch.library ops, ``kdengine::lif_multistep_fwd`` and
``kdengine::lif_multistep_bwd`` (one reverse loop over T, also summing the parameter gradients over
neurons and steps), each with a fake implementation, so a model calling ``lif_multistep`` traces
under ``torch.compile``. The reference backend is the autograd step loop of
:mod:`kdengine.ops.lif_multistep.reference` (the spec).

Backend contract (the object registered under ``op="lif_multistep"`` for each backend)::

    impl.fwd(x, v_init, params, hard_reset, decay_input, divide, save_h) -> (spikes, v_final, h | None)
    impl.bwd(x, v_init, h, grad_spikes, grad_v, params, hard_reset, decay_input, divide, surrogate,
             alpha, detach_reset, param_grads) -> (grad_x, grad_v_init, grad_params | None)
    impl.saves_h: bool

``x``: contiguous ``(T, N)``; ``v_init`` / ``grad_v``: ``(N,)`` in the state dtype or None;
``params``: ``(3,)`` state dtype on x's device, ``[leak, v_threshold, r]`` with leak = tau when
``divide`` else the decay factor k = 1/tau, r = v_reset (hard reset) or 0 (reset by subtraction);
``grad_params``: ``(2,)`` = dL/d leak, dL/d v_threshold. A backend with ``saves_h`` keeps the
pre-reset potentials ``h`` and reads them in its backward (GPU backends; they also read x and
v_init when ``param_grads``); the others recompute ``h`` from x.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine._checks import flag, real_number, same_device
from kdengine.ops.if_multistep.op import (
    SURROGATE_IDS,
    _check_v_init,
    _check_x,
    _functorch_level,
    _functorch_wrapped,
    _in_state_dtype,
    check_surrogate,
    check_threshold_reset,
    neuron_outputs,
    steps_by_neurons,
)
from kdengine.ops.if_multistep.reference import SURROGATES, state_dtype
from kdengine.ops.lif_multistep.reference import lif_multistep_reference

OP = "lif_multistep"
DEFAULT_TAU = 2.0

# --------------------------------------------------------------------------- backends


class LIFImpl:
    """One backend of ``lif_multistep``: its forward and fused backward (see the module doc)."""

    def __init__(self, fwd: Callable, bwd: Callable, saves_h: bool) -> None:
        self.fwd, self.bwd, self.saves_h = fwd, bwd, saves_h

    def __call__(self, *args):  # the registry stores callables; calling one runs the forward
        return self.fwd(*args)


def _ref_loop(x, v_init, params, hard_reset, decay_input, divide, surrogate=0, alpha=None,
              detach_reset=False):
    leak, thr = params[0], params[1]
    reset = float(params[2]) if hard_reset else None
    return lif_multistep_reference(x, leak, thr, reset, v_init, SURROGATES[surrogate], alpha,
                                   detach_reset, decay_input=decay_input, divide=divide)


def _ref_fwd(x, v_init, params, hard_reset, decay_input, divide, save_h):
    with torch.no_grad():
        s, v = _ref_loop(x, v_init, params, hard_reset, decay_input, divide)
    return s, v, None


def _ref_bwd(x, v_init, h, gs, gv, params, hard_reset, decay_input, divide, surrogate, alpha,
             detach_reset, param_grads):
    """Autograd of the reference step loop (used through the library op in tests)."""
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        if v_init is None:
            rest = float(params[2]) if hard_reset else 0.0
            v0 = torch.full((x.shape[1],), rest, dtype=params.dtype, device=x.device)
        else:
            v0 = v_init.detach().clone()
        v0.requires_grad_(True)
        p = params.detach().requires_grad_(True)
        s, v = _ref_loop(xl, v0, p, hard_reset, decay_input, divide, surrogate, alpha, detach_reset)
        outs, grads = [s], [gs]
        if gv is not None:
            outs.append(v)
            grads.append(gv)
        gx, g0, gp = torch.autograd.grad(outs, [xl, v0, p], grads, allow_unused=True)
    g0 = torch.zeros_like(v0) if g0 is None else g0.detach()
    gp = torch.zeros_like(p) if gp is None else gp
    return gx, g0, (gp[:2].detach() if param_grads else None)


def _native_fwd(kind):
    def fwd(x, v_init, params, hard_reset, decay_input, divide, save_h):
        from kdengine import _native

        s, v, h = _native.ops(kind).lif_fwd(x, v_init, params, hard_reset, decay_input, divide,
                                            save_h)
        return s, v, (h if save_h else None)

    return fwd


def _native_bwd(kind):
    def bwd(x, v_init, h, gs, gv, params, hard_reset, decay_input, divide, surrogate, alpha,
            detach_reset, param_grads):
        from kdengine import _native

        gx, g0, gp = _native.ops(kind).lif_bwd(x, v_init, h, gs, gv, params, hard_reset,
                                               decay_input, divide, surrogate, alpha,
                                               detach_reset, param_grads)
        return gx, g0, (gp if param_grads else None)

    return bwd


def _triton_fwd(*args):
    from kdengine.ops.lif_multistep.triton_kernel import lif_fwd_triton

    return lif_fwd_triton(*args)


def _triton_bwd(*args):
    from kdengine.ops.lif_multistep.triton_kernel import lif_bwd_triton

    return lif_bwd_triton(*args)


_NATIVE = ("lif_fwd", "lif_bwd")
_dispatch.register(OP, "reference")(LIFImpl(_ref_fwd, _ref_bwd, saves_h=False))
_dispatch.register(OP, "cpu", native_ops=_NATIVE)(LIFImpl(_native_fwd("cpu"), _native_bwd("cpu"),
                                                          saves_h=False))
_dispatch.register(OP, "triton")(LIFImpl(_triton_fwd, _triton_bwd, saves_h=True))
_dispatch.register(OP, "cuda", native_ops=_NATIVE)(LIFImpl(_native_fwd("cuda"), _native_bwd("cuda"),
                                                           saves_h=True))


# --------------------------------------------------------------------------- the library ops


@torch.library.custom_op("kdengine::lif_multistep_fwd", mutates_args=())
def _lif_fwd(
    x: Tensor,
    v_init: Optional[Tensor],
    params: Tensor,
    backend: str,
    hard_reset: bool,
    decay_input: bool,
    divide: bool,
    surrogate: int,
    alpha: float,
    detach_reset: bool,
    save_h: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _dispatch.implementation(OP, backend)
    s, v, h = impl.fwd(x, v_init, params, hard_reset, decay_input, divide, save_h)
    if h is None:
        h = x.new_empty((0,), dtype=params.dtype)
    return s, v, h


@_lif_fwd.register_fake
def _(x, v_init, params, backend, hard_reset, decay_input, divide, surrogate, alpha, detach_reset,
      save_h):
    sd = params.dtype
    h = x.new_empty(tuple(x.shape) if save_h else (0,), dtype=sd)
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=sd), h


@torch.library.custom_op("kdengine::lif_multistep_bwd", mutates_args=())
def _lif_bwd(
    x: Tensor,
    v_init: Optional[Tensor],
    h: Tensor,
    grad_spikes: Tensor,
    grad_v: Optional[Tensor],
    params: Tensor,
    backend: str,
    hard_reset: bool,
    decay_input: bool,
    divide: bool,
    surrogate: int,
    alpha: float,
    detach_reset: bool,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _dispatch.implementation(OP, backend)
    gx, g0, gp = impl.bwd(x if x.numel() > 0 else None, v_init, h if h.numel() > 0 else None,
                          grad_spikes, grad_v, params, hard_reset, decay_input, divide, surrogate,
                          alpha, detach_reset, param_grads)
    if gp is None:
        gp = params.new_empty((0,))
    return gx, g0, gp


@_lif_bwd.register_fake
def _(x, v_init, h, grad_spikes, grad_v, params, backend, hard_reset, decay_input, divide,
      surrogate, alpha, detach_reset, param_grads):
    return (torch.empty_like(grad_spikes), params.new_empty((grad_spikes.shape[1],)),
            params.new_empty((2,) if param_grads else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    (x, v_init, params, backend, hard_reset, decay_input, divide, surrogate, alpha, detach_reset,
     save_h) = inputs
    _, _, h = output
    # Unused outputs (usually v_final, always h) then arrive as None, not as zero tensors.
    ctx.set_materialize_grads(False)
    # A backend reading h needs x only for the leak gradient; the others recompute h from x.
    keep_x = not save_h or params.requires_grad
    ctx.save_for_backward(x if keep_x else None, v_init, params, h if save_h else None)
    ctx.args = (backend, hard_reset, decay_input, divide, surrogate, alpha, detach_reset)
    ctx.has_v_init = v_init is not None
    ctx.spike_meta = (tuple(x.shape), x.dtype, x.device)


def _backward(ctx, g_spikes, g_v, _g_h):
    x, v_init, params, h = ctx.saved_tensors
    need_x, need_v0, need_p = ctx.needs_input_grad[:3]
    if not (need_x or need_v0 or need_p):
        return (None,) * 11
    shape, dtype, device = ctx.spike_meta
    if g_spikes is None:  # only the final potential was used
        g_spikes = torch.zeros(shape, dtype=dtype, device=device)
    empty = params.new_empty((0,))
    gx, g0, gp = _lif_bwd(empty if x is None else x, v_init, empty if h is None else h,
                          g_spikes.contiguous(), None if g_v is None else g_v.contiguous(),
                          params, *ctx.args, bool(need_p))
    g_params = torch.cat([gp, gp.new_zeros(1)]) if need_p else None  # r is a constant
    return ((gx if need_x else None), (g0 if (need_v0 and ctx.has_v_init) else None),
            g_params) + (None,) * 8


_lif_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "lif_multistep: double backward (create_graph=True, e.g. a gradient penalty or a "
        "Hessian-vector product) is not supported by the fused kernels; use backend='reference' "
        "for higher-order gradients."
    )


_lif_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


@torch.compiler.assume_constant_result
def _resolve(device: torch.device, backend: Optional[str]) -> str:
    """The backend name; a trace-time constant under torch.compile."""
    return _dispatch.resolve(OP, device, backend)


# --------------------------------------------------------------------------- validation


def _float_leak(name: str, value: object, sd: torch.dtype, x_dtype: torch.dtype) -> float:
    """A Python tau (>= 1) or decay factor (0 < k <= 1), also finite and nonzero in ``sd``."""
    v = real_number(name, value)
    ok = (math.isfinite(v) and v >= 1.0) if name == "tau" else (0.0 < v <= 1.0)
    if not ok:
        want = "finite and >= 1" if name == "tau" else "in (0, 1] (k = 1/tau)"
        raise ValueError(f"{name} must be {want}, got {v}")
    if _in_state_dtype(name, v, sd, x_dtype) == 0.0:
        raise ValueError(f"{name}={v} rounds to 0 in the membrane-potential dtype {sd}")
    return v


def _tensor_param(name: str, value: Tensor, x: Tensor, sd: torch.dtype) -> Tensor:
    """A learnable scalar: a one-element floating tensor on x's device, as a 0-dim ``sd`` tensor
    (differentiable; its value is not checked: reading it would sync a GPU)."""
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float or a floating tensor, got dtype {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a float or a one-element tensor, got shape "
                         f"{tuple(value.shape)} (per-neuron values are not supported)")
    same_device(name, value, "x", x)
    return value.reshape(()).to(sd)


@functools.lru_cache(maxsize=64)
def _const_params(sd: torch.dtype, device: str, vals: tuple) -> Tensor:
    """One small device tensor per constant parameter set; only ever read."""
    return torch.tensor(vals, dtype=sd, device=device)


def _functorch_input(*tensors: Optional[Tensor]) -> bool:
    """Inside a ``torch.func`` transform the wrapped tensors take the reference step loop."""
    if _functorch_level() is None or torch.compiler.is_compiling():
        return False
    return any(t is not None and _functorch_wrapped(t) for t in tensors)


Scalar = Union[float, Tensor]


def lif_multistep(
    x: Tensor,
    tau: Optional[Scalar] = None,
    v_threshold: Scalar = 1.0,
    v_reset: Optional[float] = None,
    *,
    decay: Optional[Scalar] = None,
    decay_input: bool = True,
    v_init: Optional[Tensor] = None,
    return_v: bool = False,
    surrogate: str = "atan",
    alpha: Optional[float] = None,
    detach_reset: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Multi-step leaky integrate-and-fire neurons: all T steps in one kernel, surrogate backward.

    Per neuron, with ``r = v_reset`` (hard reset) or 0 (reset by subtraction)::

        h = v + (x[t] - (v - r)) / tau        (decay_input=True)
        h = v - (v - r) / tau + x[t]          (decay_input=False)
        spike s = 1 where h >= v_threshold;   v = h - s * v_threshold  |  v = v_reset where s

    SpikingJelly's ``LIFNode(step_mode="m")`` spike for spike (fp32 state), and with ``decay=k``
    instead of ``tau`` (the leak written ``* k``) its ``ParametricLIFNode`` with
    ``k = sigmoid(w)``. NaN potentials emit NaN spikes.

    Args:
        x: ``(T, ...)`` input currents, float32/bfloat16/float16/float64, time steps first.
        tau: membrane time constant: a float (finite, >= 1) or a one-element tensor (learnable;
            its gradient is returned). Default 2.0. Give either ``tau`` or ``decay``.
        v_threshold: theta: a float (finite, > 0, also in the state dtype) or a one-element
            tensor (learnable).
        v_reset: None (reset by subtraction, default) or the hard-reset potential (< v_threshold).
        decay: the decay factor k = 1/tau instead of tau, a float in (0, 1] or a one-element
            tensor (learnable; e.g. ``torch.sigmoid(w)`` as in SpikingJelly's PLIF neuron).
        decay_input: whether the input is scaled by the leak too (SpikingJelly's default True).
        v_init: ``(...)`` initial potential (shape of one step); default: the resting potential
            (``v_reset``, or 0). Differentiable.
        return_v: also return the final potential ``(...)`` (in x's dtype).
        surrogate: ``"atan"`` (default) or ``"sigmoid"``; alpha: its sharpness (default 2 / 4).
        detach_reset: the reset sees the spike detached (no gradient through the reset).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Tensor-valued ``tau`` / ``decay`` / ``v_threshold`` are taken as they are (not range-checked:
    that would read them back from the device); their gradients are sums over neurons and steps.
    The state is fp32 (float64 for float64 x). Double backward: ``backend="reference"`` only.

    Returns:
        spikes ``(T, ...)`` in x's dtype, or ``(spikes, v_final)`` with ``return_v``.
    """
    x = _check_x(x)
    sd = state_dtype(x.dtype)
    if tau is not None and decay is not None:
        raise ValueError("give either tau or decay (= 1/tau), not both")
    divide = decay is None
    leak_name, leak = ("tau", DEFAULT_TAU if tau is None else tau) if divide else ("decay", decay)
    leak_t = _tensor_param(leak_name, leak, x, sd) if isinstance(leak, Tensor) else None
    leak_f = None if leak_t is not None else _float_leak(leak_name, leak, sd, x.dtype)
    if isinstance(v_threshold, Tensor):
        thr_t = _tensor_param("v_threshold", v_threshold, x, sd)
        thr_f = None
        hard = v_reset is not None
        reset = real_number("v_reset", v_reset) if hard else 0.0
        if not math.isfinite(reset):
            raise ValueError(f"v_reset must be finite or None, got {reset}")
    else:
        thr_t = None
        thr_f, hard, reset = check_threshold_reset(v_threshold, v_reset, sd, x.dtype)
    sur, a = check_surrogate(surrogate, alpha)
    flag("decay_input", decay_input)
    flag("detach_reset", detach_reset)
    flag("return_v", return_v)
    if v_init is not None:
        v_init = _check_v_init(v_init, x)

    x2, v2, n = steps_by_neurons(x, v_init, sd)
    if leak_t is None and thr_t is None:
        params = _const_params(sd, str(x.device), (leak_f, thr_f, reset))
    else:
        def as_t(t, f):
            return t if t is not None else torch.full((), f, dtype=sd, device=x.device)

        params = torch.stack([as_t(leak_t, leak_f), as_t(thr_t, thr_f),
                              torch.full((), reset, dtype=sd, device=x.device)])

    name = _resolve(x.device, backend)
    if n == 0 or name == "reference" or _functorch_input(x, v_init, leak_t, thr_t):
        s, v = lif_multistep_reference(
            x2, leak_f if leak_t is None else leak_t, thr_f if thr_t is None else thr_t,
            reset if hard else None, v2, sur, a, detach_reset, decay_input=decay_input,
            divide=divide)
    else:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or params.requires_grad or (v_init is not None and v_init.requires_grad)
        )
        impl = _dispatch.implementation(OP, name)
        if not needs_grad and not torch.compiler.is_compiling():
            # Inference fast path: no custom-op machinery (same kernel, same result).
            s, v, _ = impl.fwd(x2, v2, params, hard, decay_input, divide, False)
        else:
            save_h = bool(needs_grad and impl.saves_h)
            s, v, _ = _lif_fwd(x2, v2, params, name, hard, decay_input, divide, SURROGATE_IDS[sur],
                               a, detach_reset, save_h)
    return neuron_outputs(s, v, x, return_v)


__all__ = ["lif_multistep"]
