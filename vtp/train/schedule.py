r"""The one learning-rate schedule of every training loop (teacher, pruner phase 1, pruner phase 2).

A linear warm-up over :math:`T_w` steps times a cosine from 1 to :math:`r` (``min_lr_ratio``) over the run's
progress :math:`p \in [0, 1]`:

.. math::  \eta_t = \eta \cdot \min\!\big(1, \tfrac{t+1}{T_w}\big)
           \cdot \Big(r + (1 - r)\,\tfrac12\big(1 + \cos \pi p\big)\Big)

(no warm-up factor when :math:`T_w = 0`). The teacher's progress is
:math:`p = \max(t/T, \text{elapsed}/\text{time budget})`; the pruner's phases use :math:`p = t/T` of their own
steps. Each parameter group has its own base rate :math:`\eta` (pruner, language model, vision side).
"""
from __future__ import annotations

import math

__all__ = ["lr_factor", "set_lr"]


def lr_factor(cfg, step: int, progress, warmup_steps: int | None = None) -> float:
    r"""Multiplier of the base learning rate at ``step``: linear warm-up over ``warmup_steps`` (default
    ``cfg.warmup_steps``; 0 = none), times a cosine from 1 to ``cfg.min_lr_ratio`` over ``progress``, a number in
    [0, 1] (clipped) or a pair ``(done, total)`` of steps (clipped to [0, total]; the angle is then computed as
    :math:`\pi \cdot \text{done} / \text{total}`, the rounding phase 2 has always used)."""
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if isinstance(progress, tuple):
        done, total = progress
        angle = math.pi * min(max(done, 0), total) / total
    else:
        angle = math.pi * min(1.0, max(0.0, progress))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(angle)))


def set_lr(opt, bases, factor: float) -> None:
    """Set parameter group ``i``'s learning rate to ``bases[i] * factor`` (:math:`\\eta_t` of each group)."""
    for group, base in zip(opt.param_groups, bases):
        group["lr"] = base * factor
