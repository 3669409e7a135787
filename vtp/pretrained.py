"""Checkpoints shipped with the repository (``pretrained/``), so that a CPU learner works with the real,
GPU-trained models instead of smoke-sized ones.

``pretrained/MANIFEST.json`` lists each checkpoint with the command that produced it, the device, its test
accuracy and the SHA-256 of its weights file; :func:`load_pretrained_teacher` verifies the checksum before
loading, so a corrupted or locally modified file fails loudly instead of giving other numbers.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

__all__ = ["PRETRAINED_DIR", "manifest", "pretrained_path", "file_sha256", "verify_pretrained",
           "load_pretrained_teacher", "save_pretrained_student", "load_pretrained_student", "update_manifest"]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def manifest() -> dict:
    """The manifest of the shipped checkpoints: ``{name: {file, sha256, command, device, test_accuracy, ...}}``."""
    path = PRETRAINED_DIR / "MANIFEST.json"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: the shipped checkpoints come with a clone of the repository")
    return json.loads(path.read_text())


def pretrained_path(name: str = "teacher_easyvqa") -> Path:
    """Directory of the shipped checkpoint ``name`` (a key of :func:`manifest`)."""
    entries = manifest()
    if name not in entries:
        raise ValueError(f"name must be one of {sorted(entries)}, got {name!r}")
    return PRETRAINED_DIR / name


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_pretrained(name: str = "teacher_easyvqa") -> dict:
    """Check the weights file of ``name`` against its manifest checksum; returns the manifest entry.
    Raises ``ValueError`` on a mismatch (e.g. a Git LFS pointer or a locally retrained file)."""
    entry = manifest()[name] if name in manifest() else None
    if entry is None:
        pretrained_path(name)  # raises the ValueError listing the names
    actual = file_sha256(PRETRAINED_DIR / entry["file"])
    if actual != entry["sha256"]:
        raise ValueError(f"{entry['file']}: SHA-256 {actual} does not match the manifest's {entry['sha256']}")
    return entry


def load_pretrained_teacher(device=None, name: str = "teacher_easyvqa"):
    """The shipped teacher, checksum verified: ``(llava in float32 eval mode, processor, info)``; ``info`` is the
    checkpoint's training info plus the manifest entry (``sha256``, ``test_accuracy``, ``command``, ...)."""
    from .train import load_teacher  # train imports this module lazily too: no import cycle at load time

    entry = verify_pretrained(name)
    model, processor, info = load_teacher(pretrained_path(name), device)
    return model, processor, {**info, **entry, "name": name}


def update_manifest(name: str, **fields) -> dict:
    """Add or update the manifest entry ``name`` with ``fields`` (JSON-ready values); returns the entry."""
    path = PRETRAINED_DIR / "MANIFEST.json"
    entries = json.loads(path.read_text()) if path.exists() else {}
    entries[name] = {**entries.get(name, {}), **fields}
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return entries[name]


def save_pretrained_student(student, recipe: dict, name: str = "student_easyvqa", **record) -> dict:
    """Ship a trained :class:`vtp.PrunedVLM` (adapted language model and pruner) as ``pretrained/<name>/``:
    ``model.safetensors`` (its ``state_dict`` in bfloat16, tied weights stored once) and ``recipe.json`` (the
    ``PrunerConfig`` it was trained with, as a dict). The manifest entry gets the file, its SHA-256 and ``record``
    (command, device, teacher SHA-256, ...). Returns the entry."""
    import copy

    from safetensors.torch import save_model

    directory = PRETRAINED_DIR / name
    directory.mkdir(parents=True, exist_ok=True)
    save_model(copy.deepcopy(student).to(torch.bfloat16).cpu(), str(directory / "model.safetensors"))
    (directory / "recipe.json").write_text(json.dumps(recipe, indent=2, default=list) + "\n")
    return update_manifest(name, file=f"{name}/model.safetensors", sha256=file_sha256(directory / "model.safetensors"),
                           **record)


def load_pretrained_student(device=None, name: str = "student_easyvqa"):
    """A shipped student, checksum verified: ``(PrunedVLM in float32 eval mode, processor, entry)``, rebuilt around
    the shipped teacher (:func:`load_pretrained_teacher`) from its ``recipe.json``; ``entry`` is its manifest
    entry (``test_accuracy`` per keep ratio, ``teacher_sha256``, ``command``, ...)."""
    from safetensors.torch import load_model

    from .train.student import student_from_recipe

    entry = verify_pretrained(name)
    teacher, processor, info = load_pretrained_teacher(device)
    if entry.get("teacher_sha256", info["sha256"]) != info["sha256"]:
        raise ValueError(f"{name} was trained from teacher {entry['teacher_sha256'][:12]}, the shipped teacher is "
                         f"{info['sha256'][:12]}")
    student = student_from_recipe(teacher, json.loads((pretrained_path(name) / "recipe.json").read_text()))
    load_model(student, str(PRETRAINED_DIR / entry["file"]), strict=True, device=str(next(teacher.parameters()).device))
    return student.float().eval(), processor, entry
