"""Distillation losses as nn.Modules, logits matching, and the equal-mean initialization."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from kdengine.ops.kd_loss import _check_logits, kd_loss, make_config


def check_kd_options(temperature: object, reduction: str, divergence: str, beta: object,
                     hard_weight: object, ignore_index: object, label_smoothing: object,
                     scale_t2: object, **_other: object) -> None:
    """Validate the :func:`kdengine.kd_loss` options of a module's constructor; the other options
    of its function are the caller's to check. Labels are assumed present (only forward knows)."""
    make_config(temperature, reduction, divergence, beta, hard_weight, True, ignore_index,
                label_smoothing, scale_t2, False)


class OptionsLoss(nn.Module):
    """Base of the loss modules: a loss function whose options the constructor fixes.

    A subclass's ``__init__`` (the function's option keywords, with the function's defaults)
    passes its ``locals()`` here; each option becomes an attribute of the same name, and
    :attr:`kwargs` hands them all back as keywords of the function on every call.
    """

    def __init__(self, options: dict) -> None:
        super().__init__()
        # locals() of the subclass __init__ also holds self and the zero-argument super() cell.
        self._option_names = tuple(k for k in options if k not in ("self", "__class__"))
        for name in self._option_names:
            setattr(self, name, options[name])

    @property
    def kwargs(self) -> dict:
        """The options as keyword arguments of the module's loss function."""
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if v is not None)


class KDLoss(OptionsLoss):
    """nn.Module wrapper of :func:`kdengine.kd_loss`; the constructor fixes every option.

    ``forward(student_logits, teacher_logits, labels=None)``: ``(..., V)`` logits, optional
    ``(...)`` integer labels; returns the loss in the student's dtype.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        reduction: str = "batchmean",
        divergence: str = "forward_kl",
        beta: float = 0.5,
        hard_weight: Optional[float] = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        scale_t2: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())
        check_kd_options(**self.kwargs)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels, **self.kwargs)


def logits_matching_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    centered: bool = False,
    reduction: str = "batchmean",
) -> Tensor:
    """MSE logits matching, the T -> inf face of KD (docs/papers.md section 1).

    Per row: ``1/(2V) * ||d||^2`` with ``d = z - v`` (or ``d - mean(d)`` when ``centered``); with
    ``centered=True`` it equals ``kd_loss(z, v, float("inf"))`` for every reduction. Reductions as
    in ``kd_loss``: ``"batchmean"`` is the elementwise MSE / 2, ``"mean"`` divides that by V again.
    """
    s = _check_logits("student_logits", student_logits)
    t = _check_logits("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(s.shape)} "
            f"and {tuple(t.shape)}"
        )
    if reduction not in ("none", "sum", "batchmean", "mean"):
        raise ValueError(f"reduction must be one of none, sum, batchmean, mean; got {reduction!r}")
    dt = torch.float64 if s.dtype == torch.float64 else torch.float32
    d = s.to(dt) - t.to(dt)
    if centered:
        d = d - d.mean(-1, keepdim=True)
    v = s.shape[-1]
    rows = (d * d).sum(-1) / (2.0 * v)
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif reduction == "batchmean":
        out = rows.sum() / max(rows.numel(), 1)
    else:
        out = rows.sum() / max(rows.numel() * v, 1)
    return out.to(s.dtype)


@torch.no_grad()
def equal_mean_init_(layer: nn.Linear, target_mean: float = 0.0) -> nn.Linear:
    """Equal-mean initialization of a final linear layer, in place (docs/papers.md section 1).

    Makes the class-mean of the weight rows zero and sets the mean bias to ``target_mean``, so
    ``mean_c z_c = target_mean`` for every input. Under CE or KD the logit gradient sums to zero
    over classes, so SGD never changes that mean: a student initialised with the teacher's logit
    mean keeps it, and KD at T = inf becomes plain logits matching.
    """
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer must be an nn.Linear (the final classifier), got {type(layer).__name__}")
    layer.weight.sub_(layer.weight.mean(dim=0, keepdim=True))
    if layer.bias is not None:
        layer.bias.sub_(layer.bias.mean()).add_(target_mean)
    elif target_mean != 0.0:
        raise ValueError(f"target_mean={target_mean} needs a layer with a bias")
    return layer
