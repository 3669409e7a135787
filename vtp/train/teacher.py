r"""The teacher: the unpruned small LLaVA trained on easy-VQA (or on any :class:`vtp.data.EncodedSplit`, e.g.
:func:`vtp.scenes.encode_scenes`).

Objective: cross-entropy on the answer token only,
:math:`\mathcal{L} = -\frac{1}{B}\sum_b \log p_\theta(a_b \mid \text{image}_b, \text{question}_b)`
(:func:`vtp.train.steps.answer_loss`). AdamW (weight decay on matrices only); the learning rate of
:func:`vtp.train.schedule.lr_factor` with progress :math:`p = \max(t/T, \text{elapsed}/\text{time budget})`
(training stops at :math:`p = 1`). Batches are grouped by image (several questions share one vision-tower
pass), images get label-preserving augmentation (horizontal flips, small shifts), bf16 autocast on GPU,
gradient clipping, and a guard stops with a clear message on a non-finite loss.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from .. import distributed
from ..data import VQAProcessor, build_processor, encode_split, iterate_image_batches, load_split
from ..evaluate import accuracy, autocast
from ..runtime import default_device, device_name, progress
from ..vlm import PrunedVLM, build_llava, count_parameters, num_visual_tokens, vlm_config
from .config import TrainConfig, teacher_config
from .schedule import lr_factor, set_lr
from .steps import answer_loss, step

__all__ = ["train_teacher"]


def _optimizer(model, cfg: TrainConfig):
    """AdamW with weight decay on the matrices (``dim >= 2``) only; fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + other)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=fused or None)


def _setup(cfg: TrainConfig, device, processor, val_data, train_data, model=None):
    """Device, processor, the model (``model``, or a fresh one), the training data and (rank 0, ``eval_every`` > 0)
    validation data."""
    if train_data is not None and (processor is None or (cfg.eval_every and val_data is None)):
        raise ValueError("train_data needs the processor that encoded it (and val_data when eval_every > 0)")
    device = torch.device(device) if device is not None else default_device()
    if distributed.is_distributed():
        device = distributed.local_device()
    mcfg = vlm_config(cfg.model, **cfg.model_overrides)
    n_tokens = (mcfg.image_size // mcfg.patch_size) ** 2
    if processor is None:
        processor = build_processor(n_tokens, mcfg.image_size)
    elif processor.num_image_tokens != n_tokens:
        raise ValueError(f"processor.num_image_tokens must be {n_tokens} for this model, got {processor.num_image_tokens}")
    if model is None:
        model = build_llava(mcfg, vocab_size=processor.vocab_size, image_token_id=processor.image_token_id,
                            pad_token_id=processor.pad_token_id, seed=cfg.seed)
    elif num_visual_tokens(model) != n_tokens:
        raise ValueError(f"model gives {num_visual_tokens(model)} visual tokens, cfg.model {n_tokens}")
    model = model.to(device)
    if train_data is None:
        train = load_split("train")
        if cfg.train_questions is not None and cfg.train_questions < len(train):
            train = train.subset(cfg.train_questions, seed=cfg.seed)
        data = encode_split(train, processor, device)
    else:
        data = train_data.to(device)
    if cfg.eval_every and val_data is None and distributed.is_main():  # rank 0 validates
        val_data = encode_split(load_split("val"), processor, device)
    return device, processor, model, data, val_data


def _batch_loss(net, device, cfg: TrainConfig, extra_loss=None):
    """``(loss of a batch, compiled)``: the answer CE of the unpruned model under autocast (plus
    ``extra_loss(batch, output)`` if given), compiled on CUDA when ``cfg.compile`` (the tiny model's step is
    bound by Python and kernel launches, which fusion cuts)."""
    def batch_loss(batch):
        with autocast(device, cfg.bf16):
            out = net(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="none",
                      image_index=batch["image_index"])
        loss = answer_loss(out.logits, batch["labels"])
        return loss if extra_loss is None else loss + extra_loss(batch, out)

    compiled = cfg.compile and device.type == "cuda"
    return (torch.compile(batch_loss) if compiled else batch_loss), compiled


def train_teacher(cfg: TrainConfig | str | None = None, device=None, processor: VQAProcessor | None = None,
                  val_data=None, train_data=None, model=None, extra_loss=None):
    """Train the unpruned teacher. Returns ``(llava, processor, history)``; ``history`` holds per-step ``lr``,
    ``loss`` every ``log_every`` steps (at ``step``), periodic ``val`` accuracies ``[(step, acc)]``,
    ``train_time_s``, ``device``, config. ``train_data`` (an :class:`vtp.data.EncodedSplit`, e.g.
    :func:`vtp.scenes.encode_scenes`) replaces easy-VQA's training questions; it needs the ``processor`` that
    encoded it, and ``val_data`` when ``eval_every`` > 0. ``model`` starts training from a given
    ``LlavaForConditionalGeneration`` (e.g. one whose vision tower was pretrained on dense patch labels,
    :func:`vtp.scenes.pretrain_vision`) instead of a fresh one of ``cfg.model``. ``extra_loss`` (an
    ``nn.Module``, e.g. :class:`vtp.scene_teacher.EvidenceLoss`) adds ``extra_loss(batch, output)`` to the loss
    and trains its own parameters with the model's. Under ``torchrun`` (:mod:`vtp.distributed`):
    ``DistributedDataParallel``, the global batch split over the ranks with each image's questions on one rank,
    the logged loss averaged over the ranks, validation on rank 0 (sent to all), and rank 0's clock deciding
    when a time budget ends."""
    cfg = teacher_config(cfg) if cfg is None or isinstance(cfg, str) else cfg
    distributed.setup()  # under torchrun: one process per device, each on its slice of the global batch
    distributed.check_batch(cfg.batch_size, group=cfg.questions_per_image)
    device, processor, model, data, val_data = _setup(cfg, device, processor, val_data, train_data, model)
    extra_loss = extra_loss.to(device).train() if extra_loss is not None else None
    opt = _optimizer(model if extra_loss is None else torch.nn.ModuleList([model, extra_loss]), cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history = {"step": [], "loss": [], "lr": [], "val": [], "device": device_name(device),
               "config": dataclasses.asdict(cfg), "parameters": count_parameters(model),
               "world_size": distributed.world_size()}
    batches = distributed.shard_batches(iterate_image_batches(data, processor, cfg.batch_size // cfg.questions_per_image,
                                                              cfg.questions_per_image, gen, cfg.augment))
    net = distributed.wrap(PrunedVLM(model))  # no pruner: the plain model, vision tower once per image; DDP under torchrun

    step_loss, history["compiled"] = _batch_loss(net, device, cfg, extra_loss)
    params = list(model.parameters()) + (list(extra_loss.parameters()) if extra_loss is not None else [])
    model.train()
    start = time.perf_counter()
    bar = progress(total=cfg.steps, desc="teacher", leave=False, disable=not distributed.is_main())
    t = 0
    while t < cfg.steps:
        elapsed = time.perf_counter() - start
        if cfg.time_budget_s:  # one clock, rank 0's, decides when every rank stops
            elapsed = distributed.broadcast_float(elapsed)
        frac = max(t / cfg.steps, elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0)
        if frac >= 1.0:
            break
        factor = lr_factor(cfg, t, frac)
        set_lr(opt, [cfg.lr] * len(opt.param_groups), factor)
        loss, _ = step(opt, lambda b: (step_loss(b), None), next(batches), cfg.grad_clip, params)
        if t % cfg.log_every == 0:  # .item() waits for the GPU: not every step
            _log_loss(history, t, loss, cfg.lr * factor)
        history["lr"].append(cfg.lr * factor)
        t += 1
        bar.update(1)
        if cfg.eval_every and t % cfg.eval_every == 0:
            acc = distributed.on_main(  # computed on rank 0, sent to all
                lambda: accuracy(model, val_data, processor, max_questions=cfg.eval_questions, bf16=cfg.bf16).accuracy)
            history["val"].append((t, acc))
            model.train()
    bar.close()
    history["steps_done"] = t
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history["train_time_s"] = time.perf_counter() - start
    return model.eval(), processor, history


def _log_loss(history: dict, t: int, loss: torch.Tensor, lr: float) -> None:
    """Log the global batch's loss at step ``t``; ``FloatingPointError`` if it is not finite."""
    value = distributed.mean_over_ranks(loss.detach()).item()
    if not math.isfinite(value):
        raise FloatingPointError(f"train_teacher: the loss is {value} at step {t} (lr {lr:.2e}); "
                                 "lower lr, raise warmup_steps or disable bf16")
    history["step"].append(t)
    history["loss"].append(value)

