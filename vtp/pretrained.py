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

__all__ = ["PRETRAINED_DIR", "manifest", "pretrained_path", "file_sha256", "verify_pretrained",
           "load_pretrained_teacher"]

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
