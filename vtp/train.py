r"""Training loops and checkpoints: the teacher (the unpruned small LLaVA on easy-VQA) and the pruner
(:func:`train_pruner`, lesson 07's recipe in :func:`pruner_recipe`; resumable from a checkpoint file).

Teacher objective: cross-entropy on the answer token only,
:math:`\mathcal{L} = -\frac{1}{B}\sum_b \log p_\theta(a_b \mid \text{image}_b, \text{question}_b)`.
AdamW; learning rate with a linear warm-up over :math:`T_w` steps and a cosine decay over the run's progress
:math:`p \in [0, 1]`,

.. math::  \eta_t = \eta \cdot \min\!\big(1, \tfrac{t+1}{T_w}\big)
           \cdot \Big(r + (1 - r)\,\tfrac12\big(1 + \cos \pi p\big)\Big),
           \qquad p = \max\!\Big(\frac{t}{T}, \frac{\text{elapsed}}{\text{time budget}}\Big)

(:math:`r` = ``min_lr_ratio``; without a time budget :math:`p = t/T`; training stops at :math:`p = 1`).
Batches are grouped by image (several questions share one vision-tower pass), images get label-preserving
augmentation (horizontal flips, small shifts), bf16 autocast on GPU, gradient clipping, and a guard stops
with a clear message on a non-finite loss.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from .data import VQAProcessor, build_processor, encode_split, iterate_batches, iterate_image_batches, load_split
from .evaluate import accuracy, autocast
import torch.nn.functional as F
from . import distributed
from .runtime import default_device, device_name, progress, run_mode
from .vlm import PrunedVLM, build_llava, count_parameters, vlm_config
from .pretrained import PRETRAINED_DIR, file_sha256, load_pretrained_teacher

__all__ = ["TrainConfig", "TEACHER_PRESETS", "teacher_config", "lr_factor", "lr_lambda", "train_teacher", "save_teacher",
           "load_teacher", "load_or_train_teacher", "teacher_dir", "REPO_ROOT", "PrunerConfig", "PRUNER_PRESETS",
           "pruner_config", "pruner_recipe", "train_pruner"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def _check_schedule(cfg) -> None:
    """Shared checks of the training recipes: positive int ``steps`` and ``batch_size``, warm-up shorter
    than the run."""
    for name in ("steps", "batch_size"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(cfg, name)!r}")
    if isinstance(cfg.warmup_steps, bool) or not isinstance(cfg.warmup_steps, int) \
            or not (0 <= cfg.warmup_steps < cfg.steps):
        raise ValueError(f"warmup_steps must be an int in [0, steps={cfg.steps}), got {cfg.warmup_steps!r}")


def _check_number(cfg, name: str, low: float = 0.0, high: float = math.inf, open_low: bool = False) -> None:
    """``ValueError`` unless field ``name`` is a finite number in [low, high] ((low, high] if ``open_low``)."""
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (ok and (v > low if open_low else v >= low) and v <= high):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {v!r}")


def _check_int(cfg, name: str, low: int = 0, optional: bool = False) -> None:
    """``ValueError`` unless field ``name`` is an int >= ``low`` (or None when ``optional``)."""
    v = getattr(cfg, name)
    if not ((optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= low)):
        raise ValueError(f"{name} must be an int >= {low}{' or None' if optional else ''}, got {v!r}")


def _check_choice(cfg, name: str, allowed) -> None:
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(cfg, name)!r}")


def _check_flags(cfg, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")


def _check_common(cfg) -> None:
    """The fields both recipes share: schedule, optimiser, augmentation, evaluation and logging."""
    from .data import augment_images

    _check_schedule(cfg)
    _check_number(cfg, "min_lr_ratio", 0.0, 1.0)
    _check_number(cfg, "weight_decay")
    _check_number(cfg, "grad_clip", open_low=True)
    if not isinstance(cfg.augment, dict):
        raise ValueError(f"augment must be a dict of vtp.data.augment_images arguments, got {cfg.augment!r}")
    try:  # one 8x8 image: the function checks its own arguments
        augment_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.Generator().manual_seed(0), **cfg.augment)
    except (TypeError, ValueError) as e:
        raise ValueError(f"augment: {e}") from None
    _check_int(cfg, "train_questions", 1, optional=True)
    for name, low in (("eval_every", 0), ("eval_questions", 1), ("log_every", 1), ("seed", 0)):
        _check_int(cfg, name, low)
    _check_flags(cfg, "bf16")


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
    questions_per_image: int = 2
    time_budget_s: float | None = None
    seed: int = 0
    bf16: bool = True
    compile: bool = False  # torch.compile the loss on CUDA (optional; the presets run eager)

    def __post_init__(self):
        from .vlm import PRESETS as VLM_PRESETS, VLMConfig

        if not isinstance(self.model, VLMConfig) and self.model not in VLM_PRESETS:
            raise ValueError(f"model must be one of {tuple(VLM_PRESETS)} or a vtp.vlm.VLMConfig, got {self.model!r}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict of VLMConfig fields, got {self.model_overrides!r}")
        try:
            vlm_config(self.model, **self.model_overrides)
        except TypeError as e:
            raise ValueError(f"model_overrides: {e}") from None
        _check_common(self)
        _check_flags(self, "compile")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not isinstance(self.questions_per_image, int) or not (1 <= self.questions_per_image <= self.batch_size) \
                or self.batch_size % self.questions_per_image:
            raise ValueError(f"questions_per_image must divide batch_size={self.batch_size}, got {self.questions_per_image}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be None or > 0, got {self.time_budget_s}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


TEACHER_PRESETS = {
    # CPU-sized: a small model, 300 steps on 4,000 training questions (minutes on 2 cores, not seconds).
    "smoke": TrainConfig(),
    # One GPU, <= 5 minutes: cosine over a 240 s budget (or 12,000 steps), 256 images x 1 question per batch,
    # lr 5e-4. Recipe search (results/06_teacher_sweep.json, four runs sharing one H100, ~3,600 steps each):
    # lr 1e-3 reached 92-94% (shape questions 75-82%), lr 5e-4 with one question per image 99.8%.
    "full": TrainConfig(model="full", steps=12000, batch_size=256, lr=5e-4, warmup_steps=300, weight_decay=0.05,
                        augment={"hflip": 0.5, "max_shift": 2}, train_questions=None, eval_every=2000,
                        questions_per_image=1, time_budget_s=240.0),
}


def teacher_config(mode: str | None = None, **overrides) -> TrainConfig:
    """The teacher recipe for ``mode`` (``"smoke"``/``"full"``, default :func:`vtp.runtime.run_mode`)."""
    mode = mode or run_mode()
    if mode not in TEACHER_PRESETS:
        raise ValueError(f"mode must be one of {tuple(TEACHER_PRESETS)}, got {mode!r}")
    return dataclasses.replace(TEACHER_PRESETS[mode], **overrides)


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Multiplier of the base learning rate: linear warm-up over ``warmup_steps``, times a cosine from 1 to
    ``min_lr_ratio`` over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = min(1.0, max(0.0, progress))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def lr_lambda(cfg):
    """Step-based multiplier (for ``LambdaLR``): linear warm-up, then cosine to ``cfg.min_lr_ratio`` at
    ``cfg.steps`` (:func:`lr_factor` with progress ``step / steps``)."""
    return lambda step: lr_factor(cfg, step, step / cfg.steps)


def _optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + other)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=fused or None)


def _answer_loss(logits, labels):
    """Mean CE over answer tokens (as :func:`vtp.losses.answer_ce`, without its host-side label check,
    which would wait for the GPU every step)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _batches_forever(data, processor, cfg, generator):
    """Endless shuffled question batches of ``cfg.batch_size`` with ``cfg.augment``."""
    while True:
        yield from iterate_batches(data, processor, cfg.batch_size, shuffle=True, generator=generator,
                                   augment=cfg.augment, drop_last=True)


def train_teacher(cfg: TrainConfig | str | None = None, device=None, processor: VQAProcessor | None = None,
                  val_data=None, train_data=None):
    """Train the unpruned teacher. Returns ``(llava, processor, history)``; ``history`` holds per-step
    ``lr``, ``loss`` every ``log_every`` steps (at ``step``), periodic ``val`` accuracies ``[(step, acc)]``, ``train_time_s``, ``device``, config.
    ``train_data`` (an :class:`vtp.data.EncodedSplit`, e.g. :func:`vtp.scenes.encode_scenes`) replaces easy-VQA's
    training questions; it needs the ``processor`` that encoded it, and ``val_data`` when ``eval_every`` > 0.
    Under ``torchrun`` (:mod:`vtp.distributed`): ``DistributedDataParallel``, the global batch split over the
    ranks with each image's questions on one rank, the logged loss averaged over the ranks, validation on
    rank 0 (sent to all), and rank 0's clock deciding when a time budget ends."""
    cfg = teacher_config(cfg) if cfg is None or isinstance(cfg, str) else cfg
    distributed.setup()  # under torchrun: one process per device, each on its slice of the global batch
    distributed.check_batch(cfg.batch_size, group=cfg.questions_per_image)
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
    model = build_llava(mcfg, vocab_size=processor.vocab_size, image_token_id=processor.image_token_id,
                        pad_token_id=processor.pad_token_id, seed=cfg.seed).to(device)
    if train_data is None:
        train = load_split("train")
        if cfg.train_questions is not None and cfg.train_questions < len(train):
            train = train.subset(cfg.train_questions, seed=cfg.seed)
        data = encode_split(train, processor, device)
    else:
        data = train_data.to(device)
    if cfg.eval_every and val_data is None and distributed.is_main():  # rank 0 validates
        val_data = encode_split(load_split("val"), processor, device)
    opt = _optimizer(model, cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history = {"step": [], "loss": [], "lr": [], "val": [], "device": device_name(device),
               "config": dataclasses.asdict(cfg), "parameters": count_parameters(model)}
    history["world_size"] = distributed.world_size()
    batches = distributed.shard_batches(iterate_image_batches(data, processor, cfg.batch_size // cfg.questions_per_image,
                                                              cfg.questions_per_image, gen, cfg.augment))
    vlm = PrunedVLM(model)  # no pruner: the plain model, vision tower once per image
    net = distributed.wrap(vlm)  # DistributedDataParallel under torchrun: gradients averaged over the ranks

    def batch_loss(batch):
        with autocast(device, cfg.bf16):
            logits = net(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="none",
                         image_index=batch["image_index"]).logits
        return _answer_loss(logits, batch["labels"])

    # Compiled (CUDA only): the tiny model's step is bound by Python and kernel launches, which fusion cuts.
    compiled = cfg.compile and device.type == "cuda"
    step_loss = torch.compile(batch_loss) if compiled else batch_loss
    history["compiled"] = compiled
    model.train()
    start = time.perf_counter()
    bar = progress(total=cfg.steps, desc="teacher", leave=False, disable=not distributed.is_main())
    step = 0
    while step < cfg.steps:
        elapsed = time.perf_counter() - start
        if cfg.time_budget_s:  # one clock, rank 0's, decides when every rank stops
            elapsed = distributed.broadcast_float(elapsed)
        frac = max(step / cfg.steps, elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0)
        if frac >= 1.0:
            break
        lr = cfg.lr * lr_factor(cfg, step, frac)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        loss = step_loss(batch)
        if step % cfg.log_every == 0:  # .item() waits for the GPU: not every step
            value = distributed.mean_over_ranks(loss.detach()).item()  # the global batch's loss
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"train_teacher: the loss is {value} at step {step} (lr {lr:.2e}); "
                    "lower lr, raise warmup_steps or disable bf16")
            history["step"].append(step)
            history["loss"].append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history["lr"].append(lr)
        step += 1
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0:
            acc = distributed.on_main(  # computed on rank 0, sent to all
                lambda: accuracy(model, val_data, processor, max_questions=cfg.eval_questions, bf16=cfg.bf16).accuracy)
            history["val"].append((step, acc))
            model.train()
    bar.close()
    history["steps_done"] = step
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
    info["sha256"] = file_sha256(directory / "model.safetensors")  # the weights' identity, for results files
    return model, VQAProcessor.from_pretrained(directory), info


def load_or_train_teacher(mode: str | None = None, device=None, retrain: bool = False):
    """The teacher of ``mode``: loaded from :func:`teacher_dir` if saved there (your own run), else, in full
    mode, the teacher shipped in ``pretrained/`` (:func:`vtp.pretrained.load_pretrained_teacher`, checksum
    verified), else trained now (recipe :func:`teacher_config`) and saved there. Returns
    ``(llava, processor, info)``; ``info["sha256"]`` identifies the weights."""
    mode = mode or run_mode()
    if not retrain and (teacher_dir(mode) / "config.json").exists():
        return load_teacher(teacher_dir(mode), device)
    if not retrain and mode == "full" and (PRETRAINED_DIR / "MANIFEST.json").exists():
        return load_pretrained_teacher(device)
    model, processor, history = train_teacher(teacher_config(mode), device)
    info = {k: history[k] for k in ("device", "train_time_s", "parameters", "config", "val")}
    # Save beside the target, then rename: a process that loads concurrently (notebooks run in parallel
    # in the test suite) never sees a half-written checkpoint; if another process saved first, keep theirs.
    target = teacher_dir(mode)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    save_teacher(model, processor, tmp, info)
    info["sha256"] = file_sha256(tmp / "model.safetensors")
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, processor, info


# ----------------------------------------------------------------------------------------------------------
# Pruner training (lesson 07): frozen teacher, student = teacher copy + GumbelVisionPruner.
# ----------------------------------------------------------------------------------------------------------
import copy  # noqa: E402

from .gumbel import check_tau  # noqa: E402
from .losses import SPARSITY_KINDS, SPARSITY_ON, DualAscentController, PruningLoss, visual_keep_ratio  # noqa: E402
from .losses import LOSS_FORMS  # noqa: E402
from .pruner import SAMPLERS, GumbelVisionPruner, check_ratio  # noqa: E402
from .schedules import SCHEDULES, get_temperature, sparsity_weight_schedule, target_ratio_schedule  # noqa: E402
from .vlm import PrunedVLM, answer_logits  # noqa: E402
from .controls import SELECTORS, FrozenSelector  # noqa: E402


@dataclass
class PrunerConfig:
    r"""Pruner training recipe (the correct one by default; lesson 08 flips single fields).

    Per step :math:`t` of :math:`T`: :math:`\tau_t` = :func:`vtp.get_temperature` (``max_temp`` -> ``min_temp``,
    ``temp_schedule``), sparsity weight :math:`w_s(t)` = :func:`vtp.sparsity_weight_schedule` (0 for the first
    ``sparsity_warmup`` of training), target :math:`\rho_t` = :func:`vtp.target_ratio_schedule` (``ratio_start``
    -> ``target_ratio`` over ``curriculum_frac``). Loss = :class:`vtp.PruningLoss`. The pruner learns at
    ``pruner_lr``, the language model at ``lm_lr`` (lower); the vision tower and projector learn at
    ``vision_lr`` (0 = frozen, the presets: with the question-aware pruner, training them lowered accuracy
    with real removal at 4/64 on the GPU, see ``PRUNER_PRESETS``).

    ``binarize_weight`` :math:`w_b` adds :math:`w_b(t)\,\overline{p(1-p)}`, ramped linearly from 0 at the end of
    the ratio curriculum to :math:`w_b` at the last step: it pushes the keep probabilities to 0/1 once the keep
    ratio is in place, so that the training masks (Bernoulli(:math:`p`) draws) approach the deterministic top-k
    of inference.

    ``controller_lr`` > 0 adds the Lagrangian term :math:`\lambda_t(\bar p - \rho_t)` of a
    :class:`vtp.DualAscentController` (dual step ``controller_lr``, once the sparsity weight is on). The
    fixed-weight MSE alone settles where its pull balances the task's: above small targets (measured on
    GPU: 0.13-0.15 for a target of 4/64), so the full preset adds the controller (dual step 1.0 on the GPU
    run; lesson 07 uses 0.3 with 300 steps at keep ratios >= 0.25, where 1.0 oscillated in a CPU trial).
    ``pruner_norm`` = LayerNorm before the scorer, ``question_aware`` = the scorer also reads the pooled question
    embedding (:meth:`vtp.PrunedVLM.question_embedding`; see :class:`vtp.GumbelVisionPruner`).

    ``adapt_steps`` > 0 adds a second phase, **adaptation to the deployment rule**: the pruner is frozen and
    the language model trains ``adapt_steps`` more steps (CE + distillation, no sparsity term; learning rate
    ``adapt_lr``, default ``lm_lr``, cosine to ``min_lr_ratio``) on the masks inference will apply, the
    deterministic ``eval_rule`` at ``target_ratio``. Phase 1's Bernoulli(:math:`p`) masks mix a few low-:math:`p`
    tokens into every sample; top-k never keeps those, so the language model meets at inference a mask law
    it never trained on (lesson 07 measures the gap). The frozen pruner cannot saturate in phase 2.
    ``adapt_pruner=True`` trains the pruner in phase 2 as well (at ``pruner_lr``, same cosine), through the
    deployment rule itself: hard top-k forward, gradient of :func:`vtp.pruner.topk_straight_through`'s
    scale-free surrogate, and the sparsity term (weight ``sparsity_weight``, target ``target_ratio``) as an
    anchor for the level of the keep probabilities, which top-k ignores.
    ``adapt_ratios`` (non-empty) trains phase 2 on several top-k budgets instead of ``target_ratio`` alone,
    each block of :math:`n` = ``len(adapt_ratios)`` steps visiting every budget once (block :math:`b` is the
    list rotated by :math:`b`, so that the steps logged every ``log_every`` see every budget too), as mask
    and anchor target: ONE model serves every budget, its ranking good at each cut; validations stay at
    ``target_ratio``. With validations (``eval_every`` > 0), phase 2 ends in the state of its best one
    (``phase`` "adapt"), not its last: model selection on the validation split, never the test split (one GPU
    run's phase 2 fell from 99.85% to 99.05% validation accuracy over its last 200 steps).

    Variants: ``sampler`` (see :class:`vtp.GumbelVisionPruner`), ``apply`` = ``"policy"`` (attention masking)
    or ``"zero"`` (``tokens * mask``), ``sparsity_scope`` = ``"visual"`` or ``"all"`` (text tokens counted as
    kept), ``distill_weight`` = 0 (no teacher), ``eval_rule`` = ``"topk"`` or ``"threshold"``, ``loss_form`` =
    ``"vtp"`` or ``"seed"`` (the seed document's distillation over every position and batch-level keep ratio,
    :class:`vtp.PruningLoss`'s ``form``; lesson 08 trains the seed recipe).

    ``selector`` = ``"learned"`` (the method) or an **adapted control** (DESIGN 1c; lesson 07), which trains
    the language model exactly as the learned run does (same phases and steps, learning rates, schedules,
    loss on the answer: CE + distillation, data order, teacher, seed, budgets, validations and best-state
    selection) behind a FROZEN selection, :class:`vtp.controls.FrozenSelector` in the pruner's slot:
    ``"untrained"`` (the scorer of the same seed at its random initialisation, i.e. the learned pruner's step
    0, never updated), ``"fastv"`` (the frozen teacher's FastV-style attention scores) or ``"random"``
    (uniform scores, a fresh draw per batch). A control never trains its selection: no pruner gradient, no
    sparsity, binarization or controller term (they act on the selection only). In phase 1, where the learned
    pruner samples Gumbel masks whose keep ratio follows the curriculum :math:`\rho_t`, the control's
    language model sees its selector's top-k mask at :math:`\rho_t`; in phase 2 both see top-k at the cycled
    budgets, and evaluation applies the same selection at the requested ratio. Controls need
    ``vision_lr`` = 0 (frozen visual tokens, so the selection stays fixed) and ``eval_rule`` = ``"topk"``.
    """

    target_ratio: float = 0.25
    steps: int = 60
    batch_size: int = 64
    pruner_lr: float = 2e-3
    lm_lr: float = 2e-4
    vision_lr: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_temp: float = 5.0
    min_temp: float = 0.1
    temp_schedule: str = "exponential"
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    sparsity_weight: float = 2.0
    sparsity: str = "ratio"
    sparsity_on: str = "prob"
    sparsity_scope: str = "visual"
    sparsity_warmup: float = 0.1
    binarize_weight: float = 0.0
    ratio_start: float = 0.5
    curriculum_frac: float = 0.3
    keep_bias: float = 0.0
    controller_lr: float = 0.0
    pruner_norm: bool = True
    question_aware: bool = True
    adapt_steps: int = 0
    adapt_lr: float | None = None
    adapt_pruner: bool = False
    adapt_ratios: tuple = ()
    sampler: str = "gumbel"
    apply: str = "policy"
    eval_rule: str = "topk"
    loss_form: str = "vtp"
    selector: str = "learned"
    augment: dict = field(default_factory=lambda: {"hflip": 0.5, "max_shift": 0})
    train_questions: int | None = 4000
    eval_every: int = 0
    eval_questions: int = 1000
    log_every: int = 5
    seed: int = 0
    bf16: bool = True

    def __post_init__(self):
        check_ratio(self.target_ratio, "target_ratio")
        check_ratio(self.ratio_start, "ratio_start")
        _check_common(self)
        _check_choice(self, "temp_schedule", SCHEDULES)
        get_temperature(0, self.steps, self.max_temp, self.min_temp, self.temp_schedule)  # checks both temperatures
        check_tau(self.distill_temperature, "distill_temperature")
        for name in ("distill_weight", "sparsity_weight", "binarize_weight", "controller_lr"):
            _check_number(self, name)
        for name in ("sparsity_warmup", "curriculum_frac"):
            _check_number(self, name, 0.0, 1.0)
        _check_number(self, "keep_bias", -math.inf)
        _check_choice(self, "sparsity", SPARSITY_KINDS)
        _check_choice(self, "sparsity_on", SPARSITY_ON)
        _check_choice(self, "sampler", SAMPLERS)
        _check_flags(self, "pruner_norm", "question_aware", "adapt_pruner")
        if self.apply not in ("policy", "zero"):
            raise ValueError(f"apply must be 'policy' or 'zero', got {self.apply!r}")
        if self.sparsity_scope not in ("visual", "all"):
            raise ValueError(f"sparsity_scope must be 'visual' or 'all', got {self.sparsity_scope!r}")
        if self.eval_rule not in ("topk", "threshold"):
            raise ValueError(f"eval_rule must be 'topk' or 'threshold', got {self.eval_rule!r}")
        for name in ("pruner_lr", "lm_lr", "vision_lr"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not isinstance(self.adapt_steps, int) or self.adapt_steps < 0:
            raise ValueError(f"adapt_steps must be an int >= 0, got {self.adapt_steps!r}")
        if self.adapt_lr is not None and not (self.adapt_lr > 0 and math.isfinite(self.adapt_lr)):
            raise ValueError(f"adapt_lr must be None or a finite number > 0, got {self.adapt_lr}")
        self.adapt_ratios = tuple(check_ratio(r, "adapt_ratios") for r in self.adapt_ratios)
        if self.adapt_ratios and self.eval_rule != "topk":
            raise ValueError(f"adapt_ratios needs eval_rule='topk' (a budget per step), got {self.eval_rule!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        _check_choice(self, "selector", ("learned",) + SELECTORS)
        if self.selector != "learned" and (self.vision_lr != 0 or self.eval_rule != "topk"):
            raise ValueError(f"selector={self.selector!r} (a frozen control) needs vision_lr=0 and eval_rule='topk', "
                             f"got vision_lr={self.vision_lr}, eval_rule={self.eval_rule!r}")


PRUNER_PRESETS = {
    "smoke": PrunerConfig(eval_every=30, eval_questions=500),
    # One H100: ~35 s per run. Measured at 4/64 on the 99.9% teacher (single runs, 800 steps, test split, top-k):
    # question-blind 88.6% (colour questions 50%); question-aware 95.4% (colour 86%), 97.2% with the
    # binarization term; question-aware with the vision side also learning (vision_lr 2e-4): 90.0% and 92.9%
    # (two seeds). At 2/64 a dual step of 0.3 left the keep ratio at 0.059 after 800 steps, 1.0 reached 0.040.
    "full": PrunerConfig(steps=800, batch_size=128, warmup_steps=20, controller_lr=1.0, binarize_weight=1.0,
                         train_questions=None, eval_every=400, eval_questions=2000, log_every=10,
                         augment={"hflip": 0.5, "max_shift": 2}),
}


def pruner_config(mode: str | None = None, **overrides) -> PrunerConfig:
    """The pruner recipe for ``mode`` (``"smoke"``/``"full"``, default :func:`vtp.runtime.run_mode`)."""
    mode = mode or run_mode()
    if mode not in PRUNER_PRESETS:
        raise ValueError(f"mode must be one of {tuple(PRUNER_PRESETS)}, got {mode!r}")
    return dataclasses.replace(PRUNER_PRESETS[mode], **overrides)


def pruner_recipe(ratio: float, seed: int = 0, mode: str | None = None, **overrides) -> PrunerConfig:
    """Lesson 07's recipe for keep ratio ``ratio`` (what the notebook and ``vtp-train pruner`` run): the preset of
    ``mode`` plus phase 2 with the pruner trained through top-k (``adapt_pruner``). Full run: 500 phase-1 steps
    and 350 adaptation steps; 700 adaptation steps strictly between 4/64 and 0.25 (at 7/64, from a 4/64 phase 1:
    99.18% test accuracy after 350, 99.73% after 700, H100, one seed); at ratios >= 0.25, 300 phase-1 steps, dual
    step 0.3, no binarization (with binarization one 0.25 run ended at keep 0.221) and 150 adaptation steps.
    Smoke run: 20 adaptation steps.

    ``adapt_ratios`` (several budgets; lesson 07 passes its five ratios, with ``ratio`` = 4/64) makes phase 2
    cycle through them so that one model serves every budget: in the full run 1200 adaptation steps, validated
    every 100 (phase 2 keeps its best validated state). Measured on the full test split: lesson 07's H100 run
    (1200 steps, three seeds, teacher 99.83%) 99.79-99.81% mean accuracy at each of 2/64, 4/64, 7/64, 0.25 and
    0.5, worst seed 99.75%; an earlier one with 800 steps (teacher 99.87%) 99.57-99.77%, worst seed 99.20%,
    with validation still rising at step 800; a first trial (seed 1, last state) 99.86-99.88% after 1000 steps
    and 99.88-99.90% after 1750. A phase 2 at 0.25 alone (150-700 steps) reached 99.39-99.61% there, below the
    one model at every question type. ``overrides`` last."""
    mode = mode or run_mode()
    ratio = check_ratio(ratio)
    recipe = dict(target_ratio=ratio, seed=seed, adapt_pruner=True, adapt_steps=20)
    if mode == "full":
        recipe.update(steps=500, adapt_steps=700 if 1 / 16 < ratio < 0.25 else 350)
        if ratio >= 0.25:
            recipe.update(steps=300, adapt_steps=150, controller_lr=0.3, binarize_weight=0.0, eval_every=150)
        if overrides.get("adapt_ratios"):
            recipe.update(adapt_steps=1200, eval_every=100)
    return pruner_config(mode, **{**recipe, **overrides})


def _vision_parameters(llava):
    """Vision tower + multimodal projector parameters of a LLaVA."""
    return list(llava.model.vision_tower.parameters()) + list(llava.model.multi_modal_projector.parameters())


def _set_trainable(llava, cfg: PrunerConfig):
    """Language model and head trainable; vision tower and projector only if ``cfg.vision_lr`` > 0."""
    for p in llava.parameters():
        p.requires_grad_(False)
    trainable = list(llava.model.language_model.parameters()) + list(llava.lm_head.parameters())
    for p in trainable + (_vision_parameters(llava) if cfg.vision_lr > 0 else []):
        p.requires_grad_(True)


def _student(teacher, cfg: PrunerConfig):
    student = copy.deepcopy(teacher).train()
    _set_trainable(student, cfg)
    hidden = student.config.text_config.hidden_size
    pruner = GumbelVisionPruner(hidden, rule=cfg.eval_rule, ratio=cfg.target_ratio, keep_bias=cfg.keep_bias,
                                sampler=cfg.sampler, norm=cfg.pruner_norm, text_dim=hidden if cfg.question_aware else None)
    if cfg.selector != "learned":  # an adapted control: a frozen selection in the pruner's slot
        pruner = FrozenSelector(cfg.selector, cfg.target_ratio, scorer=pruner if cfg.selector == "untrained" else None,
                                reference=PrunedVLM(teacher) if cfg.selector == "fastv" else None, seed=cfg.seed)
    return PrunedVLM(student, pruner.to(next(student.parameters()).device))


def _continue(student: PrunedVLM, cfg: PrunerConfig) -> PrunedVLM:
    """A trainable copy of a trained student for phase 2 at ``cfg.target_ratio`` (trainable as in :func:`_student`)."""
    vlm = copy.deepcopy(student).train()
    vlm.pruner.ratio = cfg.target_ratio
    _set_trainable(vlm.llava, cfg)
    return vlm


def _sparsity_inputs(out, cfg: PrunerConfig, attention_mask):
    """keep_prob / keep_mask / visual_mask for PruningLoss: visual tokens only, or (the bug) the whole
    sequence with text tokens counted as kept."""
    if cfg.sparsity_scope == "visual":
        return out.keep_prob, out.visual_keep, None
    ones = torch.ones(out.visual_mask.shape, device=out.keep_prob.device)
    prob = ones.masked_scatter(out.visual_mask, out.keep_prob)
    mask = ones.masked_scatter(out.visual_mask, out.visual_keep)
    return prob, mask, attention_mask.bool()


def train_pruner(teacher, processor: VQAProcessor, cfg: PrunerConfig | str | None = None, device=None,
                 val_data=None, callback=None, student: PrunedVLM | None = None, checkpoint=None,
                 checkpoint_every: int = 100):
    """Train a :class:`vtp.GumbelVisionPruner` (and fine-tune the language model) against a frozen teacher.

    Returns ``(student PrunedVLM in eval mode, history)``. ``history`` is a dict of lists logged every
    ``log_every`` steps (``step``, ``tau``, ``sparsity_weight``, ``target``, every loss component, ``keep_ratio``
    = training hard-mask keep ratio, ``keep_prob``, ``saturated`` = fraction of visual keep probabilities
    outside [0.01, 0.99], ``train_acc`` = accuracy under the training mask, what the run's own graph shows,
    ``mask_binary`` = whether the training mask was exactly 0/1) and ``val`` = list of dicts with real-removal
    validation accuracy and inference keep ratio (``phase`` "gumbel" or "adapt", ``rule``; with phase 2, phase 1
    ends with one more validation with ``rule="sample"``, the training masks' law), plus ``adapt`` (phase 2's
    log), ``train_time_s``, ``device``, ``config``.
    ``callback(step, history)`` is called after each validation.

    ``student`` (a trained :class:`PrunedVLM`, e.g. phase 1 of a run at another ratio) skips phase 1: a copy of
    it goes through phase 2 only (``cfg.adapt_steps`` > 0) at ``cfg.target_ratio``, with a fresh optimizer
    warmed up over ``warmup_steps``, after validating it at step 0 (``phase`` "gumbel", both rules); ``student``
    itself is left unchanged. One phase-1 model can so serve several ratios.

    ``checkpoint`` (a file path) makes the run resumable: every ``checkpoint_every`` steps (both phases
    counted) and at the end it saves the student, optimizer, schedule, controller, history, random-number
    states and the step; if the file exists when the run starts, the run continues from it (same ``cfg``
    required) and ends as the uninterrupted run would have (bit for bit on the CPU; a GPU's nondeterministic
    kernels make two uninterrupted runs differ too). A finished run's checkpoint returns its result.

    Under ``torchrun`` (:mod:`vtp.distributed`): the student is wrapped in ``DistributedDataParallel`` on this
    rank's device; ``cfg.batch_size`` is the global batch, which every rank draws (with its Gumbel noise) and
    slices; schedules follow the global step; the keep ratio fed to the controller and the logged values are
    averaged over the ranks; rank 0 validates (the result goes to every rank, so all keep the same best state),
    writes the checkpoint and shows progress. N ranks so train what one process trains on the whole batch, up to
    the order of floating-point sums, as long as every loss term is a mean over samples (``loss_form="seed"``'s
    batch-level keep ratio is not: each rank then penalises its own shard's).
    """
    cfg = pruner_config(cfg) if cfg is None or isinstance(cfg, str) else cfg
    if student is not None and not cfg.adapt_steps:
        raise ValueError("student is given, so only phase 2 runs: cfg.adapt_steps must be > 0, got 0")
    if student is not None and getattr(student.pruner, "kind", "learned") != cfg.selector:
        raise ValueError(f"cfg.selector must match the student's selection "
                         f"({getattr(student.pruner, 'kind', 'learned')!r}), got {cfg.selector!r}")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    distributed.setup()  # under torchrun: one process per device, each on its slice of the global batch
    distributed.check_batch(cfg.batch_size)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    if distributed.is_distributed():
        device = distributed.local_device()
    torch.manual_seed(cfg.seed)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_vlm = PrunedVLM(teacher)
    vlm = (_student(teacher, cfg) if student is None else _continue(student, cfg)).to(device)
    phase1 = cfg.steps if student is None else 0
    loss_fn = PruningLoss(cfg.target_ratio, cfg.distill_weight, cfg.sparsity_weight, cfg.distill_temperature,
                          cfg.sparsity, cfg.sparsity_on, form=cfg.loss_form)
    controller = DualAscentController(cfg.target_ratio, cfg.controller_lr) if cfg.controller_lr > 0 else None
    train = load_split("train")
    if cfg.train_questions is not None and cfg.train_questions < len(train):
        train = train.subset(cfg.train_questions, seed=cfg.seed)
    data = encode_split(train, processor, device)
    if cfg.eval_every and val_data is None and distributed.is_main():  # rank 0 validates
        val_data = encode_split(load_split("val"), processor, device)
    vision = {id(p) for p in _vision_parameters(vlm.llava)}
    groups = [{"params": list(vlm.pruner.parameters()), "lr": cfg.pruner_lr},
              {"params": [p for p in vlm.llava.parameters() if p.requires_grad and id(p) not in vision], "lr": cfg.lm_lr}]
    if cfg.vision_lr > 0:
        groups.append({"params": _vision_parameters(vlm.llava), "lr": cfg.vision_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    keys = ("step", "tau", "sparsity_weight", "target", "ce", "distill", "sparsity", "binarize", "total",
            "keep_ratio", "keep_prob", "saturated", "train_acc", "mask_binary", "multiplier")
    history = {k: [] for k in keys}
    history.update(val=[], device=device_name(device), config=dataclasses.asdict(cfg))
    batches = distributed.shard_batches(_batches_forever(data, processor, cfg, gen))  # global batch, this rank's rows
    best = dict(step=None, accuracy=-1.0, state=None)  # phase 2's best validation so far (model selection)
    run = dict(vlm=vlm, opt=opt, sched=sched, controller=controller, best=best)
    total, done, elapsed = phase1 + cfg.adapt_steps, 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        done, elapsed, history = _resume(checkpoint, cfg, device, batches, **run)

    def save(step_done):
        if checkpoint is not None and distributed.is_main() and (step_done % checkpoint_every == 0 or step_done == total):
            _save_run(checkpoint, cfg, device, step_done, elapsed + time.perf_counter() - start, history, **run)

    def validate(step, phase, rule=cfg.eval_rule):
        def run():
            res = accuracy(vlm, val_data, processor, ratio=cfg.target_ratio if rule == "topk" else None,
                           rule=rule, max_questions=cfg.eval_questions, bf16=cfg.bf16)
            return dict(step=step, phase=phase, rule=rule, accuracy=res.accuracy, keep_ratio=res.keep_ratio)
        history["val"].append(distributed.on_main(run))  # rank 0 validates, every rank gets the result
        if callback is not None and distributed.is_main():
            callback(step, history)

    net = distributed.wrap(vlm)  # DistributedDataParallel under torchrun: gradients averaged over the ranks
    vlm.train()
    vlm.llava.model.vision_tower.eval()
    start = time.perf_counter()
    bar = progress(range(min(done, phase1), phase1), desc=f"pruner @ {cfg.target_ratio:g}", leave=False,
                   disable=not distributed.is_main())
    for step in bar:
        batch = next(batches)
        tau = get_temperature(step, cfg.steps, cfg.max_temp, cfg.min_temp, cfg.temp_schedule)
        w_s = sparsity_weight_schedule(step, cfg.steps, cfg.sparsity_weight, cfg.sparsity_warmup)
        target = target_ratio_schedule(step, cfg.steps, cfg.target_ratio, cfg.ratio_start, cfg.curriculum_frac)
        w_b = sparsity_weight_schedule(step, cfg.steps, cfg.binarize_weight, cfg.curriculum_frac, 1 - cfg.curriculum_frac)
        # a control: its frozen selection's top-k at the curriculum's ratio, no term acting on the selection
        select = {} if cfg.selector == "learned" else dict(ratio=target, rule="topk")
        w_s, w_b = (w_s, w_b) if cfg.selector == "learned" else (0.0, 0.0)
        inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
        with autocast(device, cfg.bf16):
            teacher_logits = None
            if cfg.distill_weight > 0:
                with torch.no_grad():
                    teacher_logits = teacher_vlm(*inputs, mode="none").logits
            with distributed.global_noise(cfg.batch_size):  # Gumbel noise of the global batch, this rank's rows
                out = net(*inputs, mode=cfg.apply, tau=tau, **select)
        prob, mask, vmask = _sparsity_inputs(out, cfg, batch["attention_mask"])
        try:
            loss, parts = loss_fn(out.logits, out.labels, prob, keep_mask=mask, visual_mask=vmask,
                                  teacher_logits=teacher_logits, sparsity_weight=w_s, target_ratio=target,
                                  binarize_weight=w_b)
        except FloatingPointError as err:
            raise FloatingPointError(f"train_pruner: non-finite loss at step {step} (tau {tau:.3g}); keep tau >= 0.1, "
                                     f"lower the learning rates or disable bf16. {err}") from None
        if controller is not None and w_s > 0:
            controller.target_ratio = target
            kept = visual_keep_ratio(mask if cfg.sparsity_on == "mask" else prob, vmask)
            loss = loss + controller.penalty(kept)
            controller.update(distributed.mean_over_ranks(visual_keep_ratio(mask.detach(), vmask)))  # global batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            with torch.no_grad():
                logits, answers = answer_logits(out.logits, out.labels)
                p = out.keep_prob.float()
                vk = out.visual_keep
                row = dict(step=step, tau=tau, sparsity_weight=w_s, target=target,
                           keep_ratio=vk.float().mean().item(),
                           saturated=((p < 0.01) | (p > 0.99)).float().mean().item(),
                           train_acc=(logits.argmax(-1) == answers).float().mean().item(),
                           mask_binary=bool(((vk == 0) | (vk == 1)).all()),
                           multiplier=controller.multiplier if controller is not None else 0.0)
                row.update({k: parts[k] for k in ("ce", "distill", "sparsity", "binarize", "total", "keep_prob")})
                shared = ("step", "tau", "sparsity_weight", "target", "multiplier")  # the same on every rank
                row.update(distributed.mean_over_ranks({k: row[k] for k in keys if k not in shared}))  # global batch
            for k in keys:
                history[k].append(row[k])
            bar.set_postfix(keep=f"{row['keep_ratio']:.3f}", acc=f"{row['train_acc']:.3f}")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            validate(step + 1, "gumbel")
        save(step + 1)
    if cfg.eval_every and cfg.adapt_steps and done <= phase1:  # before phase 2 (and the training masks' law)
        if not phase1:
            validate(0, "gumbel")
        torch.manual_seed(cfg.seed)
        if cfg.selector == "learned":  # a control has no keep probabilities to sample from
            validate(phase1, "gumbel", "sample")
    if cfg.adapt_steps:
        _adapt_to_rule(vlm, teacher_vlm, loss_fn, opt, batches, cfg, history, validate, start=phase1,
                       warmup=0 if phase1 else cfg.warmup_steps, first=max(0, done - phase1), save=save, best=best,
                       net=net)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history["train_time_s"] = elapsed + time.perf_counter() - start
    return vlm.eval(), history


def _save_run(path, cfg: PrunerConfig, device, done: int, elapsed: float, history, vlm, opt, sched, controller,
              best):
    """Everything :func:`train_pruner` needs to continue after ``done`` steps, in one file."""
    torch.save(dict(done=done, elapsed=elapsed, history=history, vlm=vlm.state_dict(), opt=opt.state_dict(), best=best,
                    sched=sched.state_dict(), multiplier=controller.multiplier if controller is not None else None,
                    rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    config=dataclasses.asdict(cfg)), path)


def _resume(path, cfg: PrunerConfig, device, batches, vlm, opt, sched, controller, best):
    """Load a :func:`_save_run` file into the run's objects, replay the batches it had drawn (shuffling and
    augmentation then continue as in the uninterrupted run), restore the random-number states; returns
    ``(done, elapsed, history)``."""
    state = torch.load(path, map_location=device, weights_only=False)
    if state["config"] != dataclasses.asdict(cfg):
        raise ValueError(f"checkpoint {path} was written by a run with another config; delete it or pass that config")
    vlm.load_state_dict(state["vlm"])
    best.update(state["best"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    if controller is not None:
        controller.multiplier = state["multiplier"]
    for _ in range(state["done"]):
        next(batches)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["done"], state["elapsed"], state["history"]


def _adapt_to_rule(vlm, teacher_vlm, loss_fn, opt, batches, cfg: PrunerConfig, history, validate, start: int,
                   warmup: int, best: dict, first: int = 0, save=None, net=None):
    r"""Phase 2 of :func:`train_pruner` (``cfg.adapt_steps`` > 0): the vision side and (unless
    ``cfg.adapt_pruner``) the pruner frozen, the language model trained on the deployment masks
    (``cfg.eval_rule`` at ``cfg.target_ratio``, or cycling through ``cfg.adapt_ratios``, applied as
    ``cfg.apply``) with CE + distillation. It reuses
    phase 1's optimizer (warm Adam moments; a fresh one gets a linear ``warmup``); learning rates ``adapt_lr``
    (default ``lm_lr``) and ``pruner_lr`` on a cosine to ``min_lr_ratio``. Steps are numbered from ``start``;
    a resumed run begins at step ``first`` of the phase. Logs ``history["adapt"]``; ``save(steps done)`` after
    each step. ``best`` (a dict: step, accuracy, state) tracks the best validation; the phase ends in that
    state, recorded in ``history["adapt_best"]``. ``net`` = ``vlm`` as wrapped for data-parallel training
    (:func:`vtp.distributed.wrap`; frozen parameters then simply get no gradient), default ``vlm``."""
    net = vlm if net is None else net
    for p in _vision_parameters(vlm.llava):
        p.requires_grad_(False)
    pruner, train_pruner_too = vlm.pruner, cfg.adapt_pruner and cfg.eval_rule == "topk" and cfg.selector == "learned"
    pruner.train(train_pruner_too).requires_grad_(train_pruner_too)
    sampler, pruner.sampler = pruner.sampler, "topk"
    bases = [cfg.pruner_lr, cfg.lm_lr if cfg.adapt_lr is None else cfg.adapt_lr] + [0.0] * (len(opt.param_groups) - 2)
    w_s = cfg.sparsity_weight if train_pruner_too else 0.0
    keys = ("step", "lr", "ce", "distill", "sparsity", "total", "keep_ratio", "keep_prob", "train_acc")
    log = history["adapt"] = history["adapt"] if first else {k: [] for k in keys}
    budgets = cfg.adapt_ratios or (cfg.target_ratio,)
    bar = progress(range(first, cfg.adapt_steps), desc=f"adapt @ {'/'.join(f'{r:g}' for r in budgets)}", leave=False,
                   disable=not distributed.is_main())
    for i in bar:
        target = budgets[(i + i // len(budgets)) % len(budgets)]  # block b of the cycle: rotated by b
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * i / cfg.adapt_steps))
        f *= min(1.0, (i + 1) / warmup) if warmup else 1.0
        for group, base in zip(opt.param_groups, bases):
            group["lr"] = base * f  # frozen parameters get no gradient, so AdamW leaves them alone
        batch = next(batches)
        inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
        with autocast(next(vlm.parameters()).device, cfg.bf16):
            with torch.no_grad():
                teacher_logits = teacher_vlm(*inputs, mode="none").logits if cfg.distill_weight > 0 else None
            out = net(*inputs, mode=cfg.apply, ratio=target if cfg.eval_rule == "topk" else None, rule=cfg.eval_rule,
                      tau=1.0)
        try:
            loss, parts = loss_fn(out.logits, out.labels, out.keep_prob, keep_mask=out.visual_keep,
                                  teacher_logits=teacher_logits, sparsity_weight=w_s, target_ratio=target,
                                  binarize_weight=0.0)
        except FloatingPointError as err:
            raise FloatingPointError(f"train_pruner: non-finite loss at adaptation step {i}; lower adapt_lr or "
                                     f"disable bf16. {err}") from None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        if i % cfg.log_every == 0 or i == cfg.adapt_steps - 1:
            with torch.no_grad():
                logits, answers = answer_logits(out.logits, out.labels)
                acc = (logits.argmax(-1) == answers).float().mean().item()
            row = dict(step=start + i, lr=bases[1] * f, train_acc=acc,
                       **{k: parts[k] for k in ("ce", "distill", "sparsity", "total", "keep_ratio", "keep_prob")})
            row.update(distributed.mean_over_ranks({k: row[k] for k in keys[2:]}))  # global batch's values
            for k in keys:
                log[k].append(row[k])
            bar.set_postfix(acc=f"{acc:.3f}")
        if cfg.eval_every and ((i + 1) % cfg.eval_every == 0 or i + 1 == cfg.adapt_steps):
            validate(start + i + 1, "adapt")  # accuracy() restores train mode afterwards:
            pruner.train(train_pruner_too)
            vlm.llava.model.vision_tower.eval()
            if history["val"][-1]["accuracy"] >= best["accuracy"]:  # a tie goes to the later state
                best.update(step=start + i + 1, accuracy=history["val"][-1]["accuracy"],
                            state={k: v.detach().clone() for k, v in vlm.state_dict().items()})
        if save is not None:
            save(start + i + 1)
    pruner.sampler = sampler
    if best["state"] is not None:
        vlm.load_state_dict(best["state"])
        history["adapt_best"] = {"step": best["step"], "accuracy": best["accuracy"]}


def main(argv=None):
    """The ``vtp-train`` command (:func:`vtp.cli.main`; ``vtp-train teacher --help``, ``vtp-train pruner --help``)."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    main()
