"""LLM-head KD benchmark (``kdengine bench --suite llm``): fused-linear KD vs the baselines, one run.

Every variant computes the same thing from the same inputs, forward + backward: student logits
``h @ W.T`` (grad to ``h`` and ``W``), frozen teacher logits ``th @ tw.T``, forward KL at T = 2,
batchmean:

* ``kdengine fused-linear``: :func:`kdengine.llm.fused_linear_kd_loss` (never holds N x V);
* ``x@W.T + kdengine.kd_loss``: the materialised path with kdengine's fused loss;
* ``torch eager``: materialised logits + ``kl_div(log_softmax, log_softmax)``;
* ``torch.compile``: the eager function compiled;
* ``liger chunked``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` with ``beta=0`` (its
  forward KL), ``weight_hard_loss=0``, ``compiled=False`` (torch.compile of its chunk step on CPU
  is not part of the comparison), when liger-kernel is importable.

Peak memory is the growth of the peak RSS over the inputs (and a warm-up step at the measured
size), in a fresh process per variant (CPU; glibc's mmap threshold is pinned so that freed
buffers leave the RSS), or ``torch.cuda.max_memory_allocated`` over the inputs (GPU).

``python -m kdengine.bench.llm [--quick] [--n N --hs HS --ht HT --v V] --out-dir DIR`` prints the
table and writes ``DIR/llm.json`` (machine, versions, sizes, date). Nothing is written to
benches/results/ unless ``--out-dir benches/results --write-committed-results`` is given.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from pathlib import Path

import torch

from kdengine.bench.kd import torch_kd
from kdengine.bench.timing import missing, peak_from_child, progress, take_missing, time_fn

TEMPERATURE = 2.0
FULL_SIZE = dict(n=8192, hs=1024, ht=2048, v=32000)
QUICK_SIZE = dict(n=512, hs=256, ht=384, v=8000)
FUSED = "kdengine fused-linear"
MATERIALISED = "x@W.T + kdengine.kd_loss"
EAGER = "torch eager"
COMPILE = "torch.compile"
LIGER = "liger chunked"
VARIANTS = (FUSED, MATERIALISED, EAGER, COMPILE, LIGER)


def liger_available() -> tuple[bool, str]:
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as exc:
        return False, f"liger-kernel not importable: {type(exc).__name__}: {exc}"
    try:
        from importlib.metadata import version

        return True, f"liger-kernel {version('liger-kernel')}"
    except Exception:
        return True, "liger-kernel"


def make_inputs(n: int, hs: int, ht: int, v: int, dtype=torch.float32, device="cpu", seed=0):
    """Hidden states and heads scaled so that the logits have std ~3."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hs, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(v, hs, generator=g) * (3 / math.sqrt(hs))).to(device, dtype).requires_grad_(True)
    th = torch.randn(n, ht, generator=g).to(device, dtype)
    tw = (torch.randn(v, ht, generator=g) * (3 / math.sqrt(ht))).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, th, tw, labels


def _eager_step(h, w, th, tw):
    s = h @ w.t()
    with torch.no_grad():
        t = th @ tw.t()
    return torch_kd(s, t, TEMPERATURE)


def make_step(name: str, h, w, th, tw, labels):
    """A closure running one fwd+bwd of variant ``name`` (grads of h and W reset first)."""
    import kdengine
    from kdengine.llm import fused_linear_kd_loss

    if name == FUSED:
        def loss_fn():
            return fused_linear_kd_loss(h, w, th, tw, temperature=TEMPERATURE)
    elif name == MATERIALISED:
        def loss_fn():
            s = h @ w.t()
            with torch.no_grad():
                t = th @ tw.t()
            return kdengine.kd_loss(s, t, TEMPERATURE)
    elif name == EAGER:
        def loss_fn():
            return _eager_step(h, w, th, tw)
    elif name == COMPILE:
        compiled = torch.compile(_eager_step, dynamic=False)

        def loss_fn():
            return compiled(h, w, th, tw)
    elif name == LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                      temperature=TEMPERATURE, compiled=False)

        def loss_fn():
            return mod(h, w, th, tw, labels)
    else:
        raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")

    def step():
        h.grad = None
        w.grad = None
        loss_fn().backward()

    return step


# --------------------------------------------------------------------------- peak memory


def _child(args: argparse.Namespace) -> None:
    """Fresh process: inputs, a warm-up step at the measured size, then the measured step."""
    from kdengine.bench.kd_mem import _reset_peak, _status_kb

    torch.set_num_threads(args.threads)
    h, w, th, tw, labels = make_inputs(args.n, args.hs, args.ht, args.v)
    step = make_step(args.child, h, w, th, tw, labels)
    step()  # builds/loads kernels, compiles, touches the weight gradient buffers once
    h.grad = None
    w.grad = None
    gc.collect()
    before = _status_kb("VmRSS")
    _reset_peak()
    step()
    after = _status_kb("VmHWM")
    print(json.dumps({"peak_delta_bytes": after - before}))


def peak_extra_bytes(name: str, size: dict, threads: int, timeout: float = 1800) -> float | None:
    """Peak RSS growth of one fwd+bwd of ``name`` in a fresh process (None if it failed)."""
    env = dict(os.environ)
    # Allocations above 128 KiB are mmapped and go back to the OS when freed, so the RSS follows
    # the live memory (glibc's dynamic threshold would otherwise keep freed chunks resident).
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    cmd = [sys.executable, "-m", "kdengine.bench.llm", "--child", name, "--threads", str(threads),
           *[f"--{k}={v}" for k, v in size.items()]]
    return peak_from_child(cmd, timeout=timeout, env=env, label=f"llm {name}")


def _gpu_peak(step, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


# --------------------------------------------------------------------------- the suite


def run_llm_bench(quick: bool = False, size: dict | None = None, repeat: int | None = None,
                  with_compile: bool = True, with_memory: bool = True, with_liger: bool = True,
                  variants: tuple[str, ...] | None = None, device: str = "cpu") -> list[dict]:
    """Rows: one per variant with median seconds, speed relative to the fused path and peak MiB."""
    size = dict(size or (QUICK_SIZE if quick else FULL_SIZE))
    repeat = repeat or (3 if quick else 3)
    names = list(variants or VARIANTS)
    if not with_compile and COMPILE in names:
        names.remove(COMPILE)
    if not with_compile and COMPILE in (variants or VARIANTS):
        missing("llm", COMPILE, "skipped (--no-compile)")
    liger_ok, liger_note = liger_available()
    if LIGER in names and not (with_liger and liger_ok):
        names.remove(LIGER)
        missing("llm", LIGER, liger_note if not liger_ok else "skipped (with_liger=False)")
    shape = f"N={size['n']} Hs={size['hs']} Ht={size['ht']} V={size['v']}"
    h, w, th, tw, labels = make_inputs(**size, device=device)
    threads = torch.get_num_threads()
    rows = []
    for name in names:
        progress(f"llm fwd+bwd {shape}: {name}")
        step = make_step(name, h, w, th, tw, labels)
        warm = 2 if name == COMPILE else 1
        try:
            r = time_fn(step, repeat=repeat, warmup=warm, device=device)
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            if name == FUSED:
                raise
            missing("llm", name, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        row = {"suite": "llm", "case": "fwd+bwd", "shape": shape, "dtype": "float32", "impl": name,
               "median_s": r["median_s"], "min_s": r["min_s"], "repeat": repeat, **size}
        if name == LIGER:
            row["note"] = f"{liger_note}, LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, compiled=False)"
        if with_memory:
            progress(f"llm fwd+bwd {shape}: peak memory of {name} (fresh process)")
            if device == "cpu":
                peak = peak_extra_bytes(name, size, threads)
            else:
                peak = _gpu_peak(step, torch.device(device))
            row["peak_extra_MB"] = None if peak is None else peak / 2**20
        rows.append(row)
        del step
        h.grad = None
        w.grad = None
        gc.collect()
    ours = next((r for r in rows if r["impl"] == FUSED), None)
    if ours is not None:
        for row in rows:
            row["kdengine_speedup"] = row["median_s"] / ours["median_s"]
            if row.get("peak_extra_MB") and ours.get("peak_extra_MB") is not None:
                row["memory_ratio"] = ours["peak_extra_MB"] / row["peak_extra_MB"]
    return rows


def notes(rows: list[dict]) -> list[str]:
    """Neutral text lines: each variant's peak extra memory against the fused path's."""
    by = {r["impl"]: r for r in rows if r.get("suite") == "llm" and "median_s" in r}
    ours = by.get(FUSED)
    if ours is None or ours.get("peak_extra_MB") is None:
        return []
    lines = [f"llm {ours['shape']}: peak extra RSS {FUSED} {ours['peak_extra_MB']:.0f} MiB"]
    for name, r in by.items():
        if name != FUSED and r.get("peak_extra_MB"):
            lines.append(f"llm {r['shape']}: peak extra RSS {name} {r['peak_extra_MB']:.0f} MiB "
                         f"({r['peak_extra_MB'] / ours['peak_extra_MB']:.1f}x the fused path's)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdengine.bench.llm", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small sizes {QUICK_SIZE}")
    for k, what in (("n", "rows (tokens)"), ("hs", "student hidden size"), ("ht", "teacher hidden size"),
                    ("v", "vocabulary size")):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"{what} (default: {FULL_SIZE[k]}, "
                        f"--quick {QUICK_SIZE[k]})")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per variant (default 3)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the peak-memory measurement (one fresh process per variant)")
    ap.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel baseline")
    ap.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device")
    ap.add_argument("--out-dir", default=None, help="folder for llm.json (default: write nothing)")
    ap.add_argument("--write-committed-results", action="store_true",
                    help="allow --out-dir to be benches/results (the committed runs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = dict(QUICK_SIZE if args.quick else FULL_SIZE)
    size = {k: (getattr(args, k) if getattr(args, k) is not None else base[k]) for k in base}
    if args.out_dir and not args.write_committed_results:
        committed = (Path(__file__).resolve().parents[2] / "benches" / "results").resolve()
        target = Path(args.out_dir).resolve()
        if target == committed or committed in target.parents:
            ap.error(f"--out-dir {args.out_dir} is benches/results (committed runs); "
                     "add --write-committed-results to write there")
    if args.child is not None:
        args.threads = args.threads or torch.get_num_threads()
        for k, v in size.items():
            setattr(args, k, v)
        _child(args)
        return 0
    rows = run_llm_bench(quick=args.quick, size=size, repeat=args.repeat,
                         with_compile=not args.no_compile, with_memory=not args.no_memory,
                         with_liger=not args.no_liger, device=args.device)
    from kdengine.bench import report

    print(f"llm: {rows[0]['shape']}, fp32, forward KL T={TEMPERATURE}, fwd+bwd, "
          f"{torch.get_num_threads()} threads")
    print(report.format_comparisons(rows))
    lines = notes(rows) + report.missing_notes(take_missing())
    for line in lines:
        print(line)
    if args.out_dir:
        out = Path(args.out_dir) / "llm.json"
        report.write_results(rows, out, lines)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
