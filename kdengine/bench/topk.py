"""Top-k sparse-teacher KD loss vs the dense loss, same run, same student.

Compared at (N, V) with the teacher as (N, k) indices + log-probs for the top-k loss and as dense
(N, V) logits for the dense ones:

* ``topk[<rule>]``: :func:`kdengine.llm.topk.topk_kd_loss` (validation included);
* ``kd_loss[<backend>]``: :func:`kdengine.kd_loss` on dense teacher logits (its fused kernel
  computes the teacher's softmax itself, as any dense pipeline must);
* ``torch_eager``: ``kl_div(log_softmax(s/T), log_softmax(t/T))`` T^2, batchmean.

``fwd``: the loss alone, no gradient needed (student without requires_grad); ``fwd_bwd``:
loss + backward. The student's full logsumexp and, with a gradient, the dense (N, V) gradient
are the same in both; what the top-k teacher removes is the teacher's N x V side.

Nothing is written to disk: :func:`run_topk_bench` returns a dict, :func:`main` prints a table.
"""
from __future__ import annotations

import torch

from kdengine.bench.kd import torch_kd
from kdengine.bench.timing import time_fn


def run_topk_bench(n: int = 4096, v: int = 32000, k: int = 64, temperature: float = 2.0,
                   rules=("renormalize", "tail", "uniform"), repeat: int = 3,
                   dense_backend: str = "cpu", seed: int = 0) -> dict:
    """Median seconds per call: {"shape": ..., "fwd": {name: s}, "fwd_bwd": {name: s},
    "speedup_fwd": {...}, "speedup_fwd_bwd": {...}} (speedups of topk[renormalize] over each
    dense baseline)."""
    import kdengine
    from kdengine.llm.topk import topk_kd_loss

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 3
    t = torch.randn(n, v, generator=g) * 3
    with torch.no_grad():
        lp, idx = torch.log_softmax(t / temperature, -1).topk(k, -1)
    lp = lp.contiguous()
    idx = idx.contiguous()

    fns = {}
    for rule in rules:
        fns[f"topk[{rule}]"] = (lambda x, r=rule: topk_kd_loss(x, idx, lp, temperature, missing_mass=r))
    fns[f"kd_loss[{dense_backend}]"] = lambda x: kdengine.kd_loss(x, t, temperature, backend=dense_backend)
    fns["torch_eager"] = lambda x: torch_kd(x, t, temperature)

    out: dict = {"shape": [n, v], "k": k, "temperature": temperature, "threads": torch.get_num_threads(),
                 "fwd": {}, "fwd_bwd": {}}
    for name, fn in fns.items():
        with torch.no_grad():
            out["fwd"][name] = time_fn(lambda fn=fn: fn(s), repeat=repeat, warmup=1)["median_s"]
        x = s.clone().requires_grad_()

        def step(fn=fn, x=x):
            x.grad = None
            fn(x).backward()

        out["fwd_bwd"][name] = time_fn(step, repeat=repeat, warmup=1)["median_s"]
        del x
    ref = f"topk[{rules[0]}]"
    for mode in ("fwd", "fwd_bwd"):
        out[f"speedup_{mode}"] = {
            name: out[mode][name] / out[mode][ref] for name in out[mode] if not name.startswith("topk")
        }
    out["reference_rule"] = ref
    return out


def format_table(res: dict) -> str:
    lines = [f"top-k KD loss bench: N x V = {res['shape'][0]} x {res['shape'][1]}, k = {res['k']}, "
             f"T = {res['temperature']}, {res['threads']} threads (median seconds)",
             f"{'implementation':<22}{'fwd':>10}{'fwd+bwd':>10}"]
    for name in res["fwd"]:
        lines.append(f"{name:<22}{res['fwd'][name]:>10.4f}{res['fwd_bwd'][name]:>10.4f}")
    lines.append(f"speedup of {res['reference_rule']} over:")
    for name in res["speedup_fwd"]:
        lines.append(f"  {name:<20}{res['speedup_fwd'][name]:>9.1f}x{res['speedup_fwd_bwd'][name]:>9.1f}x")
    return "\n".join(lines)


def main(quick: bool = False) -> dict:
    res = run_topk_bench(n=512, v=8000, k=64) if quick else run_topk_bench()
    print(format_table(res))
    return res


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
