"""The student of a pruner run: a trainable copy of the teacher with a pruner (or, for an adapted control,
a frozen selection) between its projector and its language model."""
from __future__ import annotations

import copy

from ..controls import REFERENCE_SELECTORS, FrozenSelector
from ..pruner import GumbelVisionPruner
from ..vlm import PrunedVLM
from .config import PrunerConfig

__all__ = ["_student", "_continue", "_vision_parameters", "student_from_recipe"]


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
    """A trainable copy of ``teacher`` with a fresh pruner (or, for a control, its frozen selection)."""
    student = copy.deepcopy(teacher).train()
    _set_trainable(student, cfg)
    hidden = student.config.text_config.hidden_size
    pruner = GumbelVisionPruner(hidden, rule=cfg.eval_rule, ratio=cfg.target_ratio, keep_bias=cfg.keep_bias,
                                sampler=cfg.sampler, norm=cfg.pruner_norm, text_dim=hidden if cfg.question_aware else None)
    if cfg.selector != "learned":  # an adapted control: a frozen selection in the pruner's slot
        pruner = FrozenSelector(cfg.selector, cfg.target_ratio, scorer=pruner if cfg.selector == "untrained" else None,
                                reference=PrunedVLM(teacher) if cfg.selector in REFERENCE_SELECTORS else None, seed=cfg.seed)
    return PrunedVLM(student, pruner.to(next(student.parameters()).device))


def _continue(student: PrunedVLM, cfg: PrunerConfig) -> PrunedVLM:
    """A trainable copy of a trained student for phase 2 at ``cfg.target_ratio`` (trainable as in :func:`_student`)."""
    vlm = copy.deepcopy(student).train()
    vlm.pruner.ratio = cfg.target_ratio
    _set_trainable(vlm.llava, cfg)
    return vlm


def student_from_recipe(teacher, recipe: dict):
    """The untrained student of the recipe ``recipe`` (a :class:`PrunerConfig` as a dict, e.g. read from JSON):
    a copy of ``teacher`` with its pruner, on the teacher's device, ready for a saved state to be loaded."""
    cfg = PrunerConfig(**{**recipe, "adapt_ratios": tuple(recipe.get("adapt_ratios", ()))})
    return _student(teacher, cfg).to(next(teacher.parameters()).device)

