"""The shipped teacher: checksum, loading, and real accuracy on a fixed subset of the test split."""
import json

import pytest
import torch

from vtp.data import encode_split, load_split
from vtp.evaluate import accuracy
from vtp.pretrained import PRETRAINED_DIR, file_sha256, load_pretrained_teacher, manifest, verify_pretrained

SUBSET = 600  # a fixed random subset of the test split (seed 0): seconds on 2 CPU cores
THRESHOLD = 0.99  # the manifest's full-split accuracy is 0.9996; 600 questions at 0.99 leave ~4 standard errors


def test_manifest_checksum_matches_the_shipped_weights():
    entry = verify_pretrained("teacher_easyvqa")
    assert entry["sha256"] == file_sha256(PRETRAINED_DIR / entry["file"])
    assert entry["test_accuracy"] >= 0.99 and entry["test_questions"] == len(load_split("test"))


def test_a_modified_file_is_rejected(tmp_path, monkeypatch):
    import vtp.pretrained as pre

    (tmp_path / "teacher_easyvqa").mkdir()
    (tmp_path / "teacher_easyvqa" / "model.safetensors").write_bytes(b"not the weights")
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"teacher_easyvqa": manifest()["teacher_easyvqa"]}))
    monkeypatch.setattr(pre, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        pre.verify_pretrained("teacher_easyvqa")
    with pytest.raises(ValueError, match="name must be one of"):
        pre.pretrained_path("nope")


def test_shipped_teacher_answers_the_test_subset():
    model, processor, info = load_pretrained_teacher(device="cpu")
    assert info["sha256"] == manifest()["teacher_easyvqa"]["sha256"]
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    test = encode_split(load_split("test").subset(SUBSET, seed=0), processor, torch.device("cpu"))
    res = accuracy(model, test, processor, bf16=False)
    assert res.accuracy >= THRESHOLD, res


def test_shipped_student_matches_its_full_run_at_4_of_64():
    """The shipped student (lesson 07's seed-0 model, rebuilt from its recipe around the shipped teacher) on a
    fixed subset, at 4 of 64 tokens: within 4 standard errors of the manifest's full-split accuracy."""
    from vtp.pretrained import load_pretrained_student

    entry = verify_pretrained("student_easyvqa")
    assert entry["teacher_sha256"] == manifest()["teacher_easyvqa"]["sha256"]
    student, processor, _ = load_pretrained_student(torch.device("cpu"))
    test = encode_split(load_split("test").subset(SUBSET, seed=1), processor, torch.device("cpu"))
    acc = accuracy(student, test, processor, ratio=4 / 64)
    ref = entry["test_accuracy"]["0.0625"]
    assert acc.keep_ratio == pytest.approx(4 / 64)
    assert acc.accuracy >= ref - 4 * (max(ref * (1 - ref), 1 / SUBSET) / SUBSET) ** 0.5
