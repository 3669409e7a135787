"""vtp.train.train_pruner on a tiny untrained LLaVA: history, binary masks, keep ratio moving, variants, CLI,
phase 2 (adaptation to the top-k rule) and the lesson-07 recipe."""
import json
import math

import pytest
import torch

from vtp.diagnose import diagnose
from vtp.evaluate import EvalResult
from vtp.train import main, pruner_config, pruner_recipe, train_pruner
from vtp.vlm import PrunedVLM


@pytest.fixture(scope="module")
def teacher(smoke_teacher):
    return smoke_teacher


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
    monkeypatch.setattr("vtp.train.config.PRUNER_PRESETS", {"smoke": _cfg(steps=4, eval_every=0), "full": _cfg()})
    out = tmp_path / "r.json"
    ckpt = tmp_path / "run.pt"
    main(["pruner", "--mode", "smoke", "--ratio", "0.5", "--out", str(out), "--checkpoint", str(ckpt)])
    summary = json.loads(out.read_text())
    assert summary["ratio"] == 0.5 and summary["visual_tokens"] == 8.0 and 0 <= summary["test_accuracy"] <= 1
    assert torch.load(ckpt, weights_only=False)["done"] == 4 + 20  # phase 1 + the smoke recipe's phase 2
    main(["pruner", "--mode", "smoke", "--ratio", "0.25", "--budgets", "0.25", "0.5", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert list(summary["test_accuracy_by_budget"]) == ["0.2500", "0.5000"]
    assert summary["test_accuracy_by_budget"]["0.2500"] == summary["test_accuracy"]
    with pytest.raises(SystemExit) as exit_info:  # an argparse error, before any work
        main(["pruner", "--mode", "smoke", "--budgets", "0.25", "1.5"])
    assert exit_info.value.code == 2 and "--budgets" in capsys.readouterr().err


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


def test_adaptation_phase_trains_what_it_should(teacher):
    model, proc = teacher
    state = lambda m: {k: v.clone() for k, v in m.state_dict().items()}
    plain, _ = train_pruner(model, proc, _cfg())
    frozen, hf = train_pruner(model, proc, _cfg(adapt_steps=6))
    joint, hj = train_pruner(model, proc, _cfg(adapt_steps=6, adapt_pruner=True))
    p0, pf, pj = state(plain.pruner), state(frozen.pruner), state(joint.pruner)
    assert all(torch.equal(p0[k], pf[k]) for k in p0)  # phase 1 is the same run; phase 2 left the pruner alone
    assert any(not torch.equal(p0[k], pj[k]) for k in p0)  # ... unless adapt_pruner
    lm0, lmf = state(plain.language_model), state(frozen.language_model)
    assert any(not torch.equal(lm0[k], lmf[k]) for k in lm0)
    v0 = state(plain.llava.model.vision_tower)
    assert all(torch.equal(v0[k], v) for k, v in state(joint.llava.model.vision_tower).items())
    assert frozen.pruner.sampler == joint.pruner.sampler == "gumbel"  # restored after phase 2
    for h in (hf, hj):
        assert [(v["step"], v["phase"], v["rule"]) for v in h["val"]] == [
            (6, "gumbel", "topk"), (12, "gumbel", "topk"), (12, "gumbel", "sample"), (18, "adapt", "topk")]
        assert h["adapt"]["step"] == [12, 15, 17] and h["adapt"]["keep_ratio"] == [0.25] * 3  # exactly k / N
    assert hf["adapt"]["sparsity"] and all(x >= 0 for x in hj["adapt"]["sparsity"])
    # diagnose reads phase 1's top-k validations only: a phase-2 or sample-rule entry changes nothing
    before = [f.symptom for f in diagnose(hj, target_ratio=0.25)]
    hj["val"].append(dict(step=99, phase="adapt", rule="topk", accuracy=0.0, keep_ratio=0.9))
    hj["val"].insert(2, dict(step=12, phase="gumbel", rule="sample", accuracy=0.0, keep_ratio=0.9))
    assert [f.symptom for f in diagnose(hj, target_ratio=0.25)] == before


@pytest.mark.parametrize("field, value", [("adapt_steps", -1), ("adapt_steps", 2.5), ("adapt_lr", 0.0),
                                          ("adapt_lr", float("nan"))])
def test_adapt_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        pruner_config("smoke", **{field: value})


def test_recipe():
    small, large = pruner_recipe(4 / 64, 1, "full"), pruner_recipe(0.25, 0, "full")
    assert (small.steps, small.adapt_steps, small.adapt_pruner, small.seed) == (500, 350, True, 1)
    assert (small.controller_lr, small.binarize_weight) == (1.0, 1.0)
    assert (large.steps, large.adapt_steps, large.controller_lr, large.binarize_weight) == (300, 150, 0.3, 0.0)
    assert [pruner_recipe(r, mode="full").adapt_steps for r in (2 / 64, 4 / 64, 7 / 64, 0.24)] == [350, 350, 700, 700]
    assert pruner_recipe(0.5, mode="smoke").adapt_steps == 20
    assert pruner_recipe(0.5, mode="full", adapt_steps=0).adapt_steps == 0  # overrides last
    mixed = pruner_recipe(4 / 64, 0, "full", adapt_ratios=(2 / 64, 0.5))
    assert (mixed.steps, mixed.adapt_steps, mixed.eval_every, mixed.adapt_ratios) == (500, 1200, 100, (2 / 64, 0.5))
    assert pruner_recipe(4 / 64, 0, "smoke", adapt_ratios=(0.5,)).adapt_steps == 20
    with pytest.raises(ValueError, match="ratio"):
        pruner_recipe(1.5, mode="smoke")


def test_phase_2_cycles_through_several_budgets(teacher):
    model, proc = teacher  # 16 visual tokens: 0.25 keeps 4, 0.5 keeps 8
    _, h = train_pruner(model, proc, _cfg(adapt_steps=4, adapt_pruner=True, adapt_ratios=[0.25, 0.5], log_every=1))
    assert h["adapt"]["keep_ratio"] == [0.25, 0.5, 0.5, 0.25]  # block b rotated by b
    assert h["config"]["adapt_ratios"] == (0.25, 0.5) and h["val"][-1]["phase"] == "adapt"
    with pytest.raises(ValueError, match="adapt_ratios"):
        pruner_config("smoke", adapt_ratios=(0.25, 1.5))
    with pytest.raises(ValueError, match="adapt_ratios"):
        pruner_config("smoke", adapt_ratios=(0.25,), eval_rule="threshold")


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("stop_at", [6, 18])  # a validation in phase 1, one in phase 2
def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(teacher, tmp_path, stop_at):
    model, proc = teacher
    cfg = _cfg(adapt_steps=12, adapt_pruner=True)  # 12 + 12 steps, validations at 6, 12 (+ sample), 18, 24
    ref, h_ref = train_pruner(model, proc, cfg)
    ckpt = tmp_path / "run.pt"

    def crash(step, history):
        if step == stop_at:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train_pruner(model, proc, cfg, callback=crash, checkpoint=ckpt, checkpoint_every=4)
    assert torch.load(ckpt, weights_only=False)["done"] == stop_at - 2  # the last save before the crash
    resumed, h = train_pruner(model, proc, cfg, checkpoint=ckpt, checkpoint_every=4)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in ref.state_dict().items())
    drop_time = lambda hist: {k: v for k, v in hist.items() if k != "train_time_s"}
    assert drop_time(h) == drop_time(h_ref)
    again, _ = train_pruner(model, proc, cfg, checkpoint=ckpt)  # finished: the result, without training
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ref.state_dict().items())
    with pytest.raises(ValueError, match="another config"):
        train_pruner(model, proc, _cfg(adapt_steps=12, seed=1), checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_pruner(model, proc, cfg, checkpoint=ckpt, checkpoint_every=0)


def test_phase_2_from_a_given_student(teacher):
    model, proc = teacher
    base, _ = train_pruner(model, proc, _cfg())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted, h = train_pruner(model, proc, _cfg(target_ratio=0.5, adapt_steps=6, adapt_pruner=True), student=base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the given student is untouched
    assert h["step"] == [] and [(v["step"], v["phase"], v["rule"]) for v in h["val"]] == [
        (0, "gumbel", "topk"), (0, "gumbel", "sample"), (6, "adapt", "topk")]
    assert h["adapt"]["step"] == [0, 3, 5] and h["adapt"]["keep_ratio"] == [0.5] * 3 and adapted.pruner.ratio == 0.5
    assert h["adapt"]["lr"][0] < h["adapt"]["lr"][1]  # a fresh optimizer is warmed up
    moved = lambda part: any(not torch.equal(before[k], v) for k, v in adapted.state_dict().items() if k.startswith(part))
    assert moved("pruner.") and moved("llava.model.language_model.") and not moved("llava.model.vision_tower.")
    with pytest.raises(ValueError, match="adapt_steps"):
        train_pruner(model, proc, _cfg(), student=base)


def test_phase_2_ends_in_its_best_validated_state(teacher, monkeypatch):
    model, proc = teacher
    scripted = {6: 0.6, 8: 0.9, 10: 0.7}  # phase 2's validations (steps 6, 8, 10); phase 1's score 0.5
    seen = []  # (step, accuracy, state) per validation

    def fake_accuracy(vlm, data, processor, **kw):
        step = [2, 4, 4, 6, 8, 10][len(seen)]  # phase 1: 2, 4, 4 (rule sample); phase 2: 6, 8, 10
        acc = scripted.get(step, 0.5) if len(seen) >= 3 else 0.5
        seen.append((step, acc, {k: v.clone() for k, v in vlm.state_dict().items()}))
        return EvalResult(acc, {}, 1, 1.0, 0.25, torch.zeros(1))

    monkeypatch.setattr("vtp.train.pruner.accuracy", fake_accuracy)
    student, h = train_pruner(model, proc, _cfg(steps=4, eval_every=2, adapt_steps=6, adapt_pruner=True),
                              val_data=object())
    assert [v["step"] for v in h["val"]] == [2, 4, 4, 6, 8, 10]
    assert h["adapt_best"] == {"step": 8, "accuracy": 0.9}
    best_state = seen[4][2]
    assert all(torch.equal(v, best_state[k]) for k, v in student.state_dict().items())
    assert any(not torch.equal(v, seen[5][2][k]) for k, v in student.state_dict().items())  # not the last state
