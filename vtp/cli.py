"""The ``vtp-train`` command: train the teacher or a pruner outside the notebooks.

* ``vtp-train teacher [--mode smoke|full] [--out DIR] [--config JSON]``: train and save a teacher, print its
  test accuracy as JSON;
* ``vtp-train pruner [--mode smoke|full] [--ratio R] [--budgets R1 R2 ...] [--seed S] [--out FILE]
  [--checkpoint FILE] [--config JSON]``: load (or train) the teacher, train a pruner at keep ratio R
  (:func:`vtp.train.pruner_recipe`; with ``--budgets``, phase 2 cycles through those budgets, lesson 07's one
  model for every ratio; resumable from ``--checkpoint``), print test accuracy with real removal (top-k at R
  and at each budget) and the final training keep ratio, as JSON (also written to FILE).

Every argument is checked, and the recipe built, before any work: a bad value ends with an ``argparse`` error
(exit status 2), not a traceback minutes later. ``vtp-train teacher --help`` / ``vtp-train pruner --help``
list each option with its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from . import distributed, train
from .data import encode_split, load_split
from .evaluate import accuracy
from .pruner import check_ratio

__all__ = ["main", "build_parser"]

MODE_HELP = "recipe size: smoke (CPU, about a minute) or full (one GPU); default: full with a CUDA GPU, else smoke"


def _ratio(text: str) -> float:
    try:
        return check_ratio(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a keep ratio in (0, 1], got {text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of recipe fields, got {text!r}")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its description, unless the default is None (the text says what then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``vtp-train`` parser: one sub-command per model, each with its own ``--help``."""
    p = argparse.ArgumentParser(prog="vtp-train", description="Train the easy-VQA teacher or a token pruner.")
    sub = p.add_subparsers(dest="what", required=True, metavar="{teacher,pruner}")
    fmt = _Help
    t = sub.add_parser("teacher", formatter_class=fmt, help="train and save the unpruned teacher",
                       description="Train the teacher (vtp.train.teacher_config), save it, print test accuracy.")
    r = sub.add_parser("pruner", formatter_class=fmt, help="train a pruner against the teacher",
                       description="Train a pruner (vtp.train.pruner_recipe) against the saved, shipped (full "
                                   "mode) or freshly trained teacher; print test accuracy with real removal.")
    for s in (t, r):
        s.add_argument("--mode", choices=list(train.TEACHER_PRESETS), default=None, help=MODE_HELP)
        s.add_argument("--config", type=_json_object, default={}, metavar="JSON",
                       help='JSON object of recipe fields to override, e.g. \'{"batch_size": 512}\'')
    t.add_argument("--out", default=None, metavar="DIR",
                   help="directory to save the teacher in (default: checkpoints/teacher_MODE)")
    r.add_argument("--ratio", type=_ratio, default=0.25, metavar="R", help="keep ratio of visual tokens, in (0, 1]")
    r.add_argument("--budgets", type=_ratio, nargs="+", default=None, metavar="R",
                   help="keep ratios phase 2 cycles through, one model for all of them (default: --ratio alone)")
    r.add_argument("--seed", type=_seed, default=0, metavar="S", help="random seed of the pruner's run")
    r.add_argument("--out", default=None, metavar="FILE",
                   help="JSON file to write the summary to, besides printing it (default: print only)")
    r.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="file the run saves itself to (every 100 steps) and resumes from when it exists "
                        "(default: no checkpoint)")
    p.commands = {"teacher": t, "pruner": r}
    return p


def _recipe(p: argparse.ArgumentParser, args):
    """The recipe the arguments ask for, or an argparse error naming the bad field."""
    kind = train.TrainConfig if args.what == "teacher" else train.PrunerConfig
    fields = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(args.config) - set(fields))
    if unknown:
        p.error(f"--config: unknown {kind.__name__} field(s) {unknown}; the fields: {', '.join(fields)}")
    try:
        if args.what == "teacher":
            return train.teacher_config(args.mode, **args.config)
        budgets = {} if args.budgets is None else {"adapt_ratios": tuple(args.budgets)}
        return train.pruner_recipe(args.ratio, args.seed, args.mode, **budgets, **args.config)
    except (TypeError, ValueError) as e:
        p.error(f"--config: {e}")


def _check_paths(p: argparse.ArgumentParser, args) -> None:
    for name in ("out", "checkpoint"):
        path = getattr(args, name, None)
        if path is None:
            continue
        path = Path(path)
        is_dir = args.what == "teacher" and name == "out"
        if path.exists() and path.is_dir() != is_dir:
            p.error(f"--{name}: {path} exists and is {'not ' if is_dir else ''}a directory")
        if not is_dir and not path.parent.is_dir():
            p.error(f"--{name}: directory {path.parent} does not exist")


def _teacher(args, cfg) -> None:
    model, processor, history = train.train_teacher(cfg)
    if not distributed.is_main():  # under torchrun: rank 0 evaluates, prints and saves
        return
    res = accuracy(model, load_split("test"), processor)
    print(json.dumps({"test_accuracy": res.accuracy, "per_type": res.per_type, "device": history["device"],
                      "train_time_s": history["train_time_s"], "steps": history["steps_done"],
                      "val": history["val"], "parameters": history["parameters"], "config": history["config"]},
                     indent=2))
    out = args.out or train.teacher_dir(args.mode)
    info = {k: history[k] for k in ("device", "train_time_s", "parameters", "config")}
    train.save_teacher(model, processor, out, info)


def _pruner(args, cfg) -> None:
    teacher, processor, _ = train.load_or_train_teacher(args.mode)
    student, history = train.train_pruner(teacher, processor, cfg, checkpoint=args.checkpoint)
    if not distributed.is_main():  # under torchrun: rank 0 evaluates, prints and saves
        return
    test = encode_split(load_split("test"), processor, next(student.parameters()).device)
    res = accuracy(student, test, processor, ratio=cfg.target_ratio)
    summary = {"ratio": cfg.target_ratio, "seed": cfg.seed, "test_accuracy": res.accuracy, "per_type": res.per_type,
               "visual_tokens": res.visual_tokens, "final_training_keep_ratio": history["keep_ratio"][-1],
               "val": history["val"], "train_time_s": history["train_time_s"], "device": history["device"]}
    if cfg.adapt_ratios:
        summary["test_accuracy_by_budget"] = {
            f"{r:.4f}": accuracy(student, test, processor, ratio=r).accuracy for r in cfg.adapt_ratios}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


def main(argv=None) -> None:
    """Entry point of ``vtp-train`` (``argv`` defaults to ``sys.argv[1:]``; tests pass a list)."""
    args = build_parser().parse_args(argv)
    p = build_parser().commands[args.what]  # errors print the sub-command's usage
    cfg = _recipe(p, args)
    _check_paths(p, args)
    distributed.setup()  # under torchrun (several processes): process group, this rank's GPU
    (_teacher if args.what == "teacher" else _pruner)(args, cfg)


if __name__ == "__main__":
    main()
