"""Fused linear + KD loss for LLM heads: the full N x V logits never exist.

``fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, ...)``
computes ``kd_loss(student_hidden @ student_weight.T + b_s, teacher_logits, ...)`` with every
:func:`kdengine.kd_loss` option, chunk of rows by chunk of rows. Per chunk:

1. the student head GEMM gives the chunk's logits (fp32 for bf16/fp16/fp32 inputs, fp64 for fp64);
2. the teacher chunk (head GEMM under no_grad, or a slice of ready logits) in the same dtype;
3. ONE per-chunk loss call ``chunk_loss(student_logits_chunk, teacher_chunk, labels_chunk) ->
   (loss_sum_chunk, grad_logits_chunk)`` (the kd_loss backend contract with ``reduction="sum"``:
   loss and gradient of the chunk's SUM in the same pass);
4. ``grad_logits_chunk`` goes straight into ``grad_hidden[rows] = g @ W`` and the fp32
   ``grad_weight.addmm_(g.T, hidden[rows])`` (and ``grad_bias += g.sum(0)``).

The sums are normalised once at the end (batchmean: non-ignored rows of the WHOLE batch, or
``num_items_in_batch``), so chunking never changes the result. The gradients are computed in the
forward (like Liger); the backward is a scale by the incoming gradient. ``reduction="none"`` is the
exception: the per-row weights are only known in backward, so the backward runs the chunk loop a
second time (the logits GEMM twice).

The seam for other teacher kinds (a top-k sparse teacher, say)
----------------------------------------------------------------
Two objects make the loop teacher-agnostic; :class:`_Plan` holds them:

* a *teacher source* with ``chunk(lo, hi, dtype) -> teacher_chunk`` (here: :class:`DenseTeacherHead`
  and :class:`DenseTeacherLogits`; ``teacher_chunk`` can be any object the chunk loss understands,
  e.g. a (values, indices) pair); an optional ``release()`` is called after each pass over
  the rows to free per-call buffers;
* a *chunk loss* ``(student_logits_chunk (c, V), teacher_chunk, labels_chunk (c,) | None) ->
  (loss_sum_chunk, grad_logits_chunk (c, V))``: ``loss_sum_chunk`` is a tensor of a fixed shape
  summed across chunks (0-dim normally; (3,) for the soft/hard split), or per row ``(c,)`` for
  ``reduction="none"``; ``grad_logits_chunk`` is d(sum of the chunk's loss) / d logits in the
  compute dtype (row-wise d loss_r / d logits_r for "none").

Replace both and call :func:`fused_linear_chunked` (tested with a custom chunk loss in
tests/test_fused_linear_kd.py::test_chunk_loss_seam): the GEMMs, chunking, fp32 accumulation,
normalisation and the autograd wiring stay.

Precision: bf16/fp16 hidden states and heads are multiplied in fp32 (the logits of a bf16 head at
logit std 30 lose ~0.1 absolute in bf16, which moves probabilities by ~10%); this keeps one fp32
copy of each half-precision head for the call (V x H x 4 bytes). ``grad_weight``/``grad_bias``
accumulate in fp32 and are rounded once to the weight's dtype.

Chunk size: by default ``rows = clamp(AUTO_CHUNK_BYTES / (3 * V * 4), 16, N)`` rounded down to a
multiple of 8: the chunk's student logits, their gradient and the teacher logits (3 x rows x V x 4
bytes) stay around 384 MiB (logits + gradient ~256 MiB): 1048 rows at V = 32000, 216 at V = 151936.
Smaller chunks save memory but cost time on CPU: the teacher/student head GEMMs lose ~15% of their
speed at ~350 rows and ~2.5% at ~700 against >= 1024 (Xeon, 2 threads, H = 1024/2048).
Override with ``chunk_size=``.
The two logits buffers are allocated once per call and reused by every chunk.

The teacher is frozen: no gradient flows to teacher tensors, and a teacher tensor that requires
grad (with grad mode on) raises ValueError; pass ``.detach()``-ed tensors.
Second-order gradients are not supported: differentiating the backward (``create_graph=True``)
raises RuntimeError.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine.losses import OptionsLoss, check_kd_options
from kdengine.ops.kd_loss.config import KDConfig, Reduction
from kdengine.ops.kd_loss import make_config

OP = "kd_loss"
AUTO_CHUNK_BYTES = 384 << 20
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TEACHER_VOCAB_CHOICES = ("strict", "truncate")

ChunkLoss = Callable[[Tensor, object, Optional[Tensor]], "tuple[Tensor, Tensor]"]


# --------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def auto_chunk_size(n: int, v: int) -> int:
    """Rows per chunk so that 3 x rows x V x 4 bytes stay around :data:`AUTO_CHUNK_BYTES`."""
    rows = AUTO_CHUNK_BYTES // (3 * max(v, 1) * 4)
    rows = max(16, (rows // 8) * 8)
    return max(1, min(n, rows))


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """x @ w.T (+ b) with all three already in the compute dtype (into ``out`` when given)."""
    if b is None:
        return torch.mm(x, w.t(), out=out) if out is not None else x @ w.t()
    if out is not None:
        return torch.addmm(b, x, w.t(), out=out)
    return torch.addmm(b, x, w.t())


class _RowBuffer:
    """One (rows, V) buffer reused by every chunk: no fresh pages (faults, zeroing) per chunk."""

    def __init__(self) -> None:
        self.buf: Optional[Tensor] = None

    def get(self, rows: int, v: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        b = self.buf
        if b is None or b.shape[0] < rows or b.shape[1] != v or b.dtype != dtype or b.device != device:
            b = self.buf = torch.empty(rows, v, dtype=dtype, device=device)
        return b[:rows]


class DenseTeacherHead:
    """Teacher source: hidden states (N, Ht) and a head (Vt, Ht) (+ bias); chunks in fp32/fp64."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], v: int,
                 dtype: torch.dtype) -> None:
        self.hidden = hidden
        self.weight = weight[:v].to(dtype)  # truncation (if asked) drops the padded rows up front
        self.bias = None if bias is None else bias[:v].to(dtype)
        self._out = _RowBuffer()

    def release(self) -> None:
        self._out.buf = None

    def chunk(self, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
        out = self._out.get(hi - lo, self.weight.shape[0], dtype, self.hidden.device)
        with torch.no_grad():
            return _linear(self.hidden[lo:hi].to(dtype), self.weight, self.bias, out=out)


class DenseTeacherLogits:
    """Teacher source: ready logits (N, Vt), sliced to the student's V when truncation is asked."""

    def __init__(self, logits: Tensor, v: int) -> None:
        self.logits = logits
        self.v = v

    def chunk(self, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
        return self.logits[lo:hi, : self.v].to(dtype).contiguous()


class KDChunkLoss:
    """The dense per-chunk loss: one kd_loss backend call (contract of ops/kd_loss/backends.py)."""

    def __init__(self, cfg: KDConfig, backend: str) -> None:
        self.cfg = cfg
        self.impl = _dispatch.implementation(OP, backend)

    def __call__(self, s: Tensor, t: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        loss, gs, _ = self.impl(s, t, labels, self.cfg)
        return loss, gs


class SoftHardChunkLoss:
    """Weighted soft + hard parts, reported separately: loss_sum = [total, soft, hard] (3,).

    total = w_soft * soft + w_hard * hard (Liger's ``return_soft_hard_loss``); two backend calls.
    """

    def __init__(self, cfg: KDConfig, backend: str, w_soft: float, w_hard: float) -> None:
        self.impl = _dispatch.implementation(OP, backend)
        self.soft_cfg = dataclasses.replace(cfg, hard_weight=0.0)
        self.hard_cfg = dataclasses.replace(cfg, hard_weight=1.0)
        self.w_soft, self.w_hard = w_soft, w_hard

    def __call__(self, s: Tensor, t: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        ls, gs, _ = self.impl(s, t, labels, self.soft_cfg)
        if labels is None:
            lh, gh = torch.zeros_like(ls), None
        else:
            lh, gh, _ = self.impl(s, t, labels, self.hard_cfg)
        total = self.w_soft * ls + self.w_hard * lh
        g = gs * self.w_soft if gh is None else torch.add(gs * self.w_soft, gh, alpha=self.w_hard)
        return torch.stack([total, ls, lh]), g


@dataclasses.dataclass
class _Plan:
    """Everything the chunk loop needs besides the student tensors (see the seam above)."""

    teacher: object  # .chunk(lo, hi, dtype)
    chunk_loss: ChunkLoss
    labels: Optional[Tensor]
    chunk_size: int
    denom: float  # the normaliser of the summed loss (1 for sum/none)
    loss_scale: float  # overall multiplier (Liger weights)
    per_row: bool  # reduction == none
    n_out: int  # number of loss components (1, or 3 for the soft/hard split)


def _chunk_loop(plan: _Plan, hidden: Tensor, weight_c: Tensor, bias_c: Optional[Tensor],
                cdt: torch.dtype, *, want_grads: bool, row_weights: Optional[Tensor] = None,
                need: tuple[bool, bool, bool] = (True, True, True), scale: float = 1.0):
    """One pass over the rows; returns (loss, grad_hidden, grad_weight_acc, grad_bias_acc).

    The gradients are ``scale`` times those of the summed loss (times row_weights for "none"), in
    the compute dtype for weight/bias (fp32 accumulators) and the hidden dtype for the hidden
    states; the scale rides on the GEMMs' alpha (no extra pass over anything).
    """
    n = hidden.shape[0]
    v = weight_c.shape[0]
    dev = hidden.device
    if plan.per_row:
        loss = torch.empty(n, dtype=cdt, device=dev)
    else:
        loss = torch.zeros(plan.n_out, dtype=torch.float64 if cdt == torch.float64 else torch.float32,
                           device=dev)
    gh = gw = gb = None
    if want_grads:
        if need[0]:
            gh = torch.empty_like(hidden)
        if need[1]:  # written with beta=0 by the first chunk (zeros if there is none)
            gw = (torch.empty if n else torch.zeros)(weight_c.shape, dtype=cdt, device=dev)
        if need[2] and bias_c is not None:
            gb = torch.zeros(v, dtype=cdt, device=dev)
    s_buf = _RowBuffer()
    for lo in range(0, n, plan.chunk_size):
        hi = min(n, lo + plan.chunk_size)
        x = hidden[lo:hi].to(cdt)
        s = _linear(x, weight_c, bias_c, out=s_buf.get(min(plan.chunk_size, n), v, cdt, dev)[: hi - lo])
        t = plan.teacher.chunk(lo, hi, cdt)
        lab = None if plan.labels is None else plan.labels[lo:hi]
        loss_c, g = plan.chunk_loss(s, t, lab)
        del s, t
        if plan.per_row:
            loss[lo:hi] = loss_c.to(cdt)
        else:
            loss += loss_c.to(loss.dtype).reshape(loss.shape)
        if not want_grads:
            continue
        g = g.to(cdt)
        if row_weights is not None:
            g = g * row_weights[lo:hi].to(cdt).unsqueeze(-1)
        if gh is not None:
            if gh.dtype == cdt:
                gh[lo:hi].addmm_(g, weight_c, beta=0, alpha=scale)
            else:
                gh[lo:hi] = torch.mm(g, weight_c).mul_(scale).to(gh.dtype)
        if gw is not None:
            gw.addmm_(g.t(), x, beta=0 if lo == 0 else 1, alpha=scale)
        if gb is not None:
            gb.add_(g.sum(0), alpha=scale)
    release = getattr(plan.teacher, "release", None)
    if release is not None:
        release()
    return loss, gh, gw, gb


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: _Plan):
        cdt = _compute_dtype(hidden)
        weight_c = weight.to(cdt)
        bias_c = None if bias is None else bias.to(cdt)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        # Only "none" needs the plan (teacher, labels) in backward; otherwise let it go now.
        ctx.plan = plan if plan.per_row else None
        ctx.per_row = plan.per_row
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if plan.per_row:
            # The row weights come with the backward: recompute there (the logits GEMM twice).
            loss, _, _, _ = _chunk_loop(plan, hidden, weight_c, bias_c, cdt, want_grads=False)
            ctx.save_for_backward(hidden, weight, bias)
            return loss * plan.loss_scale
        want = any(need)
        scale = plan.loss_scale / plan.denom
        loss, gh, gw, gb = _chunk_loop(plan, hidden, weight_c, bias_c, cdt, want_grads=want,
                                       need=need, scale=scale)
        if gw is not None:
            gw = gw.to(weight.dtype)
        if gb is not None:
            gb = gb.to(bias.dtype)
        ctx.save_for_backward(gh, gw, gb)
        out = loss * scale
        if plan.n_out == 1:
            return out.reshape(())
        total, soft, hard = out[0], out[1] / plan.loss_scale, out[2] / plan.loss_scale
        ctx.mark_non_differentiable(soft, hard)
        return total, soft, hard

    @staticmethod
    def backward(ctx, g_loss, *_rest):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_kd_loss does not support second-order gradients (its backward is "
                "computed in the forward); do not differentiate it with create_graph=True"
            )
        if ctx.per_row:
            plan: _Plan = ctx.plan
            hidden, weight, bias = ctx.saved_tensors
            cdt = _compute_dtype(hidden)
            weight_c = weight.to(cdt)
            bias_c = None if bias is None else bias.to(cdt)
            need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                    bias is not None and ctx.needs_input_grad[2])
            _, gh, gw, gb = _chunk_loop(plan, hidden, weight_c, bias_c, cdt, want_grads=True,
                                        row_weights=g_loss * plan.loss_scale, need=need)
            return (gh, None if gw is None else gw.to(weight.dtype),
                    None if gb is None else gb.to(bias.dtype), None)
        gh, gw, gb = ctx.saved_tensors
        if g_loss is None:
            return None, None, None, None
        if not (not torch.compiler.is_compiling() and float(g_loss) == 1.0):
            gh = None if gh is None else gh * g_loss.to(gh.dtype)
            gw = None if gw is None else gw * g_loss.to(gw.dtype)
            gb = None if gb is None else gb * g_loss.to(gb.dtype)
        return gh, gw, gb, None


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, x: object, dims: Optional[int] = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32/bfloat16/float16/float64, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    return x


def _check_frozen(name: str, x: Optional[Tensor]) -> None:
    if x is not None and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but the teacher is frozen here (no teacher gradients are "
            f"computed); pass {name}.detach() or run the teacher under torch.no_grad()"
        )


def _check_same(name: str, x: Tensor, ref: Tensor, ref_name: str, dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} on {ref.device}; expected one device")
    if dtype and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; expected one dtype")


def check_student_head(student_hidden: object, student_weight: object,
                       student_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, int, tuple]:
    """Validate the student side: ``(hidden, weight, V, leading dims of hidden)``."""
    hs = _check_tensor("student_hidden", student_hidden)
    if hs.dim() < 1:
        raise ValueError("student_hidden must have shape (..., Hs)")
    w = _check_tensor("student_weight", student_weight, 2)
    if w.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must have shape (V, Hs={hs.shape[-1]}), got {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("student_weight has V = 0 rows; expected V >= 1")
    _check_same("student_weight", w, hs, "student_hidden")
    v = w.shape[0]
    if student_bias is not None:
        _check_tensor("student_bias", student_bias, 1)
        if student_bias.shape[0] != v:
            raise ValueError(f"student_bias must have shape ({v},), got {tuple(student_bias.shape)}")
        _check_same("student_bias", student_bias, hs, "student_hidden")
    return hs, w, v, tuple(hs.shape[:-1])


def check_chunk_size(chunk_size: object, n: int, v: int) -> int:
    """Rows per chunk: ``chunk_size`` checked, or :func:`auto_chunk_size` when None."""
    if chunk_size is None:
        return auto_chunk_size(n, v)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (or None for automatic), got {chunk_size!r}")
    return int(chunk_size)


def check_teacher_vocab(teacher_vocab: object) -> None:
    if teacher_vocab not in TEACHER_VOCAB_CHOICES:
        raise ValueError(f"teacher_vocab must be one of {TEACHER_VOCAB_CHOICES}, got {teacher_vocab!r}")


def loss_denominator(reduction: str, num_items_in_batch: object, labels: Optional[Tensor],
                     ignore_index: int, n: int, v: int) -> float:
    """What the summed loss is divided by: 1 (sum, none), the count of non-ignored rows (or
    ``num_items_in_batch``) for batchmean, times V for mean."""
    if num_items_in_batch is not None:
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"num_items_in_batch needs reduction='batchmean' (or 'mean'), got {reduction!r}")
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.item()
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real) \
                or not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be a positive number, got {num_items_in_batch!r}")
        count = float(num_items_in_batch)
    elif labels is not None:
        count = float(max(1, int((labels != ignore_index).sum())))
    else:
        count = float(max(1, n))
    if reduction in ("sum", "none"):
        return 1.0
    return count if reduction == "batchmean" else count * v


def _prepare(
    student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias,
    teacher_bias, labels, temperature, reduction, divergence, beta, hard_weight, ignore_index,
    label_smoothing, scale_t2, num_items_in_batch, chunk_size, teacher_vocab, backend,
    loss_scale=1.0, soft_hard=None,
):
    hs, w, v, lead = check_student_head(student_hidden, student_weight, student_bias)
    h2 = hs.reshape(-1, hs.shape[-1])
    n = h2.shape[0]
    check_teacher_vocab(teacher_vocab)

    def _vocab(vt: int, what: str) -> None:
        if vt == v:
            return
        if vt > v and teacher_vocab == "truncate":
            return
        hint = ("; pass teacher_vocab='truncate' to drop the teacher's extra (padded) vocabulary "
                "entries") if vt > v else ""
        raise ValueError(f"{what} has vocabulary Vt={vt} but student_weight V={v}{hint}")

    cdt = _compute_dtype(h2)
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_logits excludes teacher_hidden/teacher_weight/teacher_bias: "
                             "give the teacher either as logits or as hidden states + head")
        tl = _check_tensor("teacher_logits", teacher_logits)
        _check_frozen("teacher_logits", tl)
        if tuple(tl.shape[:-1]) != tuple(lead):
            raise ValueError(f"teacher_logits must have shape {tuple(lead)} + (Vt,), got {tuple(tl.shape)}")
        _check_same("teacher_logits", tl, hs, "student_hidden", dtype=False)
        _vocab(tl.shape[-1], "teacher_logits")
        teacher = DenseTeacherLogits(tl.reshape(n, tl.shape[-1]), v)
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("give the teacher as teacher_logits= or as teacher_hidden + teacher_weight")
        th = _check_tensor("teacher_hidden", teacher_hidden)
        tw = _check_tensor("teacher_weight", teacher_weight, 2)
        for nm, x in (("teacher_hidden", th), ("teacher_weight", tw), ("teacher_bias", teacher_bias)):
            _check_frozen(nm, x)
        if tuple(th.shape[:-1]) != tuple(lead):
            raise ValueError(f"teacher_hidden must have shape {tuple(lead)} + (Ht,), got {tuple(th.shape)}")
        if tw.shape[1] != th.shape[-1]:
            raise ValueError(f"teacher_weight must have shape (Vt, Ht={th.shape[-1]}), got {tuple(tw.shape)}")
        _check_same("teacher_hidden", th, hs, "student_hidden", dtype=False)
        _check_same("teacher_weight", tw, th, "teacher_hidden")
        _vocab(tw.shape[0], "teacher_weight")
        if teacher_bias is not None:
            _check_tensor("teacher_bias", teacher_bias, 1)
            if teacher_bias.shape[0] != tw.shape[0]:
                raise ValueError(f"teacher_bias must have shape ({tw.shape[0]},), got {tuple(teacher_bias.shape)}")
            _check_same("teacher_bias", teacher_bias, th, "teacher_hidden")
        teacher = DenseTeacherHead(th.reshape(n, th.shape[-1]), tw, teacher_bias, v, cdt)

    cfg = make_config(temperature, reduction, divergence, beta, hard_weight, labels is not None,
                      ignore_index, label_smoothing, scale_t2, False)
    lab = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError("labels must be an integer tensor of class indices")
        if tuple(labels.shape) != tuple(lead):
            raise ValueError(f"labels must have shape {tuple(lead)}, got {tuple(labels.shape)}")
        if labels.device != hs.device:
            raise ValueError(f"labels are on {labels.device} but student_hidden on {hs.device}")
        lab = labels.reshape(-1).to(torch.int64).contiguous()
        bad = (lab != cfg.ignore_index) & ((lab < 0) | (lab >= v))
        if n and bool(bad.any()):
            raise ValueError(f"labels must be in [0, {v}) or equal ignore_index={cfg.ignore_index}; "
                             f"found {lab[bad][0].item()}")
    chunk = check_chunk_size(chunk_size, n, v)
    red = cfg.reduction
    denom = loss_denominator(reduction, num_items_in_batch, lab, cfg.ignore_index, n, v)
    name = _dispatch.resolve(OP, hs.device, backend)
    per_row = red == Reduction.NONE
    chunk_cfg = dataclasses.replace(cfg, reduction=Reduction.NONE if per_row else Reduction.SUM)
    if soft_hard is not None:
        if per_row:
            raise ValueError("return_soft_hard_loss needs a scalar reduction")
        chunk_loss = SoftHardChunkLoss(chunk_cfg, name, *soft_hard)
        n_out = 3
    else:
        chunk_loss = KDChunkLoss(chunk_cfg, name)
        n_out = 1
    plan = _Plan(teacher, chunk_loss, lab, chunk, denom, float(loss_scale), per_row, n_out)
    return h2, w, student_bias, plan, lead


def _fused_core(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: _Plan, lead):
    out = _FusedLinearKD.apply(hidden, weight, bias, plan)
    if plan.per_row:
        return out.reshape(lead).to(hidden.dtype)
    if plan.n_out == 1:
        return out.to(hidden.dtype)
    return tuple(o.to(hidden.dtype) for o in out)


def fused_linear_chunked(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    teacher: object,
    chunk_loss: ChunkLoss,
    labels: Optional[Tensor] = None,
    *,
    denom: float = 1.0,
    chunk_size: Optional[int] = None,
    per_row: bool = False,
) -> Tensor:
    """The seam: the chunk loop with any teacher source and per-chunk loss (module docstring).

    ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, already validated; ``teacher``
    has ``chunk(lo, hi, dtype)``; ``chunk_loss(s, t, labels) -> (loss_sum, grad_logits)``;
    ``labels`` (N,) int64 or None is sliced per chunk; the loss is ``sum / denom`` (per row when
    ``per_row``). Returns the loss in ``hidden``'s dtype, differentiable w.r.t. hidden/weight/bias.
    """
    n, v = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or auto_chunk_size(n, v)
    plan = _Plan(teacher, chunk_loss, labels, chunk, float(denom), 1.0, per_row, 1)
    return _fused_core(hidden, weight, bias, plan, hidden.shape[:-1])


# --------------------------------------------------------------------------- public API


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    labels: Optional[Tensor] = None,
    hard_weight: Optional[float] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    scale_t2: bool = True,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    chunk_size: Optional[int] = None,
    teacher_vocab: str = "strict",
    backend: Optional[str] = None,
) -> Tensor:
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher, ...)`` without ever
    holding the N x V logits (see the module docstring for the chunk loop).

    Args:
        student_hidden: ``(..., Hs)`` student hidden states (float32/bfloat16/float16/float64).
        student_weight: ``(V, Hs)`` student head, same dtype and device; ``student_bias``: ``(V,)``.
        teacher_hidden, teacher_weight, teacher_bias: ``(..., Ht)``, ``(Vt, Ht)``, ``(Vt,)`` the
            frozen teacher's hidden states and head (any float dtype; Ht may differ from Hs), or
        teacher_logits: ``(..., Vt)`` ready teacher logits instead.
        temperature, reduction, divergence, beta, labels, hard_weight, ignore_index,
        label_smoothing, scale_t2, backend: as in :func:`kdengine.kd_loss` (same semantics,
            the same value as ``kd_loss`` on the materialised logits).
        num_items_in_batch: the normaliser of ``batchmean`` (``mean``: times V) instead of this
            call's non-ignored rows: pass the non-ignored rows of the whole accumulation step so
            that micro-batches sum to the gradient of one big batch (HF Trainer convention).
        chunk_size: rows per chunk (default: automatic, ~384 MiB of chunk buffers).
        teacher_vocab: ``"strict"`` (default): Vt must equal V; ``"truncate"``: a larger teacher
            vocabulary (padded heads, e.g. 152064 vs 151936) is cut to the student's first V
            entries before the softmax.

    Returns:
        The loss in the hidden states' dtype (per row ``(...)`` for ``"none"``). Gradients flow to
        ``student_hidden``, ``student_weight`` and ``student_bias`` only; teacher tensors must not
        require grad. No second-order gradients.
    """
    h2, w, b, plan, lead = _prepare(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
        student_bias, teacher_bias, labels, temperature, reduction, divergence, beta, hard_weight,
        ignore_index, label_smoothing, scale_t2, num_items_in_batch, chunk_size, teacher_vocab,
        backend,
    )
    return _fused_core(h2, w, b, plan, lead)


class FusedLinearKDLoss(OptionsLoss):
    """nn.Module of :func:`fused_linear_kd_loss`; the constructor fixes the options.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
    teacher_logits=None, student_bias=None, teacher_bias=None, labels=None,
    num_items_in_batch=None)``.
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
        chunk_size: Optional[int] = None,
        teacher_vocab: str = "strict",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(locals())
        check_kd_options(**self.kwargs)
        check_chunk_size(chunk_size, 1, 1)
        check_teacher_vocab(teacher_vocab)

    def forward(self, student_hidden: Tensor, student_weight: Tensor,
                teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None, *,
                teacher_logits: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            teacher_logits=teacher_logits, student_bias=student_bias, teacher_bias=teacher_bias,
            labels=labels, num_items_in_batch=num_items_in_batch, **self.kwargs,
        )
