"""kdengine.llm.fused_linear_kd_loss: gradients vs the float64 materialised reference, every option,
odd sizes, Hs != Ht, teacher as head or logits, padded teacher vocab, bf16/fp16 precision at logit
std 30, num_items_in_batch gradient accumulation, errors."""
from __future__ import annotations

import math

import pytest
import torch

import kdengine
from kdengine.llm import FusedLinearKDLoss, auto_chunk_size, fused_linear_kd_loss
from kdengine.ops.kd_loss import make_config
from kdengine.llm.reference_fused_linear import fused_linear_kd_reference
from tests.backend_params import backend_params

F64 = torch.float64

OPTIONS = [
    dict(),
    dict(temperature=2.0),
    dict(temperature=3.0, scale_t2=False),
    dict(divergence="reverse_kl", temperature=1.5),
    dict(divergence="jsd", beta=0.3, temperature=2.0),
    dict(labels=True),
    dict(labels=True, hard_weight=0.3, label_smoothing=0.1, temperature=2.0),
    dict(labels=True, hard_weight=1.0, ignore_index=-1),
    dict(labels=True, divergence="jsd", beta=0.7, reduction="sum"),
    dict(labels=True, reduction="mean", divergence="reverse_kl"),
    dict(labels=True, reduction="none", hard_weight=0.2, temperature=2.0),
    dict(reduction="none", divergence="jsd", beta=0.5),
    dict(temperature=math.inf),
]


def _problem(n, hs, ht, v, *, dtype=F64, bias=True, teacher_bias=True, vt=None, gen=None):
    g = gen or torch.Generator().manual_seed(n * 1000 + v)
    vt = vt or v
    h = torch.randn(n, hs, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(v, hs, generator=g, dtype=F64) * 2 / math.sqrt(hs)).to(dtype)
    b = torch.randn(v, generator=g, dtype=F64).to(dtype) if bias else None
    th = torch.randn(n, ht, generator=g, dtype=F64).to(dtype)
    tw = (torch.randn(vt, ht, generator=g, dtype=F64) * 2 / math.sqrt(ht)).to(dtype)
    tb = torch.randn(vt, generator=g, dtype=F64).to(dtype) if teacher_bias else None
    return h, w, b, th, tw, tb


def _labels(n, v, ignore_index, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    lab = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        lab[1] = ignore_index
    return lab


def _cfg(opts, has_labels):
    return make_config(
        opts.get("temperature", 1.0), opts.get("reduction", "batchmean"),
        opts.get("divergence", "forward_kl"), opts.get("beta", 0.5), opts.get("hard_weight"),
        has_labels, opts.get("ignore_index", -100), opts.get("label_smoothing", 0.0),
        opts.get("scale_t2", True), False,
    )


def _grads(loss, tensors):
    return torch.autograd.grad(loss.sum(), [t for t in tensors if t is not None])


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _check_against_reference(n, hs, ht, v, opts, *, teacher_as_logits=False, chunk_size=None,
                             backend=None, bias=True, tol=1e-9):
    opts = dict(opts)
    h, w, b, th, tw, tb = _problem(n, hs, ht, v, bias=bias)
    labels = None
    if opts.pop("labels", False):
        labels = _labels(n, v, opts.get("ignore_index", -100))
    cfg = _cfg(opts, labels is not None)
    teacher = (dict(teacher_logits=(th @ tw.t() + tb)) if teacher_as_logits
               else dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb))
    h1, w1, b1 = _leaf(h), _leaf(w), _leaf(b)
    loss = fused_linear_kd_loss(h1, w1, student_bias=b1, labels=labels, chunk_size=chunk_size,
                                backend=backend, **teacher, **opts)
    h2, w2, b2 = _leaf(h), _leaf(w), _leaf(b)
    ref = fused_linear_kd_reference(h2, w2, th, tw, teacher_bias=tb, student_bias=b2,
                                    labels=labels, cfg=cfg)
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    got = _grads(loss, (h1, w1, b1))
    want = _grads(ref, (h2, w2, b2))
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m, name=name: f"grad {name}: {m}")
    # and the same value as kdengine.kd_loss on the materialised logits
    s = h.reshape(-1, hs) @ w.t() + (b if b is not None else 0)
    t = th @ tw.t() + tb
    direct = kdengine.kd_loss(s, t, opts.pop("temperature", 1.0), labels=labels, **opts)
    torch.testing.assert_close(loss, direct, rtol=tol, atol=tol)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("size", [(1, 5, 3, 1), (7, 6, 9, 11), (13, 8, 12, 37)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(size, opts):
    n, hs, ht, v = size
    _check_against_reference(n, hs, ht, v, opts, chunk_size=5)


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[6], OPTIONS[10]], ids=["default", "labels", "none"])
def test_teacher_as_logits(opts):
    _check_against_reference(13, 8, 12, 37, opts, teacher_as_logits=True, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [1, 3, 13, 100, None])
def test_chunk_size_does_not_change_result(chunk_size):
    _check_against_reference(13, 8, 12, 37, dict(labels=True, temperature=2.0), chunk_size=chunk_size,
                             bias=False)


@pytest.mark.parametrize("backend", backend_params("kd_loss"))
def test_every_backend(backend):
    _check_against_reference(7, 6, 9, 11, dict(labels=True, divergence="jsd", beta=0.4, temperature=2.0),
                             chunk_size=3, backend=backend)


def test_leading_dims_and_module():
    h, w, b, th, tw, tb = _problem(12, 8, 10, 17)
    lab = _labels(12, 17, -100)
    mod = FusedLinearKDLoss(2.0, hard_weight=0.4, chunk_size=5)
    h1 = _leaf(h)
    loss3 = mod(h1.reshape(3, 4, 8), w, th.reshape(3, 4, 10), tw, student_bias=b, teacher_bias=tb,
                labels=lab.reshape(3, 4))
    loss2 = fused_linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, labels=lab,
                                 temperature=2.0, hard_weight=0.4)
    torch.testing.assert_close(loss3, loss2)
    none = fused_linear_kd_loss(h.reshape(3, 4, 8), w, th.reshape(3, 4, 10), tw, reduction="none")
    assert none.shape == (3, 4)
    assert "temperature=2.0" in repr(mod)


def test_float32_close_to_reference():
    h, w, b, th, tw, tb = _problem(33, 16, 24, 50, dtype=torch.float32)
    lab = _labels(33, 50, -100)
    leaves = [_leaf(x) for x in (h, w, b)]
    loss = fused_linear_kd_loss(*leaves[:2], th, tw, student_bias=leaves[2], teacher_bias=tb,
                                labels=lab, temperature=2.0, chunk_size=8)
    assert loss.dtype == torch.float32
    got = _grads(loss, leaves)
    refl = [_leaf(x.double()) for x in (h, w, b)]
    ref = fused_linear_kd_reference(*refl[:2], th, tw, student_bias=refl[2], teacher_bias=tb,
                                    labels=lab, cfg=_cfg(dict(temperature=2.0), True))
    want = _grads(ref, refl)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_as_logits", [False, True])
def test_padded_teacher_vocab(teacher_as_logits):
    """152064 vs 151936 in miniature: the teacher head has extra (padded) rows."""
    h, w, b, th, tw, tb = _problem(9, 8, 12, 29, vt=35)
    teacher = (dict(teacher_logits=th @ tw.t() + tb) if teacher_as_logits
               else dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb))
    with pytest.raises(ValueError, match="teacher_vocab='truncate'"):
        fused_linear_kd_loss(h, w, **teacher)
    h1, w1 = _leaf(h), _leaf(w)
    loss = fused_linear_kd_loss(h1, w1, teacher_vocab="truncate", temperature=2.0, chunk_size=4, **teacher)
    h2, w2 = _leaf(h), _leaf(w)
    ref = fused_linear_kd_reference(h2, w2, th, tw, teacher_bias=tb, cfg=_cfg(dict(temperature=2.0), False),
                                    teacher_vocab="truncate")
    torch.testing.assert_close(loss, ref)
    for a, e in zip(_grads(loss, (h1, w1)), _grads(ref, (h2, w2))):
        torch.testing.assert_close(a, e)
    # A smaller teacher vocabulary is never accepted.
    with pytest.raises(ValueError, match="teacher_weight has vocabulary"):
        fused_linear_kd_loss(h, w, th, tw[:20], teacher_vocab="truncate")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_half_precision_gradient_error_at_logit_std_30(dtype, divergence):
    """Half-precision inputs keep the gradient error under 1% at logit std 30 (logits and accumulation in fp32)."""
    g = torch.Generator().manual_seed(3)
    n, hdim, v = 48, 96, 700
    h = torch.randn(n, hdim, generator=g).to(dtype)
    w = (torch.randn(v, hdim, generator=g) * 30 / math.sqrt(hdim)).to(dtype)
    th = torch.randn(n, hdim, generator=g).to(dtype)
    tw = (torch.randn(v, hdim, generator=g) * 30 / math.sqrt(hdim)).to(dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    std = (h.double() @ w.double().t()).std().item()
    assert 25 < std < 35
    h1, w1 = _leaf(h), _leaf(w)
    loss = fused_linear_kd_loss(h1, w1, th, tw, labels=lab, divergence=divergence, chunk_size=16)
    gh, gw = _grads(loss, (h1, w1))
    assert gh.dtype == dtype and gw.dtype == dtype
    h2, w2 = _leaf(h.double()), _leaf(w.double())
    ref = fused_linear_kd_reference(h2, w2, th, tw, labels=lab, cfg=_cfg(dict(divergence=divergence), True))
    rh, rw = _grads(ref, (h2, w2))
    for got, want in ((gh, rh), (gw, rw)):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 0.01, rel
    assert abs(loss.double().item() - ref.item()) / ref.item() < 0.01


def test_num_items_in_batch_gradient_accumulation():
    """Two micro-batches normalised by the whole step's non-ignored rows = one big batch."""
    h, w, b, th, tw, tb = _problem(16, 8, 12, 23)
    lab = _labels(16, 23, -100)
    lab[9] = -100
    opts = dict(temperature=2.0, hard_weight=0.3, chunk_size=3)
    h1, w1, b1 = _leaf(h), _leaf(w), _leaf(b)
    full = fused_linear_kd_loss(h1, w1, th, tw, student_bias=b1, teacher_bias=tb, labels=lab, **opts)
    full.backward()
    items = int((lab != -100).sum())
    h2, w2, b2 = _leaf(h), _leaf(w), _leaf(b)
    total = 0.0
    for sl in (slice(0, 5), slice(5, 16)):  # unequal micro-batches with different ignored counts
        part = fused_linear_kd_loss(h2[sl], w2, th[sl], tw, student_bias=b2, teacher_bias=tb,
                                    labels=lab[sl], num_items_in_batch=torch.tensor(items), **opts)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    for a, e in ((h2, h1), (w2, w1), (b2, b1)):
        torch.testing.assert_close(a.grad, e.grad)
    # Without the normaliser the micro-batch means differ from the big batch (the point of it).
    p = fused_linear_kd_loss(h[:5], w, th[:5], tw, labels=lab[:5], **opts)
    assert not torch.allclose(p, fused_linear_kd_loss(h[:5], w, th[:5], tw, labels=lab[:5],
                                                      num_items_in_batch=items, **opts))


def test_num_items_in_batch_matches_reference():
    h, w, b, th, tw, tb = _problem(7, 6, 9, 11)
    lab = _labels(7, 11, -100)
    for red in ("batchmean", "mean"):
        loss = fused_linear_kd_loss(h, w, th, tw, labels=lab, reduction=red, num_items_in_batch=40)
        ref = fused_linear_kd_reference(h, w, th, tw, labels=lab, num_items_in_batch=40,
                                        cfg=_cfg(dict(reduction=red), True))
        torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fused_linear_kd_loss(h, w, th, tw, reduction="sum", num_items_in_batch=4)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fused_linear_kd_loss(h, w, th, tw, num_items_in_batch=0)


def test_backward_scales_by_incoming_gradient():
    h, w, b, th, tw, tb = _problem(9, 8, 12, 17)
    h1, w1 = _leaf(h), _leaf(w)
    (3.0 * fused_linear_kd_loss(h1, w1, th, tw, chunk_size=4)).backward()
    h2, w2 = _leaf(h), _leaf(w)
    fused_linear_kd_loss(h2, w2, th, tw).backward()
    torch.testing.assert_close(h1.grad, 3.0 * h2.grad)
    torch.testing.assert_close(w1.grad, 3.0 * w2.grad)


def test_only_hidden_requires_grad():
    h, w, b, th, tw, tb = _problem(9, 8, 12, 17)
    h1 = _leaf(h)
    fused_linear_kd_loss(h1, w, th, tw, student_bias=b).backward()
    h2, w2 = _leaf(h), _leaf(w)
    fused_linear_kd_loss(h2, w2, th, tw, student_bias=b).backward()
    torch.testing.assert_close(h1.grad, h2.grad)


def test_second_order_raises():
    h, w, b, th, tw, tb = _problem(5, 4, 6, 7)
    h1, w1 = _leaf(h), _leaf(w)
    loss = fused_linear_kd_loss(h1, w1, th, tw)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss, (h1, w1), create_graph=True)


def test_empty_batch():
    h, w, b, th, tw, tb = _problem(1, 4, 6, 7)
    h0 = _leaf(h[:0])
    loss = fused_linear_kd_loss(h0, w, th[:0], tw)
    assert loss.item() == 0.0
    loss.backward()
    assert h0.grad.shape == (0, 4)


def test_auto_chunk_size():
    assert auto_chunk_size(8192, 32000) == 1048  # 3 x rows x V x 4 bytes ~ 384 MiB
    assert auto_chunk_size(8192, 151936) == 216
    assert auto_chunk_size(5, 32000) == 5
    assert auto_chunk_size(10**6, 10**7) == 16  # at least a few rows


def test_bad_inputs_name_the_argument():
    h, w, b, th, tw, tb = _problem(5, 4, 6, 7, dtype=torch.float32)
    cases = [
        (dict(student_weight=w[:, :3]), "student_weight"),
        (dict(teacher_weight=tw[:, :5]), "teacher_weight"),
        (dict(student_weight=w.double()), "student_weight"),
        (dict(student_bias=b[:3]), "student_bias"),
        (dict(student_bias=b.double()), "student_bias"),
        (dict(teacher_weight=tw[:6]), "teacher_weight"),
        (dict(teacher_hidden=th[:3]), "teacher_hidden"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-3), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(teacher_vocab="pad"), "teacher_vocab"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 99])), "labels"),
        (dict(labels=torch.zeros(4, dtype=torch.long)), "labels"),
        (dict(teacher_logits=th @ tw.t()), "teacher_logits"),
        (dict(teacher_hidden=None), "teacher_hidden"),
        (dict(teacher_weight=_leaf(tw)), "teacher_weight"),
    ]
    base = dict(student_hidden=h, student_weight=w, teacher_hidden=th, teacher_weight=tw)
    for over, name in cases:
        kw = {**base, **over}
        with pytest.raises(ValueError, match=name):
            fused_linear_kd_loss(kw.pop("student_hidden"), kw.pop("student_weight"),
                                 kw.pop("teacher_hidden"), kw.pop("teacher_weight"), **kw)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_linear_kd_loss(h, w, teacher_logits=_leaf(th @ tw.t()))
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearKDLoss(temperature=-1.0)
    # A frozen teacher head inside no_grad is fine.
    with torch.no_grad():
        fused_linear_kd_loss(h, w, th, _leaf(tw))


def test_chunk_loss_seam():
    """A different teacher kind plugs in as (teacher source, chunk loss): here a squared error on
    the logits, checked against autograd on the materialised logits."""
    from kdengine.llm.fused_linear import fused_linear_chunked

    class Source:
        def __init__(self, t):
            self.t = t

        def chunk(self, lo, hi, dtype):
            return self.t[lo:hi].to(dtype)

    seen = []

    def mse_chunk(s, t, labels):
        seen.append(s.shape[0])
        d = s - t
        return (d * d).sum(), 2 * d

    h, w, b, th, tw, tb = _problem(11, 6, 9, 13)
    t = th @ tw.t()
    h1, w1, b1 = _leaf(h), _leaf(w), _leaf(b)
    loss = fused_linear_chunked(h1, w1, b1, Source(t), mse_chunk, denom=11.0, chunk_size=4)
    assert seen == [4, 4, 3]
    h2, w2, b2 = _leaf(h), _leaf(w), _leaf(b)
    ref = ((h2 @ w2.t() + b2 - t) ** 2).sum() / 11.0
    torch.testing.assert_close(loss, ref)
    for a, e in zip(_grads(loss, (h1, w1, b1)), _grads(ref, (h2, w2, b2))):
        torch.testing.assert_close(a, e)


def test_llm_bench_suite_smoke(tmp_path):
    """`kdengine bench --suite llm` machinery at a tiny size (no compile, no memory children)."""
    from kdengine.bench import llm

    rows = llm.run_llm_bench(size=dict(n=24, hs=8, ht=12, v=40), repeat=1, with_compile=False,
                             with_memory=False)
    impls = [r["impl"] for r in rows]
    assert impls[:3] == [llm.FUSED, llm.MATERIALISED, llm.EAGER]
    assert all(r["median_s"] > 0 for r in rows)
    assert llm.notes(rows) == []  # no memory measured: nothing to say
    assert llm.main(["--n", "24", "--hs", "8", "--ht", "12", "--v", "40", "--repeat", "1",
                     "--no-compile", "--no-memory", "--no-liger", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "llm.json").exists()


def test_non_contiguous_hidden_and_tied_weight():
    """A transposed hidden view and a head given as an embedding's .t() (tied weights)."""
    h, w, b, th, tw, tb = _problem(9, 16, 5, 21)
    h_nc = _leaf(h.t().contiguous()).t()  # non-contiguous (9, 16) view of a leaf
    emb = _leaf(w.t().contiguous())  # (H, V) "embedding"; the head is emb.t()
    loss = fused_linear_kd_loss(h_nc, emb.t(), th, tw, chunk_size=4, temperature=2.0)
    h1, w1 = _leaf(h), _leaf(w)
    ref = fused_linear_kd_reference(h1, w1, th, tw, cfg=_cfg(dict(temperature=2.0), False))
    torch.testing.assert_close(loss, ref)
    g_h, g_emb = torch.autograd.grad(loss, (h_nc, emb))
    r_h, r_w = torch.autograd.grad(ref, (h1, w1))
    torch.testing.assert_close(g_h, r_h)
    torch.testing.assert_close(g_emb, r_w.t())
