r"""The one optimisation step shared by the teacher loop and both pruner phases (nanoGPT-style: the loops stay
short and visible, the step is written once).

.. math::  \theta \leftarrow \mathrm{AdamW}\big(\theta,\ \mathrm{clip}(\nabla_\theta \mathcal{L}(\text{batch}), c)\big),
           \qquad \mathrm{clip}(g, c) = g \cdot \min\!\big(1, c / \lVert g \rVert_2\big)

with :math:`\mathcal{L}` the loop's own loss (the teacher's answer cross-entropy, or :class:`vtp.PruningLoss`
for the pruner) and :math:`c` = ``grad_clip`` (the norm over every clipped parameter together).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["step", "answer_loss"]


def step(opt: torch.optim.Optimizer, compute_loss, batch: dict, grad_clip: float, params=None):
    """One step: ``loss, aux = compute_loss(batch)`` (forward and loss, under the caller's autocast), zero the
    gradients, ``loss.backward()``, clip the gradient norm of ``params`` (default: every parameter of ``opt``'s
    groups, in group order) to ``grad_clip``, ``opt.step()``. Returns ``(loss, aux)``; the learning rates are
    set by the caller beforehand (:func:`vtp.train.schedule.set_lr`)."""
    loss, aux = compute_loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if params is None:
        params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss, aux


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Mean CE over answer tokens, :math:`-\frac{1}{|A|}\sum_{(b,t) \in A} \log p(y_{b,t+1} \mid x_{b, \le t})`
    with :math:`A` the positions whose next label is not -100 (as :func:`vtp.losses.answer_ce`, without its
    host-side label check, which would wait for the GPU every step)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
