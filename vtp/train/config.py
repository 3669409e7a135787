r"""Training recipes as data: :class:`TrainConfig` (the teacher) and :class:`PrunerConfig` (a pruner), their
validation (every field checked when the object is built, a ``ValueError`` naming the field), and the presets
(``"smoke"``: CPU-sized; ``"full"``: one GPU). Configs are flat dataclasses, so ``dataclasses.asdict(cfg)``
round-trips through :func:`pruner_config` (``pruner_config(mode, **asdict(cfg))``), which sweeps and notebooks
rely on. Measured results of these recipes live in ``results/`` (``06_small_vlm.json``,
``06_teacher_sweep.json``, ``07_train_pruner.json``, ``08_why_accuracy_drops.json``), not here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..gumbel import check_tau
from ..losses import LOSS_FORMS, SPARSITY_KINDS, SPARSITY_ON
from ..pruner import SAMPLERS, check_ratio
from ..runtime import run_mode
from ..schedules import SCHEDULES, get_temperature
from ..vlm import vlm_config
from ..controls import SELECTORS

__all__ = ["TrainConfig", "TEACHER_PRESETS", "teacher_config", "PrunerConfig", "PRUNER_PRESETS", "pruner_config",
           "pruner_recipe", "ABLATION_FIELDS"]

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
    from ..data import augment_images

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
        from ..vlm import PRESETS as VLM_PRESETS, VLMConfig

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
    # lr 5e-4 (the recipe search: results/06_teacher_sweep.json; the run: results/06_small_vlm.json).
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


@dataclass
class PrunerConfig:
    r"""Pruner training recipe (the correct one by default; lesson 08 flips single fields).

    Per step :math:`t` of :math:`T`: :math:`\tau_t` = :func:`vtp.get_temperature` (``max_temp`` -> ``min_temp``,
    ``temp_schedule``), sparsity weight :math:`w_s(t)` = :func:`vtp.sparsity_weight_schedule` (0 for the first
    ``sparsity_warmup`` of training), target :math:`\rho_t` = :func:`vtp.target_ratio_schedule` (``ratio_start``
    -> ``target_ratio`` over ``curriculum_frac``). Loss = :class:`vtp.PruningLoss`. The pruner learns at
    ``pruner_lr``, the language model at ``lm_lr`` (lower); the vision tower and projector learn at
    ``vision_lr`` (0 = frozen, as in the presets; ``results/07_train_pruner.json`` holds the measured runs).

    ``binarize_weight`` :math:`w_b` adds :math:`w_b(t)\,\overline{p(1-p)}`, ramped linearly from 0 at the end of
    the ratio curriculum to :math:`w_b` at the last step: it pushes the keep probabilities to 0/1 once the keep
    ratio is in place, so that the training masks (Bernoulli(:math:`p`) draws) approach the deterministic top-k
    of inference.

    ``controller_lr`` > 0 adds the Lagrangian term :math:`\lambda_t(\bar p - \rho_t)` of a
    :class:`vtp.DualAscentController` (dual step ``controller_lr``, once the sparsity weight is on). The
    fixed-weight MSE alone settles where its pull balances the task's, above small targets, so the full preset
    adds the controller (dual step 1.0; :func:`pruner_recipe` uses 0.3 at keep ratios >= 0.25).
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
    (``phase`` "adapt"), not its last: model selection on the validation split, never the test split.

    **Ablation switches** (lesson 08 flips them one at a time; :data:`ABLATION_FIELDS` lists them; the fields
    stay flat so that ``dataclasses.asdict`` round-trips): ``sampler`` (see :class:`vtp.GumbelVisionPruner`), ``apply`` = ``"policy"`` (attention masking)
    or ``"zero"`` (``tokens * mask``), ``sparsity_scope`` = ``"visual"`` or ``"all"`` (text tokens counted as
    kept), ``distill_weight`` = 0 (no teacher), ``eval_rule`` = ``"topk"`` or ``"threshold"``, ``loss_form`` =
    ``"vtp"`` or ``"seed"`` (the seed document's distillation over every position and batch-level keep ratio,
    :class:`vtp.PruningLoss`'s ``form``; lesson 08 trains the seed recipe).

    ``selector`` = ``"learned"`` (the method) or an **adapted control** (DESIGN 1c; lesson 07), which trains
    the language model exactly as the learned run does (same phases and steps, learning rates, schedules,
    loss on the answer: CE + distillation, data order, teacher, seed, budgets, validations and best-state
    selection) behind a FROZEN selection, :class:`vtp.controls.FrozenSelector` in the pruner's slot:
    ``"untrained"`` (the scorer of the same seed at its random initialisation, i.e. the learned pruner's step
    0, never updated), ``"fastv"`` (the frozen teacher's FastV-style attention scores), ``"random"``
    (uniform scores, a fresh draw per batch) or ``"visionzip"`` (the frozen teacher's VisionZip-style selection,
    without merging; lesson 11). A control never trains its selection: no pruner gradient, no
    sparsity, binarization or controller term (they act on the selection only). In phase 1, where the learned
    pruner samples Gumbel masks whose keep ratio follows the curriculum :math:`\rho_t`, the control's
    language model sees its selector's top-k mask at :math:`\rho_t`; in phase 2 both see top-k at the cycled
    budgets, and evaluation applies the same selection at the requested ratio. Controls need
    ``vision_lr`` = 0 (frozen visual tokens, so the selection stays fixed) and ``eval_rule`` = ``"topk"``.

    ``time_budget_s`` (``None``: no limit) is a guard, not a schedule: once the run's training time (both phases,
    validations included) reaches it, phase 2 stops before its next step, validates (with ``eval_every`` > 0) and
    ends in its best validated state as usual; ``history["stopped_early"]`` is the (global) step it stopped at,
    ``None`` when every step ran. Phase 1 always runs to its end (its temperature, sparsity and ratio schedules are
    defined over its steps). Runs compared at equal steps must check that neither stopped early.
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
    eval_batch_size: int = 512  # questions per validation forward (attention memory grows with it)
    log_every: int = 5
    seed: int = 0
    bf16: bool = True
    time_budget_s: float | None = None

    def __post_init__(self):
        check_ratio(self.target_ratio, "target_ratio")
        _check_int(self, "eval_batch_size", 1)
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
        if self.time_budget_s is not None:
            _check_number(self, "time_budget_s", open_low=True)
        if self.selector != "learned" and (self.vision_lr != 0 or self.eval_rule != "topk"):
            raise ValueError(f"selector={self.selector!r} (a frozen control) needs vision_lr=0 and eval_rule='topk', "
                             f"got vision_lr={self.vision_lr}, eval_rule={self.eval_rule!r}")


PRUNER_PRESETS = {
    "smoke": PrunerConfig(eval_every=30, eval_questions=500),
    # One GPU: 800 steps of 128 questions, dual step 1.0, binarization term on, frozen vision side
    # (measured runs of this recipe: results/07_train_pruner.json).
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
    ``mode`` plus phase 2 with the pruner trained through top-k (``adapt_pruner``).

    Full run: 500 phase-1 steps and 350 adaptation steps; 700 adaptation steps strictly between 1/16 and 0.25;
    at ratios >= 0.25, 300 phase-1 steps, dual step 0.3, no binarization term, 150 adaptation steps validated
    every 150. Smoke run: 20 adaptation steps. ``adapt_ratios`` (several budgets; lesson 07 passes its five
    ratios, with ``ratio`` = 4/64) makes phase 2 cycle through them so that one model serves every budget: in
    the full run 1200 adaptation steps, validated every 100 (phase 2 keeps its best validated state).
    ``overrides`` last. Measured accuracies of this recipe: ``results/07_train_pruner.json``."""
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



#: The lesson-08 switches of :class:`PrunerConfig` (each flips the correct recipe to one documented mistake or
#: variant). Kept as flat fields, so ``dataclasses.asdict(cfg)`` and ``pruner_config(mode, **asdict(cfg))``
#: round-trip unchanged; this tuple is the group.
ABLATION_FIELDS = ("sampler", "apply", "sparsity_scope", "sparsity_on", "sparsity", "loss_form", "eval_rule",
                   "distill_weight", "keep_bias", "pruner_norm", "question_aware")
