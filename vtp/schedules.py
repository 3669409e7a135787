r"""Schedules over training steps: Gumbel temperature, sparsity-weight warm-up, target-ratio curriculum.

With progress :math:`s = \min(\text{step}/\text{total\_steps}, 1)`:

* exponential (seed): :math:`\tau(s) = \tau_\max (\tau_\min/\tau_\max)^s`
* linear: :math:`\tau(s) = \tau_\max + (\tau_\min - \tau_\max)\, s`
* cosine: :math:`\tau(s) = \tau_\min + \tfrac12(\tau_\max - \tau_\min)(1 + \cos \pi s)`

All three start at ``max_temp``, end at ``min_temp`` and decrease monotonically. Keep the floor at about
0.1: the straight-through gradient scales like :math:`1/\tau` and :math:`\tau \to 0` gives NaN.
"""
from __future__ import annotations

import math

from .gumbel import check_tau
from .pruner import check_ratio

__all__ = ["get_temperature", "sparsity_weight_schedule", "target_ratio_schedule", "SCHEDULES"]

SCHEDULES = ("exponential", "linear", "cosine")


def _progress(step, total_steps) -> float:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
        raise ValueError(f"step must be a finite number >= 0, got {step!r}")
    return min(step / total_steps, 1.0)


def _frac(value, name) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def get_temperature(step, total_steps: int, max_temp: float = 5.0, min_temp: float = 0.1,
                    schedule: str = "exponential") -> float:
    """Gumbel-softmax temperature at ``step`` of ``total_steps`` (``max_temp`` -> ``min_temp``)."""
    s = _progress(step, total_steps)
    hi, lo = check_tau(max_temp, "max_temp"), check_tau(min_temp, "min_temp")
    if lo > hi:
        raise ValueError(f"min_temp must be <= max_temp, got min_temp={lo}, max_temp={hi}")
    if schedule == "exponential":
        return hi * (lo / hi) ** s
    if schedule == "linear":
        return hi + (lo - hi) * s
    if schedule == "cosine":
        return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * s))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def sparsity_weight_schedule(step, total_steps: int, weight: float, warmup_frac: float = 0.1,
                             ramp_frac: float = 0.0) -> float:
    """0 for the first ``warmup_frac`` of training, then a linear ramp over ``ramp_frac`` up to ``weight``."""
    s = _progress(step, total_steps)
    warm, ramp = _frac(warmup_frac, "warmup_frac"), _frac(ramp_frac, "ramp_frac")
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if s < warm:
        return 0.0
    if ramp == 0:
        return float(weight)
    return float(weight) * min((s - warm) / ramp, 1.0)


def target_ratio_schedule(step, total_steps: int, target: float, start: float = 1.0,
                          curriculum_frac: float = 0.5) -> float:
    """Keep-ratio curriculum: linear from ``start`` to ``target`` over the first ``curriculum_frac``."""
    s = _progress(step, total_steps)
    target, start = check_ratio(target, "target"), check_ratio(start, "start")
    frac = _frac(curriculum_frac, "curriculum_frac")
    if frac == 0 or s >= frac:
        return target
    return start + (target - start) * s / frac
