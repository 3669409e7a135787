r"""Phase 2 of the pruner training (:func:`vtp.train.train_pruner`, ``adapt_steps`` > 0): the language model
learns on the masks of deployment instead of the Gumbel masks of phase 1 (top-k at the target, or cycling through
``adapt_ratios``), with CE + distillation from the frozen teacher; the pruner stays frozen or trains through
top-k (``adapt_pruner``). Phase 1 (:mod:`vtp.train.pruner`) trains under one law of masks and deployment applies
another; this phase closes that gap (lesson 04 shows it on a toy task, lesson 08 measures it).

Also here: the two helpers both phases share (a batch's model inputs, the teacher's logits).
"""
from __future__ import annotations

import torch

from .. import distributed
from ..evaluate import autocast
from ..runtime import progress
from ..vlm import answer_logits
from .schedule import lr_factor, set_lr
from .steps import step
from .student import _vision_parameters

ADAPT_KEYS = ("step", "lr", "ce", "distill", "sparsity", "total", "keep_ratio", "keep_prob", "train_acc")


def _inputs(batch: dict):
    """The positional model inputs of a batch, and its ``image_index`` (None when every sample has its image)."""
    return (batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]), \
        {"image_index": batch["image_index"]} if "image_index" in batch else {}


def _teacher_logits(run, inputs, extra):
    """The frozen teacher's logits (no gradient), or None without distillation."""
    if run.cfg.distill_weight <= 0:
        return None
    with torch.no_grad():
        return run.teacher_vlm(*inputs, mode="none", **extra).logits


def _adapt_loss(run, i: int, target: float, w_s: float, batch: dict):
    """Phase 2's loss at its step ``i``: the deployment rule's mask (``eval_rule`` at ``target``), CE +
    distillation (+ the sparsity anchor when the pruner trains). Returns ``(loss, (output, loss parts))``."""
    cfg = run.cfg
    inputs, extra = _inputs(batch)
    with autocast(run.device, cfg.bf16):
        teacher_logits = _teacher_logits(run, inputs, extra)
        out = run.net(*inputs, mode=cfg.apply, ratio=target if cfg.eval_rule == "topk" else None, rule=cfg.eval_rule,
                      tau=1.0, **extra)
    try:
        loss, parts = run.loss_fn(out.logits, out.labels, out.keep_prob, keep_mask=out.visual_keep,
                                  teacher_logits=teacher_logits, sparsity_weight=w_s, target_ratio=target,
                                  binarize_weight=0.0)
    except FloatingPointError as err:
        raise FloatingPointError(f"train_pruner: non-finite loss at adaptation step {i}; lower adapt_lr or "
                                 f"disable bf16. {err}") from None
    return loss, (out, parts)


@torch.no_grad()
def _adapt_row(run, t: int, lr: float, out, parts) -> float:
    """Phase 2's log row at (global) step ``t``, averaged over the ranks; returns the training accuracy."""
    logits, answers = answer_logits(out.logits, out.labels)
    acc = (logits.argmax(-1) == answers).float().mean().item()
    row = dict(step=t, lr=lr, train_acc=acc,
               **{k: parts[k] for k in ("ce", "distill", "sparsity", "total", "keep_ratio", "keep_prob")})
    row.update(distributed.mean_over_ranks({k: row[k] for k in ADAPT_KEYS[2:]}))  # global batch's values
    for k in ADAPT_KEYS:
        run.history["adapt"][k].append(row[k])
    return acc


def _adapt_validate(run, t: int, train_pruner_too: bool) -> None:
    """Validate at (global) step ``t`` and keep the best state so far (a tie goes to the later state)."""
    run.validate(t, "adapt")  # accuracy() restores train mode afterwards:
    run.vlm.pruner.train(train_pruner_too)
    run.vlm.llava.model.vision_tower.eval()
    if run.history["val"][-1]["accuracy"] >= run.best["accuracy"]:
        run.best.update(step=t, accuracy=run.history["val"][-1]["accuracy"],
                        state={k: v.detach().clone() for k, v in run.vlm.state_dict().items()})


def _adapt_to_rule(run, start: int, warmup: int, first: int = 0) -> None:
    r"""Phase 2 (``cfg.adapt_steps`` > 0): the vision side and (unless ``cfg.adapt_pruner``) the pruner frozen,
    the language model trained on the deployment masks (``cfg.eval_rule`` at ``cfg.target_ratio``, or cycling
    through ``cfg.adapt_ratios``: block :math:`b` of the cycle is the list rotated by :math:`b`) with CE +
    distillation. Phase 1's optimizer continues (warm Adam moments; a fresh one gets a linear ``warmup``),
    learning rates ``adapt_lr`` (default ``lm_lr``) and ``pruner_lr`` on :func:`lr_factor`'s cosine over the
    phase. Steps are numbered from ``start``; a resumed run begins at step ``first`` of the phase. Logs
    ``history["adapt"]``; ends in the best validated state (``history["adapt_best"]``)."""
    cfg, vlm = run.cfg, run.vlm
    for p in _vision_parameters(vlm.llava):
        p.requires_grad_(False)
    pruner, train_pruner_too = vlm.pruner, cfg.adapt_pruner and cfg.eval_rule == "topk" and cfg.selector == "learned"
    pruner.train(train_pruner_too).requires_grad_(train_pruner_too)
    sampler, pruner.sampler = pruner.sampler, "topk"
    bases = [cfg.pruner_lr, cfg.lm_lr if cfg.adapt_lr is None else cfg.adapt_lr] + [0.0] * (len(run.opt.param_groups) - 2)
    w_s = cfg.sparsity_weight if train_pruner_too else 0.0
    run.history["adapt"] = run.history["adapt"] if first else {k: [] for k in ADAPT_KEYS}
    budgets = cfg.adapt_ratios or (cfg.target_ratio,)
    bar = progress(range(first, cfg.adapt_steps), desc=f"adapt @ {'/'.join(f'{r:g}' for r in budgets)}", leave=False,
                   disable=not distributed.is_main())
    for i in bar:
        if run.out_of_time():  # the time guard: stop before step i, validate the state reached, keep the best
            run.history["stopped_early"] = start + i
            if run.eval_every and i % run.eval_every:
                _adapt_validate(run, start + i, train_pruner_too)
            break
        target = budgets[(i + i // len(budgets)) % len(budgets)]  # block b of the cycle: rotated by b
        f = lr_factor(cfg, i, (i, cfg.adapt_steps), warmup)
        set_lr(run.opt, bases, f)  # frozen parameters get no gradient, so AdamW leaves them alone
        _, (out, parts) = step(run.opt, lambda batch: _adapt_loss(run, i, target, w_s, batch), next(run.batches),
                               cfg.grad_clip)
        if i % cfg.log_every == 0 or i == cfg.adapt_steps - 1:
            bar.set_postfix(acc=f"{_adapt_row(run, start + i, bases[1] * f, out, parts):.3f}")
        if run.eval_every and ((i + 1) % run.eval_every == 0 or i + 1 == cfg.adapt_steps):
            _adapt_validate(run, start + i + 1, train_pruner_too)
        run.save(start + i + 1)
    pruner.sampler = sampler
    if run.best["state"] is not None:
        vlm.load_state_dict(run.best["state"])
        run.history["adapt_best"] = {"step": run.best["step"], "accuracy": run.best["accuracy"]}
