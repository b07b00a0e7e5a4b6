"""Hugging Face integration: kdengine's fused KD loss inside a ``transformers.Trainer`` loop.

* :func:`causal_lm_kd_loss` -- the KD loss of causal LM logits ``(B, L, V)``: logits at position
  i are compared where ``labels[i + 1]`` is not ``ignore_index`` (the causal shift), normalized
  per valid token, or by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation
  and multi-device token averaging). Pure torch: needs no transformers.
* :func:`generalized_jsd_loss` -- a drop-in with the conventions of TRL's
  ``GKDTrainer.generalized_jsd_loss`` (see the mapping below), computed by :func:`kdengine.kd_loss`.
* :class:`KDTrainer` -- a ``transformers.Trainer`` whose ``compute_loss`` runs a frozen teacher
  and returns :func:`causal_lm_kd_loss` (optionally mixed with the hard-label CE). Needs the
  optional ``transformers`` dependency; it is created on first access.

Mapping of TRL's ``generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
reduction, num_items_in_batch)`` (TRL 1.16, ``trl.experimental.gkd``) onto ``kdengine.kd_loss``:

* TRL's mixture is ``m = beta p_teacher + (1 - beta) q_student`` and its loss
  ``beta KL(p || m) + (1 - beta) KL(q || m)``: exactly ``divergence="jsd", beta=beta``.
* The end points are not the (vanishing) JSD limits but KLs: TRL ``beta = 0`` is
  ``KL(teacher || student)`` = ``divergence="forward_kl"``, ``beta = 1`` is
  ``KL(student || teacher)`` = ``divergence="reverse_kl"``.
* TRL divides the logits by ``temperature`` and does not multiply by T^2: ``scale_t2=False``.
* ``labels`` only mask (``-100`` dropped; TRL does not shift them, its ``compute_loss`` does):
  ``labels=`` with ``hard_weight=0`` and ``ignore_index=-100``.
* Reductions: ``num_items_in_batch`` given -> ``reduction="sum"`` / num_items_in_batch (TRL ignores
  ``reduction`` then); ``"batchmean"`` with labels -> kdengine ``"batchmean"`` (sum / valid
  tokens, 0 when none); ``"batchmean"`` *without* labels -> ``"sum"`` / ``logits.shape[0]`` (TRL
  divides by the first dimension, the batch size, not the number of tokens); ``"sum"`` -> ``"sum"``;
  ``"mean"`` -> ``"mean"`` (sum / (valid tokens x V)); ``"none"``: TRL returns the element-wise
  terms (masked rows removed, shape ``(n_valid, V)``), kdengine per-token row sums (masked rows
  0, shape ``(B, L)``): those are TRL's terms summed over V.
* Note: TRL's ``GKDTrainer.compute_loss`` calls it without ``temperature`` (T = 1; the config's
  temperature is the sampling temperature of on-policy generation).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from kdengine.ops.kd_loss import kd_loss

__all__ = ["causal_lm_kd_loss", "generalized_jsd_loss", "KDTrainer"]  # noqa: F822 (KDTrainer: module __getattr__, built when transformers is installed)


def _check_3d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"{name} must be a (batch, sequence, vocab) tensor of logits, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")


def causal_lm_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    *,
    num_items_in_batch: Optional[Tensor | int] = None,
    shift: bool = True,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    scale_t2: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """KD loss of a causal LM: ``(B, L, V)`` logits, ``(B, L)`` labels with ``ignore_index`` padding.

    With ``shift=True`` (default, as the HF models' own loss) the logits of position i are scored
    against ``labels[i + 1]``: logits ``[:, :-1]`` with labels ``[:, 1:]``. Rows whose (shifted)
    label is ``ignore_index`` drop out. ``hard_weight`` mixes in the CE of the labels
    (``loss = hard_weight CE + (1 - hard_weight) T^2 D``). The loss is a mean over the valid tokens,
    or the sum over them divided by ``num_items_in_batch`` when given (what
    ``transformers.Trainer`` passes for gradient-accumulation-correct averaging). Without labels
    every position counts. A teacher with a larger (padded) vocabulary than the student is cut to
    the student's ``V``.
    """
    _check_3d("student_logits", student_logits)
    _check_3d("teacher_logits", teacher_logits)
    v = student_logits.shape[-1]
    if teacher_logits.shape[-1] > v:
        teacher_logits = teacher_logits[..., :v]
    if shift:
        student_logits = student_logits[:, :-1, :]
        teacher_logits = teacher_logits[:, :-1, :]
        if labels is not None:
            labels = labels[:, 1:]
    kw = dict(divergence=divergence, beta=beta, ignore_index=ignore_index,
              label_smoothing=label_smoothing, scale_t2=scale_t2, backend=backend)
    if labels is not None:
        kw.update(labels=labels, hard_weight=hard_weight)
    elif hard_weight:
        raise ValueError(f"hard_weight={hard_weight} needs labels")
    if num_items_in_batch is None:
        return kd_loss(student_logits, teacher_logits, temperature, reduction="batchmean", **kw)
    total = kd_loss(student_logits, teacher_logits, temperature, reduction="sum", **kw)
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Tensor | int] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (same arguments and conventions; see the module
    docstring for the mapping), computed by the fused :func:`kdengine.kd_loss`."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    beta = float(beta)
    divergence = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
    kw: dict[str, Any] = dict(divergence=divergence, beta=beta if divergence == "jsd" else 0.5,
                              scale_t2=False, backend=backend)
    if labels is not None:
        # labels only mask: any value other than -100 is a kept row
        mask_labels = torch.where(labels == -100, torch.full_like(labels, -100),
                                  torch.zeros_like(labels))
        kw.update(labels=mask_labels, hard_weight=0.0, ignore_index=-100)
    if num_items_in_batch is not None:
        total = kd_loss(student_logits, teacher_logits, temperature, reduction="sum", **kw)
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "batchmean":
        if labels is not None:
            return kd_loss(student_logits, teacher_logits, temperature, reduction="batchmean", **kw)
        total = kd_loss(student_logits, teacher_logits, temperature, reduction="sum", **kw)
        return total / max(student_logits.shape[0], 1)
    if reduction in ("sum", "mean", "none"):
        return kd_loss(student_logits, teacher_logits, temperature, reduction=reduction, **kw)
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- transformers.Trainer


def _make_kd_trainer():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "kdengine.llm.hf.KDTrainer needs transformers: pip install 'kdengine[hf]' "
            "(or pip install transformers)"
        ) from e

    class KDTrainer(transformers.Trainer):
        """``transformers.Trainer`` distilling a frozen ``teacher_model`` into the trained model.

        ``compute_loss`` runs the student and (under ``no_grad``, in eval mode) the teacher on the
        same inputs, without passing ``labels`` to the models, and returns
        :func:`causal_lm_kd_loss` with the causal shift, ``ignore_index=-100`` and the
        ``num_items_in_batch`` the Trainer passes (then multiplied by the number of processes when
        ``average_tokens_across_devices``, as the Trainer's own loss does). Batches need
        ``labels`` (``-100`` on padding) unless ``hard_weight == 0``.

        Keyword args (beyond ``transformers.Trainer``'s): ``teacher_model``, ``temperature``,
        ``divergence``, ``beta``, ``hard_weight``, ``label_smoothing``, ``scale_t2``, ``backend``.
        """

        def __init__(self, *args, teacher_model, temperature: float = 1.0,
                     divergence: str = "forward_kl", beta: float = 0.5, hard_weight: float = 0.0,
                     label_smoothing: float = 0.0, scale_t2: bool = True,
                     backend: Optional[str] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.to(self.args.device).eval()
            self.teacher_model.requires_grad_(False)
            self.kd_options = dict(temperature=temperature, divergence=divergence, beta=beta,
                                   hard_weight=hard_weight, label_smoothing=label_smoothing,
                                   scale_t2=scale_t2, backend=backend)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels", None)
            outputs = model(**inputs)
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(**inputs).logits
            opts = dict(self.kd_options)
            t = opts.pop("temperature")
            loss = causal_lm_kd_loss(outputs.logits, teacher_logits, labels, t,
                                     num_items_in_batch=num_items_in_batch, ignore_index=-100,
                                     **opts)
            if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices",
                                                          False):
                # num_items_in_batch counts the tokens of every process; DDP averages gradients
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    KDTrainer.__qualname__ = "KDTrainer"
    return KDTrainer


_CACHE: dict[str, Any] = {}


def __getattr__(name: str):
    if name == "KDTrainer":
        if name not in _CACHE:
            _CACHE[name] = _make_kd_trainer()
        return _CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
