"""Paired statistics for the reproductions: per-seed differences between a method and its baseline.

Every arm of a reproduction runs on the same seeds (same initialisation, data order and subset per
seed), so the honest comparison is paired: for each seed s the difference d_s = method_s -
baseline_s, then the mean of the d_s with a Student-t confidence interval

    mean(d) +- t_{(1 + c) / 2, n - 1} * sd(d) / sqrt(n)

(sd with n - 1 in the denominator). Pairing removes the seed-to-seed spread both arms share, which an
unpaired comparison of two means counts twice. The t quantile is computed here (regularized
incomplete beta by its continued fraction, inverted by bisection) so that kdengine needs no SciPy.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

__all__ = ["PairedDifference", "paired_difference", "paired_comparisons", "claim_notes",
           "student_t_quantile", "student_t_cdf"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast on the side of the mean; use the symmetry elsewhere
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _check_df(df: float) -> float:
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not math.isfinite(df) or df <= 0:
        raise ValueError(f"df must be a finite number > 0, got {df!r}")
    return float(df)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    df = _check_df(df)
    if math.isnan(t):
        raise ValueError("t must not be NaN")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0 < p < 1)."""
    df = _check_df(df)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"p must be a number in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    hi = 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):  # bisection to the last bit: the cdf is monotone, no derivative needed
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDifference:
    """method - baseline, paired by seed. ``ci_low``/``ci_high`` are None with fewer than 2 seeds."""

    n: int
    seeds: tuple
    differences: tuple
    mean: float
    sd: float
    confidence: float
    ci_low: Optional[float]
    ci_high: Optional[float]
    wins: int
    losses: int
    ties: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole confidence interval lies on one side of 0."""
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"], d["differences"] = list(self.seeds), list(self.differences)
        d["excludes_zero"] = self.excludes_zero
        return d


def paired_difference(method: Mapping[Any, float], baseline: Mapping[Any, float], *,
                      confidence: float = 0.95) -> PairedDifference:
    """Mean of the per-seed differences ``method[s] - baseline[s]`` and its Student-t interval.

    Args:
        method, baseline: seed -> value; both must hold exactly the same seeds.
        confidence: level of the two-sided interval, in (0, 1).
    """
    if not isinstance(method, Mapping) or not isinstance(baseline, Mapping):
        raise TypeError("method and baseline must be mappings seed -> value")
    if set(method) != set(baseline):
        raise ValueError(f"method and baseline must have the same seeds, got {sorted(method, key=str)} "
                         f"and {sorted(baseline, key=str)}")
    if not method:
        raise ValueError("paired_difference needs at least one seed")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    seeds = tuple(sorted(method, key=str))
    diffs = []
    for s in seeds:
        a, b = float(method[s]), float(baseline[s])
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"seed {s!r}: values must be finite, got {a!r} and {b!r}")
        diffs.append(a - b)
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    lo = hi = None
    if n > 1:
        half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return PairedDifference(
        n=n, seeds=seeds, differences=tuple(diffs), mean=mean, sd=sd, confidence=float(confidence),
        ci_low=lo, ci_high=hi, wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs),
        ties=sum(d == 0 for d in diffs))


def paired_comparisons(rows: Sequence[Mapping[str, Any]], *, baseline: str, metric: str,
                       method_key: str = "method", seed_key: str = "seed",
                       within: Sequence[str] = (), confidence: float = 0.95,
                       scale: float = 100.0, unit: str = " points") -> list[dict[str, Any]]:
    """Every method against ``baseline``, paired by ``seed_key``, in each group of ``within``.

    ``rows``: one per (group, method, seed) with the ``metric`` value. Returns one dict per
    (group, method): the group values, ``method``, the :class:`PairedDifference` fields (scaled by
    ``scale``) and ``note``, one plain sentence that says whether the interval excludes 0.
    """
    groups: dict[tuple, dict[str, dict[Any, float]]] = {}
    for r in rows:
        for k in (*within, method_key, seed_key, metric):
            if k not in r:
                raise KeyError(f"paired_comparisons: a row has no {k!r}: {dict(r)}")
        by_method = groups.setdefault(tuple(r[k] for k in within), {})
        seeds = by_method.setdefault(r[method_key], {})
        if r[seed_key] in seeds:
            raise ValueError(f"paired_comparisons: two rows for method {r[method_key]!r}, seed "
                             f"{r[seed_key]!r} in group {dict(zip(within, tuple(r[k] for k in within)))}")
        seeds[r[seed_key]] = float(r[metric])
    out = []
    for g, by_method in groups.items():
        if baseline not in by_method:
            raise ValueError(f"paired_comparisons: no {baseline!r} rows in group {dict(zip(within, g))}")
        for name, values in by_method.items():
            if name == baseline:
                continue
            p = paired_difference(values, by_method[baseline], confidence=confidence)
            d = {k: (v * scale if k in ("mean", "sd", "ci_low", "ci_high") and v is not None else v)
                 for k, v in p.as_dict().items()}
            d["differences"] = [x * scale for x in p.differences]
            where = ", ".join(f"{k}={v}" for k, v in zip(within, g))
            head = f"[{where}] " if where else ""
            if p.ci_low is None:
                verdict = f"one seed only, no interval: {p.mean * scale:+.2f}{unit}"
            else:
                level = f"{100 * confidence:g} % CI"
                span = f"[{p.ci_low * scale:+.2f}, {p.ci_high * scale:+.2f}]"
                if p.excludes_zero:
                    side = "better" if p.mean > 0 else "worse"
                    verdict = (f"{side} than {baseline} by {p.mean * scale:+.2f}{unit} ({level} {span}, "
                               f"{p.wins}/{p.n} seeds higher)")
                else:
                    verdict = (f"not distinguishable from {baseline}: {p.mean * scale:+.2f}{unit} "
                               f"({level} {span} includes 0, {p.wins}/{p.n} seeds higher)")
            d.update({**dict(zip(within, g)), method_key: name, "baseline": baseline, "metric": metric,
                      "note": f"{head}{name}: {verdict}"})
            out.append(d)
    return out


def claim_notes(rows: Sequence[Mapping[str, Any]], claims: Sequence[tuple[str, str, str]], *, label: str,
                metric: str = "test_acc", within: Sequence[str] = ("dataset",)) -> list[str]:
    """One line per paper claim ``(text, method, baseline)`` that ``method`` beats ``baseline``:
    REPRODUCED when the paired 95 % interval of method - baseline lies above 0, CONTRADICTED (worse)
    when it lies below, NOT REPRODUCED when it includes 0 (the README generator reads these words)."""
    by: dict[tuple[Any, str], dict[str, Any]] = {}
    for base in dict.fromkeys(b for _, _, b in claims):
        for c in paired_comparisons(rows, baseline=base, metric=metric, within=within):
            by[(c["method"], base)] = c
    out = []
    for text, m, b in claims:
        c = by.get((m, b))
        if c is None or c["ci_low"] is None:
            out.append(f"{label}: {text}: no interval (fewer than 2 seeds)")
            continue
        lo, hi = c["ci_low"], c["ci_high"]
        verdict = ("REPRODUCED" if lo > 0 else "CONTRADICTED (worse)" if hi < 0
                   else "NOT REPRODUCED (interval includes 0)")
        out.append(f"{label}: {text}: {verdict}: {m} - {b} on {metric} = {c['mean']:+.2f} points, "
                   f"95 % CI [{lo:+.2f}, {hi:+.2f}]")
    return out
