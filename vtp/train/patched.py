r"""Train a pruner for any model family :func:`vtp.patch` supports (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), on
batches from the model's own ``transformers`` processor: phase 1 of lesson 07, through the patched model.

:func:`vtp.train_pruner` builds its student around a LLaVA (:class:`vtp.PrunedVLM`). This loop needs no wrapper:
``vtp.patch(model, pruner)`` in train mode samples hard Gumbel masks per image and applies them as the keep policy
of the policy-weighted attention (masking = removal, :mod:`vtp.attention`), so the same model, switched to eval
mode, removes the dropped tokens at the prefill of ``generate()``.

At step :math:`t` of :math:`T`, with the temperature :math:`\tau_t` of :func:`vtp.get_temperature` (exponential,
``max_temp`` to ``min_temp``) and the sparsity weight ramped in over the first ``warmup_frac`` of the steps,
the loss is :class:`vtp.PruningLoss`,

.. math::
    \mathcal{L} = \text{CE}(\text{answer}) + w_d\,\text{KL}(p_\text{teacher} \,\|\, p_\text{student})
    + w_s(t)\,\frac{1}{I}\sum_i \big(\bar p_i - \rho\big)^2,

:math:`\bar p_i` the mean keep probability over image :math:`i`'s visual tokens and :math:`\rho` the target ratio.
The teacher is a frozen copy of the model taken before any update (or the ``teacher`` given); the language model
is frozen (``lm_lr = 0``) or fine-tuned at ``lm_lr``; the vision tower stays frozen.
"""
from __future__ import annotations

import copy
import math

import torch

from ..losses import PruningLoss
from ..patch import SUPPORTED, patch
from ..pruner import check_ratio
from ..runtime import progress
from ..schedules import get_temperature
from .batches import training_batches
from .steps import step

__all__ = ["train_patched"]


def _check(model, steps, lr, lm_lr, warmup_frac):
    if not isinstance(model, SUPPORTED):
        raise TypeError(f"model must be one of {', '.join(c.__name__ for c in SUPPORTED)}, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, value in (("lr", lr), ("lm_lr", lm_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if lr == 0:
        raise ValueError("lr must be > 0: the pruner is what this loop trains")
    if not 0 <= warmup_frac < 1:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac!r}")


def _optimizer(model, pruner, lr, lm_lr):
    """AdamW on the pruner (``lr``) and, when ``lm_lr`` > 0, the language model; everything else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(pruner.parameters()), "lr": lr}]
    if lm_lr > 0:
        lm = list(model.get_decoder().parameters())
        for p in lm:
            p.requires_grad_(True)
        groups.append({"params": lm, "lr": lm_lr})
    for p in pruner.parameters():
        p.requires_grad_(True)
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_patched(model, pruner, batches, steps: int, ratio: float = 0.25, lr: float = 2e-3, lm_lr: float = 0.0,
                  teacher=None, sparsity_weight: float = 2.0, distill_weight: float = 1.0, max_temp: float = 5.0,
                  min_temp: float = 0.1, warmup_frac: float = 0.1, log_every: int = 10):
    """Train ``pruner`` (a :class:`vtp.GumbelVisionPruner` of the language model's width) for ``model`` on
    ``batches`` (any iterable of dicts that ``model(**batch)`` accepts, e.g. its processor's output, plus ``labels``:
    the answer's token ids, -100 elsewhere; one image per sample). ``model`` is patched in place (:func:`vtp.patch`
    at ``ratio``, top-k) and returned in eval mode, ready for ``generate()``, with the history: ``step``, ``tau``,
    the loss components and ``keep_ratio`` (of the sampled masks) every ``log_every`` steps."""
    _check(model, steps, lr, lm_lr, warmup_frac)
    ratio = check_ratio(ratio)
    device = next(model.parameters()).device
    teacher = (copy.deepcopy(model) if teacher is None else teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    patch(model, pruner.to(device), ratio=ratio)
    opt = _optimizer(model, pruner, lr, lm_lr)
    loss_fn = PruningLoss(ratio, distill_weight=distill_weight, sparsity_weight=sparsity_weight)
    stream = training_batches(batches, device)
    history = {"step": [], "tau": [], "keep_ratio": [], "ce": [], "distill": [], "sparsity": [], "total": []}
    model.train()

    def compute_loss(batch):
        with torch.no_grad():
            teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits = model(**batch).logits  # labels passed: the question the pruner reads excludes the answer
        state = model.vtp_last
        if state.keep_prob.shape[0] != logits.shape[0]:
            raise ValueError(f"batches: one image per sample, got {state.keep_prob.shape[0]} images for "
                             f"{logits.shape[0]} samples")
        return loss_fn(logits, batch["labels"], state.keep_prob, keep_mask=state.mask, visual_mask=state.valid,
                       teacher_logits=teacher_logits, sparsity_weight=w_s)

    for t in progress(range(steps), desc="pruner", leave=False):
        pruner.tau = tau = get_temperature(t, steps, max_temp, min_temp)
        w_s = sparsity_weight * min(1.0, t / max(1.0, warmup_frac * steps))  # read by compute_loss
        _, parts = step(opt, compute_loss, next(stream), grad_clip=1.0)
        if t % log_every == 0 or t == steps - 1:
            history["step"].append(t)
            history["tau"].append(tau)
            for k in ("keep_ratio", "ce", "distill", "sparsity", "total"):
                history[k].append(parts[k])
    return model.eval(), history
