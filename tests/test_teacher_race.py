"""Two processes that train the same mode's teacher at once (lessons run in parallel in the test suite) end with
one teacher: whoever saves second returns the first saver's weights, so every lesson and every job it starts
sees the same SHA-256."""
import copy

import torch

import vtp.train.checkpoint as ckpt
import vtp.train.teacher as teacher_module
from vtp.pretrained import file_sha256


def test_the_second_saver_returns_the_first_savers_teacher(tmp_path, monkeypatch, smoke_teacher):
    model, proc = smoke_teacher
    target = tmp_path / "teacher_smoke"
    monkeypatch.setattr(ckpt, "teacher_dir", lambda mode=None: target)
    theirs = copy.deepcopy(model)
    with torch.no_grad():
        next(theirs.parameters()).add_(1.0)  # another process's (different) teacher
    info = {"device": "cpu", "train_time_s": 0.0, "parameters": 0, "config": {}, "val": []}

    def train_while_another_saves(cfg, device=None):  # the other process finishes first, during our training
        ckpt.save_teacher(theirs, proc, target, info)
        return copy.deepcopy(model), proc, {**info, "step": []}

    monkeypatch.setattr(teacher_module, "train_teacher", train_while_another_saves)
    got, _, got_info = ckpt.load_or_train_teacher("smoke", device="cpu")
    assert got_info["sha256"] == file_sha256(target / "model.safetensors")
    first = next(theirs.parameters()).detach().to(torch.bfloat16).float()  # saved in bfloat16
    assert torch.equal(next(got.parameters()).detach(), first)  # theirs, not ours
    assert not any(p.name.startswith(".teacher_smoke-") for p in tmp_path.iterdir())  # our copy is cleaned up


def test_the_first_saver_keeps_its_own(tmp_path, monkeypatch, smoke_teacher):
    model, proc = smoke_teacher
    target = tmp_path / "teacher_smoke"
    monkeypatch.setattr(ckpt, "teacher_dir", lambda mode=None: target)
    info = {"device": "cpu", "train_time_s": 0.0, "parameters": 0, "config": {}, "val": []}
    monkeypatch.setattr(teacher_module, "train_teacher", lambda cfg, device=None: (model, proc, info))
    got, _, got_info = ckpt.load_or_train_teacher("smoke", device="cpu")
    assert got is model and got_info["sha256"] == file_sha256(target / "model.safetensors")
