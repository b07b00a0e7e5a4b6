"""The demo's settings: one frozen dataclass, two presets (full, quick), validated overrides.

Every number the demo uses is here, so the JSON report can record the whole configuration and a
test can shrink the run (fewer images, epochs, steps) through :func:`make_config` without touching
the stages.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from kdengine.data.mnist import MNIST_TOTAL

__all__ = ["DemoConfig", "make_config", "N_TRAIN_PART"]

# load_mnist's fixed split: the first 8,000 images of the seeded permutation are "train", the
# other 2,000 "test" (never ../shared, never anything else).
N_TRAIN_PART = 8000
N_TEST_PART = MNIST_TOTAL - N_TRAIN_PART


@dataclass(frozen=True)
class DemoConfig:
    """All settings of one demo run (see :mod:`kdengine.demo` for what each stage does).

    Data: of the 8,000 train images, the first ``n_fit`` train every network (the first
    ``n_calib`` of those also calibrate the SNN conversion and the crossbar ADC windows) and the
    *last* ``n_heldout`` are the held-out split on which the SNN latency cuts are tuned; the
    first ``n_test`` of the 2,000 test images score the ANNs, the runtime and the crossbar, the
    first ``n_test_snn`` of them the SNN.
    """

    quick: bool = False
    seed: int = 0        # initialisations, data order, dropout, bit flips
    split_seed: int = 0  # load_mnist's split: fixed (seed 0) unless asked otherwise
    threads: int = 2
    # data
    n_fit: int = 7000
    n_heldout: int = 1000
    n_calib: int = 1000
    n_test: int = 2000
    n_test_snn: int = 2000
    # training (Adam, cosine decay per step to 0, batch ``batch``). Learning rates, kd_weight and
    # temperature: picked by a small sweep (lr 5e-3 / 1e-2 x kd_weight 0 / 0.5 / 0.7 / 0.9 at T=4,
    # and T 2 / 8 at 0.7; 6 epochs, seed 0) scored on the *held-out* split, never on the test images.
    batch: int = 128
    teacher_width: int = 32
    teacher_hidden: int = 256
    teacher_epochs: int = 3
    teacher_lr: float = 5e-3
    student_width: int = 16
    student_hidden: int = 128
    student_epochs: int = 6
    student_lr: float = 5e-3
    snn_student_epochs: int = 6
    snn_student_lr: float = 1e-2
    ce_baseline: bool = True
    temperature: float = 4.0
    kd_weight: float = 0.5  # loss = kd_weight * KD(T) + (1 - kd_weight) * CE
    # batch-1 latency (interleaved blocks of timed calls)
    latency_rounds: int = 5
    latency_per_round: int = 40
    snn_latency_images: int = 100
    # SNN latency cuts
    t_max: int = 32          # steps of the fixed-T test run (accuracy-vs-step trace)
    t_search: int = 16       # target T of the design-time scaling search
    t_ref: int = 32          # early-exit cap
    n_search: int = 500      # held-out images scoring each scaling candidate
    search_percentiles: tuple = (99.9, 100.0)
    search_scales: tuple = (0.8, 1.0)
    search_init_potentials: tuple = (0.0, 0.5)
    ee_max_loss: float = 0.003
    ee_max_flip: float = 0.005
    # crossbar
    xbar_rows: int = 128
    xbar_adc_bits: int = 4
    xbar_ber: float = 1e-3
    xbar_seeds: int = 2
    n_test_xbar_sweep: int = 500  # test images of the plot's ADC-bits / bit-error-rate sweeps
    xbar_bits_sweep: tuple = (1, 2, 3, 4, 6, 8)
    xbar_ber_sweep: tuple = (0.0, 1e-3, 1e-2, 4e-2)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


_QUICK = dict(
    quick=True, n_fit=4000, n_heldout=500, n_calib=500, n_test=1000, n_test_snn=500,
    teacher_width=16, teacher_hidden=128, teacher_epochs=2, student_epochs=2, snn_student_epochs=2,
    ce_baseline=False, latency_rounds=2, latency_per_round=20, snn_latency_images=20,
    t_max=16, t_search=8, t_ref=16, n_search=200, search_percentiles=(99.9,), search_scales=(0.8, 1.0),
    search_init_potentials=(0.5,), xbar_seeds=1, xbar_bits_sweep=(1, 2, 3, 4, 8),
    xbar_ber_sweep=(0.0, 1e-3, 1e-2), n_test_xbar_sweep=500,
)

_INTS_POS = ("threads", "n_fit", "n_heldout", "n_calib", "n_test", "n_test_snn", "batch", "teacher_width",
             "teacher_hidden", "teacher_epochs", "student_width", "student_hidden", "student_epochs",
             "snn_student_epochs", "latency_rounds", "latency_per_round", "snn_latency_images", "t_max",
             "t_search", "t_ref", "n_search", "xbar_rows", "xbar_adc_bits", "xbar_seeds", "n_test_xbar_sweep")


def _check_int(cfg: DemoConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def _check_real(cfg: DemoConfig, name: str, ok: Any, what: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(v):
        raise ValueError(f"{name} must be {what}, got {v!r}")


def _check_at_most(cfg: DemoConfig, name: str, bound: int, bound_name: str) -> None:
    if getattr(cfg, name) > bound:
        raise ValueError(f"{name} must be <= {bound_name} ({bound}), got {getattr(cfg, name)}")


def _check(cfg: DemoConfig) -> DemoConfig:
    for name in _INTS_POS:
        _check_int(cfg, name, 1)
    for name in ("seed", "split_seed"):
        _check_int(cfg, name, 0)
    for name in ("quick", "ce_baseline"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(cfg, name)).__name__}")
    if cfg.n_fit + cfg.n_heldout > N_TRAIN_PART:
        raise ValueError(f"n_fit + n_heldout must be <= {N_TRAIN_PART} (the train part of the split), "
                         f"got {cfg.n_fit} + {cfg.n_heldout}")
    _check_at_most(cfg, "n_calib", cfg.n_fit, "n_fit")
    _check_at_most(cfg, "n_search", cfg.n_heldout, "n_heldout")
    for name in ("n_test", "n_test_snn"):
        _check_at_most(cfg, name, N_TEST_PART, "the test part of the split")
    _check_at_most(cfg, "n_test_xbar_sweep", cfg.n_test, "n_test")
    _check_at_most(cfg, "n_test_snn", cfg.n_test, "n_test")
    _check_at_most(cfg, "snn_latency_images", cfg.n_test_snn, "n_test_snn")
    _check_at_most(cfg, "t_ref", cfg.t_max, "t_max (t_ref is the early-exit cap)")
    for name in ("teacher_lr", "student_lr", "snn_student_lr", "temperature"):
        _check_real(cfg, name, lambda v: 0 < v < float("inf"), "a finite number > 0")
    for name in ("kd_weight", "ee_max_loss", "ee_max_flip", "xbar_ber"):
        _check_real(cfg, name, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    for name in ("search_percentiles", "search_scales", "search_init_potentials", "xbar_bits_sweep",
                 "xbar_ber_sweep"):
        v = getattr(cfg, name)
        if not isinstance(v, tuple) or not v:
            raise ValueError(f"{name} must be a non-empty tuple, got {v!r}")
    return cfg


def make_config(quick: bool = False, **overrides: Any) -> DemoConfig:
    """The full (``quick=False``) or quick preset with ``overrides`` applied and validated.

    Raises TypeError for an unknown setting or a value of the wrong type, ValueError for a value
    out of range (each names the setting).
    """
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown demo setting(s) {unknown}; known: {sorted(names)}")
    base: dict[str, Any] = dict(_QUICK) if quick else {}
    base.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()})
    base["quick"] = quick
    return _check(DemoConfig(**base))
