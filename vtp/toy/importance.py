r"""Lesson 03: a :class:`vtp.GumbelVisionPruner` trained on random tokens whose importance is partly predictable
from their features, with the sparsity terms of :class:`vtp.PruningLoss`."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..losses import DualAscentController, PruningLoss, visual_keep_ratio
from ..pruner import GumbelVisionPruner, check_ratio, threshold_keep_mask, topk_keep_mask


def importance_batch(direction: torch.Tensor, batch: int, tokens: int, noise: float = 1.0,
                     generator: torch.Generator | None = None):
    r"""Random tokens ``x [B, N, d] ~ N(0, 1)`` and their importance
    :math:`u = \operatorname{relu}(x \cdot w^* / \sqrt d + \text{noise}\cdot\varepsilon)`, ``[B, N]``.

    ``noise`` is the part of the importance a scorer cannot see in the features (0 = fully predictable).
    """
    d = direction.numel()
    x = torch.randn(batch, tokens, d, generator=generator)
    u = torch.relu(x @ direction / math.sqrt(d) + noise * torch.randn(batch, tokens, generator=generator))
    return x, u


def train_importance_pruner(direction: torch.Tensor, target_ratio: float = 0.25, sparsity: str = "ratio",
                            sparsity_weight: float = 20.0, binarize_weight: float = 0.0, text_tokens: int = 0,
                            visual_only: bool = True, dual_lr: float | None = None, noise: float = 1.0,
                            steps: int = 300, batch: int = 32, tokens: int = 64, lr: float = 1e-2,
                            tau: float = 1.0, seed: int = 0, optimizer: str = "adam",
                            target_schedule: Callable[[int], float] | None = None, penalty_with_dual: bool = False):
    r"""Train a :class:`vtp.GumbelVisionPruner` on :func:`importance_batch` tokens; return ``(pruner, ratios)``.

    Task surrogate: the importance lost by dropping, :math:`\frac1{BN}\sum u\,(1 - m)` with the hard Gumbel
    mask :math:`m`. Sparsity: the ``sparsity`` / ``binarize`` terms of :class:`vtp.PruningLoss` (its CE is
    a constant here: the toy has no language model). ``text_tokens`` always-kept tokens are appended to the
    keep probabilities; ``visual_only=False`` forgets the ``visual_mask`` (the pitfall). ``dual_lr`` replaces
    the fixed weight by a :class:`vtp.DualAscentController` (``penalty_with_dual=True`` keeps the fixed-weight
    term next to it, as lesson 07's recipe does). ``target_schedule(step)`` overrides the target
    per step (a ratio curriculum); ``optimizer`` is ``"adam"`` or ``"sgd"``. ``ratios`` = per-step visual keep
    ratio (mean keep probability).
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f'optimizer must be "adam" or "sgd", got {optimizer!r}')
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pruner = GumbelVisionPruner(direction.numel(), reduction=1, norm=False).train()  # unit-scale toy tokens: the seed scorer
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(pruner.parameters(), lr=lr)
    loss_fn = PruningLoss(target_ratio, distill_weight=0.0, sparsity_weight=0.0 if dual_lr and not penalty_with_dual else sparsity_weight,
                          sparsity=sparsity, binarize_weight=binarize_weight, shift_labels=False)
    controller = DualAscentController(target_ratio, lr=dual_lr) if dual_lr else None
    const_logits, const_labels = torch.zeros(batch, 1, 2), torch.zeros(batch, 1, dtype=torch.long)  # CE = log 2
    visual = torch.cat([torch.ones(batch, tokens), torch.zeros(batch, text_tokens)], 1).bool()
    ratios = []
    for step in range(steps):
        x, u = importance_batch(direction, batch, tokens, noise, gen)
        out = pruner(x, tau=tau)
        task = (u * (1 - out.mask)).mean()
        keep_prob = torch.cat([out.keep_prob, torch.ones(batch, text_tokens)], 1)
        target = None if target_schedule is None else target_schedule(step)
        extra, _ = loss_fn(const_logits, const_labels, keep_prob, visual_mask=visual if visual_only else None,
                           target_ratio=target)
        loss = task + extra
        visual_ratio = visual_keep_ratio(out.keep_prob)
        if controller is not None:
            loss = loss + controller.penalty(visual_ratio)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if controller is not None:
            controller.update(visual_ratio.detach())
        ratios.append(float(visual_ratio.detach().mean()))
    return pruner.eval(), ratios


@torch.no_grad()
def importance_report(pruner: GumbelVisionPruner, direction: torch.Tensor, target_ratio: float, noise: float = 1.0,
                      batch: int = 64, tokens: int = 64, seed: int = 123) -> dict:
    r"""Deterministic (eval-mode) behaviour of a trained pruner on a fresh batch.

    ``mean_p`` = mean keep probability, ``above_half`` = fraction with :math:`p > 0.5`, ``binarity`` = mean
    :math:`p(1-p)` (0 = all decisions certain), ``kept_threshold`` / ``kept_topk`` = fraction kept by the
    threshold rule / by top-k at ``target_ratio``, ``recall_*`` = share of the total importance they keep.
    """
    target_ratio = check_ratio(target_ratio, "target_ratio")
    x, u = importance_batch(direction, batch, tokens, noise, torch.Generator().manual_seed(seed))
    p = pruner.eval()(x).keep_prob
    thr = threshold_keep_mask(p, 0.5)
    top = topk_keep_mask(p, target_ratio)
    recall = lambda m: float((u * m).sum() / u.sum())
    return dict(mean_p=float(p.mean()), above_half=float((p > 0.5).float().mean()), binarity=float((p * (1 - p)).mean()),
                kept_threshold=float(thr.mean()), kept_topk=float(top.mean()),
                recall_threshold=recall(thr), recall_topk=recall(top))

