"""Vocab-parallel KD: gloo process groups of 2 and 3 CPU processes with uneven vocabulary shards
give the loss and the per-shard gradients of the single-process float64 reference on the
concatenated logits; mismatched shards/options raise a ValueError naming the argument on every
rank. Spawning is slow, so each spawned group runs all of its checks in one worker."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

import kdengine
from kdengine.llm.vocab_parallel import vocab_parallel_kd_loss, vocab_parallel_linear_kd_loss
from kdengine.train import distributed as D

V = 37
LEAD = (2, 5)  # (batch, sequence): N = 10 rows


def _ref(s, t, T, **kw):
    """Float64 single-process reference loss and gradients on the full vocabulary."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    loss = kdengine.kd_loss(s64, t64, T, backend="reference", **kw)
    return loss, s64, t64


def _inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*LEAD, V, generator=g) * 3).to(dtype)
    t = (torch.randn(*LEAD, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, LEAD, generator=g)
    labels[0, 1] = -100
    labels[1, 4] = -100
    return s, t, labels


def _shard(x, lo, hi):
    return x[..., lo:hi].detach().clone().requires_grad_()


def _check_case(lo, hi, s, t, T, rtol, atol, vocab_start=None, **kw):
    """One loss + backward on this rank's shard vs the reference; returns the loss."""
    ss, ts = _shard(s, lo, hi), _shard(t, lo, hi)
    loss = vocab_parallel_kd_loss(ss, ts, T, vocab_start=vocab_start, **kw)
    ref, s64, t64 = _ref(s, t, T, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    # a random upstream gradient (same on every rank: same seed) checks 'none' row by row
    gw = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (loss * gw.to(loss.dtype)).sum().backward()
    (ref * gw).sum().backward()
    torch.testing.assert_close(ss.grad.double(), s64.grad[..., lo:hi], rtol=rtol, atol=atol)
    if t64.grad is None:  # hard_weight=1: the teacher is not in the graph
        assert ts.grad is None
    else:
        torch.testing.assert_close(ts.grad.double(), t64.grad[..., lo:hi], rtol=rtol, atol=atol)
    return loss


def _same_on_all_ranks(x: torch.Tensor, world: int) -> None:
    x = x.detach().double().reshape(-1)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    for o in out[1:]:
        assert torch.equal(o, out[0])


def _expect_error(match: str, fn) -> None:
    with pytest.raises(ValueError, match=match):
        fn()


def _worker(rank: int, world: int, sizes: list[int], starts: list[int], explicit: bool) -> None:
    torch.set_num_threads(1)
    assert dist.get_world_size() == world
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    vs = starts[rank] if explicit else None
    s, t, labels = _inputs(0)

    # -- every divergence x reduction x {no labels, KD + smoothed CE with ignored rows, CE only}
    label_modes = [
        {},
        dict(labels=labels, hard_weight=0.3, label_smoothing=0.1),
        dict(labels=labels, hard_weight=1.0),
    ]
    for div, red, T, lab_kw in itertools.product(
        ["forward_kl", "reverse_kl", "jsd"], ["batchmean", "sum", "mean", "none"], [1.0, 2.5],
        label_modes,
    ):
        kw = dict(divergence=div, reduction=red, beta=0.3, **lab_kw)
        loss = _check_case(lo, hi, s, t, T, 1e-9, 1e-12, vocab_start=vs, **kw)
        _same_on_all_ranks(loss, world)
    # labels with the default hard_weight (0.5), ignore_index, scale_t2=False
    _check_case(lo, hi, s, t, 4.0, 1e-9, 1e-12, vocab_start=vs, labels=labels, scale_t2=False,
                divergence="jsd", beta=0.7)
    # a different ignore_index value
    lab2 = labels.masked_fill(labels == -100, 3)
    _check_case(lo, hi, s, t, 2.0, 1e-9, 1e-12, vocab_start=vs, labels=lab2, ignore_index=3,
                hard_weight=0.5)
    # every row ignored: loss 0, gradient 0 (reference: count 0 -> 0)
    _check_case(lo, hi, s, t, 2.0, 1e-9, 1e-12, vocab_start=vs,
                labels=torch.full(LEAD, -100), hard_weight=0.5)

    # -- float32 inputs: fp32 math at small T; large T (up to 1e3) within 1e-5 of float64
    s32, t32, _ = _inputs(1, torch.float32)
    for div, T in itertools.product(["forward_kl", "reverse_kl", "jsd"], [1.0, 30.0, 1e3]):
        loss = _check_case(lo, hi, s32, t32, T, 1e-5, 1e-7, vocab_start=vs, divergence=div,
                           labels=labels, hard_weight=0.2)
        assert loss.dtype == torch.float32
    # close distributions in float32 (the terms cancel): the rows are redone in float64
    tc = (s32 + 1e-3 * torch.randn(s32.shape, generator=torch.Generator().manual_seed(4))).float()
    for div, red in itertools.product(["forward_kl", "reverse_kl", "jsd"], ["batchmean", "none"]):
        _check_case(lo, hi, s32, tc, 1.0, 1e-5, 0.0, vocab_start=vs, divergence=div, reduction=red)
    # float64 inputs at T = 1e3 (no CE: the pure divergence, tiny before the T^2 scale)
    for div in ["forward_kl", "reverse_kl", "jsd"]:
        _check_case(lo, hi, s, t, 1e3, 1e-8, 0.0, vocab_start=vs, divergence=div, reduction="none")
    # bf16 / fp16 inputs: float32 math; reference on the same rounded logits
    for dt in (torch.bfloat16, torch.float16):
        sb, tb, _ = _inputs(2, dt)
        ss, ts = _shard(sb, lo, hi), _shard(tb, lo, hi)
        loss = vocab_parallel_kd_loss(ss, ts, 2.0, vocab_start=vs, divergence="jsd")
        ref, _, _ = _ref(sb, tb, 2.0, divergence="jsd")
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
        loss.backward()
        assert ss.grad.dtype == dt and ts.grad.dtype == dt

    # -- head-sharded variant: gradients of the weight shards and of the (all-reduced) hidden
    g = torch.Generator().manual_seed(3)
    h, ht = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 12, generator=g,
                                                                         dtype=torch.float64)
    w, wt = torch.randn(V, 8, generator=g, dtype=torch.float64), torch.randn(V, 12, generator=g,
                                                                          dtype=torch.float64)
    hh = h.clone().requires_grad_()
    ws = w[lo:hi].clone().requires_grad_()
    loss = vocab_parallel_linear_kd_loss(hh, ws, ht, wt[lo:hi], 2.0, vocab_start=vs,
                                         divergence="reverse_kl")
    loss.backward()
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = kdengine.kd_loss(h_ref @ w_ref.T, ht @ wt.T, 2.0, divergence="reverse_kl",
                           backend="reference")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(ws.grad, w_ref.grad[lo:hi], rtol=1e-9, atol=1e-12)
    gh = hh.grad.clone()
    dist.all_reduce(gh)
    torch.testing.assert_close(gh, h_ref.grad, rtol=1e-9, atol=1e-12)

    # -- mismatches: every rank raises a ValueError naming the argument, then the group still works
    last = rank == world - 1
    sl, tl = s[..., lo:hi], t[..., lo:hi]
    _expect_error("student_shard", lambda: vocab_parallel_kd_loss(
        sl[:, :4] if last else sl, tl[:, :4] if last else tl, vocab_start=vs))
    _expect_error("student_shard", lambda: vocab_parallel_kd_loss(
        sl.reshape(-1, hi - lo) if last else sl, tl.reshape(-1, hi - lo) if last else tl,
        vocab_start=vs))
    _expect_error("student_shard", lambda: vocab_parallel_kd_loss(
        sl.float() if last else sl, tl.float() if last else tl, vocab_start=vs))
    _expect_error("teacher_shard", lambda: vocab_parallel_kd_loss(
        sl, tl[..., :0] if last else tl, vocab_start=vs))
    _expect_error("temperature", lambda: vocab_parallel_kd_loss(
        sl, tl, 2.0 if last else 1.0, vocab_start=vs))
    _expect_error("reduction", lambda: vocab_parallel_kd_loss(
        sl, tl, reduction="sum" if last else "batchmean", vocab_start=vs))
    _expect_error("divergence", lambda: vocab_parallel_kd_loss(
        sl, tl, divergence="jsd" if last else "forward_kl", vocab_start=vs))
    _expect_error("beta", lambda: vocab_parallel_kd_loss(
        sl, tl, divergence="jsd", beta=0.4 if last else 0.5, vocab_start=vs))
    _expect_error("labels", lambda: vocab_parallel_kd_loss(
        sl, tl, labels=lab2 if last else labels, vocab_start=vs))
    _expect_error("labels", lambda: vocab_parallel_kd_loss(
        sl, tl, labels=None if last else labels, hard_weight=0.0, vocab_start=vs))
    _expect_error("labels", lambda: vocab_parallel_kd_loss(
        sl, tl, labels=labels[:, :4] if last else labels, vocab_start=vs))
    _expect_error("labels", lambda: vocab_parallel_kd_loss(
        sl, tl, labels=labels.masked_fill(labels == -100, V), vocab_start=vs))
    _expect_error("vocab_start", lambda: vocab_parallel_kd_loss(sl, tl, vocab_start=0))
    if vs is not None:
        _expect_error("vocab_start", lambda: vocab_parallel_kd_loss(
            sl, tl, vocab_start=None if last else vs))
    _expect_error("temperature", lambda: vocab_parallel_kd_loss(sl, tl, math.inf, vocab_start=vs))
    # the group is still in step after all of that
    _check_case(lo, hi, s, t, 2.0, 1e-9, 1e-12, vocab_start=vs, divergence="jsd")


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes,order",
    [
        ([1, 36], [0, 1]),  # world 2, a shard of size 1, vocab_start inferred
        ([10, 13, 14], [2, 0, 1]),  # world 3, uneven; explicit vocab_start: rank 0 holds the end
    ],
    ids=["world2-1+36-inferred", "world3-10+13+14-explicit"],
)
def test_vocab_parallel_matches_single_process(sizes, order):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    world = len(sizes)
    explicit = order != list(range(world))
    # order[k] = rank holding the k-th slice of the vocabulary
    starts = [0] * world
    pos = 0
    for r in order:
        starts[r] = pos
        pos += sizes[r]
    assert pos == V
    D.spawn(_worker, world, sizes, starts, explicit, backend="gloo")


def test_single_process_without_group_is_kd_loss():
    s, t, labels = _inputs(5)
    for div in ["forward_kl", "reverse_kl", "jsd"]:
        _check_case(0, V, s, t, 3.0, 1e-10, 1e-13, divergence=div, labels=labels, hard_weight=0.4,
                    label_smoothing=0.05)


def test_bad_arguments_raise_locally():
    s, t, labels = _inputs(6)
    with pytest.raises(TypeError, match="student_shard"):
        vocab_parallel_kd_loss(s.numpy(), t)
    with pytest.raises(TypeError, match="teacher_shard"):
        vocab_parallel_kd_loss(s, t.long())
    with pytest.raises(TypeError, match="vocab_start"):
        vocab_parallel_kd_loss(s, t, vocab_start=1.5)
    with pytest.raises(TypeError, match="labels"):
        vocab_parallel_kd_loss(s, t, labels=labels.float())
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_kd_loss(s, t, math.inf)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_kd_loss(s, t, 0.0)
    with pytest.raises(ValueError, match="teacher_shard"):
        vocab_parallel_kd_loss(s, t[..., :5])
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_kd_loss(s, t, vocab_start=3)  # one process: must start at 0
    with pytest.raises(ValueError, match="beta"):
        vocab_parallel_kd_loss(s, t, divergence="jsd", beta=1.0)
