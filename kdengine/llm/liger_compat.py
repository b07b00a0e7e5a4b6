"""A drop-in for Liger-Kernel's chunked distillation losses, computed by kdengine's fused path.

Signature of ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (0.8.x)::

    LigerCompatFusedLinearKDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                 ignore_index=-100, temperature=1.0, compiled=True,
                                 chunk_size=1024, return_soft_hard_loss=False)
    forward(student_input, student_weight, teacher_input, teacher_weight, true_labels,
            student_bias=None, teacher_bias=None)

plus kdengine's keyword extras: ``num_items_in_batch`` (forward), ``divergence``,
``teacher_vocab`` and ``backend`` (constructor).

Semantics (Liger's definition, checked against its source):

* ``loss = weight_hard_loss * hard + weight_soft_loss * soft``; ``hard`` = cross-entropy of the
  student logits at T = 1 (no label smoothing), ``soft`` = the divergence of the temperature
  softmaxes with NO T^2 factor; both are summed over the rows whose label is not
  ``ignore_index`` and divided by the number of such rows in the whole batch (at least 1), or by
  ``num_items_in_batch`` when given.
* ``beta``: generalized JSD ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``
  (p teacher, q student): the same convention as ``kd_loss(divergence="jsd", beta=beta)``.
  The end points are Liger's: ``beta = 0`` is the forward KL(p || q), ``beta = 1`` the reverse
  KL(q || p) (kdengine's ``"forward_kl"``/``"reverse_kl"``). ``divergence=`` overrides this.
* ``return_soft_hard_loss=True`` returns ``(loss, soft, hard)``; ``soft``/``hard`` are unweighted
  and detached (values for logging: only ``loss`` is differentiable; Liger returns the gradient of
  ``loss`` whatever is differentiated).
* ``compiled`` is accepted and ignored (nothing to compile); ``chunk_size`` is the rows per chunk
  (Liger splits into ``N // chunk_size`` chunks; the result does not depend on it).

Differences, on purpose:

* Teacher vocabulary larger than the student's: Liger pads the student logits with zeros (the
  student then puts probability on the padded entries); here it raises unless
  ``teacher_vocab="truncate"``, which drops the teacher's extra entries instead.
* bf16/fp16 inputs: the logits are computed in fp32 here (Liger keeps them in the input dtype).
* Second-order gradients raise; teacher tensors that require grad raise (Liger silently ignores).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from kdengine.llm.fused_linear import _fused_core, _prepare
from kdengine.losses import OptionsLoss


def _divergence_for(beta: float, divergence: Optional[str]) -> str:
    if divergence is not None:
        return divergence
    if beta == 0:
        return "forward_kl"
    if beta == 1:
        return "reverse_kl"
    return "jsd"


def _check_weight(name: str, w: object) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {w!r}")
    return float(w)


def liger_fused_linear_kd_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    true_labels: Tensor,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    weight_hard_loss: float = 0.5,
    weight_soft_loss: float = 0.5,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compiled: bool = True,
    chunk_size: Optional[int] = 1024,
    return_soft_hard_loss: bool = False,
    *,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    divergence: Optional[str] = None,
    teacher_vocab: str = "strict",
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Liger's ``LigerFusedLinearJSDFunction.apply`` argument order (see the module docstring)."""
    del compiled  # accepted for signature compatibility; nothing to compile
    wh = _check_weight("weight_hard_loss", weight_hard_loss)
    ws = _check_weight("weight_soft_loss", weight_soft_loss)
    div = _divergence_for(beta, divergence)
    jsd_beta = beta if div == "jsd" else 0.5
    common = dict(
        temperature=temperature, reduction="batchmean", divergence=div, beta=jsd_beta,
        ignore_index=ignore_index, label_smoothing=0.0, scale_t2=False,
        num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, teacher_vocab=teacher_vocab,
        backend=backend,
    )
    args = (student_input, student_weight, teacher_input, teacher_weight, None, student_bias,
            teacher_bias, true_labels)
    if return_soft_hard_loss:
        h2, w, b, plan, lead = _prepare(*args, hard_weight=0.0, soft_hard=(ws, wh),
                                        **common)
        return _fused_core(h2, w, b, plan, lead)
    total = wh + ws
    alpha = wh / total if total > 0 else 0.0
    h2, w, b, plan, lead = _prepare(*args, hard_weight=alpha, loss_scale=total,
                                    **common)
    return _fused_core(h2, w, b, plan, lead)


class LigerCompatFusedLinearKDLoss(OptionsLoss):
    """Liger's ``LigerFusedLinearJSDLoss`` signature on kdengine's fused path (module docstring)."""

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: Optional[int] = 1024,
        return_soft_hard_loss: bool = False,
        *,
        divergence: Optional[str] = None,
        teacher_vocab: str = "strict",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())
        if temperature == 0:
            raise ValueError("temperature must be > 0, got 0")
        _check_weight("weight_hard_loss", weight_hard_loss)
        _check_weight("weight_soft_loss", weight_soft_loss)

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        true_labels: Tensor,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        *,
        num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    ):
        return liger_fused_linear_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels,
            student_bias, teacher_bias, num_items_in_batch=num_items_in_batch, **self.kwargs,
        )
