"""vtp.scene_pruning (lesson 11): one recipe for the learned run and its controls, the presets' arithmetic, the
shared data files, image-grouped batches, the one-pass student evaluation (= scene_accuracy, plus evidence recall)."""
import dataclasses
import json

import pytest
import torch

from vtp import scene_pruning as sp
from vtp.controls import FrozenSelector
from vtp.pruner import GumbelVisionPruner
from vtp.scenes import SceneConfig, encode_scenes, scene_accuracy, scene_processor, scene_split
from vtp.vlm import PrunedVLM, build_llava

CFG = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2, max_objects=4,
                  max_count=2, families=("exist", "count", "query_color", "query_shape", "relation"))


@pytest.fixture(scope="module")
def setup():
    proc = scene_processor(CFG, question_first=True)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id, image_size=64, patch_size=16).eval()
    split = scene_split("test", CFG, 60)
    return model, proc, split


@pytest.mark.parametrize("mode", ["smoke", "full"])
def test_one_recipe_for_the_learned_run_and_its_controls(mode):
    s = sp.settings(mode)
    learned = sp.scene_pruner_config("learned", 1, mode)
    assert learned.target_ratio == sp.SHARED and learned.adapt_ratios == tuple(sp.BUDGETS.values())
    assert learned.augment == {} and learned.time_budget_s == s["time_budget_s"] and learned.seed == 1
    assert (learned.steps, learned.adapt_steps, learned.batch_size) == (s["steps"], s["adapt_steps"], s["batch_size"])
    assert learned.adapt_pruner and learned.question_aware
    for selector in ("untrained", "visionzip", "fastv"):
        control = sp.scene_pruner_config(selector, 1, mode)
        assert dataclasses.replace(control, selector="learned") == learned
    # the arithmetic the presets rely on: whole blocks of budgets, whole images per batch, phase 1 ending on a
    # validation and at least one inside phase 2 (which also validates at its last step)
    assert s["adapt_steps"] % len(sp.BUDGETS) == 0 and s["batch_size"] % s["questions_per_image"] == 0
    assert s["steps"] % s["eval_every"] == 0 and s["adapt_steps"] >= s["eval_every"] and len(s["seeds"]) == 3
    with pytest.raises(ValueError, match="mode"):
        sp.settings("medium")


def test_budgets_are_192_128_64_of_576():
    assert [round(r * 576) for r in sp.BUDGETS.values()] == [192, 128, 64] and list(sp.BUDGETS) == ["192", "128", "64"]


def test_data_files_round_trip_and_wait(tmp_path, setup):
    _, _, split = setup
    path = sp.save_data(tmp_path / "d.pt", test=split)
    back = sp.load_data(sp.wait_for(path, timeout_s=1))["test"]
    assert back.questions == split.questions and torch.equal(back.evidence, split.evidence)
    assert not list(tmp_path.glob(".*tmp"))  # written beside, then renamed
    (tmp_path / "x.pt.failed").write_text("ValueError: boom")
    with pytest.raises(RuntimeError, match="boom"):
        sp.wait_for(tmp_path / "x.pt", timeout_s=5)
    with pytest.raises(RuntimeError, match="did not appear"):
        sp.wait_for(tmp_path / "y.pt", timeout_s=0.2, poll_s=0.05)


def test_image_batches_group_questions_and_repeat_per_seed(setup):
    _, proc, split = setup
    cfg = sp.scene_pruner_config("learned", 0, "smoke")
    a, b = sp.image_batches(split, proc, cfg), sp.image_batches(split, proc, cfg)
    first, again = next(a), next(b)
    assert first["input_ids"].shape[0] == cfg.batch_size and first["pixel_values"].shape[0] == cfg.batch_size // 2
    assert first["image_index"].tolist() == [i // 2 for i in range(cfg.batch_size)]
    assert torch.equal(first["index"], again["index"])  # the same seed: the same batches for the learned run and controls
    other = sp.image_batches(split, proc, dataclasses.replace(cfg, seed=1))
    assert not torch.equal(next(other)["index"], first["index"])
    with pytest.raises(ValueError, match="questions_per_image"):
        sp.image_batches(split, proc, cfg, questions_per_image=3)


def test_student_evaluation_equals_scene_accuracy_and_reads_the_kept_masks(setup):
    model, proc, split = setup
    torch.manual_seed(0)
    scorer = GumbelVisionPruner(64, text_dim=64)
    student = PrunedVLM(model, FrozenSelector("untrained", 0.25, scorer=scorer))
    enc = encode_scenes(split, proc)
    for ratio in (0.25, 0.5):
        res = sp.evaluate_student(student, split, proc, ratio, encoded=enc, batch_size=16)
        ref = scene_accuracy(student, split, proc, encoded=enc, ratio=ratio, batch_size=16)
        assert res["accuracy"] == ref.accuracy and res["visual_tokens"] == ref.visual_tokens == round(16 * ratio)
        assert res["n"] == len(split) and set(res["per_family"]) == set(res["evidence_recall"]) == set(CFG.families)
        assert res["per_family"] == pytest.approx(ref.per_type)
        assert 0 <= res["evidence_recall_overall"] <= 1
    # the same numbers from the frozen selection used as a keep_fn on the plain model
    keep_fn = lambda batch, vlm: student.pruner(student.visual_features(batch["pixel_values"]), ratio=0.25,  # noqa: E731
                                                text=None if scorer.text_dim is None else _text(student, batch)).mask
    other = sp.evaluate_keep_fn(model, split, proc, keep_fn, encoded=enc, batch_size=16)
    mine = sp.evaluate_student(student, split, proc, 0.25, encoded=enc, batch_size=16)
    assert other["accuracy"] == mine["accuracy"]
    assert other["evidence_recall"] == pytest.approx(mine["evidence_recall"])


def _text(vlm, batch):
    ids = batch["input_ids"]
    embeds = vlm.llava.get_input_embeddings()(ids)
    return vlm.question_embedding(embeds, ids == vlm.image_token_id, batch["attention_mask"], batch["labels"])


def test_lesson11_job_names_its_kinds():
    with pytest.raises(ValueError, match="kind"):
        sp.lesson11_job("evaluate")


def test_recipe_study_script_smoke(tmp_path, monkeypatch):
    """scripts/lesson11_recipe_study.py on the smoke teacher: one seed of two variants, the report's fields, the
    variants' overrides reaching the trained runs (the top-k phase 1 keeps exactly k of N tokens)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("study", root / "scripts" / "lesson11_recipe_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = tmp_path / "study.json"
    monkeypatch.setenv("VTP_MODE", "smoke")  # the script sets the mode for its jobs; restored after the test
    study.main(["--smoke", "--out", str(out), "--variants", "recipe,topk_phase1", "--seeds", "0", "--adapt-steps", "3"])
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["shared_overrides"] == {"adapt_steps": 3}
    assert set(report["variants"]) == {"recipe", "topk_phase1"}
    for name, rep in report["variants"].items():
        row = rep["seeds"]["0"]
        assert row["phase2_steps"] == 3 and row["stopped_early"] is None and set(row["accuracy"]) == set(sp.BUDGETS)
        assert set(rep["goals_met"]) == set(sp.BUDGETS) and all(0 <= x <= 1 for x in row["accuracy"].values())
    k = max(1, round(sp.SHARED * 16)) / 16  # the smoke scenes' 16 tokens
    assert abs(report["variants"]["topk_phase1"]["seeds"]["0"]["phase1_keep_last5"] - k) < 1e-6
    with pytest.raises(SystemExit, match="unknown"):
        study.main(["--smoke", "--out", str(out), "--variants", "nope"])
