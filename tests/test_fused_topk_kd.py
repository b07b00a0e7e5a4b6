"""fused_linear_topk_kd_loss == topk_kd_loss on the materialised head logits (float64 oracle)."""
from __future__ import annotations

import pytest
import torch

from kdengine.llm import fused_linear_kd_loss, fused_linear_topk_kd_loss, topk_kd_loss


def _topk_teacher(n, v, k, gen, dtype=torch.float64):
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    lp = torch.log_softmax(t, -1)
    vals, idx = lp.topk(k, -1)
    return idx, vals.to(dtype), t


def _student(n, h, v, gen, dtype=torch.float64, bias=True):
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    return x, w, b


CASES = [
    dict(),
    dict(divergence="reverse_kl", missing_mass="tail"),
    dict(missing_mass="uniform", reduction="sum"),
    dict(missing_mass="tail", reduction="mean"),
    dict(reduction="none"),
    dict(labels=True, hard_weight=0.3, label_smoothing=0.1),
    dict(labels=True, reduction="none", hard_weight=0.5),
    dict(scale_t2=False, temperature=2.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("n,h,v,k,chunk", [(1, 3, 5, 2, None), (7, 6, 11, 4, 3), (13, 5, 37, 37, 5)])
def test_matches_topk_loss_on_materialised_logits(case, n, h, v, k, chunk):
    gen = torch.Generator().manual_seed(n * 100 + v)
    case = dict(case)
    x, w, b = _student(n, h, v, gen)
    idx, lp, _ = _topk_teacher(n, v, k, gen)
    labels = None
    if case.pop("labels", False):
        labels = torch.randint(0, v, (n,), generator=gen)
        labels[0] = -100
    T = case.pop("temperature", 2.0)
    got = fused_linear_topk_kd_loss(x, w, idx, lp, T, student_bias=b, labels=labels,
                                    chunk_size=chunk, **case)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    want = topk_kd_loss(x2 @ w2.T + b2, idx, lp, T, labels=labels, backend="reference", **case)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    gw = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    (got * gw).sum().backward()
    (want * gw).sum().backward()
    for a, c in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-8, atol=1e-11)


def test_k_equal_v_is_the_dense_fused_loss():
    gen = torch.Generator().manual_seed(5)
    n, h, v = 9, 4, 13
    x, w, b = _student(n, h, v, gen)
    idx, lp, t_logits = _topk_teacher(n, v, v, gen)
    got = fused_linear_topk_kd_loss(x, w, idx, lp, 3.0, student_bias=b, chunk_size=4)
    dense = fused_linear_kd_loss(x, w, teacher_logits=t_logits * 3.0, student_bias=b, temperature=3.0,
                                 backend="reference")
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-12)


def test_float32_and_num_items_in_batch():
    gen = torch.Generator().manual_seed(7)
    n, h, v, k = 12, 8, 50, 6
    x, w, b = _student(n, h, v, gen, dtype=torch.float32)
    idx, lp, _ = _topk_teacher(n, v, k, gen, dtype=torch.float32)
    full = fused_linear_topk_kd_loss(x, w, idx, lp, 2.0, student_bias=b)
    full.backward()
    g_full = w.grad.clone()
    w.grad = None
    for part in (slice(0, 5), slice(5, 12)):
        fused_linear_topk_kd_loss(x[part], w, idx[part], lp[part], 2.0, student_bias=b,
                                  num_items_in_batch=n).backward()
    torch.testing.assert_close(w.grad, g_full, rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_argument():
    gen = torch.Generator().manual_seed(3)
    x, w, b = _student(4, 3, 7, gen)
    idx, lp, _ = _topk_teacher(4, 7, 3, gen)
    with pytest.raises(ValueError, match="topk_indices"):
        fused_linear_topk_kd_loss(x, w, idx + 7, lp)
    with pytest.raises(ValueError, match="topk_logprobs"):
        fused_linear_topk_kd_loss(x, w, idx, lp[:, :2])
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_topk_kd_loss(x, w[:, :2], idx, lp)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_topk_kd_loss(x, w, idx, lp, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_topk_kd_loss(x, w, idx, lp, reduction="avg")
    loss = fused_linear_topk_kd_loss(x, w, idx, lp)
    with pytest.raises(RuntimeError, match="second-order"):
        g, = torch.autograd.grad(loss, w, create_graph=True)
