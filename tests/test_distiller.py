"""The Distiller trainer: determinism, stop-and-resume bitwise equality, loss terms, checkpoints."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from kdengine import kd_loss, logits_matching_loss
from kdengine.train import (
    BatchContext,
    CrossEntropyTerm,
    Distiller,
    FunctionTerm,
    KDTerm,
    LogitsMatchingTerm,
    SoftTargetTerm,
    epoch_permutation,
    global_batches,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

D_IN, C = 12, 5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add overhead (and the CI box is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n: int = 203, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    w = torch.randn(D_IN, C, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, C, generator=g)).argmax(-1)
    return x, y


def _student(seed: int, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, C))


def _teacher_logits(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(123)
    t = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, C))
    with torch.no_grad():
        return t(x) * 3.0


def _make(seed_init: int, cache: torch.Tensor, *, seed: int = 5) -> Distiller:
    s = _student(seed_init)
    opt = torch.optim.Adam(s.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    return Distiller(s, opt, [(0.3, CrossEntropyTerm()), (0.7, KDTerm(3.0))], teacher=cache,
                     scheduler=sched, scheduler_interval="step", batch_size=32, seed=seed,
                     progress=False)


def _state(d: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in d.student.state_dict().items()}


def test_stop_and_resume_is_bitwise_identical(tmp_path):
    x, y = _data()
    cache = _teacher_logits(x)
    epochs = 3  # 203 / 32 -> 7 batches per epoch, 21 steps

    ref = _make(0, cache)
    hist_ref = ref.fit((x, y), epochs, test=(x[:50], y[:50]))
    w_ref = _state(ref)

    ck = tmp_path / "run.safetensors"
    a = _make(0, cache)
    a.fit((x, y), epochs, test=(x[:50], y[:50]), checkpoint=ck, max_steps=10)  # stops mid-epoch 2
    assert a.global_step == 10 and a.epoch == 1 and a.batch_in_epoch == 3
    # a fresh process would rebuild everything from scratch, with other random init and RNG state
    torch.manual_seed(999)
    b = _make(1, cache)
    assert not all(torch.equal(w_ref[k], v) for k, v in _state(b).items())
    hist_b = b.fit((x, y), epochs, test=(x[:50], y[:50]), checkpoint=ck, resume=True)
    w_b = _state(b)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_b[k]), k
    assert b.global_step == ref.global_step == 21
    assert len(hist_b) == len(hist_ref) == epochs
    for r1, r2 in zip(hist_ref, hist_b):
        for k in ("loss", "ce", "kd", "train_acc", "test_acc", "lr"):
            assert r1[k] == r2[k], (k, r1[k], r2[k])
    # the optimizer state (Adam moments, step) came back too
    s_ref = ref.optimizer.state_dict()["state"]
    s_b = b.optimizer.state_dict()["state"]
    for i in s_ref:
        for k in s_ref[i]:
            assert torch.equal(torch.as_tensor(s_ref[i][k]), torch.as_tensor(s_b[i][k]))
    assert ref.scheduler.state_dict() == b.scheduler.state_dict()


def test_resume_at_epoch_boundary_and_checkpoint_every(tmp_path):
    x, y = _data(96)
    cache = _teacher_logits(x)
    ref = _make(0, cache)
    ref.fit((x, y), 2)
    ck = tmp_path / "c.safetensors"
    a = _make(0, cache)
    a.fit((x, y), 1, checkpoint=ck, checkpoint_every=2)   # 3 steps per epoch, ends at an epoch end
    b = _make(3, cache)
    b.fit((x, y), 2, checkpoint=ck, resume=True)
    for k, v in _state(ref).items():
        assert torch.equal(v, b.student.state_dict()[k])
    assert [d.name for d in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left


def test_same_seed_same_weights_other_seed_differs():
    x, y = _data(80)
    cache = _teacher_logits(x)
    runs = []
    for data_seed in (5, 5, 6):
        d = _make(0, cache, seed=data_seed)
        d.fit((x, y), 2)
        runs.append(_state(d))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_epoch_permutation_is_seeded_and_varies_by_epoch():
    p0 = epoch_permutation(50, 1, 0)
    assert torch.equal(p0, epoch_permutation(50, 1, 0))
    assert not torch.equal(p0, epoch_permutation(50, 1, 1))
    assert torch.equal(torch.sort(p0).values, torch.arange(50))
    bs = global_batches(50, 16, 1, 0)
    assert [len(b) for b in bs] == [16, 16, 16, 2]
    assert [len(b) for b in global_batches(50, 16, 1, 0, drop_last=True)] == [16, 16, 16]
    assert [len(b) for b in global_batches(50, 16, 1, 0, min_size=4)] == [16, 16, 16]


def test_builtin_terms_match_the_losses(seed):
    z = torch.randn(6, C, requires_grad=True)
    v = torch.randn(6, C) * 2
    y = torch.randint(0, C, (6,))
    ctx = BatchContext(inputs=None, labels=y, indices=torch.arange(6), student_logits=z, teacher_logits=v)
    torch.testing.assert_close(KDTerm(2.5)(ctx), kd_loss(z, v, 2.5, hard_weight=0.0))
    torch.testing.assert_close(KDTerm(math.inf)(ctx), kd_loss(z, v, math.inf, hard_weight=0.0))
    torch.testing.assert_close(LogitsMatchingTerm(centered=True)(ctx),
                               logits_matching_loss(z, v, centered=True))
    torch.testing.assert_close(CrossEntropyTerm(0.1)(ctx),
                               nn.functional.cross_entropy(z, y, label_smoothing=0.1))
    # soft targets = teacher softmax at T is T^2 * (KL + H(p)): same gradient as KD
    p = torch.softmax(v / 2.5, -1)
    soft = SoftTargetTerm(lambda c: p, temperature=2.5)(ctx)
    g1, = torch.autograd.grad(soft, z)
    g2, = torch.autograd.grad(kd_loss(z, v, 2.5, hard_weight=0.0), z)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    ctx.teacher_logits = None
    with pytest.raises(ValueError, match="teacher"):
        KDTerm(2.0)(ctx)


def test_feature_hooks_and_frozen_teacher():
    x, y = _data(64)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, C))
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = _student(1, dropout=0.0)
    seen = {}

    def feat_match(ctx: BatchContext) -> torch.Tensor:
        fs, ft = ctx.student_features["1"], ctx.teacher_features["1"]
        seen["shapes"] = (tuple(fs.shape), tuple(ft.shape), ft.requires_grad)
        return (fs - ft).pow(2).mean()

    terms = [CrossEntropyTerm(), (0.1, FunctionTerm(feat_match, "feat"))]
    d = Distiller(s, torch.optim.SGD(s.parameters(), lr=0.05), terms,
                  teacher=teacher, student_features=["1"], teacher_features=["1"], batch_size=16,
                  progress=False)
    h = d.fit((x, y), 1)
    assert seen["shapes"] == ((16, 16), (16, 16), False)
    assert "feat" in h[0] and h[0]["feat"] > 0
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="no module named"):
        Distiller(s, torch.optim.SGD(s.parameters(), lr=0.1), [CrossEntropyTerm()],
                  student_features=["nope"])


def test_bad_arguments_are_named():
    s = _student(0)
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        Distiller(s, "sgd", [CrossEntropyTerm()])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        Distiller(s, opt, [])
    with pytest.raises(ValueError, match="duplicate"):
        Distiller(s, opt, [CrossEntropyTerm(), CrossEntropyTerm()])
    with pytest.raises(ValueError, match="batch_size"):
        Distiller(s, opt, [CrossEntropyTerm()], batch_size=0)
    with pytest.raises(TypeError, match="teacher"):
        Distiller(s, opt, [CrossEntropyTerm()], teacher="big")  # type: ignore[arg-type]
    x, y = _data(40)
    d = Distiller(s, opt, [KDTerm(2.0)], teacher=torch.randn(39, C), progress=False)
    with pytest.raises(ValueError, match="aligned"):
        d.fit((x, y), 1)
    bad = Distiller(s, opt, [FunctionTerm(lambda c: c.student_logits, "vec")], progress=False)
    with pytest.raises(ValueError, match="scalar"):
        bad.fit((x, y), 1)
    with pytest.raises(TypeError, match="labels"):
        Distiller(s, opt, [CrossEntropyTerm()], progress=False).fit((x, y.float()), 1)


def test_checkpoint_roundtrip_without_pickle(tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    p = save_checkpoint(tmp_path / "x.safetensors", modules={"m": m}, optimizers={"o": opt},
                        state={"epoch": 3, "inf": math.inf, "nested": {"a": [1, 2.5]}})
    tensors, meta = read_checkpoint(p)
    assert "module/m/weight" in tensors and "optim/o/0/exp_avg" in tensors
    m2 = nn.Linear(4, 3)
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.5)
    st = load_checkpoint(p, modules={"m": m2}, optimizers={"o": opt2})
    assert st == {"epoch": 3, "inf": math.inf, "nested": {"a": [1, 2.5]}}
    assert torch.equal(m.weight, m2.weight)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt.state[m.weight]["exp_avg_sq"], opt2.state[m2.weight]["exp_avg_sq"])
    # a file that is not a checkpoint
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a kdengine checkpoint"):
        read_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "y.safetensors", state={"f": object()})
    assert not (tmp_path / "y.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["plain.safetensors", "x.safetensors"]


def test_module_loss_term_is_trained_and_checkpointed(tmp_path):
    x, y = _data(64)

    class Proj(nn.Module):
        name = "proj"

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(C, C)

        def forward(self, ctx: BatchContext) -> torch.Tensor:
            return nn.functional.cross_entropy(self.lin(ctx.student_logits), ctx.labels)

    torch.manual_seed(0)
    term = Proj()
    s = _student(0, dropout=0.0)
    w0 = term.lin.weight.detach().clone()
    opt = torch.optim.SGD(list(s.parameters()) + list(term.parameters()), lr=0.1)
    d = Distiller(s, opt, [CrossEntropyTerm(), term], batch_size=16, progress=False)
    d.fit((x, y), 1, checkpoint=tmp_path / "c.safetensors")
    assert not torch.equal(w0, term.lin.weight)
    tensors, _ = read_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(tensors["module/term_proj/lin.weight"], term.lin.weight.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast path)")
def test_cuda_amp_runs():
    x, y = _data(64)
    s = _student(0, dropout=0.0)
    d = Distiller(s, torch.optim.SGD(s.parameters(), lr=0.1), [CrossEntropyTerm(), KDTerm(2.0)],
                  teacher=_teacher_logits(x), device="cuda", batch_size=16, progress=False)
    assert d.amp
    h = d.fit((x, y), 2)
    assert math.isfinite(h[-1]["loss"])


def test_repro_registry_and_result_files(tmp_path, capsys):
    from kdengine import repro
    from kdengine.repro.common import compare_to, mean_std, summarize, write_results

    names = repro.registry()
    assert {"tinf", "tang"} <= set(names)
    assert repro.main(["--list"]) == 0
    assert "tinf" in capsys.readouterr().out
    assert repro.main(["no-such-repro"]) == 2

    @repro.register("_test_dummy", "a test entry", minutes=0.1, quick_minutes=0.1)
    def _dummy(args: repro.ReproArgs) -> dict:
        rows = [{"dataset": "d", "method": m, "seed": s, "test_acc": acc + 0.01 * s}
                for s in args.seeds for m, acc in (("kd", 0.90), ("new", 0.85))]
        return write_results("dummy", rows, args.out_dir, title="Dummy", data_note="none",
                             notes=compare_to(summarize(rows, ("dataset", "method"), ("test_acc",)),
                                              baseline="kd"),
                             scale={"test_acc": 100.0}, seeds=args.seeds)

    try:
        assert repro.main(["_test_dummy", "--seeds", "0", "2", "--out", str(tmp_path)]) == 0
    finally:
        repro._REGISTRY.pop("_test_dummy", None)
    md = (tmp_path / "dummy.md").read_text()
    assert "91.00 ± 1.41" in md and "new does NOT beat kd: -5.00 points" in md
    assert (tmp_path / "dummy.png").stat().st_size > 1000
    import json

    payload = json.loads((tmp_path / "dummy.json").read_text())
    assert payload["seeds"] == [0, 2] and len(payload["rows"]) == 4
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([5.0]) == (5.0, 0.0)


# --------------------------------------------------------------------------- fit (the shared loop)


def test_fit_is_seeded_and_equals_the_hand_wired_distiller():
    """fit(schedule="step") is the Distiller with Adam and per-step cosine decay, nothing more:
    same weights as wiring them by hand; the lr ends at 0; another seed gives other weights."""
    import math as _m

    from kdengine.train import fit

    x, y = _data()
    cache = _teacher_logits(x)
    losses = {"ce": (0.4, CrossEntropyTerm()), "kd": (0.6, KDTerm(3.0))}
    a = _student(1)
    r = fit(a, (x, y), losses, teacher=cache, epochs=3, lr=1e-2, schedule="step", batch_size=32, seed=4,
            test=(x, y))
    b = _student(1)
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    steps = 3 * _m.ceil(len(x) / 32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + _m.cos(_m.pi * min(s, steps) / steps)))
    d = Distiller(b, opt, losses, teacher=cache, scheduler=sched, scheduler_interval="step", batch_size=32,
                  seed=4, progress=False)
    h = d.fit((x, y), 3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert r["steps"] == steps == h[-1]["step"] and r["loss"] == h[-1]["loss"]
    assert r["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert r["test_acc"] == d.evaluate((x, y)) and set(r["last_epoch"]) == {"loss", "ce", "kd", "train_acc"}
    assert not a.training
    c = _student(1)
    fit(c, (x, y), losses, teacher=cache, epochs=3, lr=1e-2, schedule="step", batch_size=32, seed=5)
    assert not torch.equal(c[0].weight, a[0].weight)


def test_fit_binary_clips_and_calls_on_step():
    from kdengine.nn import binarize_model
    from kdengine.train import fit

    x, y = _data()
    torch.manual_seed(0)
    m = binarize_model(nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.Linear(16, 16),
                                     nn.BatchNorm1d(16), nn.Linear(16, C)), mode="both")
    with torch.no_grad():
        m[2].weight.mul_(10.0)     # latent weights well outside [-1, 1]: training alone keeps them there
    ticks = []
    r = fit(m, (x, y), epochs=2, lr=0.5, optimizer="sgd", batch_size=32, seed=0, binary=True,
            on_step=lambda: ticks.append(1))
    assert len(ticks) == r["steps"] == 2 * 7
    latent = [p for n, p in m.named_parameters() if n.startswith("2.") and n.endswith("weight")]
    assert latent and all(float(p.detach().abs().max()) <= 1.0 for p in latent)


@pytest.mark.parametrize("kw, match", [(dict(optimizer="rmsprop"), "optimizer"), (dict(schedule="linear"), "schedule")])
def test_fit_names_a_bad_recipe(kw, match):
    from kdengine.train import fit

    x, y = _data(20)
    with pytest.raises(ValueError, match=match):
        fit(_student(0), (x, y), epochs=1, lr=0.1, **kw)
