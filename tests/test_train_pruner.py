"""vtp.train.train_pruner on a tiny untrained LLaVA: history, binary masks, keep ratio moving, variants, CLI."""
import json
import math

import pytest
import torch

from vtp.data import build_processor
from vtp.train import main, pruner_config, train_pruner
from vtp.vlm import PrunedVLM, build_llava


@pytest.fixture(scope="module")
def teacher():
    proc = build_processor(16)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    return model, proc


def _cfg(**kw):
    base = dict(steps=12, batch_size=16, warmup_steps=2, train_questions=256, eval_every=6, eval_questions=32,
                log_every=3, target_ratio=0.25)
    return pruner_config("smoke", **{**base, **kw})


def test_history_and_student(teacher):
    model, proc = teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student, h = train_pruner(model, proc, _cfg())
    assert isinstance(student, PrunedVLM) and not student.training
    for k in ("step", "tau", "ce", "distill", "sparsity", "keep_ratio", "saturated", "train_acc", "mask_binary"):
        assert len(h[k]) == len(h["step"]) > 0, k
    assert all(h["mask_binary"]) and all(math.isfinite(x) for x in h["total"])
    assert h["tau"][0] == pytest.approx(5.0) and h["tau"][-1] < 0.2  # annealed towards the 0.1 floor
    assert h["sparsity_weight"][0] == 0.0 and h["sparsity_weight"][-1] > 0  # warm-up
    assert [v["step"] for v in h["val"]] == [6, 12] and all(0 <= v["accuracy"] <= 1 for v in h["val"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher is untouched


def test_variants_run(teacher):
    model, proc = teacher
    _, soft = train_pruner(model, proc, _cfg(sampler="soft", steps=4, eval_every=0))
    assert not all(soft["mask_binary"])
    _, zero = train_pruner(model, proc, _cfg(apply="zero", sparsity_scope="all", steps=4, eval_every=0))
    assert len(zero["keep_ratio"]) > 0
    with pytest.raises(ValueError, match="apply"):
        pruner_config("smoke", apply="mask")
    with pytest.raises(ValueError, match="target_ratio"):
        pruner_config("smoke", target_ratio=0.0)


def test_cli_pruner(tmp_path, monkeypatch, teacher, capsys):
    model, proc = teacher
    monkeypatch.setattr("vtp.train.load_or_train_teacher", lambda mode=None: (model, proc, {}))
    monkeypatch.setattr("vtp.train.PRUNER_PRESETS", {"smoke": _cfg(steps=4, eval_every=0), "full": _cfg()})
    out = tmp_path / "r.json"
    main(["pruner", "--mode", "smoke", "--ratio", "0.5", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["ratio"] == 0.5 and summary["visual_tokens"] == 8.0 and 0 <= summary["test_accuracy"] <= 1


def test_vision_lr_trains_vision_tower_and_projector(teacher):
    model, proc = teacher
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    def moved(student, part):
        return any(not torch.equal(v, ref[f"model.{part}.{k}"])
                   for k, v in getattr(student.llava.model, part).state_dict().items())

    frozen, _ = train_pruner(model, proc, _cfg(steps=4, eval_every=0))
    assert not moved(frozen, "vision_tower") and not moved(frozen, "multi_modal_projector")
    tuned, _ = train_pruner(model, proc, _cfg(steps=4, eval_every=0, vision_lr=1e-3))
    assert moved(tuned, "vision_tower") and moved(tuned, "multi_modal_projector")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # the teacher is untouched
    with pytest.raises(ValueError, match="vision_lr"):
        pruner_config("smoke", vision_lr=-1.0)
