"""Checkpoints: the teacher (saved the Hugging Face way: safetensors weights, config, processor, a JSON of
training facts) and a pruner run's resumable state (:func:`save_run` / :func:`resume_run`, one file)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from ..data import VQAProcessor
from ..pretrained import PRETRAINED_DIR, file_sha256, load_pretrained_teacher
from ..runtime import default_device, run_mode

__all__ = ["REPO_ROOT", "teacher_dir", "save_teacher", "load_teacher", "load_or_train_teacher", "save_teacher_once",
           "save_run",
           "resume_run"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


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
    verified), else trained now (recipe :func:`vtp.train.teacher_config`) and saved there. Returns
    ``(llava, processor, info)``; ``info["sha256"]`` identifies the weights."""
    from .config import teacher_config
    from .teacher import train_teacher

    mode = mode or run_mode()
    if not retrain and (teacher_dir(mode) / "config.json").exists():
        return load_teacher(teacher_dir(mode), device)
    if not retrain and mode == "full" and (PRETRAINED_DIR / "MANIFEST.json").exists():
        return load_pretrained_teacher(device)
    model, processor, history = train_teacher(teacher_config(mode), device)
    info = {k: history[k] for k in ("device", "train_time_s", "parameters", "config", "val")}
    return save_teacher_once(model, processor, info, teacher_dir(mode), device)


def save_teacher_once(model, processor, info: dict, target, device=None):
    """Save a freshly trained teacher to ``target`` and return ``(model, processor, info)`` with
    ``info["sha256"]``. Saved beside the target, then renamed: a process that loads concurrently (notebooks run
    in parallel in the test suite) never sees a half-written checkpoint. If another process saved first, theirs
    is THE teacher: it is returned instead, so every process (and every job it starts) uses the same weights."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    save_teacher(model, processor, tmp, info)
    info["sha256"] = file_sha256(tmp / "model.safetensors")
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return load_teacher(target, device)
    return model, processor, info


def save_run(path, cfg, device, done: int, elapsed: float, history, vlm, opt, controller, best) -> None:
    """Everything :func:`vtp.train.train_pruner` needs to continue after ``done`` steps, in one file: the
    student, the optimizer (its moments and learning rates), the controller's multiplier, the best validated
    state, the history, the random-number states and the config."""
    torch.save(dict(done=done, elapsed=elapsed, history=history, vlm=vlm.state_dict(), opt=opt.state_dict(), best=best,
                    multiplier=controller.multiplier if controller is not None else None,
                    rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    config=dataclasses.asdict(cfg)), path)


def resume_run(path, cfg, device, batches, vlm, opt, controller, best):
    """Load a :func:`save_run` file into the run's objects, replay the batches it had drawn (shuffling and
    augmentation then continue as in the uninterrupted run), restore the random-number states; returns
    ``(done, elapsed, history)``. The learning rates need no state: the schedule is a function of the step."""
    state = torch.load(path, map_location=device, weights_only=False)
    if state["config"] != dataclasses.asdict(cfg):
        raise ValueError(f"checkpoint {path} was written by a run with another config; delete it or pass that config")
    vlm.load_state_dict(state["vlm"])
    best.update(state["best"])
    opt.load_state_dict(state["opt"])
    if controller is not None:
        controller.multiplier = state["multiplier"]
    for _ in range(state["done"]):
        next(batches)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["done"], state["elapsed"], state["history"]
