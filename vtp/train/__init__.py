"""Training: the teacher and the pruner, as a small package.

* :mod:`~vtp.train.config`: the recipes as data (:class:`TrainConfig`, :class:`PrunerConfig`, presets);
* :mod:`~vtp.train.schedule`: the one learning-rate schedule (:func:`lr_factor`);
* :mod:`~vtp.train.steps`: the one optimisation step (:func:`step`) every loop calls;
* :mod:`~vtp.train.batches`: training data: any iterable of batches, and the easy-VQA / scenes adapters;
* :mod:`~vtp.train.teacher`: :func:`train_teacher`;
* :mod:`~vtp.train.pruner`: :func:`train_pruner` (phase 1 with Gumbel masks, phase 2 on the deployment rule);
* :mod:`~vtp.train.patched`: :func:`train_patched`, a pruner for any family :func:`vtp.patch` supports;
* :mod:`~vtp.train.checkpoint`: saving and loading the teacher, resumable pruner runs.

The ``vtp-train`` command lives in :mod:`vtp.cli`.
"""
from .config import (ABLATION_FIELDS, PRUNER_PRESETS, TEACHER_PRESETS, PrunerConfig, TrainConfig, pruner_config,
                     pruner_recipe, teacher_config)
from .schedule import lr_factor, set_lr
from .steps import answer_loss, step
from .batches import REQUIRED_KEYS, easy_vqa_batches, encoded_batches, scene_batches, training_batches
from .checkpoint import REPO_ROOT, load_or_train_teacher, load_teacher, save_teacher, save_teacher_once, teacher_dir
from .teacher import train_teacher
from .student import _student
from .pruner import train_pruner
from .patched import train_patched

__all__ = ["TrainConfig", "TEACHER_PRESETS", "teacher_config", "PrunerConfig", "PRUNER_PRESETS", "pruner_config",
           "pruner_recipe", "ABLATION_FIELDS", "lr_factor", "set_lr", "step", "answer_loss", "REQUIRED_KEYS",
           "training_batches", "encoded_batches", "easy_vqa_batches", "scene_batches", "train_teacher",
           "save_teacher", "load_teacher", "load_or_train_teacher", "save_teacher_once", "teacher_dir", "REPO_ROOT", "train_pruner",
           "train_patched"]


def main(argv=None):
    """The ``vtp-train`` command (:func:`vtp.cli.main`; ``vtp-train teacher --help``, ``vtp-train pruner --help``)."""
    from ..cli import main as cli_main

    return cli_main(argv)
