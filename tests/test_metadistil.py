"""MetaDistil (docs/papers.md s5): quiz split, pilot update, second-order meta-gradient, real update."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdengine.methods.metadistil import (
    MetaDistil,
    meta_gradient,
    quiz_split,
    student_objective,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation (7x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


F64 = torch.float64


def _mlp(i, h, o, dtype=F64):
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, o)).to(dtype)


def _batch(n, d, c, dtype=F64):
    return torch.randn(n, d, dtype=dtype), torch.randint(0, c, (n,))


def _quiz_loss_plain(student, teacher, t_params, x, y, xq, yq, lr, alpha, temp):
    """The quiz loss after an explicit (autograd) pilot step, for a given teacher state."""
    sp = {k: p.detach().clone().requires_grad_(True) for k, p in student.named_parameters()}
    t_logits = functional_call(teacher, t_params, (x,))
    loss = student_objective(functional_call(student, sp, (x,)), t_logits, y, alpha, temp)
    gs = torch.autograd.grad(loss, list(sp.values()))
    sp2 = {k: v - lr * g for (k, v), g in zip(sp.items(), gs)}
    return F.cross_entropy(functional_call(student, sp2, (xq,)), yq).item()


def test_meta_gradient_matches_central_finite_differences(seed):
    student, teacher = _mlp(3, 4, 3), _mlp(3, 3, 3)   # 24 teacher parameters -> 48 evaluations
    x, y = _batch(6, 3, 3)
    xq, yq = _batch(5, 3, 3)
    kw = dict(pilot_lr=0.7, alpha=0.6, temperature=2.0)
    grads, q = meta_gradient(student, teacher, x, y, xq, yq, **kw)
    base = {k: p.detach().clone() for k, p in teacher.named_parameters()}
    assert set(grads) == set(base)
    assert q.item() == pytest.approx(_quiz_loss_plain(student, teacher, base, x, y, xq, yq, 0.7, 0.6, 2.0))
    eps = 1e-6
    num = {}
    for k, p in base.items():
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            pp = {kk: v.clone() for kk, v in base.items()}
            pp[k].view(-1)[i] += eps
            hi = _quiz_loss_plain(student, teacher, pp, x, y, xq, yq, 0.7, 0.6, 2.0)
            pp[k].view(-1)[i] -= 2 * eps
            lo = _quiz_loss_plain(student, teacher, pp, x, y, xq, yq, 0.7, 0.6, 2.0)
            fd.view(-1)[i] = (hi - lo) / (2 * eps)
        num[k] = fd
    ga = torch.cat([grads[k].flatten() for k in base])
    gn = torch.cat([num[k].flatten() for k in base])
    assert gn.norm() > 1e-4  # a real signal, not two zeros agreeing
    rel = ((ga - gn).norm() / gn.norm()).item()
    assert rel < 1e-4, rel
    # the quiz CE has no direct teacher term: all of the gradient flows through theta_s' (second
    # order); and meta_gradient is functional, it leaves no .grad on the modules
    for p in teacher.parameters():
        assert p.grad is None


def test_quiz_split():
    tr, qz = quiz_split(100, 0.1, seed=3)
    assert len(qz) == 10 and len(tr) == 90
    assert torch.equal(torch.cat([tr, qz]).sort().values, torch.arange(100))
    tr2, qz2 = quiz_split(100, 0.1, seed=3)
    assert torch.equal(qz, qz2) and torch.equal(tr, tr2)
    assert not torch.equal(quiz_split(100, 0.1, seed=4)[1], qz)
    with pytest.raises(ValueError, match="quiz_fraction"):
        quiz_split(10, 1.0)
    with pytest.raises(ValueError, match="n"):
        quiz_split(1)


def test_step_updates_teacher_then_student_from_original_state(seed):
    student, teacher = _mlp(4, 6, 3), _mlp(4, 6, 3)
    x, y = _batch(8, 4, 3)
    xq, yq = _batch(4, 4, 3)
    s0 = copy.deepcopy(student)
    t0 = {k: p.detach().clone() for k, p in teacher.named_parameters()}
    lr_s, lr_t = 0.3, 0.2
    md = MetaDistil(student, teacher, torch.optim.SGD(student.parameters(), lr=lr_s),
                    torch.optim.SGD(teacher.parameters(), lr=lr_t), alpha=0.5,
                    temperature=3.0, teacher_clip=None)
    grads, _ = meta_gradient(s0, teacher, x, y, xq, yq, pilot_lr=lr_s, alpha=0.5, temperature=3.0)
    out = md.step(x, y, xq, yq)
    assert set(out) == {"loss", "quiz_loss", "teacher_grad_norm"}
    # teacher: one SGD step along the meta-gradient
    for k, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), t0[k] - lr_t * grads[k])
    # student: a step from its original state, against the updated teacher
    with torch.no_grad():
        tl = teacher(x)
    loss = student_objective(s0(x), tl, y, 0.5, 3.0)
    gs = torch.autograd.grad(loss, list(s0.parameters()))
    for p, p0, g in zip(student.parameters(), s0.parameters(), gs):
        torch.testing.assert_close(p.detach(), p0.detach() - lr_s * g)
    assert out["loss"] == pytest.approx(loss.item())


def test_teacher_clip_bounds_the_update(seed):
    student, teacher = _mlp(4, 6, 3), _mlp(4, 6, 3)
    x, y = _batch(8, 4, 3)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    clip = 1e-3
    md = MetaDistil(student, teacher, torch.optim.SGD(student.parameters(), lr=1.0),
                    torch.optim.SGD(teacher.parameters(), lr=1.0), teacher_clip=clip)
    out = md.step(x, y, x, y)
    delta = torch.cat([(p.detach() - a).flatten() for p, a in zip(teacher.parameters(), t0)])
    assert out["teacher_grad_norm"] > clip  # the test is only meaningful when clipping acts
    assert delta.norm().item() == pytest.approx(clip, rel=1e-4)  # clip_grad_norm_ adds 1e-6 to the norm


def test_batchnorm_cnn_any_module_pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.BatchNorm1d(16), nn.ReLU(),
                            nn.Linear(16, 3))
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 3, (6,))
    rm = student[1].running_mean.clone()
    grads, q = meta_gradient(student, teacher, x, y, x, y, pilot_lr=0.1)
    assert torch.equal(rm, student[1].running_mean)  # the virtual step leaves buffers alone
    assert all(torch.isfinite(g).all() for g in grads.values()) and torch.isfinite(q)
    assert sum(g.abs().sum() for g in grads.values()) > 0
    md = MetaDistil(student, teacher, torch.optim.Adam(student.parameters(), 1e-2),
                    torch.optim.Adam(teacher.parameters(), 1e-3), meta_every=2)
    r1 = md.step(x, y, x, y)
    r2 = md.step(x, y, x, y)
    assert r1["quiz_loss"] == r1["quiz_loss"] and r2["quiz_loss"] != r2["quiz_loss"]  # NaN = skipped


def test_frozen_teacher_params_are_left_out():
    student, teacher = _mlp(3, 4, 2), _mlp(3, 4, 2)
    teacher[0].weight.requires_grad_(False)
    x, y = _batch(4, 3, 2)
    grads, _ = meta_gradient(student, teacher, x, y, x, y, pilot_lr=0.1)
    assert "0.weight" not in grads and "2.weight" in grads


def test_bad_inputs():
    student, teacher = _mlp(3, 4, 2), _mlp(3, 4, 2)
    x, y = _batch(4, 3, 2)
    with pytest.raises(TypeError, match="y"):
        meta_gradient(student, teacher, x, y.float(), x, y, pilot_lr=0.1)
    with pytest.raises(ValueError, match="batch"):
        meta_gradient(student, teacher, x, y[:2], x, y, pilot_lr=0.1)
    with pytest.raises(ValueError, match="pilot_lr"):
        meta_gradient(student, teacher, x, y, x, y, pilot_lr=0.0)
    with pytest.raises(TypeError, match="nn.Module"):
        meta_gradient(lambda z: z, teacher, x, y, x, y, pilot_lr=0.1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="teacher"):
        meta_gradient(student, teacher, x, y, x, y, pilot_lr=0.1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        MetaDistil(student, teacher, opt, opt, alpha=1.5)
    with pytest.raises(ValueError, match="meta_every"):
        MetaDistil(student, teacher, opt, opt, meta_every=0)


def test_teacher_frozen_for_the_first_fraction_of_steps():
    student, teacher = _mlp(4, 6, 3), _mlp(4, 6, 3)
    x, y = _batch(8, 4, 3)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    md = MetaDistil(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1),
                    torch.optim.SGD(teacher.parameters(), lr=0.1), teacher_frozen_fraction=0.625,
                    total_steps=8)
    assert md.first_meta_step == 5
    quiz = [md.step(x, y, x, y)["quiz_loss"] for _ in range(5)]
    assert all(q != q for q in quiz)  # NaN: no meta update yet
    assert all(torch.equal(p, a) for p, a in zip(teacher.parameters(), t0))
    q = md.step(x, y, x, y)["quiz_loss"]
    assert q == q  # the sixth call (index 5) is the first meta update
    assert not all(torch.equal(p, a) for p, a in zip(teacher.parameters(), t0))
    with pytest.raises(ValueError, match="total_steps"):
        MetaDistil(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1),
                   torch.optim.SGD(teacher.parameters(), lr=0.1), teacher_frozen_fraction=0.5)
    with pytest.raises(ValueError, match="teacher_frozen_fraction"):
        MetaDistil(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1),
                   torch.optim.SGD(teacher.parameters(), lr=0.1), teacher_frozen_fraction=1.5,
                   total_steps=4)


def test_pilot_lr_follows_the_student_schedule():
    student, teacher = _mlp(4, 6, 3), _mlp(4, 6, 3)
    x, y = _batch(8, 4, 3)
    xq, yq = _batch(4, 4, 3)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.4, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(s_opt, T_max=4)
    lr_t = 0.2
    md = MetaDistil(student, teacher, s_opt, torch.optim.SGD(teacher.parameters(), lr=lr_t),
                    teacher_clip=None)
    for _ in range(2):
        md.step(x, y, xq, yq)
        sched.step()
    lr_now = s_opt.param_groups[0]["lr"]
    assert lr_now < 0.4 and md.pilot_lr == pytest.approx(lr_now)
    t_before = {k: p.detach().clone() for k, p in teacher.named_parameters()}
    grads, _ = meta_gradient(copy.deepcopy(student), teacher, x, y, xq, yq, pilot_lr=lr_now)
    md.step(x, y, xq, yq)
    for k, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), t_before[k] - lr_t * grads[k])
    fixed = MetaDistil(student, teacher, s_opt, torch.optim.SGD(teacher.parameters(), lr=lr_t),
                       pilot_lr=0.05)
    assert fixed.pilot_lr == 0.05


def test_repro_claims_are_decided_by_the_paired_interval():
    from kdengine.repro.metadistil import ARMS, FASHION, _claims

    gain = {"ce": 0.0, "kd": 0.02, "kd_heldout": 0.015, "md": 0.016}
    noise = [0.001, -0.002, 0.0, 0.002, -0.001]
    rows = [{"dataset": FASHION, "method": ARMS[a], "seed": s, "test_acc": 0.8 + g + noise[(s + k) % 5]}
            for k, (a, g) in enumerate(gain.items()) for s in range(5)]
    lines = _claims(rows)
    assert lines[0].startswith(f"{FASHION}: MetaDistil gives a better student than vanilla KD")
    assert "CONTRADICTED" in lines[0]
    assert "NOT REPRODUCED" in lines[1]         # +0.1 point inside the seed noise
    assert "REPRODUCED" in lines[2] and "NOT" not in lines[2] and "CONTRADICTED" not in lines[2]
    assert "REPRODUCED" in lines[3] and "premise" in lines[3]


def test_repro_entry_defaults_to_five_seeds():
    from kdengine import repro

    e = repro.registry()["metadistil"]
    assert e.seeds == (0, 1, 2, 3, 4) and e.quick_minutes <= 1 and e.minutes <= 10 and e.threads == 1


@pytest.mark.slow
def test_repro_quick_entry_writes_paired_results(tmp_path):
    import json

    from kdengine import repro

    assert repro.main(["metadistil", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "metadistil.json").read_text())
    assert res["seeds"] == [0, 1, 2, 3, 4] and res["tuning"] and res["departures"]
    seeds = {}
    for r in res["rows"]:
        seeds.setdefault(r["method"], set()).add(r["seed"])
    assert seeds == {m: {0, 1, 2, 3, 4} for m in
                     ("CE (student alone)", "KD (vanilla)", "KD, quiz held out", "MetaDistil")}
    md_rows = [r for r in res["rows"] if r["method"] == "MetaDistil"]
    # the teacher is frozen for the first 62.5 % of the steps: the rest are meta steps
    assert all(0 < r["meta_steps"] < 0.4 * 3 * 15 for r in md_rows)
    md = (tmp_path / "metadistil.md").read_text()
    assert "against KD (vanilla)" in md and "QUICK run" in md and "REPRODUCED" in md
    assert "Tuned (and on what)" in md and "Departures from the paper" in md
