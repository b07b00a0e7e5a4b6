"""``kdengine repro snn_conv_fashion``: a spiking CNN trained through time with surrogate gradients
on Fashion-MNIST, on kdengine's fused IF and parametric LIF neurons (plain autograd and
memory-light BPTT) and on SpikingJelly's ``IFNode`` / ``ParametricLIFNode`` in the same architecture,
in the same run.

1. Data: :func:`kdengine.repro.common.fashion_split`: a fixed ``n_train`` subset of the official
   60k less 5k val (subset sizes fit a 10-minute budget on 2 cores), the 5k val and the official
   10k test; nothing is tuned on test.
2. Network: :class:`kdengine.models.ConvSNN` (conv-BN-neuron with the image as the current at every
   step, maxpool conv-BN-neuron, maxpool fc-neuron, readout of the mean spike count; T steps),
   cross-entropy, Adam, cosine per epoch (:func:`kdengine.train.fit`), identical initial weights
   and batch order in every arm of a seed.
3. Arms: ``kdengine IF`` (the fused multi-step kernel, plain autograd), ``kdengine IF,
   memory-light`` (the same blocks keeping the input spikes as 1 bit and recomputing; its
   gradients are bit-identical, so its trained weights must equal the plain arm's -- checked) and
   ``SpikingJelly IFNode`` (multi-step, torch backend, ATan surrogate: SpikingJelly 2.x has no
   backend switch on CPU), all with threshold 1, hard reset to 0, ATan(alpha 2). The neuron is a
   factory argument of ConvSNN, so a LIF / PLIF module drops in the same way.
4. Reported: time per training epoch (wall; the machine is shared, so the lead re-measures), val and
   test accuracy, and per arm the bytes autograd keeps between forward and backward for one
   training batch and the peak RSS growth of one training step in a fresh process
   (:mod:`kdengine.bench.snn_memory`; not in ``--quick``).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdengine.bench.snn_memory import peak_rss_bytes, saved_bytes, spikingjelly_if_factory
from kdengine.models import ConvSNN
from kdengine.repro import ReproArgs, register
from kdengine.repro.common import fashion_note, fashion_split, write_results
from kdengine.train import evaluate, fit

__all__ = ["entry", "ARMS", "FULL", "QUICK"]

N_VAL, SPLIT_SEED = 5000, 0
NEURONS = ("IF", "PLIF")
SJ_NAMES = {"IF": "IFNode", "PLIF": "ParametricLIFNode"}


def arm_names(neuron: str) -> tuple[str, str, str]:
    """(kdengine plain, kdengine memory-light, SpikingJelly) arm labels of one neuron kind."""
    return f"kdengine {neuron}", f"kdengine {neuron}, memory-light", f"SpikingJelly {SJ_NAMES[neuron]}"


KD, LIGHT, SJ = arm_names("IF")
ARMS = tuple(a for n in NEURONS for a in arm_names(n))
FULL = dict(time_steps=4, channels=(8, 16), hidden=64, n_train=20000, epochs=4, batch_size=128, lr=2e-3,
            rss=True)
QUICK = dict(FULL, time_steps=2, channels=(4, 8), hidden=32, n_train=512, epochs=1, rss=False)
QUICK_SIZES = (10, 512, 300, 300)   # teacher_train (unused), student_train, val, test


def _plif_factory() -> Callable[[], nn.Module]:
    """kdengine's fused parametric LIF with SpikingJelly's ParametricLIFNode settings (init tau 2,
    decay_input, threshold 1, hard reset to 0) and the ATan(2) surrogate of the IF arms."""
    from kdengine.snn import ParametricLIFNeuron

    return lambda: ParametricLIFNeuron(2.0, 1.0, 0.0, surrogate="atan", alpha=2.0)


def _sj_plif_factory() -> Optional[Callable[[], nn.Module]]:
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError:
        return None
    return lambda: neuron.ParametricLIFNode(init_tau=2.0, v_threshold=1.0, v_reset=0.0,
                                            surrogate_function=surrogate.ATan(alpha=2.0), detach_reset=False,
                                            step_mode="m")


def _arm_model(arm: str, cfg: dict, seed: int) -> Optional[nn.Module]:
    neuron = next(n for n in NEURONS if arm in arm_names(n))
    kd, light, sj = arm_names(neuron)
    factory: Optional[Callable[[], nn.Module]] = None
    if arm == sj:
        factory = spikingjelly_if_factory() if neuron == "IF" else _sj_plif_factory()
        if factory is None:
            return None
    elif neuron == "PLIF":
        factory = _plif_factory()
    torch.manual_seed(seed)
    return ConvSNN(factory, channels=cfg["channels"], hidden=cfg["hidden"], time_steps=cfg["time_steps"],
                   memory_light=arm == light)


def _memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MiB autograd keeps for the backward of one training batch (a copy of the model: the trained
    one is left alone)."""
    m = copy.deepcopy(model).train()
    # a copy: a slice of the training set would keep (and count) the whole set's storage
    return saved_bytes(m, x.clone(), y.clone()) / 2**20


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


def _seed_run(seed: int, parts: dict, cfg: dict, log) -> tuple[list[dict], dict]:
    x_tr, y_tr = parts["student_train"]
    rows, trained = [], {}
    for arm in ARMS:
        model = _arm_model(arm, cfg, seed)
        if model is None:
            log(f"[seed {seed}] {arm}: spikingjelly is not importable, arm skipped")
            continue
        log(f"[seed {seed}] {arm}: training {cfg['epochs']} epoch(s) on {len(y_tr)} images, T={cfg['time_steps']}")
        r = fit(model, (x_tr, y_tr), epochs=cfg["epochs"], lr=cfg["lr"], optimizer="adam", schedule="epoch",
                batch_size=cfg["batch_size"], seed=seed)
        epoch_s = [h["time_s"] for h in r["history"]]
        row = {"method": arm, "seed": seed, "epoch_s": _r(statistics.mean(epoch_s), 2),
               "epoch_s_each": [_r(t, 2) for t in epoch_s], "train_cpu_s": _r(r["cpu_s"], 1),
               "final_train_loss": _r(r["loss"]),
               "val_acc": evaluate(model, parts["val"]), "test_acc": evaluate(model, parts["test"]),
               "saved_MB": _r(_memory(model, x_tr[:cfg["batch_size"]], y_tr[:cfg["batch_size"]]), 3)}
        log(f"  {arm}: {row['epoch_s']} s/epoch, val {row['val_acc']:.4f}, test {row['test_acc']:.4f}, "
            f"autograd keeps {row['saved_MB']} MiB per batch")
        rows.append(row)
        trained[arm] = model
    same = {}
    for neuron in NEURONS:
        kd, light, _ = arm_names(neuron)
        if kd in trained and light in trained:
            same[neuron] = all(torch.equal(a, b) for a, b in zip(trained[kd].state_dict().values(),
                                                                 trained[light].state_dict().values()))
    return rows, {"memory_light_weights_equal_plain": same}


def _rss(cfg: dict, arms: list[str], log) -> dict[str, Optional[float]]:
    impl = {KD: "plain", LIGHT: "light", SJ: "spikingjelly"}
    out = {}
    for arm in (a for a in arms if a in impl):   # the IF arms: the child builds IF nets
        log(f"peak RSS of one training step, {arm} (fresh process)")
        b = peak_rss_bytes(impl[arm], cfg["time_steps"], cfg["batch_size"], cfg["channels"], cfg["hidden"])
        out[arm] = None if b is None else _r(b / 2**20, 1)
    return out


def _notes(rows: list[dict], extra: dict) -> list[str]:
    notes = []
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)

    def mean(arm: str, k: str) -> float:
        return statistics.mean(r[k] for r in by[arm])

    for neuron in NEURONS:
        kd, light, sj = arm_names(neuron)
        if kd in by and sj in by:
            notes.append(f"time per training epoch: {kd} {mean(kd, 'epoch_s'):.1f} s, {sj} {mean(sj, 'epoch_s'):.1f} "
                         f"s (SpikingJelly / kdengine = {mean(sj, 'epoch_s') / mean(kd, 'epoch_s'):.2f}x)")
        if kd in by and light in by:
            ratio = mean(light, 'epoch_s') / mean(kd, 'epoch_s')
            notes.append(f"{neuron} memory-light BPTT: {mean(light, 'epoch_s'):.1f} s per epoch ({ratio:.2f}x the "
                         "plain arm: one more forward per block in the backward); autograd keeps "
                         f"{mean(light, 'saved_MB'):.2f} MiB per batch vs {mean(kd, 'saved_MB'):.2f} MiB "
                         f"({mean(kd, 'saved_MB') / mean(light, 'saved_MB'):.0f}x less)")
            eq = [e["memory_light_weights_equal_plain"].get(neuron) for e in extra.values()]
            notes.append(f"{neuron} memory-light training ends with weights bit-identical to plain training on every "
                         f"seed: {'yes' if all(eq) else 'NO'} ({sum(bool(e) for e in eq)}/{len(eq)} seeds)")
    for arm in by:
        notes.append(f"{arm}: test accuracy {100 * mean(arm, 'test_acc'):.2f} % "
                     f"(val {100 * mean(arm, 'val_acc'):.2f} %)")
    return notes


@register("snn_conv_fashion", "spiking CNN trained with surrogate gradients on Fashion-MNIST: kdengine's fused IF and "
                              "parametric LIF (plain and memory-light BPTT) vs SpikingJelly's IFNode / "
                              "ParametricLIFNode, time per epoch, accuracy, memory",
          minutes=9, quick_minutes=0.5, seeds=(0,), record_subdir="", threads=2)
def entry(args: ReproArgs) -> dict:
    log = print
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    parts = fashion_split(n_val=N_VAL, split_seed=SPLIT_SEED, student_subset=FULL["n_train"],
                          quick_sizes=QUICK_SIZES if args.quick else None)
    parts.pop("teacher_train")
    rows: list[dict] = []
    extra: dict[Any, Any] = {}
    for seed in args.seeds:
        r, e = _seed_run(seed, parts, cfg, log)
        rows += r
        extra[seed] = e
    rss = _rss(cfg, sorted({r["method"] for r in rows}, key=ARMS.index), log) if cfg["rss"] else {}
    for row in rows:
        row["peak_rss_MB"] = rss.get(row["method"])
    notes = _notes(rows, extra)
    if rss:
        notes.append("peak RSS growth of one training step (fresh process, batch "
                     f"{cfg['batch_size']}): " + ", ".join(f"{k} {v} MiB" for k, v in rss.items() if v is not None))
    metrics = ["test_acc", "val_acc", "epoch_s", "saved_MB"] + (["peak_rss_MB"] if rss else [])
    labels = {"test_acc": "test acc", "val_acc": "val acc", "epoch_s": "s / epoch",
              "saved_MB": "MiB kept for backward", "peak_rss_MB": "peak RSS growth (MiB)"}
    setup = {**cfg, "neurons": "IF and parametric LIF (init tau 2, 1/tau = sigmoid(w) learned, decay_input), "
                               "threshold 1, hard reset to 0, ATan(alpha=2), reset attached",
             "peak_rss": "measured for the IF arms only (fresh child process per arm)",
             "optimizer": "Adam, cosine per epoch", "threads": torch.get_num_threads(),
             "memory_light_weights_equal_plain": {str(s): e["memory_light_weights_equal_plain"]
                                                  for s, e in extra.items()}}
    if rss:
        notes.append("peak RSS was measured for the IF arms only (the PLIF arms keep the same tensors per block)")
    res = write_results(
        "snn_conv_fashion", rows, args.out_dir,
        title="Spiking CNN on Fashion-MNIST through kdengine's kernels vs SpikingJelly (kdengine repro "
              "snn_conv_fashion)",
        group_by=("method",), metrics=metrics, labels=labels, scale={"test_acc": 100.0, "val_acc": 100.0},
        data_note=fashion_note(parts, n_val=N_VAL, split_seed=SPLIT_SEED), notes=notes, setup=setup,
        plot=False, wall_s=time.perf_counter() - t0, seeds=args.seeds,
        tuning=["nothing is tuned: the recipe (Adam lr 2e-3, cosine, batch 128, T=4) is fixed in advance; "
                "val accuracy is reported beside test"])
    return {"table": res["table"] + "\n\n" + "\n".join(f"- {n}" for n in notes), "paths": res["paths"]}
