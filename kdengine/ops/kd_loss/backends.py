"""Registers the kd_loss implementations of every backend (see the contract in ops/kd_loss/op.py)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from kdengine import _dispatch
from kdengine.ops.kd_loss.config import KDConfig


def _native_call(kind: str, student: Tensor, teacher: Tensor, labels: Optional[Tensor], cfg: KDConfig):
    from kdengine import _native

    loss, gs, gt = _native.ops(kind).kd_loss_kernel(
        student, teacher, labels, cfg.temperature, cfg.scale_t2, int(cfg.divergence), cfg.beta,
        cfg.hard_weight, cfg.ignore_index, cfg.label_smoothing, int(cfg.reduction),
        cfg.need_teacher_grad,
    )
    return loss, gs, (gt if cfg.need_teacher_grad else None)


@_dispatch.register("kd_loss", "reference")
def _reference(student, teacher, labels, cfg):
    """Reference through the library op (tests): loss and gradients from autograd of the spec."""
    import torch

    from kdengine.ops.kd_loss.reference import kd_loss_reference

    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        t = teacher.detach().requires_grad_(cfg.need_teacher_grad)
        loss = kd_loss_reference(s, t, labels, cfg)
        inputs = [s, t] if cfg.need_teacher_grad else [s]
        if cfg.reduction == 0:  # none: per-row gradients, rows are independent
            grads = torch.autograd.grad(loss.sum(), inputs)
        else:
            grads = torch.autograd.grad(loss, inputs)
    gs = grads[0].to(student.dtype)
    gt = grads[1].to(teacher.dtype) if cfg.need_teacher_grad else None
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return loss.detach().to(loss_dtype), gs, gt


@_dispatch.register("kd_loss", "cpu", native_ops=("kd_loss_kernel",))
def _cpu(student, teacher, labels, cfg):
    return _native_call("cpu", student, teacher, labels, cfg)


@_dispatch.register("kd_loss", "cuda", native_ops=("kd_loss_kernel",))
def _cuda(student, teacher, labels, cfg):
    return _native_call("cuda", student, teacher, labels, cfg)


@_dispatch.register("kd_loss", "triton")
def _triton(student, teacher, labels, cfg):
    from kdengine.ops.kd_loss.triton_kernel import kd_loss_triton

    return kd_loss_triton(student, teacher, labels, cfg)
