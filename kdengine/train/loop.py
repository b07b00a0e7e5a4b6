"""``fit``: the one training loop of the demo and the reproductions, built on the :class:`Distiller`.

It picks the optimizer and the learning-rate schedule by name, so that a caller states a recipe
("Adam 5e-3, cosine per step, batch 128, binary latent weights clipped") instead of wiring
optimizer, scheduler and Distiller each time. Determinism is the Distiller's: the data order of
epoch ``e`` is ``epoch_permutation(N, seed, e)`` and the global RNG (dropout) is seeded with
``seed`` at the start, so the same model initialisation and arguments give the same weights.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from kdengine.train.distiller import CrossEntropyTerm, Distiller

__all__ = ["fit", "SCHEDULES", "OPTIMIZERS"]

SCHEDULES = ("epoch", "step", None)
OPTIMIZERS = ("adam", "sgd")


def _n_rows(train: Any) -> int:
    return len(train[0]) if isinstance(train, (tuple, list)) else len(train)


def fit(
    model: nn.Module,
    train: Any,
    losses: Any = None,
    *,
    epochs: int,
    lr: float,
    teacher: Any = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: Optional[str] = "epoch",
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    test: Any = None,
    binary: bool = False,
    on_step: Optional[Callable[[], None]] = None,
    student_features: Iterable[str] = (),
    extra_params: Iterable[torch.nn.Parameter] = (),
    extra_modules: Optional[Mapping[str, nn.Module]] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place; returns a summary and leaves the model in eval mode.

    Args:
        train: ``(inputs, labels)`` (or a dataset), as for :meth:`Distiller.fit`.
        losses: Distiller loss terms; default cross-entropy alone.
        teacher: a teacher module or cached teacher logits aligned with ``train``'s rows.
        optimizer: ``"adam"`` (``weight_decay``) or ``"sgd"`` (``momentum``, ``weight_decay``) over
            the model's trainable parameters plus ``extra_params`` (e.g. a loss head's).
        schedule: ``"epoch"``: cosine annealing to 0 over the epochs, stepped per epoch
            (``CosineAnnealingLR``); ``"step"``: cosine decay to 0 over all optimizer steps, stepped
            per batch; ``None``: constant.
        binary: clip binary latent weights to [-1, 1] after every step (BinaryNet's clipped STE,
            :func:`kdengine.nn.clip_latent_weights_`).
        on_step: called after every optimizer step (e.g. a progress bar's ``update``).
        test: optional eval data: ``test_acc`` per epoch in the history and at the end.

    Returns:
        ``{"history", "steps", "loss" (last epoch's mean), "last_epoch" (its metrics),
        "time_s", "cpu_s"}`` and ``"test_acc"`` when ``test`` is given.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * math.ceil(_n_rows(train) / batch_size)
    sched: Any = None
    if schedule == "epoch":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    elif schedule == "step":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    clip = None
    if binary:
        from kdengine.nn import clip_latent_weights_

        clip = clip_latent_weights_

    def after_step(d: Distiller) -> None:
        if clip is not None:
            clip(d.student)
        if on_step is not None:
            on_step()

    d = Distiller(model, opt, losses if losses is not None else [CrossEntropyTerm()], teacher=teacher,
                  scheduler=sched, scheduler_interval="step" if schedule == "step" else "epoch",
                  device=device, batch_size=batch_size, seed=seed, progress=progress,
                  student_features=student_features, extra_modules=extra_modules,
                  after_step=after_step if (clip is not None or on_step is not None) else None)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        hist = d.fit(train, epochs, test=test)
    finally:
        d.close()
    out: dict[str, Any] = {
        "history": hist, "steps": steps,
        "loss": hist[-1]["loss"] if hist else float("nan"),
        "last_epoch": {k: v for k, v in (hist[-1] if hist else {}).items()
                       if k not in ("epoch", "step", "lr", "time_s", "test_acc")},
        "time_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
    }
    if test is not None:
        out["test_acc"] = hist[-1]["test_acc"] if hist else d.evaluate(test)
    model.eval()
    return out
