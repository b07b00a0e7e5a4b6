"""Training stages: the float teacher (cross-entropy) and the students (fused KD loss, or CE only),
all through :class:`kdengine.train.Distiller` with cached teacher logits.

Each run: Adam, cosine decay of the learning rate to 0 over all steps (stepped per batch), global
batch ``cfg.batch``, the Distiller's seeded data order. Binary students get their latent weights
clipped to [-1, 1] after every optimizer step (BinaryNet; :func:`kdengine.nn.clip_latent_weights_`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from kdengine.nn import clip_latent_weights_
from kdengine.train import CrossEntropyTerm, Distiller, KDTerm
from kdengine.train.distiller import predict_logits

__all__ = ["fit", "teacher_cache", "steps_for"]


class _DemoDistiller(Distiller):
    """A Distiller that clips binary latent weights after each step and ticks a stage bar."""

    def __init__(self, *args: Any, bar: Any, clip: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bar = bar
        self._clip = clip

    def training_step(self, inputs, labels, indices, loss_scale: float = 1.0):
        out = super().training_step(inputs, labels, indices, loss_scale)
        if self._clip:
            clip_latent_weights_(self.student)
        self._bar.update(1)
        return out


def steps_for(n: int, batch: int, epochs: int) -> int:
    """Optimizer steps of a run (for the progress bar's total)."""
    return epochs * math.ceil(n / batch)


def fit(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch: int, seed: int,
        bar: Any, teacher_logits: Optional[Tensor] = None, temperature: float = 4.0,
        kd_weight: float = 0.7, binary: bool = False) -> dict:
    """Train ``model`` in place on ``(x, y)``; with ``teacher_logits`` ``(N, C)`` (aligned with
    ``x``) the loss is ``kd_weight * kd_loss(T) + (1 - kd_weight) * CE``, else CE alone.

    Returns a JSON-ready summary (loss terms and running train accuracy of the last epoch, wall
    and CPU seconds)."""
    steps = steps_for(len(x), batch, epochs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    if teacher_logits is None:
        losses: Any = [CrossEntropyTerm()]
        loss_desc = "cross-entropy"
    else:
        losses = {"ce": (1.0 - kd_weight, CrossEntropyTerm()), "kd": (kd_weight, KDTerm(temperature))}
        loss_desc = f"{kd_weight:g} * kd_loss(T={temperature:g}) + {1 - kd_weight:g} * CE"
    d = _DemoDistiller(model, opt, losses, teacher=teacher_logits, scheduler=sched, scheduler_interval="step",
                       batch_size=batch, seed=seed, progress=False, bar=bar, clip=binary)
    t0, c0 = time.perf_counter(), time.process_time()
    hist = d.fit((x, y), epochs)
    d.close()
    model.eval()
    last = hist[-1]
    return {
        "loss": loss_desc, "epochs": epochs, "steps": steps, "lr": lr, "batch": batch,
        "optimizer": "Adam, cosine decay per step to 0",
        "last_epoch": {k: round(float(v), 4) for k, v in last.items() if k not in ("epoch", "step", "lr", "time_s")},
        "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2),
    }


def teacher_cache(teacher: nn.Module, x: Tensor) -> Tensor:
    """The frozen teacher's logits ``(N, C)`` float32 on the training images (eval mode), computed
    once and shared by every student (the Distiller's cached-teacher mode)."""
    return predict_logits(teacher, x, batch_size=1000)
