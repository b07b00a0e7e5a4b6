"""``if_multistep``: the fused multi-step integrate-and-fire neuron (all T steps in one kernel).

It validates the inputs, flattens the neurons to ``(T, N)``, picks a backend
(:mod:`kdengine._dispatch`) and runs it. Kernel backends go through two torch.library ops,
``kdengine::if_multistep_fwd`` and ``kdengine::if_multistep_bwd`` (the latter is the former's
backward: one reverse loop over T), each with a fake (meta) implementation, so a model calling
``if_multistep`` traces under ``torch.compile``. The reference backend is the autograd step loop
of :mod:`kdengine.ops.if_multistep.reference` (the spec). ``if_multistep_bwd`` has an autograd formula of
its own (double backward: the reference loop's second derivatives for backends that keep x, a
RuntimeError for those that keep only h; see :func:`if_multistep`).

Backend contract (the object registered under ``op="if_multistep"`` for each backend)::

    impl.fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h) -> (spikes, v_final, h | None)
    impl.bwd(x, v_init, h, grad_spikes, grad_v, v_threshold, hard_reset, v_reset, surrogate,
             alpha, detach_reset) -> (grad_x, grad_v_init)
    impl.saves_h: bool

``x``: contiguous ``(T, N)`` float32/bfloat16/float16/float64; ``v_init`` / ``grad_v``: ``(N,)``
in the state dtype (float64 for float64 x, else float32) or None (``v_init`` None: the resting
potential, ``v_reset`` for the hard reset, else 0); ``hard_reset`` False means reset by
subtraction (``v_reset`` is then ignored); ``surrogate``: 0 atan, 1 sigmoid. ``spikes`` and
``grad_x`` are ``(T, N)`` in x's dtype, ``v_final`` and ``grad_v_init`` ``(N,)`` in the state
dtype. A backend with ``saves_h`` returns the pre-reset potentials ``h`` ``(T, N)`` (state dtype)
when ``save_h`` and its backward reads them instead of ``x``/``v_init`` (GPU backends); the others
recompute ``h`` from ``x`` in the backward (CPU: 20 instead of 24 bytes per element-step for
forward + backward in fp32, and no (T, N) buffer kept between them).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine._checks import dtype_name, flag, floating_tensor, real_number, same_device
from kdengine.ops.if_multistep.reference import DEFAULT_ALPHA, SURROGATES, state_dtype

OP = "if_multistep"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SURROGATE_IDS = {name: i for i, name in enumerate(SURROGATES)}  # atan 0, sigmoid 1


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class IFImpl:
    """One backend of ``if_multistep``: its forward and fused backward (see the module doc)."""

    fwd: Callable
    bwd: Callable
    saves_h: bool

    def __call__(self, *args):  # the registry stores callables; calling one runs the forward
        return self.fwd(*args)


def _ref_fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h):
    from kdengine.ops.if_multistep.reference import if_multistep_reference

    with torch.no_grad():
        s, v = if_multistep_reference(x, v_threshold, v_reset if hard_reset else None, v_init)
    return s, v, None


def _ref_bwd(x, v_init, h, gs, gv, v_threshold, hard_reset, v_reset, surrogate, alpha,
             detach_reset):
    """Autograd of the reference step loop (used through the library op in tests)."""
    from kdengine.ops.if_multistep.reference import if_multistep_reference

    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        sd = state_dtype(x.dtype)
        if v_init is None:
            rest = v_reset if hard_reset else 0.0
            v0 = torch.full((x.shape[1],), rest, dtype=sd, device=x.device)
        else:
            v0 = v_init.detach().clone()
        v0.requires_grad_(True)
        s, v = if_multistep_reference(xl, v_threshold, v_reset if hard_reset else None, v0,
                                      SURROGATES[surrogate], alpha, detach_reset)
        outs, grads = [s], [gs]
        if gv is not None:
            outs.append(v)
            grads.append(gv)
        gx, g0 = torch.autograd.grad(outs, [xl, v0], grads, allow_unused=True)
    if g0 is None:
        g0 = torch.zeros_like(v0)
    return gx, g0.detach()


def _cpu_fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h):
    from kdengine import _native

    s, v, _ = _native.ops("cpu").if_fwd(x, v_init, v_threshold, hard_reset, v_reset, False)
    return s, v, None


def _cpu_bwd(x, v_init, h, gs, gv, v_threshold, hard_reset, v_reset, surrogate, alpha,
             detach_reset):
    from kdengine import _native

    return _native.ops("cpu").if_bwd(x, v_init, None, gs, gv, v_threshold, hard_reset, v_reset,
                                     surrogate, alpha, detach_reset)


def _cuda_fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h):
    from kdengine import _native

    s, v, h = _native.ops("cuda").if_fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h)
    return s, v, (h if save_h else None)


def _cuda_bwd(x, v_init, h, gs, gv, v_threshold, hard_reset, v_reset, surrogate, alpha,
              detach_reset):
    from kdengine import _native

    return _native.ops("cuda").if_bwd(x, v_init, h, gs, gv, v_threshold, hard_reset, v_reset,
                                      surrogate, alpha, detach_reset)


def _triton_fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h):
    from kdengine.ops.if_multistep.triton_kernel import if_fwd_triton

    return if_fwd_triton(x, v_init, v_threshold, hard_reset, v_reset, save_h)


def _triton_bwd(x, v_init, h, gs, gv, v_threshold, hard_reset, v_reset, surrogate, alpha,
                detach_reset):
    from kdengine.ops.if_multistep.triton_kernel import if_bwd_triton

    return if_bwd_triton(h, gs, gv, v_threshold, hard_reset, v_reset, surrogate, alpha,
                         detach_reset)


_dispatch.register(OP, "reference")(IFImpl(_ref_fwd, _ref_bwd, saves_h=False))
_dispatch.register(OP, "cpu", native_ops=("if_fwd", "if_bwd"))(IFImpl(_cpu_fwd, _cpu_bwd, saves_h=False))
_dispatch.register(OP, "triton")(IFImpl(_triton_fwd, _triton_bwd, saves_h=True))
_dispatch.register(OP, "cuda", native_ops=("if_fwd", "if_bwd"))(IFImpl(_cuda_fwd, _cuda_bwd, saves_h=True))


# --------------------------------------------------------------------------- the library ops


@torch.library.custom_op("kdengine::if_multistep_fwd", mutates_args=())
def _if_fwd(
    x: Tensor,
    v_init: Optional[Tensor],
    backend: str,
    v_threshold: float,
    hard_reset: bool,
    v_reset: float,
    surrogate: int,
    alpha: float,
    detach_reset: bool,
    save_h: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _dispatch.implementation(OP, backend)
    s, v, h = impl.fwd(x, v_init, v_threshold, hard_reset, v_reset, save_h)
    if h is None:
        h = x.new_empty((0,), dtype=state_dtype(x.dtype))
    return s, v, h


@_if_fwd.register_fake
def _(x, v_init, backend, v_threshold, hard_reset, v_reset, surrogate, alpha, detach_reset,
      save_h):
    sd = state_dtype(x.dtype)
    h = x.new_empty(tuple(x.shape) if save_h else (0,), dtype=sd)
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=sd), h


@torch.library.custom_op("kdengine::if_multistep_bwd", mutates_args=())
def _if_bwd(
    x: Tensor,
    v_init: Optional[Tensor],
    h: Tensor,
    grad_spikes: Tensor,
    grad_v: Optional[Tensor],
    backend: str,
    v_threshold: float,
    hard_reset: bool,
    v_reset: float,
    surrogate: int,
    alpha: float,
    detach_reset: bool,
) -> tuple[Tensor, Tensor]:
    impl = _dispatch.implementation(OP, backend)
    return impl.bwd(x, v_init, h if h.numel() > 0 else None, grad_spikes, grad_v, v_threshold,
                    hard_reset, v_reset, surrogate, alpha, detach_reset)


@_if_bwd.register_fake
def _(x, v_init, h, grad_spikes, grad_v, backend, v_threshold, hard_reset, v_reset, surrogate,
      alpha, detach_reset):
    sd = state_dtype(grad_spikes.dtype)
    return torch.empty_like(grad_spikes), grad_spikes.new_empty((grad_spikes.shape[1],), dtype=sd)


def _setup_context(ctx, inputs, output) -> None:
    (x, v_init, backend, v_threshold, hard_reset, v_reset, surrogate, alpha, detach_reset,
     save_h) = inputs
    _, _, h = output
    # Unused outputs (usually v_final, always h) then arrive as None instead of zero tensors that
    # would be allocated, filled and read for nothing.
    ctx.set_materialize_grads(False)
    if save_h:  # the backward reads h, not x: do not keep x alive
        ctx.save_for_backward(None, None, h)
    else:
        ctx.save_for_backward(x, v_init, None)
    ctx.args = (backend, v_threshold, hard_reset, v_reset, surrogate, alpha, detach_reset)
    ctx.has_v_init = v_init is not None
    ctx.spike_meta = (tuple(x.shape), x.dtype, x.device)


def _backward(ctx, g_spikes, g_v, _g_h):
    x, v_init, h = ctx.saved_tensors
    need_x, need_v0 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_v0):
        return (None,) * 10
    if g_spikes is None:  # only the final potential was used
        shape, dtype, device = ctx.spike_meta
        g_spikes = torch.zeros(shape, dtype=dtype, device=device)
    if h is None:
        h = x.new_empty((0,), dtype=state_dtype(x.dtype))
    if x is None:
        x = h.new_empty((0,))
    gx, g0 = _if_bwd(x, v_init, h, g_spikes.contiguous(),
                     None if g_v is None else g_v.contiguous(), *ctx.args)
    return (gx if need_x else None, g0 if (need_v0 and ctx.has_v_init) else None) + (None,) * 8


_if_fwd.register_autograd(_backward, setup_context=_setup_context)


# Double backward. The fused backward kernels are not differentiable, so the backward op gets its
# own autograd formula: with ``create_graph=True`` (gradient penalties, Hessian-vector products,
# ``torch.autograd.functional.hvp``) the first-order gradients still come from the kernel, and
# differentiating them re-runs the reference step loop on the saved x / v_init and takes the
# vector-Jacobian product of *its* backward -- the derivative of the surrogate backward formula
# (the spec, :mod:`kdengine.ops.if_multistep.reference`), so every backend gives the reference's second
# derivatives. Backends whose backward reads the saved potentials h instead of x (saves_h: triton,
# cuda) have not kept x and raise instead of returning a wrong (e.g. missing) second-order term.


def _bwd_setup_context(ctx, inputs, output) -> None:
    (x, v_init, h, grad_spikes, grad_v, backend, v_threshold, hard_reset, v_reset, surrogate,
     alpha, detach_reset) = inputs
    ctx.save_for_backward(x, v_init, grad_spikes, grad_v)
    ctx.saved_h = h.numel() > 0
    ctx.args = (backend, v_threshold, hard_reset, v_reset, surrogate, alpha, detach_reset)


def _double_backward(ctx, gg_x, gg_v0):
    backend, v_threshold, hard_reset, v_reset, surrogate, alpha, detach_reset = ctx.args
    if ctx.saved_h:
        raise RuntimeError(
            f"if_multistep: double backward (create_graph=True, e.g. a gradient penalty or a "
            f"Hessian-vector product) is not supported by the {backend} backend: its backward "
            f"reads the saved membrane potentials, not x. Use backend='cpu' or "
            f"backend='reference' for higher-order gradients."
        )
    from kdengine.ops.if_multistep.reference import if_multistep_reference

    x, v_init, gs, gv = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()  # a third order asked for: keep this graph too

    def alias(t: Optional[Tensor]) -> Optional[Tensor]:
        # a handle to differentiate with respect to: a view keeps t's own graph (higher orders)
        if t is None:
            return None
        return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)

    with torch.enable_grad():
        xl, v0l, gsl, gvl = alias(x), alias(v_init), alias(gs), alias(gv)
        s, v = if_multistep_reference(xl, v_threshold, v_reset if hard_reset else None, v0l,
                                      SURROGATES[surrogate], alpha, detach_reset)
        outs, seeds = [s], [gsl]
        if gvl is not None:
            outs.append(v)
            seeds.append(gvl)
        wrt = [xl] + ([v0l] if v0l is not None else [])
        first = torch.autograd.grad(outs, wrt, seeds, create_graph=True, allow_unused=True)
        pairs = [(f, g) for f, g in zip(first, (gg_x, gg_v0))
                 if f is not None and g is not None and f.requires_grad]
        leaves = [t for t in (xl, v0l, gsl, gvl) if t is not None]
        if pairs:
            got = torch.autograd.grad([f for f, _ in pairs], leaves, [g for _, g in pairs],
                                      create_graph=create_graph, allow_unused=True)
        else:
            got = (None,) * len(leaves)
    grads = iter(got)
    g_x = next(grads)
    g_v0 = next(grads) if v0l is not None else None
    g_gs = next(grads)
    g_gv = next(grads) if gvl is not None else None
    return (g_x, g_v0, None, g_gs, g_gv) + (None,) * 7


_if_bwd.register_autograd(_double_backward, setup_context=_bwd_setup_context)


@torch.compiler.assume_constant_result
def _resolve(device: torch.device, backend: Optional[str]) -> str:
    """The backend name; a trace-time constant under torch.compile (the availability probe
    takes a lock and may build the native library, which Dynamo cannot trace)."""
    return _dispatch.resolve(OP, device, backend)


# --------------------------------------------------------------------------- validation


_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32


def _in_state_dtype(name: str, value: float, sd: torch.dtype, x_dtype: torch.dtype) -> float:
    """``value`` rounded to the state dtype ``sd`` (every backend computes in it); ValueError if it
    rounds to +-inf there (e.g. v_threshold=1e39 with float32 state, where the backends would
    otherwise disagree -- no spikes, NaN -- instead of failing)."""
    if sd == torch.float64:
        return value  # already finite: checked by the caller
    try:
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # some Python versions raise instead of rounding to inf
        rounded = math.inf
    if math.isinf(rounded):
        raise ValueError(
            f"{name}={value} is outside the finite range of {dtype_name(sd)}, the membrane-"
            f"potential dtype for {dtype_name(x_dtype)} x (|{name}| <= {torch.finfo(sd).max}); "
            f"scale the inputs down, or use float64 x"
        )
    return rounded


def _check_x(x: object) -> Tensor:
    x = floating_tensor("x", x, FLOAT_DTYPES, tensor_of=" of input currents (T, ...)", listed=True,
                        values_of=" of input currents")
    if x.dim() < 1:
        raise ValueError(
            "x must have shape (T, ...) with the time steps first; got a 0-dim tensor (no T "
            "dimension)"
        )
    if x.shape[0] < 1:
        raise ValueError(f"x must have T >= 1 time steps (dim 0), got shape {tuple(x.shape)}")
    return x


def steps_by_neurons(x: Tensor, v_init: Optional[Tensor], sd: torch.dtype) -> tuple[Tensor, Optional[Tensor], int]:
    """The kernels' layout: ``x`` ``(T, ...)`` as a contiguous ``(T, N)``, ``v_init`` ``(...)`` as a
    contiguous ``(N,)`` in the state dtype ``sd`` (or None), and N (shared by the neuron ops)."""
    n = math.prod(x.shape[1:])
    x2 = x.reshape(x.shape[0], n).contiguous()
    return x2, None if v_init is None else v_init.reshape(n).to(sd).contiguous(), n


def neuron_outputs(s: Tensor, v: Tensor, x: Tensor, return_v: bool) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The kernels' ``(T, N)`` spikes and ``(N,)`` final potential back in ``x``'s shape and dtype."""
    spikes = s.reshape(x.shape)
    if not return_v:
        return spikes
    return spikes, v.reshape(x.shape[1:]).to(x.dtype)


def _check_v_init(v_init: object, x: Tensor) -> Tensor:
    v_init = floating_tensor("v_init", v_init, FLOAT_DTYPES, tensor_of=" or None")
    if tuple(v_init.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"v_init must have the shape of one time step of x, {tuple(x.shape[1:])}, got "
            f"{tuple(v_init.shape)}"
        )
    same_device("v_init", v_init, "x", x)
    return v_init


def check_threshold_reset(v_threshold: object, v_reset: object, sd: torch.dtype,
                          x_dtype: torch.dtype) -> tuple[float, bool, float]:
    """``(theta, hard_reset, v_reset or 0.0)`` from the user's threshold and reset, checked: theta
    finite and > 0, v_reset None or finite and below theta, both also in the state dtype ``sd``
    (ValueError otherwise, so every backend sees the same neuron)."""
    thr = real_number("v_threshold", v_threshold)
    if not (math.isfinite(thr) and thr > 0):
        raise ValueError(f"v_threshold must be finite and > 0, got {thr}")
    # in float32 state: a normal float32 magnitude is neither inf nor 0 there (fast path)
    f32_ok = sd is torch.float32 and _F32_TINY <= thr <= _F32_MAX
    thr_s = thr if f32_ok else _in_state_dtype("v_threshold", thr, sd, x_dtype)
    if thr_s == 0.0:
        raise ValueError(
            f"v_threshold={thr} rounds to 0 in {dtype_name(sd)}, the membrane-potential dtype "
            f"for {dtype_name(x_dtype)} x; it must be > 0 there (smallest {dtype_name(sd)} > 0: "
            f"{torch.finfo(sd).smallest_normal * torch.finfo(sd).eps})"
        )
    hard = v_reset is not None
    reset = 0.0
    if hard:
        reset = real_number("v_reset", v_reset)
        if not math.isfinite(reset):
            raise ValueError(f"v_reset must be finite or None, got {reset}")
        if reset >= thr:
            raise ValueError(
                f"v_reset must be below v_threshold (a reset at or above threshold fires forever), "
                f"got v_reset={reset} >= v_threshold={thr}"
            )
        if (sd is torch.float32 and (not f32_ok or abs(reset) > _F32_MAX
                                     or thr - reset <= thr * 2.0**-22)
                and _in_state_dtype("v_reset", reset, sd, x_dtype)
                >= _in_state_dtype("v_threshold", thr, sd, x_dtype)):
            raise ValueError(
                f"v_reset must be below v_threshold in {dtype_name(sd)} (the membrane-potential "
                f"dtype for {dtype_name(x_dtype)} x), but v_reset={reset} and v_threshold={thr} "
                f"round to the same value there (a reset at threshold fires forever)"
            )
    return thr, hard, reset


def check_surrogate(surrogate: object, alpha: object) -> tuple[str, float]:
    """``(surrogate name, alpha)``: a known name (case-insensitive) and alpha finite and > 0
    (default: the surrogate's)."""
    if not isinstance(surrogate, str):
        raise TypeError(
            f"surrogate must be a str, one of {SURROGATES}, got {type(surrogate).__name__}"
        )
    sur = surrogate.lower()
    if sur not in SURROGATE_IDS:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    a = DEFAULT_ALPHA[sur] if alpha is None else real_number("alpha", alpha)
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"alpha must be finite and > 0, got {a}")
    return sur, a


_functorch_level = torch._C._functorch.maybe_current_level  # None outside torch.func transforms
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _functorch_input(x: Tensor, v_init: Optional[Tensor]) -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...): its wrapped tensors
    cannot go through the kernels' torch.library autograd, so such calls take the reference step
    loop (same spikes, same surrogate gradients, any order). ~0.05 us outside transforms."""
    if _functorch_level() is None or torch.compiler.is_compiling():
        return False
    return _functorch_wrapped(x) or (v_init is not None and _functorch_wrapped(v_init))


def if_multistep(
    x: Tensor,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = None,
    *,
    v_init: Optional[Tensor] = None,
    return_v: bool = False,
    surrogate: str = "atan",
    alpha: Optional[float] = None,
    detach_reset: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Multi-step integrate-and-fire neurons: all T steps in one kernel, surrogate backward.

    Per neuron: ``v = v + x[t]``; spike ``s = 1`` when ``v >= v_threshold``; then reset by
    subtraction ``v -= s * v_threshold`` (``v_reset=None``) or hard reset ``v = v_reset`` where
    ``s``. Equals SpikingJelly's ``IFNode(step_mode="m", v_threshold, v_reset,
    surrogate_function, detach_reset)`` spike for spike (fp32 state; SpikingJelly keeps bf16/fp16
    state in the input dtype on CPU, kdengine in fp32), except that a NaN potential emits NaN.

    Args:
        x: ``(T, ...)`` input currents, float32/bfloat16/float16/float64, T >= 1 time steps first.
        v_threshold: firing threshold theta, finite and > 0, also in the state dtype (float32
            for all but float64 x: ``|v_threshold| <= 3.4e38`` and not rounding to 0; ValueError
            otherwise, so every backend sees the same threshold).
        v_reset: None (reset by subtraction, default) or the hard-reset potential, < v_threshold
            (also after rounding to the state dtype) and finite in the state dtype.
        v_init: ``(...)`` initial potential (shape of one step), e.g. the final potential of the
            previous chunk of a stream; default: the resting potential (``v_reset``, or 0).
            Differentiable.
        return_v: also return the final potential ``(...)`` (in x's dtype; the state is fp32,
            float64 for float64 x).
        surrogate: ``"atan"`` (default) or ``"sigmoid"``: the backward replaces dH/du by
            atan: ``(alpha/2) / (1 + (pi/2 alpha u)^2)``; sigmoid: ``alpha sig(alpha u)(1 -
            sig(alpha u))`` at ``u = v - v_threshold``.
        alpha: surrogate sharpness, > 0; default 2.0 for atan, 4.0 for sigmoid (SpikingJelly's).
        detach_reset: the reset term sees the spike detached (no gradient through the reset).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (default: the
            ``KDENGINE_BACKEND`` variable, else auto).

    Returns:
        spikes ``(T, ...)`` in x's dtype (0/1), or ``(spikes, v_final)`` with ``return_v``.

    Higher-order gradients. The "true" derivatives here are those of the surrogate backward
    formula (the reference step loop's autograd, whose backward is itself differentiable).
    ``backend="reference"`` and ``"cpu"`` support double backward (``create_graph=True``:
    gradient penalties, Hessian-vector products): the cpu backend's first-order gradients come
    from the fused kernel, and their derivatives from the reference loop re-run on the saved
    inputs, so both give the reference's values. ``"triton"`` and ``"cuda"`` keep only the
    membrane potentials for their backward and raise RuntimeError on double backward (never a
    silently missing term). Under ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``,
    ``vmap``) every backend runs the reference step loop.
    """
    x = _check_x(x)
    sd = state_dtype(x.dtype)
    thr, hard, reset = check_threshold_reset(v_threshold, v_reset, sd, x.dtype)
    sur, a = check_surrogate(surrogate, alpha)
    flag("detach_reset", detach_reset)
    flag("return_v", return_v)
    if v_init is not None:
        v_init = _check_v_init(v_init, x)

    x2, v2, n = steps_by_neurons(x, v_init, sd)

    name = _resolve(x.device, backend)
    if n == 0 or name == "reference" or _functorch_input(x, v_init):
        from kdengine.ops.if_multistep.reference import if_multistep_reference

        s, v = if_multistep_reference(x2, thr, reset if hard else None, v2, sur, a, detach_reset)
    else:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (v_init is not None and v_init.requires_grad)
        )
        impl = _dispatch.implementation(OP, name)
        if not needs_grad and not torch.compiler.is_compiling():
            # Inference fast path: nothing to differentiate and nothing to trace, so skip the
            # torch.library custom-op machinery (~65 us per call on this CPU, as much as the
            # kernel itself for a batch-1 spiking layer); same kernel, same result.
            s, v, _ = impl.fwd(x2, v2, thr, hard, reset, False)
        else:
            save_h = bool(needs_grad and impl.saves_h)
            s, v, _ = _if_fwd(x2, v2, name, thr, hard, reset, SURROGATE_IDS[sur], a, detach_reset,
                              save_h)
    return neuron_outputs(s, v, x, return_v)
