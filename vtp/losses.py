r"""``PruningLoss`` and the keep-ratio controller.

.. math::

    \mathcal{L} = \underbrace{\text{CE}(\text{answer tokens})}_\text{task}
      + w_d\, T^2\, \underbrace{\frac{1}{|A|}\sum_{t \in A} \text{KL}\big(p^T_t \,\|\, p^S_t\big)}_\text{distillation}
      + w_s\, \underbrace{\frac{1}{B}\sum_b \big(\bar k_b - \rho\big)^2}_\text{sparsity}
      + w_b\, \frac{1}{B}\sum_b \overline{p(1-p)}_b

* :math:`A` = supervised (answer) positions, labels ``-100`` elsewhere; :math:`p^T_t, p^S_t` the teacher's
  and student's softmax at temperature :math:`T` (``F.kl_div(..., reduction="batchmean")`` on the flattened
  ``[tokens, vocab]`` tensor = sum over vocabulary, mean over answer tokens).
* :math:`\bar k_b` = mean keep value over the VISUAL tokens of sample :math:`b` only: keep probabilities
  (seed) or the straight-through hard mask (DynamicViT); :math:`\rho` the target keep ratio.
  ``sparsity="l1"`` uses :math:`\bar k_b` itself (push every token to drop).
* Saturation: :math:`\partial(\bar p - \rho)^2/\partial l = 2(\bar p - \rho)\,p(1-p)/N`, which vanishes once
  keep probabilities saturate near 0 or 1.

``form="seed"`` computes the distillation and sparsity terms as the seed document's ``PruningLoss`` does
(lesson 08 trains that recipe): :math:`\frac1B \sum_{b,t,v} p^T_{b,t,v}(\log p^T_{b,t,v} - \log p^S_{b,t,v})`
over EVERY position :math:`t` of the ``[B, L, V]`` logits (``F.kl_div(..., reduction="batchmean")`` divides by
:math:`B` only; no temperature), and :math:`(\bar k - \rho)^2` with :math:`\bar k` the mean over all the
visual tokens of the batch (one ratio per batch, not per sample).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .gumbel import check_tau
from .pruner import check_ratio

__all__ = ["PruningLoss", "answer_ce", "distillation_kl", "seed_distillation_kl", "visual_keep_ratio",
           "DualAscentController"]

SPARSITY_KINDS = ("ratio", "l1")
SPARSITY_ON = ("prob", "mask")
LOSS_FORMS = ("vtp", "seed")


def _shift(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    """transformers' causal-LM convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (logits without vocab), got {tuple(labels.shape)}"
        )
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def answer_ce(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool = True) -> torch.Tensor:
    """Cross-entropy averaged over supervised tokens (labels != -100); float32."""
    logits, labels = _shift(logits, labels, shift_labels)
    if not (labels != -100).any():
        raise ValueError("labels: no supervised token (every label is -100)")
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def distillation_kl(student_logits, teacher_logits, labels, temperature: float = 1.0, shift_labels: bool = True):
    r""":math:`T^2 \cdot \frac{1}{|A|}\sum_{t\in A}\sum_v p^T_{t,v}(\log p^T_{t,v} - \log p^S_{t,v})` over answer tokens."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    T = check_tau(temperature, "temperature")
    s, lab = _shift(student_logits, labels, shift_labels)
    t, _ = _shift(teacher_logits, labels, shift_labels)
    sel = lab != -100
    if not sel.any():
        raise ValueError("labels: no supervised token (every label is -100)")
    log_s = F.log_softmax(s[sel].float() / T, dim=-1)
    log_t = F.log_softmax(t[sel].float().detach() / T, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * T * T


def seed_distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    r"""The seed document's distillation: ``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")``
    on the whole ``[B, L, V]`` logits, :math:`\frac1B \sum_{b,t,v} p^T_{b,t,v}(\log p^T_{b,t,v} - \log p^S_{b,t,v})`:
    every position (image, question, padding and answer), summed, divided by the batch size; float32."""
    if teacher_logits.shape != student_logits.shape or student_logits.dim() != 3:
        raise ValueError(f"student and teacher logits must have one shape (batch, length, vocab), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float().detach(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def visual_keep_ratio(keep: torch.Tensor, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-sample mean of ``keep`` [B, N] over the positions where ``visual_mask`` is True: shape [B]."""
    if keep.dim() != 2:
        raise ValueError(f"keep must have shape (batch, tokens), got {tuple(keep.shape)}")
    if visual_mask is None:
        return keep.float().mean(-1)
    if visual_mask.shape != keep.shape:
        raise ValueError(f"visual_mask must have shape {tuple(keep.shape)}, got {tuple(visual_mask.shape)}")
    vm = visual_mask.float()
    n = vm.sum(-1)
    if (n == 0).any():
        raise ValueError("visual_mask: every sample needs at least one visual token")
    return (keep.float() * vm).sum(-1) / n


def _check_keep(keep: torch.Tensor, name: str, batch: int) -> None:
    """``TypeError`` unless ``keep`` is a floating-point tensor; ``ValueError`` unless its shape is
    (``batch``, tokens)."""
    if not isinstance(keep, torch.Tensor) or not keep.is_floating_point():
        got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise TypeError(f"{name} must be a floating-point tensor (batch, visual tokens), got {got}")
    if keep.dim() != 2 or keep.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch}, visual tokens) (the batch of logits), "
                         f"got {tuple(keep.shape)}")


class PruningLoss(nn.Module):
    """Task CE + KL distillation + visual-only sparsity (+ optional binarization).

    Args:
        target_ratio: target keep ratio of visual tokens, in (0, 1].
        distill_weight: :math:`w_d` (0 disables distillation).
        sparsity_weight: :math:`w_s` (a schedule may override it per call).
        distill_temperature: :math:`T` of the KL term (T^2 factor applied).
        sparsity: ``"ratio"`` (MSE to target) or ``"l1"``.
        sparsity_on: ``"prob"`` (keep probabilities, seed) or ``"mask"`` (hard straight-through mask).
        binarize_weight: :math:`w_b` of the :math:`p(1-p)` term.
        shift_labels: labels follow transformers' causal-LM convention (shifted inside).
        form: ``"vtp"`` (above) or ``"seed"``: the seed document's distillation over every position and its
            batch-level keep ratio (module docstring); ``distill_temperature`` is then unused.
    """

    def __init__(self, target_ratio: float = 0.25, distill_weight: float = 1.0, sparsity_weight: float = 2.0,
                 distill_temperature: float = 1.0, sparsity: str = "ratio", sparsity_on: str = "prob",
                 binarize_weight: float = 0.0, shift_labels: bool = True, form: str = "vtp"):
        super().__init__()
        if form not in LOSS_FORMS:
            raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
        self.form = form
        if sparsity not in SPARSITY_KINDS:
            raise ValueError(f"sparsity must be one of {SPARSITY_KINDS}, got {sparsity!r}")
        if sparsity_on not in SPARSITY_ON:
            raise ValueError(f"sparsity_on must be one of {SPARSITY_ON}, got {sparsity_on!r}")
        for name, w in (("distill_weight", distill_weight), ("sparsity_weight", sparsity_weight),
                        ("binarize_weight", binarize_weight)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        self.target_ratio = check_ratio(target_ratio, "target_ratio")
        self.distill_weight, self.sparsity_weight, self.binarize_weight = distill_weight, sparsity_weight, binarize_weight
        self.distill_temperature = check_tau(distill_temperature, "distill_temperature")
        self.sparsity, self.sparsity_on, self.shift_labels = sparsity, sparsity_on, shift_labels

    def forward(self, logits, labels, keep_prob, keep_mask=None, visual_mask=None, teacher_logits=None,
                sparsity_weight: float | None = None, target_ratio: float | None = None,
                binarize_weight: float | None = None):
        """Return ``(total, components)``; components are floats: ce, distill, sparsity, binarize,
        keep_ratio (measured on the hard mask if given, else on probabilities), keep_prob, total.
        ``sparsity_weight`` / ``target_ratio`` / ``binarize_weight`` override the constructor's (schedules).

        Shapes and dtypes are checked before any work: ``keep_prob`` [B, N] floating point, with the batch ``B``
        of ``logits``. Its values must lie in [0, 1]: checked with the components, in the one read-back to the
        host this call makes anyway (``ValueError``; a non-finite total raises ``FloatingPointError``)."""
        _check_keep(keep_prob, "keep_prob", logits.shape[0])
        if keep_mask is not None:
            _check_keep(keep_mask, "keep_mask", logits.shape[0])
            if keep_mask.shape != keep_prob.shape:
                raise ValueError(f"keep_mask must have keep_prob's shape {tuple(keep_prob.shape)}, got {tuple(keep_mask.shape)}")
        target = self.target_ratio if target_ratio is None else check_ratio(target_ratio, "target_ratio")
        w_s = self.sparsity_weight if sparsity_weight is None else float(sparsity_weight)
        ce = answer_ce(logits, labels, self.shift_labels)
        total = ce
        distill = torch.zeros((), device=ce.device)
        if self.distill_weight > 0 and teacher_logits is not None:
            distill = (seed_distillation_kl(logits, teacher_logits) if self.form == "seed" else
                       distillation_kl(logits, teacher_logits, labels, self.distill_temperature, self.shift_labels))
            total = total + self.distill_weight * distill
        if self.sparsity_on == "mask":
            if keep_mask is None:
                raise ValueError('keep_mask is required when sparsity_on="mask"')
            kept = keep_mask
        else:
            kept = keep_prob
        ratio = visual_keep_ratio(kept, visual_mask)
        if self.form == "seed":  # one ratio per batch: the mean over all its visual tokens
            vm = torch.ones_like(kept, dtype=torch.float32) if visual_mask is None else visual_mask.float()
            ratio = (kept.float() * vm).sum().reshape(1) / vm.sum()
        sparsity = ((ratio - target) ** 2).mean() if self.sparsity == "ratio" else ratio.mean()
        total = total + w_s * sparsity
        p = keep_prob.float()
        binarize = visual_keep_ratio(p * (1 - p), visual_mask).mean()
        w_b = self.binarize_weight if binarize_weight is None else float(binarize_weight)
        if w_b > 0:
            total = total + w_b * binarize
        measured = visual_keep_ratio(keep_mask if keep_mask is not None else keep_prob, visual_mask).mean()
        parts = dict(ce=ce, distill=distill, sparsity=sparsity, binarize=binarize, keep_ratio=measured,
                     keep_prob=visual_keep_ratio(keep_prob, visual_mask).mean(), total=total)
        lo, hi = torch.aminmax(p.detach())
        # one read-back for every component and the range check
        values = torch.stack([v.detach().float().reshape(()) for v in (*parts.values(), lo, hi)]).tolist()
        parts, (lo, hi) = dict(zip(parts, values[:-2])), values[-2:]
        if lo < 0 or hi > 1:
            raise ValueError(f"keep_prob must be probabilities in [0, 1], got values in [{lo:g}, {hi:g}]")
        if not math.isfinite(parts["total"]):
            raise FloatingPointError(f"PruningLoss is not finite: {parts}")
        return total, parts


class DualAscentController:
    r"""Lagrangian control of the keep ratio: adapt the multiplier :math:`\lambda` of the constraint
    :math:`g = \bar k - \rho = 0`.

    The model minimises :math:`\mathcal{L}_\text{task} + \lambda g` (see :meth:`penalty`); after each step
    :meth:`update` performs dual ascent :math:`\lambda \leftarrow \operatorname{clip}(\lambda + \eta\, g,
    -\lambda_\max, \lambda_\max)`. Too many tokens kept -> :math:`\lambda` grows -> pressure to drop.
    """

    def __init__(self, target_ratio: float, lr: float = 0.5, init: float = 0.0, max_multiplier: float = 50.0):
        self.target_ratio = check_ratio(target_ratio, "target_ratio")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not (max_multiplier > 0 and math.isfinite(max_multiplier)):
            raise ValueError(f"max_multiplier must be a finite number > 0, got {max_multiplier}")
        if not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init}")
        self.lr, self.max_multiplier, self.multiplier = float(lr), float(max_multiplier), float(init)

    def penalty(self, keep_ratio: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda (\bar k - \rho)`, differentiable in ``keep_ratio`` (a scalar or per-sample tensor)."""
        return self.multiplier * (keep_ratio.mean() - self.target_ratio)

    def update(self, keep_ratio) -> float:
        """One dual-ascent step from the measured keep ratio; returns the new multiplier. A non-finite keep ratio
        raises ``ValueError`` (it would make the multiplier NaN for good)."""
        g = float(keep_ratio.mean() if isinstance(keep_ratio, torch.Tensor) else keep_ratio) - self.target_ratio
        if not math.isfinite(g):
            raise ValueError(f"keep_ratio must be a finite number, got {g + self.target_ratio}")
        self.multiplier = min(max(self.multiplier + self.lr * g, -self.max_multiplier), self.max_multiplier)
        return self.multiplier
