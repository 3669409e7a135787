r"""Paired comparisons over seeds: the noise measure of the lessons that compare training recipes.

Two recipes A and B trained with the same seeds :math:`s = 1..n` (same teacher, data order and steps) give
accuracies :math:`a_s, b_s`. The effect of A against its reference B is the mean paired difference

.. math::  \bar d = \frac1n \sum_s d_s, \qquad d_s = a_s - b_s,

and its 95% confidence interval is Student's t-interval over the :math:`n` differences,

.. math::  \bar d \pm t_{0.975,\,n-1}\, \frac{s_d}{\sqrt n}, \qquad
           s_d^2 = \frac{1}{n-1} \sum_s (d_s - \bar d)^2 .

Pairing removes what the seeds share (a hard initialisation, a lucky data order) from the comparison. An
effect is called real only if its interval excludes 0. The t quantile is computed here (no SciPy): the
Student-t CDF by Simpson integration of its density, inverted by bisection.
"""
from __future__ import annotations

import functools
import math

__all__ = ["t_quantile", "t_interval", "paired_effect"]


def _t_pdf(x: float, df: int) -> float:
    r""":math:`f(x) = \frac{\Gamma(\frac{\nu+1}{2})}{\sqrt{\nu\pi}\,\Gamma(\frac\nu2)}(1 + x^2/\nu)^{-(\nu+1)/2}`."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 + the integral of the density over [0, x] (composite Simpson rule)."""
    h = x / intervals
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, intervals))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(x, df))


@functools.lru_cache(maxsize=256, typed=True)
def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom, for ``q`` in [0.5, 1) (e.g. 0.975)."""
    if not (isinstance(df, int) and not isinstance(df, bool) and df >= 1):
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if not (0.5 <= q < 1):
        raise ValueError(f"q must be in [0.5, 1), got {q!r}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:  # bracket the quantile
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def _numbers(values, name: str) -> list[float]:
    try:
        xs = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"{name} must be finite numbers, got {xs}")
    return xs


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    r"""``(mean, low, high)``: the mean of ``values`` and its ``level`` t-interval
    :math:`\bar x \pm t_{(1+\text{level})/2,\,n-1}\, s/\sqrt n` (needs n >= 2 values)."""
    xs = _numbers(values, "values")
    if len(xs) < 2:
        raise ValueError(f"values: a t-interval needs at least 2 values, got {len(xs)}")
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_effect(values, reference, level: float = 0.95) -> dict:
    """Effect of ``values`` against ``reference`` (same seeds, same order): ``{"per_seed": [d_s], "mean",
    "ci95": [low, high], "real"}``; ``real`` = the interval excludes 0. (The key is ``ci95`` at any ``level``.)"""
    a, b = _numbers(values, "values"), _numbers(reference, "reference")
    if len(a) != len(b):
        raise ValueError(f"values and reference must pair up seed by seed, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    mean, low, high = t_interval(diffs, level)
    return {"per_seed": diffs, "mean": mean, "ci95": [low, high], "real": bool(low > 0 or high < 0)}
