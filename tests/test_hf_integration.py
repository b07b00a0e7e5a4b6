"""Hugging Face integration (the optional ``hf`` extra): kdengine's JSD equals TRL's
``GKDTrainer.generalized_jsd_loss``, and KDTrainer distills a tiny random Llama into a smaller one
with a decreasing loss. Tests that need transformers/trl skip with the reason when they are absent;
the causal-shift helper is pure torch and always runs."""
from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

import pytest
import torch

import kdengine
from kdengine.llm.hf import causal_lm_kd_loss, generalized_jsd_loss

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill_tiny_lm.py"
NEED_HF = "the optional hf extra (pip install 'kdengine[hf]') is not installed: "


def _trl_generalized_jsd():
    pytest.importorskip("transformers", reason=NEED_HF + "no transformers")
    pytest.importorskip("trl", reason=NEED_HF + "no trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            pytest.skip("this trl has no GKDTrainer")
    return GKDTrainer.generalized_jsd_loss


def _example():
    pytest.importorskip("transformers", reason=NEED_HF + "no transformers")
    spec = importlib.util.spec_from_file_location("distill_tiny_lm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _logits(seed: int, dtype=torch.float64, b=3, l=7, v=257):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, l, v, generator=g) * 2).to(dtype)
    t = (torch.randn(b, l, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, l), generator=g)
    labels[0, :2] = -100
    labels[2, -3:] = -100
    return s, t, labels


def test_causal_shift_and_num_items():
    s, t, labels = _logits(0)
    ref = kdengine.kd_loss(s[:, :-1], t[:, :-1], 2.0, labels=labels[:, 1:], hard_weight=0.0,
                           backend="reference")
    torch.testing.assert_close(causal_lm_kd_loss(s, t, labels, 2.0, backend="reference"), ref)
    n = int((labels[:, 1:] != -100).sum())
    out = causal_lm_kd_loss(s, t, labels, 2.0, num_items_in_batch=torch.tensor(2 * n),
                            backend="reference")
    torch.testing.assert_close(out, ref / 2)
    # a teacher with a padded vocabulary is cut to the student's
    tp = torch.cat([t, torch.randn(3, 7, 5, dtype=t.dtype)], -1)
    torch.testing.assert_close(causal_lm_kd_loss(s, tp, labels, 2.0, backend="reference"), ref)
    with pytest.raises(ValueError, match="student_logits"):
        causal_lm_kd_loss(s[0], t[0], labels[0])


def test_generalized_jsd_equals_trl():
    trl_loss = _trl_generalized_jsd()
    s, t, labels = _logits(1)
    # beta 0 / 1 are TRL's forward / reverse KL end points
    for beta, temp in itertools.product([0.0, 0.1, 0.5, 0.9, 1.0], [1.0, 2.5]):
        cases = [
            dict(labels=labels, reduction="batchmean"),
            dict(labels=None, reduction="batchmean"),  # TRL: / batch size, not / tokens
            dict(labels=labels, reduction="sum"),
            dict(labels=labels, reduction="mean"),
            dict(labels=None, reduction="mean"),
            dict(labels=labels, num_items_in_batch=torch.tensor(11)),
        ]
        for kw in cases:
            ss, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
            ours = generalized_jsd_loss(ss, t, beta=beta, temperature=temp, backend="reference", **kw)
            theirs = trl_loss(s2, t, beta=beta, temperature=temp, **kw)
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, beta=beta, temp=temp, kw=kw: f"beta={beta} T={temp} {kw}: {m}")
            ours.backward()
            theirs.backward()
            torch.testing.assert_close(ss.grad, s2.grad, rtol=1e-8, atol=1e-12)
        # 'none': TRL keeps element-wise terms of the unmasked rows; ours are their row sums
        ours = generalized_jsd_loss(s, t, labels, beta, temp, reduction="none", backend="reference")
        theirs = trl_loss(s, t, labels, beta, temp, reduction="none")
        torch.testing.assert_close(ours[labels != -100], theirs.sum(-1), rtol=1e-10, atol=1e-12)
        assert bool((ours[labels == -100] == 0).all())
    # float32 through the default (fused) backend
    s32, t32, _ = _logits(2, torch.float32)
    for beta in (0.0, 0.3, 1.0):
        ours = generalized_jsd_loss(s32, t32, labels, beta, 2.0)
        theirs = trl_loss(s32.double(), t32.double(), labels, beta, 2.0)
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)


def test_kd_trainer_loss_matches_kd_loss(tmp_path):
    ex = _example()
    from transformers import TrainingArguments, default_data_collator

    from kdengine.llm.hf import KDTrainer

    teacher, student = ex.build_models(0)
    data = ex.SyntheticTokens(4, 12)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=4)
    tr = KDTrainer(model=student, args=args, train_dataset=data, data_collator=default_data_collator,
                   teacher_model=teacher, temperature=2.0, divergence="jsd", beta=0.3,
                   hard_weight=0.25, backend="reference")
    batch = default_data_collator([data[i] for i in range(4)])
    loss = tr.compute_loss(student, batch)
    with torch.no_grad():
        sl = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tl = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = batch["labels"][:, 1:]
    ref = kdengine.kd_loss(sl[:, :-1], tl[:, :-1], 2.0, labels=y, hard_weight=0.25,
                           divergence="jsd", beta=0.3, backend="reference")
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    n = int((y != -100).sum())
    loss2 = tr.compute_loss(student, batch, num_items_in_batch=torch.tensor(n))
    torch.testing.assert_close(loss2.detach(), ref, rtol=1e-5, atol=1e-6)


def test_tiny_lm_distillation_loss_decreases():
    ex = _example()
    losses = ex.distill(12, batch_size=8, seq_len=16, verbose=False)
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
