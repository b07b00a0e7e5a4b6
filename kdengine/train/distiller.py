"""The :class:`Distiller`: a small, deterministic, resumable, DDP-ready distillation trainer.

A run is a student, an optimizer, an optional LR scheduler, an optional teacher (a frozen module or
a tensor of cached teacher logits aligned with the training set) and a loss made of weighted terms.
A *loss term* is any callable ``term(ctx: BatchContext) -> scalar Tensor`` (the :class:`LossTerm`
protocol); its name (``term.name`` or the class name) keys the per-epoch metrics. Built-ins:
:class:`CrossEntropyTerm`, :class:`KDTerm` (``kdengine.kd_loss`` with a temperature),
:class:`LogitsMatchingTerm`, :class:`SoftTargetTerm` (CE against any soft targets) and
:class:`FunctionTerm`. Terms that are ``nn.Module``s (with parameters of their own, e.g. an
auto-encoder) are moved to the device and saved in checkpoints; put their parameters in the
optimizer yourself.

Determinism and resume. Epoch ``e`` visits the training set in the order
``randperm(N, generator=seed * 1_000_003 + e)``, cut into global batches of ``batch_size``. Nothing
else draws from that generator, so a run can stop after any step and resume at the next batch.
A checkpoint (:mod:`kdengine.train.checkpoint`: safetensors + JSON, atomic, no pickle) holds the
student, an unfrozen teacher, module loss terms, ``extra_modules``, optimizer(s), scheduler, the
global torch RNG (dropout) and the partial epoch's metric sums, so a stopped-and-resumed CPU run
ends bitwise equal to an uninterrupted one (tests/test_distiller.py checks it).

Distributed. When a process group is initialised (under torchrun call
:func:`kdengine.train.distributed.init_distributed` before building the Distiller; or use
:func:`kdengine.train.distributed.spawn`), the student is wrapped in DDP and each rank takes its
contiguous slice of every global batch; its loss is scaled by its share of the batch so that the
averaged gradient is the single-process gradient of the global-batch mean. Per-example-mean loss
terms are thus exact; a term that is not a mean over examples (or a BatchNorm, which is not synced)
makes the ranks differ from one process, and so does dropout (each process draws its own masks).

Mixed precision: on CUDA the forward passes run under ``torch.autocast(bfloat16)`` (``amp=None``
means "on for CUDA"); logits are cast to float32 before the loss terms.

Subclassing: override :meth:`Distiller.training_step` for a custom update (e.g. a meta-learned
teacher); it must return ``(ctx, total_loss, term_values)`` and do its own backward/step.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine.train import checkpoint as ckpt
from kdengine.train import distributed as D

# --------------------------------------------------------------------------- batch context


@dataclass
class BatchContext:
    """Everything a loss term may look at for one (per-rank) batch.

    Attributes:
        inputs: the batch inputs as given to the student (e.g. ``(B, ...)`` float tensor).
        labels: ``(B,)`` int64 class labels.
        indices: ``(B,)`` int64 positions of the examples in the training set (for cached or
            per-example data).
        student_logits: ``(B, C)`` float32 student logits (with grad).
        teacher_logits: ``(B, C)`` float32 teacher logits (no grad when the teacher is frozen) or
            None when there is no teacher.
        student_features / teacher_features: module path -> output captured by forward hooks on
            the modules named in ``Distiller(student_features=..., teacher_features=...)``.
        student / teacher: the unwrapped modules (not the DDP wrapper).
        epoch / step: 0-based epoch, global step count before this step.
        extras: free-form dict a subclass or a term may fill.
    """

    inputs: Any
    labels: Tensor
    indices: Tensor
    student_logits: Tensor
    teacher_logits: Optional[Tensor]
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    student: Optional[nn.Module] = None
    teacher: Optional[nn.Module] = None
    epoch: int = 0
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class LossTerm(Protocol):
    """A loss term: ``term(ctx) -> scalar Tensor`` (mean over the batch's examples, by convention)."""

    def __call__(self, ctx: BatchContext) -> Tensor: ...


def term_name(term: Any) -> str:
    """``term.name`` if set, else the class (or function) name."""
    name = getattr(term, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(term, "__name__", type(term).__name__)


def _need_teacher(ctx: BatchContext, who: str) -> Tensor:
    if ctx.teacher_logits is None:
        raise ValueError(f"{who} needs teacher logits; give the Distiller a teacher module or cache")
    return ctx.teacher_logits


class CrossEntropyTerm:
    """Hard-label cross-entropy, mean over the batch (optional label smoothing epsilon)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "ce") -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.name = name

    def __call__(self, ctx: BatchContext) -> Tensor:
        return F.cross_entropy(ctx.student_logits, ctx.labels, label_smoothing=self.label_smoothing)


class KDTerm:
    """Hinton KD through :func:`kdengine.kd_loss`: ``T^2 KL(p_T || q_T)``, batchmean.

    ``temperature=float('inf')`` is the exact limit (centered logits matching).
    """

    def __init__(self, temperature: float = 4.0, *, divergence: str = "forward_kl",
                 scale_t2: bool = True, backend: Optional[str] = None, name: str = "kd") -> None:
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0 (or inf), got {temperature}")
        self.temperature = float(temperature)
        self.divergence = divergence
        self.scale_t2 = scale_t2
        self.backend = backend
        self.name = name

    def __call__(self, ctx: BatchContext) -> Tensor:
        from kdengine import kd_loss

        v = _need_teacher(ctx, "KDTerm")
        return kd_loss(ctx.student_logits, v, self.temperature, divergence=self.divergence,
                       scale_t2=self.scale_t2, hard_weight=0.0, backend=self.backend)


class LogitsMatchingTerm:
    """MSE logits matching ``1/(2C) ||z - v||^2`` (optionally centered), batchmean."""

    def __init__(self, centered: bool = False, name: str = "lm") -> None:
        self.centered = centered
        self.name = name

    def __call__(self, ctx: BatchContext) -> Tensor:
        from kdengine import logits_matching_loss

        v = _need_teacher(ctx, "LogitsMatchingTerm")
        return logits_matching_loss(ctx.student_logits, v, centered=self.centered)


class SoftTargetTerm:
    """Cross-entropy against soft targets: ``mean_b -sum_c t_bc log softmax(z_b / T)_c * T^2``.

    ``targets(ctx) -> (B, C)`` probabilities (rows summing to 1, no grad needed). With
    ``temperature`` T the student side is softened and the term is scaled by T^2 like KD.
    """

    def __init__(self, targets: Callable[[BatchContext], Tensor], *, temperature: float = 1.0,
                 name: str = "soft") -> None:
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.targets = targets
        self.temperature = float(temperature)
        self.name = name

    def __call__(self, ctx: BatchContext) -> Tensor:
        t = self.targets(ctx)
        z = ctx.student_logits
        if t.shape != z.shape:
            raise ValueError(f"soft targets must have shape {tuple(z.shape)}, got {tuple(t.shape)}")
        logq = torch.log_softmax(z / self.temperature, dim=-1)
        return -(t.detach().to(logq.dtype) * logq).sum(-1).mean() * self.temperature ** 2


class FunctionTerm:
    """Wrap a plain function ``fn(ctx) -> Tensor`` with a name."""

    def __init__(self, fn: Callable[[BatchContext], Tensor], name: str) -> None:
        self.fn = fn
        self.name = name

    def __call__(self, ctx: BatchContext) -> Tensor:
        return self.fn(ctx)


TermSpec = Union[LossTerm, tuple[float, LossTerm]]


def _normalise_terms(losses: Union[Sequence[TermSpec], Mapping[str, TermSpec]]) -> list[tuple[str, float, Any]]:
    items: list[tuple[Optional[str], Any]]
    if isinstance(losses, Mapping):
        items = list(losses.items())
    elif isinstance(losses, (list, tuple)):
        items = [(None, s) for s in losses]
    else:
        raise TypeError(f"losses must be a list of terms / (weight, term) pairs or a dict, got {type(losses).__name__}")
    if not items:
        raise ValueError("losses must contain at least one term")
    out: list[tuple[str, float, Any]] = []
    for name, spec in items:
        if isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"a loss entry must be a term or a (weight, term) pair, got {spec!r}")
            w, term = spec
        else:
            w, term = 1.0, spec
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise TypeError(f"loss weight must be a finite number, got {w!r}")
        if not callable(term):
            raise TypeError(f"loss term must be callable(ctx) -> Tensor, got {type(term).__name__}")
        n = name or term_name(term)
        if n in {o[0] for o in out} or n in ("loss", "train_acc", "test_acc", "epoch", "step"):
            raise ValueError(f"duplicate or reserved loss term name {n!r}; give the term a distinct name=")
        out.append((n, float(w), term))
    return out


# --------------------------------------------------------------------------- data


class _Data:
    """Indexable training/eval data: (inputs, labels) tensors, a TensorDataset, or a Dataset."""

    def __init__(self, data: Any, device: torch.device, what: str) -> None:
        from torch.utils.data import Dataset, TensorDataset

        self.tensors: Optional[tuple[Tensor, Tensor]] = None
        self.dataset = None
        if isinstance(data, TensorDataset):
            data = data.tensors
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            x, y = data
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{what}: inputs have {x.shape[0]} rows but labels {y.shape[0]}")
            if y.dtype.is_floating_point or y.dim() != 1:
                raise TypeError(f"{what}: labels must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}")
            self.tensors = (x.to(device), y.to(device=device, dtype=torch.int64))
            self.n = int(x.shape[0])
        elif isinstance(data, Dataset):
            self.dataset = data
            self.n = len(data)  # type: ignore[arg-type]
        else:
            raise TypeError(f"{what} must be (inputs, labels) tensors, a TensorDataset or a map-style "
                            f"Dataset of (x, y); got {type(data).__name__}")
        if self.n == 0:
            raise ValueError(f"{what} is empty")
        self.device = device

    def __len__(self) -> int:
        return self.n

    def get(self, idx: Tensor) -> tuple[Any, Tensor]:
        if self.tensors is not None:
            i = idx.to(self.tensors[0].device)
            return self.tensors[0][i], self.tensors[1][i]
        from torch.utils.data import default_collate

        x, y = default_collate([self.dataset[int(i)] for i in idx])  # type: ignore[index]
        return _to_device(x, self.device), torch.as_tensor(y, dtype=torch.int64, device=self.device)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The seeded order ``(n,) int64`` in which epoch ``epoch`` visits the training set."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def global_batches(n: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = False,
                   min_size: int = 1) -> list[Tensor]:
    """The epoch's global batches of dataset indices; a last batch smaller than ``min_size``
    (or than ``batch_size`` when ``drop_last``) is dropped."""
    perm = epoch_permutation(n, seed, epoch)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if out and (len(out[-1]) < min_size or (drop_last and len(out[-1]) < batch_size)):
        out.pop()
    return out


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (kdengine draws from no other RNG)."""
    torch.manual_seed(int(seed))


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: Tensor, *, batch_size: int = 1024,
                   device: torch.device | str | None = None, amp: bool = False) -> Tensor:
    """Logits ``(N, C)`` float32 of ``model`` on ``inputs`` in eval mode (mode restored after)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, inputs.shape[0], batch_size):
            with _autocast(dev, amp):
                outs.append(model(inputs[i:i + batch_size].to(dev)).float())
    finally:
        model.train(was)
    return torch.cat(outs)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 1024,
             device: torch.device | str | None = None, amp: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, labels)`` (or a TensorDataset/Dataset)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    d = _Data(data, dev, "data")
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, d.n, batch_size):
            x, y = d.get(torch.arange(i, min(i + batch_size, d.n)))
            with _autocast(dev, amp):
                z = model(x)
            correct += int((z.argmax(-1) == y).sum())
    finally:
        model.train(was)
    return correct / d.n


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the trainer


class Distiller:
    """Train ``student`` on a weighted sum of loss terms, optionally against a teacher.

    Args:
        student: the model to train; ``student(inputs) -> (B, C)`` logits.
        optimizer: optimizer over the student's (and any trainable term's) parameters.
        losses: list of terms or ``(weight, term)`` pairs, or a dict name -> term / pair.
        teacher: None, a module (frozen unless ``freeze_teacher=False``) or a float tensor
            ``(N_train, C)`` of cached teacher logits aligned with the training set's rows.
        scheduler: optional LR scheduler, stepped every epoch or every step (``scheduler_interval``).
        device: where to train (``"cpu"``, ``"cuda"``...).
        batch_size: the *global* batch size (split over ranks under DDP).
        seed: seeds the data order (and the global RNG at the start of a fresh :meth:`fit`).
        progress: show tqdm progress bars and an epoch summary line (rank 0 only).
        amp: bf16 autocast; None = on for CUDA, off otherwise.
        freeze_teacher: put the teacher in eval mode with ``requires_grad=False`` and run it
            under no_grad.
        student_features / teacher_features: module paths (as in ``named_modules()``) whose
            outputs are captured into ``ctx.student_features`` / ``ctx.teacher_features``.
        grad_clip: optional max global grad norm.
        extra_modules: more modules to move to the device and to checkpoint (name -> module).
        extra_optimizers: more optimizers to checkpoint (name -> optimizer).
        drop_last: drop the last, smaller global batch of each epoch.
        find_unused_parameters: passed to DDP.
        after_step: optional ``fn(distiller)`` called after every optimizer step (e.g. clipping
            binary latent weights, ticking a progress bar).
    """

    def __init__(
        self,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        losses: Union[Sequence[TermSpec], Mapping[str, TermSpec]],
        teacher: Union[nn.Module, Tensor, None] = None,
        *,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        seed: int = 0,
        progress: bool = True,
        amp: Optional[bool] = None,
        freeze_teacher: bool = True,
        student_features: Iterable[str] = (),
        teacher_features: Iterable[str] = (),
        grad_clip: Optional[float] = None,
        extra_modules: Optional[Mapping[str, nn.Module]] = None,
        extra_optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
        drop_last: bool = False,
        find_unused_parameters: bool = False,
        after_step: Optional[Callable[["Distiller"], None]] = None,
    ) -> None:
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.device = torch.device(device)
        self.terms = _normalise_terms(losses)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = int(seed)
        self.progress = progress
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.freeze_teacher = freeze_teacher
        self.grad_clip = grad_clip
        self.drop_last = drop_last
        self.after_step = after_step

        self.student = student.to(self.device)
        self.teacher: Optional[nn.Module] = None
        self.teacher_cache: Optional[Tensor] = None
        if isinstance(teacher, Tensor):
            if teacher.dim() != 2 or not teacher.dtype.is_floating_point:
                raise ValueError(f"cached teacher logits must be a float (N, C) tensor, got "
                                 f"{teacher.dtype} {tuple(teacher.shape)}")
            self.teacher_cache = teacher.detach().to(self.device, torch.float32)
        elif isinstance(teacher, nn.Module):
            self.teacher = teacher.to(self.device)
            if freeze_teacher:
                self.teacher.eval()
                for p in self.teacher.parameters():
                    p.requires_grad_(False)
        elif teacher is not None:
            raise TypeError(f"teacher must be an nn.Module, a (N, C) logits tensor or None, got "
                            f"{type(teacher).__name__}")

        self.extra_modules: dict[str, nn.Module] = {}
        for name, _, term in self.terms:
            if isinstance(term, nn.Module):
                self.extra_modules[f"term_{name}"] = term.to(self.device)
        for name, mod in (extra_modules or {}).items():
            self.extra_modules[name] = mod.to(self.device)
        self.extra_optimizers = dict(extra_optimizers or {})

        self._s_feats: dict[str, Tensor] = {}
        self._t_feats: dict[str, Tensor] = {}
        self._hooks: list = []
        self._hooks += self._register_hooks(self.student, list(student_features), self._s_feats,
                                            "student_features")
        if self.teacher is not None:
            self._hooks += self._register_hooks(self.teacher, list(teacher_features), self._t_feats,
                                                "teacher_features")
        elif list(teacher_features):
            raise ValueError("teacher_features needs a teacher module (not cached logits)")

        self.model: nn.Module = self.student
        if D.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.model = DDP(self.student, device_ids=ids, find_unused_parameters=find_unused_parameters)

        # progress state (checkpointed)
        self.epoch = 0            # epochs completed
        self.batch_in_epoch = 0   # batches of the current epoch completed
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self._acc = self._zero_acc()

    # ------------------------------------------------------------------ hooks and forward

    @staticmethod
    def _register_hooks(model: nn.Module, names: list[str], store: dict, what: str) -> list:
        mods = dict(model.named_modules())
        handles = []
        for n in names:
            if n not in mods:
                raise ValueError(f"{what}: no module named {n!r}; have {[k for k in mods if k][:20]}")

            def hook(_m, _inp, out, n=n):
                store[n] = out

            handles.append(mods[n].register_forward_hook(hook))
        return handles

    def teacher_logits(self, inputs: Any, indices: Tensor) -> Optional[Tensor]:
        """Teacher logits for a batch: the cache rows, or a forward of the teacher module."""
        if self.teacher_cache is not None:
            return self.teacher_cache[indices.to(self.device)]
        if self.teacher is None:
            return None
        grad = not self.freeze_teacher and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), _autocast(self.device, self.amp):
            v = self.teacher(inputs)
        return v.float()

    def forward(self, inputs: Any, labels: Tensor, indices: Tensor) -> BatchContext:
        """Run student (through DDP when distributed) and teacher; build the :class:`BatchContext`."""
        self._s_feats.clear()
        self._t_feats.clear()
        with _autocast(self.device, self.amp):
            z = self.model(inputs)
        v = self.teacher_logits(inputs, indices)
        return BatchContext(
            inputs=inputs, labels=labels, indices=indices, student_logits=z.float(), teacher_logits=v,
            student_features=dict(self._s_feats), teacher_features=dict(self._t_feats),
            student=self.student, teacher=self.teacher, epoch=self.epoch, step=self.global_step,
        )

    def compute_loss(self, ctx: BatchContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the terms and each term's (unweighted, detached) value."""
        total: Optional[Tensor] = None
        parts: dict[str, Tensor] = {}
        for name, w, term in self.terms:
            val = term(ctx)
            if not isinstance(val, Tensor) or val.numel() != 1:
                raise ValueError(f"loss term {name!r} must return a scalar tensor, got "
                                 f"{type(val).__name__} {getattr(val, 'shape', '')}")
            val = val.reshape(())
            parts[name] = val.detach()
            if w != 0.0:
                total = val * w if total is None else total + val * w
        if total is None:
            total = ctx.student_logits.sum() * 0.0
        return total, parts

    def training_step(self, inputs: Any, labels: Tensor, indices: Tensor,
                      loss_scale: float = 1.0) -> tuple[BatchContext, Tensor, dict[str, Tensor]]:
        """One optimisation step on this rank's batch; returns ``(ctx, total_loss, term_values)``.

        ``loss_scale`` is the rank's share weight under DDP (1 otherwise): the backward runs on
        ``total * loss_scale``. Override for custom updates.
        """
        ctx = self.forward(inputs, labels, indices)
        total, parts = self.compute_loss(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        (total * loss_scale if loss_scale != 1.0 else total).backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        return ctx, total.detach(), parts

    # ------------------------------------------------------------------ metrics

    def _zero_acc(self) -> dict[str, Any]:
        return {"n": 0.0, "correct": 0.0, "loss": 0.0, "terms": {n: 0.0 for n, _, _ in self.terms}}

    def _accumulate(self, ctx: BatchContext, total: Tensor, parts: Mapping[str, Tensor]) -> None:
        b = float(ctx.labels.shape[0])
        a = self._acc
        a["n"] += b
        a["correct"] += float((ctx.student_logits.detach().argmax(-1) == ctx.labels).sum())
        a["loss"] += float(total) * b
        for k, v in parts.items():
            a["terms"][k] = a["terms"].get(k, 0.0) + float(v) * b

    def _reduced_acc(self) -> dict[str, Any]:
        """Metric sums over all ranks (identity in one process)."""
        if not D.is_distributed():
            return {"n": self._acc["n"], "correct": self._acc["correct"], "loss": self._acc["loss"],
                    "terms": dict(self._acc["terms"])}
        names = sorted(self._acc["terms"])
        vec = torch.tensor([self._acc["n"], self._acc["correct"], self._acc["loss"]]
                           + [self._acc["terms"][k] for k in names], dtype=torch.float64)
        if self.device.type == "cuda":
            vec = vec.to(self.device)
        vec = D.all_reduce_sum(vec).cpu().tolist()
        return {"n": vec[0], "correct": vec[1], "loss": vec[2], "terms": dict(zip(names, vec[3:]))}

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoints

    def _components(self) -> tuple[dict, dict, dict]:
        modules = {"student": self.student}
        if self.teacher is not None and not self.freeze_teacher:
            modules["teacher"] = self.teacher
        modules.update(self.extra_modules)
        optimizers = {"optimizer": self.optimizer, **self.extra_optimizers}
        schedulers = {"scheduler": self.scheduler} if self.scheduler is not None else {}
        return modules, optimizers, schedulers

    def save_checkpoint(self, path: str | os.PathLike) -> Optional[Path]:
        """Write a checkpoint (rank 0 writes; all ranks must call it under DDP)."""
        acc = self._reduced_acc()
        if D.rank() != 0:
            self._acc = self._zero_acc()   # rank 0 now holds the reduced sums
        else:
            self._acc = acc
        out = None
        if D.is_main_process():
            modules, optimizers, schedulers = self._components()
            state = {
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step, "seed": self.seed, "batch_size": self.batch_size,
                "history": self.history, "acc": acc, "world_size": D.world_size(),
            }
            out = ckpt.save_checkpoint(path, modules=modules, optimizers=optimizers,
                                       schedulers=schedulers, state=state)
        D.barrier()
        return out

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore everything :meth:`save_checkpoint` wrote; returns the saved state dict."""
        modules, optimizers, schedulers = self._components()
        state = ckpt.load_checkpoint(path, modules=modules, optimizers=optimizers,
                                     schedulers=schedulers, restore_rng=True)
        if state.get("batch_size") != self.batch_size or state.get("seed") != self.seed:
            raise ValueError(
                f"checkpoint was written with batch_size={state.get('batch_size')} seed={state.get('seed')}, "
                f"this Distiller has batch_size={self.batch_size} seed={self.seed}; resuming would "
                "change the data order"
            )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        acc = state["acc"]
        self._acc = acc if D.rank() == 0 else self._zero_acc()
        return state

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        train: Any,
        epochs: int,
        *,
        test: Any = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: Optional[int] = None,
        resume: bool = False,
        max_steps: Optional[int] = None,
        eval_train: bool = False,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are complete (or ``max_steps`` global steps).

        Args:
            train: ``(inputs, labels)`` tensors, a TensorDataset or a map-style Dataset.
            epochs: total number of epochs of the run (a resumed run continues up to it).
            test: optional eval data; its accuracy is logged as ``test_acc`` each epoch.
            checkpoint: file to write at each epoch end (and every ``checkpoint_every`` steps);
                with ``resume=True`` and an existing file, training continues from it.
            max_steps: stop (after writing the checkpoint) once ``global_step`` reaches it:
                simulates an interrupted run.
            eval_train: also measure the full training-set accuracy in eval mode each epoch
                (``train_acc`` is otherwise the running accuracy of the training batches).

        Returns:
            ``self.history``: one dict per completed epoch (``epoch``, ``step``, ``loss``, each
            term, ``train_acc``, ``test_acc``, ``lr``, ``time_s``).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        data = _Data(train, self.device, "train")
        test_data = _Data(test, self.device, "test") if test is not None else None
        if self.teacher_cache is not None and self.teacher_cache.shape[0] != data.n:
            raise ValueError(f"cached teacher logits have {self.teacher_cache.shape[0]} rows, the "
                             f"training set {data.n}; they must be aligned row by row")
        if resume and checkpoint is not None and Path(checkpoint).is_file():
            self.load_checkpoint(checkpoint)
        elif self.global_step == 0:
            seed_everything(self.seed + 7919 * D.rank())
        world, rk = D.world_size(), D.rank()
        if self.batch_size < world:
            raise ValueError(f"batch_size={self.batch_size} is smaller than the world size {world}")

        self.student.train()
        while self.epoch < epochs:
            t0 = time.perf_counter()
            batches = global_batches(data.n, self.batch_size, self.seed, self.epoch,
                                     drop_last=self.drop_last, min_size=world)
            bar = None
            if self.progress and D.is_main_process():
                from tqdm.auto import tqdm

                bar = tqdm(total=len(batches), initial=self.batch_in_epoch, leave=False,
                           desc=f"epoch {self.epoch + 1}/{epochs}", dynamic_ncols=True)
            try:
                for b in range(self.batch_in_epoch, len(batches)):
                    gidx = batches[b]
                    idx = D.shard_batch(gidx, rk, world)
                    scale = D.shard_weight(len(gidx), len(idx), world) if world > 1 else 1.0
                    x, y = data.get(idx)
                    ctx, total, parts = self.training_step(x, y, idx, scale)
                    if self.after_step is not None:
                        self.after_step(self)
                    self._accumulate(ctx, total, parts)
                    self.global_step += 1
                    self.batch_in_epoch = b + 1
                    if self.scheduler is not None and self.scheduler_interval == "step":
                        self.scheduler.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(total):.4f}")
                    stop = max_steps is not None and self.global_step >= max_steps
                    due = bool(checkpoint_every) and self.global_step % checkpoint_every == 0
                    if checkpoint is not None and (stop or due):
                        self.save_checkpoint(checkpoint)
                    if stop:
                        return self.history
            finally:
                if bar is not None:
                    bar.close()
            # ---- end of epoch
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            acc = self._reduced_acc()
            n = max(acc["n"], 1.0)
            row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step,
                                   "loss": acc["loss"] / n}
            row.update({k: v / n for k, v in acc["terms"].items()})
            row["train_acc"] = acc["correct"] / n
            if eval_train:
                row["train_acc_eval"] = evaluate(self.student, (data.tensors if data.tensors else data.dataset),
                                                 batch_size=self.eval_batch_size, device=self.device, amp=self.amp)
            if test_data is not None:
                row["test_acc"] = evaluate(self.student, test_data.tensors or test_data.dataset,
                                           batch_size=self.eval_batch_size, device=self.device, amp=self.amp)
            row["lr"] = self.current_lr()
            row["time_s"] = time.perf_counter() - t0
            self.history.append(row)
            self.epoch += 1
            self.batch_in_epoch = 0
            self._acc = self._zero_acc()
            if self.progress and D.is_main_process():
                from tqdm.auto import tqdm

                tqdm.write("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items()))
            if checkpoint is not None:
                self.save_checkpoint(checkpoint)
        return self.history

    def evaluate(self, data: Any) -> float:
        """Top-1 accuracy of the student on ``data``."""
        return evaluate(self.student, data, batch_size=self.eval_batch_size, device=self.device,
                        amp=self.amp)

    def close(self) -> None:
        """Remove the feature hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
