r"""Training loops and checkpoints. For now: the teacher (the unpruned small LLaVA on easy-VQA).

Teacher objective: cross-entropy on the answer token only,
:math:`\mathcal{L} = -\frac{1}{B}\sum_b \log p_\theta(a_b \mid \text{image}_b, \text{question}_b)`.
AdamW, learning rate with linear warm-up then cosine decay,

.. math::  \eta_t = \eta \cdot \begin{cases} t / T_w & t < T_w \\
           r + (1 - r)\,\tfrac12\big(1 + \cos(\pi \tfrac{t - T_w}{T - T_w})\big) & t \ge T_w \end{cases}

(:math:`r` = ``min_lr_ratio``), gradient clipping, bf16 autocast on GPU, label-preserving augmentation
(horizontal flips, small shifts), and a guard that stops with a clear message on a non-finite loss.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from .data import VQAProcessor, build_processor, encode_split, iterate_batches, load_split
from .evaluate import accuracy, autocast
from .losses import answer_ce
from .runtime import default_device, device_name, progress, run_mode
from .vlm import build_llava, count_parameters, vlm_config

__all__ = ["TrainConfig", "TEACHER_PRESETS", "teacher_config", "lr_lambda", "train_teacher", "save_teacher",
           "load_teacher", "load_or_train_teacher", "teacher_dir", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TrainConfig:
    """Teacher training recipe. ``model`` = a :data:`vtp.vlm.PRESETS` name, ``model_overrides`` its fields;
    ``train_questions`` limits the training set (smoke runs); ``augment`` = arguments of
    :func:`vtp.data.augment_images`."""

    model: str = "smoke"
    model_overrides: dict = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    augment: dict = field(default_factory=lambda: {"hflip": 0.5, "max_shift": 0})
    train_questions: int | None = 4000
    eval_every: int = 0
    log_every: int = 10
    eval_questions: int = 2000
    seed: int = 0
    bf16: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not (0 <= self.warmup_steps < self.steps):
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


TEACHER_PRESETS = {
    "smoke": TrainConfig(),
    "full": TrainConfig(model="full", steps=5000, batch_size=256, lr=1e-3, warmup_steps=250, weight_decay=0.05,
                        augment={"hflip": 0.5, "max_shift": 2}, train_questions=None, eval_every=1000),
}


def teacher_config(mode: str | None = None, **overrides) -> TrainConfig:
    """The teacher recipe for ``mode`` (``"smoke"``/``"full"``, default :func:`vtp.runtime.run_mode`)."""
    mode = mode or run_mode()
    if mode not in TEACHER_PRESETS:
        raise ValueError(f"mode must be one of {tuple(TEACHER_PRESETS)}, got {mode!r}")
    return dataclasses.replace(TEACHER_PRESETS[mode], **overrides)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the base learning rate at each step: linear warm-up, then cosine to ``min_lr_ratio``."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _batches_forever(data, processor, cfg, generator):
    while True:
        yield from iterate_batches(data, processor, cfg.batch_size, shuffle=True, generator=generator,
                                   augment=cfg.augment, drop_last=True)


def train_teacher(cfg: TrainConfig | str | None = None, device=None, processor: VQAProcessor | None = None,
                  val_data=None):
    """Train the unpruned teacher. Returns ``(llava, processor, history)``; ``history`` holds per-step
    ``lr``, ``loss`` every ``log_every`` steps (at ``step``), periodic ``val`` accuracies ``[(step, acc)]``, ``train_time_s``, ``device``, config."""
    cfg = teacher_config(cfg) if cfg is None or isinstance(cfg, str) else cfg
    device = torch.device(device) if device is not None else default_device()
    mcfg = vlm_config(cfg.model, **cfg.model_overrides)
    n_tokens = (mcfg.image_size // mcfg.patch_size) ** 2
    if processor is None:
        processor = build_processor(n_tokens, mcfg.image_size)
    elif processor.num_image_tokens != n_tokens:
        raise ValueError(f"processor.num_image_tokens must be {n_tokens} for this model, got {processor.num_image_tokens}")
    model = build_llava(mcfg, vocab_size=processor.vocab_size, image_token_id=processor.image_token_id,
                        pad_token_id=processor.pad_token_id, seed=cfg.seed).to(device)
    train = load_split("train")
    if cfg.train_questions is not None and cfg.train_questions < len(train):
        train = train.subset(cfg.train_questions, seed=cfg.seed)
    data = encode_split(train, processor, device)
    if cfg.eval_every and val_data is None:
        val_data = encode_split(load_split("val"), processor, device)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    history = {"step": [], "loss": [], "lr": [], "val": [], "device": device_name(device), "config": dataclasses.asdict(cfg),
               "parameters": count_parameters(model)}
    batches = _batches_forever(data, processor, cfg, gen)
    model.train()
    start = time.perf_counter()
    bar = progress(range(cfg.steps), desc="teacher", leave=False)
    for step in bar:
        batch = next(batches)
        with autocast(device, cfg.bf16):
            logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"]).logits
        loss = answer_ce(logits, batch["labels"])
        if step % cfg.log_every == 0 or step == cfg.steps - 1:  # .item() waits for the GPU: not every step
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"train_teacher: the loss is {value} at step {step} (lr {sched.get_last_lr()[0]:.2e}); "
                    "lower lr, raise warmup_steps or disable bf16")
            history["step"].append(step)
            history["loss"].append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        history["lr"].append(sched.get_last_lr()[0])
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            acc = accuracy(model, val_data, processor, max_questions=cfg.eval_questions, bf16=cfg.bf16).accuracy
            history["val"].append((step + 1, acc))
            bar.set_postfix(val=f"{acc:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history["train_time_s"] = time.perf_counter() - start
    model.eval()
    return model, processor, history


def teacher_dir(mode: str | None = None) -> Path:
    """Where the teacher of ``mode`` is saved: ``checkpoints/teacher_<mode>`` in the repository (git-ignored:
    the checkpoint is not committed; whoever lacks it trains it, a few minutes on one GPU)."""
    mode = mode or run_mode()
    return REPO_ROOT / "checkpoints" / f"teacher_{mode}"


@contextlib.contextmanager
def _quiet_hub():
    """No transformers progress bars (weights loading / writing) while saving or loading checkpoints."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_teacher(model, processor: VQAProcessor, directory, info: dict | None = None, dtype=torch.bfloat16) -> Path:
    """Save weights (safetensors, in ``dtype``), config, processor and ``info`` (JSON) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with _quiet_hub():
        model.save_pretrained(directory, state_dict=state)
    processor.save_pretrained(directory)
    (directory / "train_info.json").write_text(json.dumps(info or {}, indent=2, default=str))
    return directory


def load_teacher(directory, device=None):
    """Load a saved teacher: ``(llava in float32 eval mode, processor, info)``."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"no teacher checkpoint in {directory}")
    device = torch.device(device) if device is not None else default_device()
    with _quiet_hub():
        model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    model.config._attn_implementation = "sdpa"
    info_path = directory / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return model, VQAProcessor.from_pretrained(directory), info


def load_or_train_teacher(mode: str | None = None, device=None, retrain: bool = False):
    """The teacher of ``mode``: loaded from :func:`teacher_dir` if saved there, else trained now (recipe
    :func:`teacher_config`) and saved there. Returns ``(llava, processor, info)``."""
    mode = mode or run_mode()
    if not retrain and (teacher_dir(mode) / "config.json").exists():
        return load_teacher(teacher_dir(mode), device)
    model, processor, history = train_teacher(teacher_config(mode), device)
    info = {k: history[k] for k in ("device", "train_time_s", "parameters", "config", "val")}
    save_teacher(model, processor, teacher_dir(mode), info)
    return model, processor, info


def main(argv=None):
    """``vtp-train teacher [--mode smoke|full] [--out DIR]``: train and save a teacher, print test accuracy."""
    p = argparse.ArgumentParser(prog="vtp-train")
    p.add_argument("what", choices=["teacher"])
    p.add_argument("--mode", choices=list(TEACHER_PRESETS), default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, processor, history = train_teacher(teacher_config(args.mode))
    res = accuracy(model, load_split("test"), processor)
    print(json.dumps({"test_accuracy": res.accuracy, "per_type": res.per_type, "device": history["device"],
                      "train_time_s": history["train_time_s"], "parameters": history["parameters"]}, indent=2))
    out = args.out or teacher_dir(args.mode)
    save_teacher(model, processor, out, {k: history[k] for k in ("device", "train_time_s", "parameters", "config")})
