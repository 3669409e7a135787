"""Many small training runs at once: independent pruner trainings share one GPU as separate processes.

The models of this course are tiny: one training process leaves a large GPU mostly idle (each step is bound by
Python and kernel launches), so the lessons that train tens of variants x seeds run them concurrently, one
process per run. :func:`run_jobs` is that pool; :func:`train_and_test` is the job most lessons need (train one
pruner from the teacher, evaluate it with real removal on the test split).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from .runtime import progress, run_mode

__all__ = ["run_jobs", "train_and_test"]


def run_jobs(fn, jobs: list[dict], workers: int | None = None, desc: str = "runs") -> list:
    """``[fn(**job) for job in jobs]``, concurrently on a GPU machine.

    On CUDA (and ``workers`` != 1) every job runs in its own spawned process, at most ``workers`` at a time
    (default ``min(len(jobs), 8)``); elsewhere, or with ``workers=1``, the jobs run here one after another.
    ``fn`` must be an importable module-level function and return picklable data (dicts of numbers, lists).
    Results come back in job order; a failing job raises ``RuntimeError`` naming it (its ``name`` key, or its
    index), after the jobs already started have finished.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not all(isinstance(job, dict) for job in jobs):
        raise TypeError("jobs must be a list of keyword-argument dicts")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be None or an int >= 1, got {workers!r}")
    names = [str(job.get("name", i)) for i, job in enumerate(jobs)]
    if workers is None:
        workers = min(len(jobs), 8) if torch.cuda.is_available() else 1
    results = [None] * len(jobs)
    bar = progress(total=len(jobs), desc=desc, leave=False)
    if workers == 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = _call(fn, job, names[i])
            bar.update(1)
        bar.close()
        return results
    env = {"VTP_PROGRESS": "0", "VTP_MODE": run_mode(),  # workers inherit os.environ; no nested progress bars
           # many processes share one GPU: release freed blocks instead of fragmenting the cache
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "expandable_segments:True"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_call, fn, job, names[i]): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    finally:
        bar.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def _call(fn, job: dict, name: str):
    try:
        return fn(**job)
    except Exception as err:  # name the job: a pool's traceback alone does not say which one failed
        raise RuntimeError(f"job {name!r} failed: {type(err).__name__}: {err}") from err


def train_and_test(config: dict, mode: str | None = None, eval_ratios=(), threshold: bool = False,
                   test_questions: int | None = None, save_to: str | None = None, name: str = "",
                   phase1_test: bool = False) -> dict:
    """Train one pruner and test it: the usual job of :func:`run_jobs`.

    Loads the teacher of ``mode`` (:func:`vtp.load_or_train_teacher`: in full mode the shipped one), builds
    ``pruner_config(mode, **config)`` (pass a whole recipe as ``dataclasses.asdict(pruner_recipe(...))``),
    runs :func:`vtp.train_pruner`, and evaluates the student on the test split (a fixed subset of ``test_questions``
    questions if given) with the dropped tokens removed: top-k at each ratio of ``eval_ratios`` and, if
    ``threshold``, the keep-probability > 0.5 rule. ``phase1_test`` (a recipe with phase 2) tests the student the
    same way at the end of phase 1 too, in the state a phase-1-only run of the recipe ends in (``train_pruner``'s
    ``phase1_end``), at no training cost. Saves the student's ``state_dict`` to ``save_to`` if given.

    Returns ``{"name", "seed", "config", "accuracy": {f"{r:.4f}": acc}, "per_type": {f"{r:.4f}": {...}},
    "threshold": {"accuracy", "keep_ratio", "per_type"} or None, "phase1": {"accuracy", "per_type", "threshold"}
    or None, "final_keep_ratio", "train_time_s", "history", "teacher_sha256", "device"}``.
    """
    from .evaluate import accuracy, accuracy_at_ratios, encoded_test_split
    from .train import load_or_train_teacher, pruner_config, train_pruner

    mode = mode or run_mode()
    cfg = pruner_config(mode, **config)
    teacher, processor, info = load_or_train_teacher(mode)
    data = {}  # the encoded test split, built once

    def tested(student) -> dict:
        if not data:
            data["test"] = encoded_test_split(processor, next(student.parameters()).device, test_questions)
        test = data["test"]
        at = accuracy_at_ratios(student, test, processor, eval_ratios, cfg.bf16)
        thr = None
        if threshold:
            res = accuracy(student, test, processor, rule="threshold", bf16=cfg.bf16)
            thr = {"accuracy": res.accuracy, "keep_ratio": res.keep_ratio, "per_type": res.per_type}
        return {"accuracy": at["accuracy"], "per_type": at["per_type"], "threshold": thr}

    phase1 = {}
    hook = (lambda vlm: phase1.update(tested(vlm))) if phase1_test else None
    student, history = train_pruner(teacher, processor, cfg, phase1_end=hook)
    out = tested(student)
    if save_to is not None:
        torch.save(student.state_dict(), save_to)
    return {"name": name, "seed": cfg.seed, "config": history["config"], **out, "phase1": phase1 or None,
            "final_keep_ratio": history["keep_ratio"][-1] if history["keep_ratio"] else None,
            "train_time_s": history["train_time_s"], "history": history, "teacher_sha256": info.get("sha256"),
            "device": history["device"]}
