"""The Liger-compatible surface: Liger's definition (w_hard CE + w_soft D, no T^2, JSD beta with
the KL end points at 0 and 1) against kdengine's own semantics, num_items_in_batch, and against
Liger-Kernel itself on CPU when it is installed."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import kdengine
from kdengine.llm import LigerCompatFusedLinearKDLoss, liger_fused_linear_kd_loss


def _problem(n=13, hs=8, ht=12, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hs, generator=g)
    w = torch.randn(v, hs, generator=g) / math.sqrt(hs) * 2
    b = torch.randn(v, generator=g)
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(v, ht, generator=g) / math.sqrt(ht) * 2
    tb = torch.randn(v, generator=g)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[2] = -100
    lab[5] = -100
    return h, w, b, th, tw, tb, lab


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _liger_definition(h, w, b, th, tw, tb, lab, wh, ws, beta, temperature):
    """Liger's loss written with kdengine.kd_loss on materialised logits (float64)."""
    s = (h.double() @ w.double().t() + b.double())
    t = th.double() @ tw.double().t() + tb.double()
    div = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    soft = kdengine.kd_loss(s, t, temperature, labels=lab, hard_weight=0.0, divergence=div,
                            beta=beta if div == "jsd" else 0.5, scale_t2=False, backend="reference")
    hard = kdengine.kd_loss(s, t, temperature, labels=lab, hard_weight=1.0, backend="reference")
    return wh * hard + ws * soft, soft, hard


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_matches_liger_definition(beta, weights):
    wh, ws = weights
    h, w, b, th, tw, tb, lab = _problem()
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    loss, soft, hard = LigerCompatFusedLinearKDLoss(
        weight_hard_loss=wh, weight_soft_loss=ws, beta=beta, temperature=2.0, chunk_size=4,
        return_soft_hard_loss=True,
    )(hl, wl, th, tw, lab, bl, tb)
    hr, wr, br = _leaf(h.double()), _leaf(w.double()), _leaf(b.double())
    ref, rsoft, rhard = _liger_definition(hr, wr, br, th, tw, tb, lab, wh, ws, beta, 2.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft.double(), rsoft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard.double(), rhard, rtol=1e-5, atol=1e-6)
    assert not soft.requires_grad and not hard.requires_grad
    if wh + ws == 0:
        assert loss.item() == 0.0
        return
    got = torch.autograd.grad(loss, (hl, wl, bl))
    want = torch.autograd.grad(ref, (hr, wr, br))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-6)
    # The single-output form (one backend call per chunk) gives the same loss and gradients.
    hl2, wl2, bl2 = _leaf(h), _leaf(w), _leaf(b)
    single = liger_fused_linear_kd_loss(hl2, wl2, th, tw, lab, bl2, tb, wh, ws, beta, -100, 2.0,
                                        True, 4, False)
    torch.testing.assert_close(single, loss)
    for a, e in zip(torch.autograd.grad(single, (hl2, wl2, bl2)), got):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_same_as_fused_linear_kd_loss_without_t2():
    """weight_hard_loss + weight_soft_loss = 1 is fused_linear_kd_loss(hard_weight=w_h, scale_t2=False)."""
    h, w, b, th, tw, tb, lab = _problem()
    a = LigerCompatFusedLinearKDLoss(0.3, 0.7, beta=0.4, temperature=3.0)(h, w, th, tw, lab, b, tb)
    e = kdengine.llm.fused_linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, labels=lab,
                                          hard_weight=0.3, scale_t2=False, divergence="jsd",
                                          beta=0.4, temperature=3.0)
    torch.testing.assert_close(a, e)


def test_signature_matches_liger():
    init = inspect.signature(LigerCompatFusedLinearKDLoss.__init__).parameters
    assert list(init)[1:9] == ["weight_hard_loss", "weight_soft_loss", "beta", "ignore_index",
                               "temperature", "compiled", "chunk_size", "return_soft_hard_loss"]
    fwd = inspect.signature(LigerCompatFusedLinearKDLoss.forward).parameters
    assert list(fwd)[1:8] == ["student_input", "student_weight", "teacher_input", "teacher_weight",
                              "true_labels", "student_bias", "teacher_bias"]


def test_num_items_in_batch_gradient_accumulation():
    h, w, b, th, tw, tb, lab = _problem(n=14)
    mod = LigerCompatFusedLinearKDLoss(0.4, 0.6, beta=0.5, temperature=2.0, chunk_size=3)
    wl = _leaf(w)
    mod(h, wl, th, tw, lab, b, tb).backward()
    items = int((lab != -100).sum())
    wm = _leaf(w)
    for sl in (slice(0, 4), slice(4, 14)):
        mod(h[sl], wm, th[sl], tw, lab[sl], b, tb, num_items_in_batch=items).backward()
    torch.testing.assert_close(wm.grad, wl.grad)


def test_padded_teacher_vocab_is_explicit():
    h, w, b, th, tw, tb, lab = _problem()
    tw_pad = torch.cat([tw, torch.zeros(3, tw.shape[1])])
    with pytest.raises(ValueError, match="teacher_vocab"):
        LigerCompatFusedLinearKDLoss()(h, w, th, tw_pad, lab)
    a = LigerCompatFusedLinearKDLoss(teacher_vocab="truncate")(h, w, th, tw_pad, lab)
    e = LigerCompatFusedLinearKDLoss()(h, w, th, tw, lab)
    torch.testing.assert_close(a, e)


def test_bad_weights():
    with pytest.raises(ValueError, match="weight_hard_loss"):
        LigerCompatFusedLinearKDLoss(weight_hard_loss=-1.0)
    with pytest.raises(ValueError, match="weight_soft_loss"):
        LigerCompatFusedLinearKDLoss(weight_soft_loss=float("nan"))


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:  # not installed, or its import fails on this machine
        pytest.skip(f"liger-kernel not importable: {exc}")
    return LigerFusedLinearJSDLoss


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 1.0)])
def test_against_liger_kernel_on_cpu(beta, weights):
    LigerJSD = _liger()
    wh, ws = weights
    h, w, b, th, tw, tb, lab = _problem()
    kw = dict(weight_hard_loss=wh, weight_soft_loss=ws, beta=beta, temperature=2.0, chunk_size=4,
              return_soft_hard_loss=True)
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    theirs = LigerJSD(compiled=False, **kw)(hl, wl, th, tw, lab, bl, tb)
    g_theirs = torch.autograd.grad(theirs[0], (hl, wl, bl))
    hk, wk, bk = _leaf(h), _leaf(w), _leaf(b)
    ours = LigerCompatFusedLinearKDLoss(**kw)(hk, wk, th, tw, lab, bk, tb)
    g_ours = torch.autograd.grad(ours[0], (hk, wk, bk))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for a, e in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
