r"""Pruner training (lesson 07): a frozen teacher, a student = a copy of the teacher + a
:class:`vtp.GumbelVisionPruner` between its projector and its language model, trained on any iterable of batches
(:mod:`vtp.train.batches`; easy-VQA by default).

Phase 1, per step :math:`t` of :math:`T`: a Gumbel keep mask at temperature :math:`\tau_t`
(:func:`vtp.get_temperature`) acts on the language model as an attention policy (masking = removal), and

.. math::  \mathcal{L} = \mathrm{CE}_{\text{answer}} + w_d\,T_d^2\,\mathrm{KL}(p_{\text{teacher}} \,\|\, p_{\text{student}})
           + w_s(t)\,\big(\bar p_{\text{visual}} - \rho_t\big)^2 \;[+\ w_b(t)\,\overline{p(1-p)}]
           \;[+\ \lambda_t(\bar p - \rho_t)]

(:class:`vtp.PruningLoss`; the bracketed terms are the binarization ramp and the dual-ascent controller).
Phase 2 (``adapt_steps`` > 0): the masks of deployment (top-k at the target, or cycling through
``adapt_ratios``), CE + distillation, the pruner frozen or trained through top-k (``adapt_pruner``). Every
step is :func:`vtp.train.steps.step`; every learning rate is :func:`vtp.train.schedule.lr_factor`.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..data import VQAProcessor, encode_split, load_split
from ..evaluate import accuracy, autocast
from ..losses import DualAscentController, PruningLoss, visual_keep_ratio
from ..runtime import device_name, progress
from ..schedules import get_temperature, sparsity_weight_schedule, target_ratio_schedule
from ..vlm import PrunedVLM, answer_logits
from .batches import easy_vqa_batches, training_batches
from .adapt import _adapt_to_rule, _inputs, _teacher_logits
from .checkpoint import resume_run, save_run
from .config import PrunerConfig, pruner_config
from .schedule import lr_factor, set_lr
from .steps import step
from .student import _continue, _student, _vision_parameters

__all__ = ["train_pruner"]

PHASE1_KEYS = ("step", "tau", "sparsity_weight", "target", "ce", "distill", "sparsity", "binarize", "total",
               "keep_ratio", "keep_prob", "saturated", "train_acc", "mask_binary", "multiplier")



def _sparsity_inputs(out, cfg: PrunerConfig, attention_mask):
    """keep_prob / keep_mask / visual_mask for PruningLoss: visual tokens only, or (the bug) the whole
    sequence with text tokens counted as kept."""
    if cfg.sparsity_scope == "visual":
        return out.keep_prob, out.visual_keep, None
    ones = torch.ones(out.visual_mask.shape, device=out.keep_prob.device)
    prob = ones.masked_scatter(out.visual_mask, out.keep_prob)
    mask = ones.masked_scatter(out.visual_mask, out.visual_keep)
    return prob, mask, attention_mask.bool()


def _phase1_bases(cfg: PrunerConfig) -> list:
    """Phase 1's base learning rates, one per optimizer group: pruner, language model (and vision side)."""
    return [cfg.pruner_lr, cfg.lm_lr] + ([cfg.vision_lr] if cfg.vision_lr > 0 else [])


def _optimizer(vlm: PrunedVLM, cfg: PrunerConfig):
    """AdamW with groups [pruner, language model, (vision tower + projector when ``vision_lr`` > 0)]."""
    vision = {id(p) for p in _vision_parameters(vlm.llava)}
    params = [list(vlm.pruner.parameters()),
              [p for p in vlm.llava.parameters() if p.requires_grad and id(p) not in vision],
              _vision_parameters(vlm.llava)]
    groups = [{"params": ps, "lr": lr} for ps, lr in zip(params, _phase1_bases(cfg))]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


@dataclass
class _Run:
    """What the two phases share: models, optimizer, loss, data stream, log, best state and the hooks."""

    cfg: PrunerConfig
    device: torch.device
    vlm: PrunedVLM
    net: torch.nn.Module  # vlm, or (under torchrun) vlm wrapped in DistributedDataParallel
    teacher_vlm: PrunedVLM
    loss_fn: PruningLoss
    opt: torch.optim.Optimizer
    controller: DualAscentController | None
    batches: object
    history: dict
    best: dict
    eval_every: int  # cfg.eval_every, or 0 when there is nothing to validate on
    validate: object = None
    save: object = None
    out_of_time: object = lambda: False  # cfg.time_budget_s's guard: True once the run's training time reaches it


def _phase1_schedule(cfg: PrunerConfig, t: int) -> dict:
    """tau_t, w_s(t), rho_t, w_b(t) at phase-1 step ``t`` (a control: no term acting on its selection)."""
    s = dict(tau=get_temperature(t, cfg.steps, cfg.max_temp, cfg.min_temp, cfg.temp_schedule),
             w_s=sparsity_weight_schedule(t, cfg.steps, cfg.sparsity_weight, cfg.sparsity_warmup),
             target=target_ratio_schedule(t, cfg.steps, cfg.target_ratio, cfg.ratio_start, cfg.curriculum_frac),
             w_b=sparsity_weight_schedule(t, cfg.steps, cfg.binarize_weight, cfg.curriculum_frac, 1 - cfg.curriculum_frac))
    if cfg.selector != "learned":
        s.update(w_s=0.0, w_b=0.0)
    return s


def _phase1_loss(run: _Run, t: int, s: dict, batch: dict):
    """Phase 1's loss at step ``t``: the student under a sampled mask (a control: its top-k at rho_t),
    :class:`vtp.PruningLoss` against the teacher, plus the controller's Lagrangian term. Returns
    ``(loss, (output, loss parts))``."""
    cfg = run.cfg
    select = {} if cfg.selector == "learned" else dict(ratio=s["target"], rule="topk")
    inputs, extra = _inputs(batch)
    with autocast(run.device, cfg.bf16):
        teacher_logits = _teacher_logits(run, inputs, extra)
        with distributed.global_noise(cfg.batch_size):  # Gumbel noise of the global batch, this rank's rows
            out = run.net(*inputs, mode=cfg.apply, tau=s["tau"], **select, **extra)
    prob, mask, vmask = _sparsity_inputs(out, cfg, batch["attention_mask"])
    try:
        loss, parts = run.loss_fn(out.logits, out.labels, prob, keep_mask=mask, visual_mask=vmask,
                                  teacher_logits=teacher_logits, sparsity_weight=s["w_s"], target_ratio=s["target"],
                                  binarize_weight=s["w_b"])
    except FloatingPointError as err:
        raise FloatingPointError(f"train_pruner: non-finite loss at step {t} (tau {s['tau']:.3g}); keep tau >= 0.1, "
                                 f"lower the learning rates or disable bf16. {err}") from None
    controller = run.controller
    if controller is not None and s["w_s"] > 0:
        controller.target_ratio = s["target"]
        kept = visual_keep_ratio(mask if cfg.sparsity_on == "mask" else prob, vmask)
        loss = loss + controller.penalty(kept)
        controller.update(distributed.mean_over_ranks(visual_keep_ratio(mask.detach(), vmask)))  # global batch
    return loss, (out, parts)


@torch.no_grad()
def _phase1_row(run: _Run, t: int, s: dict, out, parts) -> dict:
    """Phase 1's log row at step ``t`` (averaged over the ranks), appended to ``run.history``."""
    logits, answers = answer_logits(out.logits, out.labels)
    p, vk = out.keep_prob.float(), out.visual_keep
    row = dict(step=t, tau=s["tau"], sparsity_weight=s["w_s"], target=s["target"],
               keep_ratio=vk.float().mean().item(),
               saturated=((p < 0.01) | (p > 0.99)).float().mean().item(),
               train_acc=(logits.argmax(-1) == answers).float().mean().item(),
               mask_binary=bool(((vk == 0) | (vk == 1)).all()),
               multiplier=run.controller.multiplier if run.controller is not None else 0.0)
    row.update({k: parts[k] for k in ("ce", "distill", "sparsity", "binarize", "total", "keep_prob")})
    shared = ("step", "tau", "sparsity_weight", "target", "multiplier")  # the same on every rank
    row.update(distributed.mean_over_ranks({k: row[k] for k in PHASE1_KEYS if k not in shared}))  # global batch
    for k in PHASE1_KEYS:
        run.history[k].append(row[k])
    return row


def _phase1(run: _Run, first: int, last: int) -> None:
    """Phase 1, steps ``first`` .. ``last`` - 1: Gumbel masks, the pruner and the language model learning."""
    cfg = run.cfg
    bases = _phase1_bases(cfg)
    bar = progress(range(first, last), desc=f"pruner @ {cfg.target_ratio:g}", leave=False,
                   disable=not distributed.is_main())
    for t in bar:
        s = _phase1_schedule(cfg, t)
        set_lr(run.opt, bases, lr_factor(cfg, t, t / cfg.steps))
        _, (out, parts) = step(run.opt, lambda batch: _phase1_loss(run, t, s, batch), next(run.batches),
                               cfg.grad_clip)
        if t % cfg.log_every == 0 or t == cfg.steps - 1:
            row = _phase1_row(run, t, s, out, parts)
            bar.set_postfix(keep=f"{row['keep_ratio']:.3f}", acc=f"{row['train_acc']:.3f}")
        if run.eval_every and ((t + 1) % run.eval_every == 0 or t + 1 == cfg.steps):
            run.validate(t + 1, "gumbel")
        run.save(t + 1)


def _validate(run: _Run, val_data, processor, callback, t: int, phase: str, rule: str | None = None) -> None:
    """Validate with real removal (``rule``, default ``cfg.eval_rule``; top-k at ``cfg.target_ratio``) on rank 0,
    append the result to ``history["val"]`` on every rank, then call ``callback(t, history)`` on rank 0."""
    cfg = run.cfg
    rule = rule or cfg.eval_rule

    def measure():
        res = accuracy(run.vlm, val_data, processor, ratio=cfg.target_ratio if rule == "topk" else None,
                       rule=rule, max_questions=cfg.eval_questions, bf16=cfg.bf16, batch_size=cfg.eval_batch_size)
        return dict(step=t, phase=phase, rule=rule, accuracy=res.accuracy, keep_ratio=res.keep_ratio)
    run.history["val"].append(distributed.on_main(measure))  # rank 0 validates, every rank gets the result
    if callback is not None and distributed.is_main():
        callback(t, run.history)


def _between_phases(vlm: PrunedVLM, device: torch.device, fn) -> None:
    """``fn(vlm)``, then the random-number state and each module's train/eval mode as they were before."""
    modes = [(m, m.training) for m in vlm.modules()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        fn(vlm)
    for m, training in modes:
        m.training = training


def _check_args(cfg: PrunerConfig, processor, student, checkpoint_every, batches, val_data, phase1_end) -> None:
    """Argument checks before any work."""
    if processor is None and (batches is None or val_data is not None):
        raise ValueError("processor is needed to load easy-VQA (batches=None) and to validate on val_data")
    if student is not None and not cfg.adapt_steps:
        raise ValueError("student is given, so only phase 2 runs: cfg.adapt_steps must be > 0, got 0")
    if student is not None and getattr(student.pruner, "kind", "learned") != cfg.selector:
        raise ValueError(f"cfg.selector must match the student's selection "
                         f"({getattr(student.pruner, 'kind', 'learned')!r}), got {cfg.selector!r}")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if phase1_end is not None and not (callable(phase1_end) and cfg.adapt_steps and student is None):
        raise ValueError("phase1_end must be a callable, and needs phase 1 and a phase 2 (no student, "
                         f"cfg.adapt_steps > 0), got {phase1_end!r}, adapt_steps={cfg.adapt_steps}")


def _build_run(teacher, processor, cfg: PrunerConfig, device, val_data, student, batches):
    """Teacher (frozen), student, loss, controller, data stream, optimizer and log of a run; returns
    ``(run, val_data)`` (easy-VQA's validation split on rank 0 when no batches are given and none is passed)."""
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    if distributed.is_distributed():
        device = distributed.local_device()
    torch.manual_seed(cfg.seed)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vlm = (_student(teacher, cfg) if student is None else _continue(student, cfg)).to(device)
    loss_fn = PruningLoss(cfg.target_ratio, cfg.distill_weight, cfg.sparsity_weight, cfg.distill_temperature,
                          cfg.sparsity, cfg.sparsity_on, form=cfg.loss_form)
    controller = DualAscentController(cfg.target_ratio, cfg.controller_lr) if cfg.controller_lr > 0 else None
    validates = bool(cfg.eval_every) and (batches is None or val_data is not None)
    if batches is None:  # the default dataset adapter: easy-VQA
        batches = easy_vqa_batches(processor, cfg, device)
        if cfg.eval_every and val_data is None and distributed.is_main():  # rank 0 validates
            val_data = encode_split(load_split("val"), processor, device)
    history = {k: [] for k in PHASE1_KEYS}
    history.update(val=[], device=device_name(device), config=dataclasses.asdict(cfg))
    run = _Run(cfg, device, vlm, vlm, PrunedVLM(teacher), loss_fn, _optimizer(vlm, cfg), controller,
               distributed.shard_batches(training_batches(batches, device)),  # global batch, this rank's rows
               history, dict(step=None, accuracy=-1.0, state=None), cfg.eval_every if validates else 0)
    return run, val_data


def _end_of_phase1(run, cfg: PrunerConfig, phase1: int, phase1_end) -> float:
    """Between the phases: the ``phase1_end`` hook (rank 0) and, with validations and a phase 2, phase 1's last
    validations (before the training masks' law changes). Returns the hook's seconds."""
    hook_s = 0.0
    if phase1_end is not None and distributed.is_main():
        hook_start = time.perf_counter()
        _between_phases(run.vlm, run.device, phase1_end)
        hook_s = time.perf_counter() - hook_start
    if run.eval_every and cfg.adapt_steps:
        if not phase1:
            run.validate(0, "gumbel")
        torch.manual_seed(cfg.seed)
        if cfg.selector == "learned":  # a control has no keep probabilities to sample from
            run.validate(phase1, "gumbel", "sample")
    return hook_s


def train_pruner(teacher, processor: VQAProcessor | None = None, cfg: PrunerConfig | str | None = None, device=None,
                 val_data=None, callback=None, student: PrunedVLM | None = None, checkpoint=None,
                 checkpoint_every: int = 100, batches=None, phase1_end=None):
    """Train a :class:`vtp.GumbelVisionPruner` (and fine-tune the language model) against the frozen ``teacher``
    (any ``LlavaForConditionalGeneration``). Returns ``(student PrunedVLM in eval mode, history)``.

    ``batches``: any iterable of batch dicts (:mod:`vtp.train.batches`: ``input_ids``, ``pixel_values``,
    ``attention_mask``, ``labels`` with -100 outside the answer, optionally ``image_index``), one per step,
    ``cfg.batch_size`` samples each; default: easy-VQA's training questions (:func:`easy_vqa_batches`,
    ``processor`` the easy-VQA one). ``val_data`` (a :class:`vtp.data.EncodedSplit`, with ``processor``) turns
    on the validations every ``cfg.eval_every`` steps (real removal; with the default data, easy-VQA's
    validation split when not given); without it, custom batches train without validation.

    ``history``: lists logged every ``log_every`` steps (``step``, ``tau``, ``sparsity_weight``, ``target``, every
    loss component, ``keep_ratio`` = the training mask's, ``keep_prob``, ``saturated`` = share of keep
    probabilities outside [0.01, 0.99], ``train_acc``, ``mask_binary``), ``val`` (dicts: step, ``phase`` "gumbel"
    or "adapt", ``rule``, accuracy, keep ratio; with phase 2, phase 1 ends with a ``rule="sample"`` one),
    ``adapt`` (phase 2's log), ``train_time_s``, ``device``, ``config``, ``stopped_early`` (the step at which
    ``cfg.time_budget_s`` stopped phase 2, ``None`` when every step ran). ``callback(step, history)`` follows each
    validation. ``student`` (a trained :class:`PrunedVLM`) skips phase 1: a copy of it goes through phase 2 only,
    with a fresh optimizer warmed up over ``warmup_steps``. ``checkpoint`` (a file) makes the run resumable
    (saved every ``checkpoint_every`` steps and at the end; an existing file is continued, same ``cfg``
    required, ending as the uninterrupted run would, bit for bit on the CPU). Under ``torchrun``: DDP, every
    rank draws the global batch (and its Gumbel noise) and slices it; rank 0 validates and saves.
    ``phase1_end(student)`` (a callable, with phase 2 only) is called on rank 0 when phase 1 ends, before phase 2:
    the student is then in the state that a run of ``cfg`` with ``adapt_steps=0`` ends in (phase 1 depends on
    nothing of phase 2), e.g. to test it (lesson 08); the random-number state and every module's train/eval mode
    are restored after the call, so phase 2 runs as it would without it.
    """
    cfg = pruner_config(cfg) if cfg is None or isinstance(cfg, str) else cfg
    _check_args(cfg, processor, student, checkpoint_every, batches, val_data, phase1_end)
    distributed.setup()  # under torchrun: one process per device, each on its slice of the global batch
    distributed.check_batch(cfg.batch_size)
    run, val_data = _build_run(teacher, processor, cfg, device, val_data, student, batches)
    phase1 = cfg.steps if student is None else 0  # a trained student goes through phase 2 only
    total, done, elapsed = phase1 + cfg.adapt_steps, 0, 0.0
    state = dict(vlm=run.vlm, opt=run.opt, controller=run.controller, best=run.best)
    if checkpoint is not None and Path(checkpoint).exists():
        done, elapsed, run.history = resume_run(checkpoint, cfg, run.device, run.batches, **state)

    def save(step_done):
        if checkpoint is not None and distributed.is_main() and (step_done % checkpoint_every == 0 or step_done == total):
            save_run(checkpoint, cfg, run.device, step_done, elapsed + time.perf_counter() - start, run.history, **state)

    run.save, run.validate = save, functools.partial(_validate, run, val_data, processor, callback)
    if cfg.time_budget_s is not None:  # training time so far (`start` moves past the phase1_end hook); rank 0's clock
        run.out_of_time = lambda: distributed.broadcast_float(elapsed + time.perf_counter() - start) >= cfg.time_budget_s
    run.history.setdefault("stopped_early", None)
    run.net = distributed.wrap(run.vlm)  # DistributedDataParallel under torchrun: gradients averaged over the ranks
    run.vlm.train().llava.model.vision_tower.eval()  # the tower stays frozen, in eval mode
    start = time.perf_counter()
    _phase1(run, min(done, phase1), phase1)
    if done <= phase1:
        start += _end_of_phase1(run, cfg, phase1, phase1_end)  # the hook's time is not training time
    if cfg.adapt_steps:
        _adapt_to_rule(run, start=phase1, warmup=0 if phase1 else cfg.warmup_steps, first=max(0, done - phase1))
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    run.history["train_time_s"] = elapsed + time.perf_counter() - start
    return run.vlm.eval(), run.history
