"""Crossbar stage: the XNOR student's binary layers on simulated in-memory arrays
(:func:`kdengine.crossbar.simulate`).

1. Ideal arrays (unlimited ADC bits, no bit errors, ``xbar_rows`` rows per tile): the logits must
   equal the packed runtime's bit for bit (``torch.equal``; a mismatch raises AssertionError and
   stops the demo).
2. ADC windows: 3 x the RMS of each layer's tile partial sums on ``n_calib`` *training* images
   (:func:`kdengine.crossbar.calibrate_adc_clip`).
3. The reported setting: ``xbar_rows`` rows, a ``xbar_adc_bits``-bit ADC with those windows and
   stored-bit flips at rate ``xbar_ber`` (``xbar_seeds`` flip seeds from ``seed``: mean, min,
   max); also the same ADC without flips.
4. For the plot: accuracy against ADC bits (no flips) and against the bit-error rate (ideal ADC),
   on the first ``n_test_xbar_sweep`` test images.
5. Counts per image and for the test pass: arrays, tile activations, ADC conversions.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdengine.crossbar import calibrate_adc_clip, simulate

__all__ = ["run_crossbar_stage", "crossbar_bar_total"]


def crossbar_bar_total(cfg) -> int:
    """Units of the stage's bar: one per simulate() call."""
    return 3 + cfg.xbar_seeds + len(cfg.xbar_bits_sweep) + len(cfg.xbar_ber_sweep)


def _acc(logits: Tensor, y: Tensor) -> float:
    return round(float((logits.argmax(1) == y).double().mean()), 4)


def run_crossbar_stage(im: Any, packed_logits: Tensor, x_calib: Tensor, x_test: Tensor, y_test: Tensor,
                       cfg, bar: Any) -> dict:
    """Steps 1-5 of the module docstring; returns a JSON-ready dict."""
    rows = cfg.xbar_rows
    ideal, st = simulate(im, x_test, rows=rows)
    bar.update(1)
    exact = bool(torch.equal(ideal, packed_logits))
    if not exact:
        diff = float((ideal.double() - packed_logits.double()).abs().max())
        raise AssertionError(f"crossbar with an ideal ADC and no bit errors differs from the packed kernels "
                             f"(max |diff| {diff:g}); it must equal them bit for bit")
    n = len(x_test)
    layers = [{"name": s.name, "kind": s.kind, "k": s.k, "n": s.n, "row_tiles": s.row_tiles, "arrays": s.arrays,
               "tile_activations_per_image": s.tile_activations // n,
               "adc_conversions_per_image": s.adc_conversions // n} for s in st.layers]
    clip = calibrate_adc_clip(im, x_calib, rows=rows, n_sigma=3.0)
    bar.update(1)

    def run(bits, ber, seed=0, n=None):
        out, s = simulate(im, x_test[:n], rows=rows, adc_bits=bits, adc_clip=clip if bits else None,
                          bit_error_rate=ber, seed=seed)
        bar.update(1)
        return out, s

    seeds = []
    for sd in range(cfg.xbar_seeds):
        out, s = run(cfg.xbar_adc_bits, cfg.xbar_ber, cfg.seed + sd)
        seeds.append({"seed": cfg.seed + sd, "accuracy": _acc(out, y_test), "flipped_bits": s.flipped_bits,
                      "agreement_with_ideal": _acc(out, ideal.argmax(1)),
                      "saturation_rate": round(sum(l.saturations for l in s.layers) / max(1, s.adc_conversions), 5)})
    accs = [r["accuracy"] for r in seeds]
    out, _ = run(cfg.xbar_adc_bits, 0.0)
    adc_only = _acc(out, y_test)
    ns = cfg.n_test_xbar_sweep
    bits_sweep = {}
    for b in cfg.xbar_bits_sweep:
        out, _ = run(int(b), 0.0, n=ns)
        bits_sweep[str(b)] = _acc(out, y_test[:ns])
    ber_sweep = {}
    for q in cfg.xbar_ber_sweep:
        out, _ = run(None, float(q), cfg.seed, n=ns)
        ber_sweep[repr(float(q))] = _acc(out, y_test[:ns])
    return {
        "rows": rows,
        "ideal_equals_packed_kernels": exact,
        "ideal_accuracy": _acc(ideal, y_test),
        "adc_windows_3rms": {k: round(v, 2) for k, v in clip.items()},
        "setting": {"rows": rows, "adc_bits": cfg.xbar_adc_bits, "adc_window": "3 x RMS of the partial sums "
                    "(training images)", "bit_error_rate": cfg.xbar_ber, "seeds": cfg.xbar_seeds},
        "setting_accuracy_mean": round(sum(accs) / len(accs), 4),
        "setting_accuracy_min": min(accs), "setting_accuracy_max": max(accs),
        "setting_per_seed": seeds,
        "adc_only_accuracy": adc_only,
        "sweep_n_test": ns,
        "sweep_ideal_accuracy": _acc(ideal[:ns], y_test[:ns]),
        "accuracy_vs_adc_bits": bits_sweep,
        "accuracy_vs_bit_error_rate_ideal_adc": ber_sweep,
        "layers": layers,
        "digital_binary_layers": list(st.digital_binary_layers),
        "arrays": sum(l["arrays"] for l in layers),
        "tile_activations_per_image": st.tile_activations // n,
        "adc_conversions_per_image": st.adc_conversions // n,
        "tile_activations_test_pass": st.tile_activations,
        "adc_conversions_test_pass": st.adc_conversions,
        "n_test": n,
    }
