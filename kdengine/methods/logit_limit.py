"""KD as logits matching: the T -> inf story (Chen, Wang, Chen, arXiv 2109.06458; docs/papers.md section 1).

Facts this module measures (z student logits, v teacher logits, C classes, q = softmax(z/T),
p = softmax(v/T), z_c = z - mean(z), v_c = v - mean(v)):

1. Gradient gap. ``d/dz [T^2 KL(p || q)] = T (q - p)``. Expanding softmax around the uniform
   distribution,

       T (q - p) = (1/C) (z_c - v_c) + (1/(2 C T)) [(z_c^2 - mean z_c^2) - (v_c^2 - mean v_c^2)] + O(1/T^2),

   so the gap to the logits-matching gradient ``(1/C)(z_c - v_c)`` (the gradient of
   ``kd_loss(z, v, inf)``) is ``g1 / T + O(1/T^2)`` with ``g1`` = :func:`first_order_gap`:
   a slope of -1 on a log-log plot (:func:`gradient_gap`, :func:`loglog_slope`).
2. Conservation. The logit gradient of softmax-CE or KD sums to zero over classes, so for a final
   linear layer ``z = W h + b`` the class-mean row ``mean_c W[c]`` and the mean bias receive zero
   gradient: plain SGD (with or without momentum) never changes them; weight decay only shrinks
   them geometrically. Plain (uncentered) MSE logits matching does move them. So does Adam, even
   under CE or KD: its update ``m_c / sqrt(v_c)`` divides each class row by its own second moment,
   so zero-sum gradients give updates that do not sum to zero (:func:`conservation_run` measures
   it rather than assuming it; the repro ``kdengine repro tinf`` reports the drift).
3. Equal-mean initialisation. If the student's logit mean equals the teacher's for every input at
   the start (``kdengine.equal_mean_init_`` on both final layers: the teacher's softmax outputs do
   not change, only its constant logit offset), the mean gap stays 0, so the plain MSE logits
   matching gradient has no mean component and KD at high T tracks it with an O(1/T) gap
   (:func:`tracking_run`). Without equal means the high-T KD student keeps its own mean while the
   MSE student moves its mean to the teacher's: the trajectories do not converge as T grows.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

import kdengine
from kdengine.losses import logits_matching_loss
from kdengine.models import logit_layer


def _check_pair(z: Tensor, v: Tensor) -> None:
    if not isinstance(z, Tensor) or not isinstance(v, Tensor):
        raise TypeError("z and v must be tensors of logits")
    if z.shape != v.shape or z.dim() < 1:
        raise ValueError(f"z and v must have one shape (..., C), got {tuple(z.shape)} and {tuple(v.shape)}")


def kd_gradient(z: Tensor, v: Tensor, temperature: float) -> Tensor:
    """Closed-form ``d/dz [T^2 KL(softmax(v/T) || softmax(z/T))]`` per row, ``T (q - p)``;
    at ``T = inf`` the limit :func:`limit_gradient`. Same shape and dtype as ``z``."""
    _check_pair(z, v)
    if math.isinf(temperature):
        return limit_gradient(z, v)
    t = float(temperature)
    return t * (torch.softmax(z / t, -1) - torch.softmax(v / t, -1))


def limit_gradient(z: Tensor, v: Tensor) -> Tensor:
    """The T -> inf gradient ``(1/C) [(z - mean z) - (v - mean v)]`` (centered logits matching)."""
    _check_pair(z, v)
    d = z - v
    return (d - d.mean(-1, keepdim=True)) / z.shape[-1]


def first_order_gap(z: Tensor, v: Tensor) -> Tensor:
    """The 1/T coefficient of the gap: ``T (q - p) - limit = first_order_gap / T + O(1/T^2)``,
    ``g1 = (1/(2C)) [(z_c^2 - mean z_c^2) - (v_c^2 - mean v_c^2)]``."""
    _check_pair(z, v)
    zc = z - z.mean(-1, keepdim=True)
    vc = v - v.mean(-1, keepdim=True)
    a = zc * zc
    b = vc * vc
    return ((a - a.mean(-1, keepdim=True)) - (b - b.mean(-1, keepdim=True))) / (2 * z.shape[-1])


def kd_autograd_gradient(z: Tensor, v: Tensor, temperature: float, backend: Optional[str] = None) -> Tensor:
    """``d/dz kdengine.kd_loss(z, v, T, reduction="sum")`` by autograd (per-row gradients)."""
    zz = z.detach().clone().requires_grad_(True)
    loss = kdengine.kd_loss(zz, v.detach(), temperature, reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(loss, zz)
    return g


def gradient_gap(z: Tensor, v: Tensor, temperatures: Iterable[float], *, use_autograd: bool = True,
                 backend: Optional[str] = None) -> list[float]:
    """Max-abs gap between the KD gradient at each T and the logits-matching limit.

    Uses autograd through :func:`kdengine.kd_loss` (``use_autograd``) or the closed form. Use
    float64 logits to see the 1/T law down to T ~ 1e4 (float32 rounding floors it near 1e-7).
    """
    lim = limit_gradient(z, v)
    out = []
    for t in temperatures:
        g = kd_autograd_gradient(z, v, t, backend) if use_autograd else kd_gradient(z, v, t)
        out.append(float((g - lim).abs().max()))
    return out


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x) (the exponent of a power law)."""
    lx = torch.tensor([math.log(a) for a in x], dtype=torch.float64)
    ly = torch.tensor([math.log(b) for b in y], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


# --------------------------------------------------------------------------- conservation


def class_mean(layer: nn.Linear) -> tuple[Tensor, Optional[Tensor]]:
    """Class-mean weight row ``mean_c W[c]`` (in_features,) and mean bias (0-dim) of a logit layer."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer must be an nn.Linear logit layer, got {type(layer).__name__}")
    w = layer.weight.detach().mean(0).clone()
    b = layer.bias.detach().mean().clone() if layer.bias is not None else None
    return w, b


LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]   # (student_logits, teacher_logits, labels)


def loss_fn(name: str, temperature: float = 4.0) -> LossFn:
    """The losses compared here: ``"ce"``, ``"kd"`` (T^2 KL at ``temperature``, inf allowed),
    ``"mse"`` (plain logits matching) and ``"mse_centered"``; all batchmean."""
    if name == "ce":
        return lambda z, v, y: nn.functional.cross_entropy(z, y)
    if name == "kd":
        return lambda z, v, y: kdengine.kd_loss(z, v, temperature, hard_weight=0.0)
    if name == "mse":
        return lambda z, v, y: logits_matching_loss(z, v)
    if name == "mse_centered":
        return lambda z, v, y: logits_matching_loss(z, v, centered=True)
    raise ValueError(f"loss name must be ce, kd, mse or mse_centered, got {name!r}")


def conservation_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: LossFn,
    *,
    teacher_logits: Optional[Tensor] = None,
    steps: int = 50,
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> dict[str, object]:
    """Train ``model`` (in place) for ``steps`` steps and track the logit layer's class mean.

    Returns ``{"w_drift": max |mean row - initial|, "b_drift": |mean bias - initial|,
    "w_expected_drift": the same against the weight-decay-only prediction
    (1 - lr wd)^steps * initial (plain SGD without momentum; None otherwise),
    "w_norm": |initial mean row|_max, "loss_first", "loss_last"}``.
    """
    layer = logit_layer(model)
    w0, b0 = class_mean(layer)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                                     weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    losses = []
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:batch_size] if batch_size else torch.arange(n)
        z = model(x[idx])
        v = teacher_logits[idx] if teacher_logits is not None else z.detach()
        lv = loss(z, v, y[idx])
        opt.zero_grad(set_to_none=True)
        lv.backward()
        opt.step()
        losses.append(float(lv.detach()))
    w1, b1 = class_mean(layer)
    out: dict[str, object] = {
        "w_drift": float((w1 - w0).abs().max()),
        "b_drift": float((b1 - b0).abs()) if b0 is not None else 0.0,
        "w_norm": float(w0.abs().max()),
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": losses[-1] if losses else float("nan"),
        "w_expected_drift": None,
    }
    if optimizer == "sgd" and momentum == 0.0:
        shrink = (1.0 - lr * weight_decay) ** steps
        out["w_expected_drift"] = float((w1 - w0 * shrink).abs().max())
    return out


# --------------------------------------------------------------------------- tracking


def _train_copy(student: nn.Module, x: Tensor, v: Tensor, loss: Callable[[Tensor, Tensor], Tensor],
                steps: int, lr: float) -> nn.Module:
    s = copy.deepcopy(student)
    opt = torch.optim.SGD(s.parameters(), lr=lr)
    for _ in range(steps):
        lv = loss(s(x), v)
        opt.zero_grad(set_to_none=True)
        lv.backward()
        opt.step()
    return s


def tracking_run(
    student: nn.Module,
    teacher_logits: Tensor,
    x: Tensor,
    temperatures: Sequence[float],
    *,
    steps: int = 100,
    lr: float = 0.5,
    equal_mean: bool = True,
    probe: Optional[Tensor] = None,
) -> dict[str, object]:
    """Does KD at temperature T follow plain (uncentered) MSE logits matching as T grows?

    Trains copies of ``student`` (full-batch SGD, ``steps`` steps, same init) with
    ``kd_loss(z, v, T)`` for each T and with ``logits_matching_loss(z, v)``; returns the max-abs
    difference of their logits on ``probe`` (default ``x``) for each T, and the final mean logit
    gap ``|mean(z) - mean(v)|`` of the MSE and highest-T KD students.

    ``equal_mean=True`` first applies ``equal_mean_init_`` to the student's logit layer with the
    teacher's logit mean as target; ``teacher_logits`` should then have a constant row mean (apply
    ``equal_mean_init_`` to the teacher's logit layer: its softmax is unchanged).
    """
    s0 = copy.deepcopy(student)
    v = teacher_logits.detach()
    target = float(v.mean())
    if equal_mean:
        kdengine.equal_mean_init_(logit_layer(s0), target_mean=target)
    px = x if probe is None else probe
    mse = _train_copy(s0, x, v, lambda z, t: logits_matching_loss(z, t), steps, lr)
    with torch.no_grad():
        z_mse = mse(px)
    gaps = []
    kd_mean_gap = float("nan")
    for t in temperatures:
        kd = _train_copy(s0, x, v, lambda z, tt, t=t: kdengine.kd_loss(z, tt, t, hard_weight=0.0), steps, lr)
        with torch.no_grad():
            z_kd = kd(px)
            gaps.append(float((z_kd - z_mse).abs().max()))
            kd_mean_gap = float((kd(x).mean(-1) - v.mean(-1)).abs().max())
    with torch.no_grad():
        mse_mean_gap = float((mse(x).mean(-1) - v.mean(-1)).abs().max())
    return {"temperatures": list(temperatures), "gap": gaps, "mse_mean_gap": mse_mean_gap,
            "kd_mean_gap_last_T": kd_mean_gap, "equal_mean": equal_mean}
