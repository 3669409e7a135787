"""Adapted controls (PrunerConfig.selector, vtp.controls.FrozenSelector): the selection stays frozen, the
language model trains the same steps at the same learning rates as the learned run, budgets are exact."""
import copy

import pytest
import torch

from vtp.baselines import VisionZip, fastv_scores
from vtp.controls import FrozenSelector, load_student
from vtp.evaluate import accuracy
from vtp.pruner import GumbelVisionPruner
from vtp.train import pruner_config, train_pruner
from vtp.vlm import PrunedVLM


@pytest.fixture(scope="module")
def teacher(smoke_teacher):
    return smoke_teacher


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, warmup_steps=2, train_questions=64, eval_every=3, eval_questions=16,
                log_every=1, target_ratio=0.25, adapt_steps=4, adapt_pruner=True, adapt_ratios=(0.5, 0.25))
    return pruner_config("smoke", **{**base, **kw})


def _batch(B=3, n_img=16, n_txt=5):
    ids = torch.cat([torch.full((B, n_img), 2), torch.randint(5, 30, (B, n_txt))], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return ids, torch.rand(B, 3, 64, 64), torch.ones_like(ids), labels


def _lm_state(vlm):
    return {k: v.detach().clone() for k, v in vlm.llava.state_dict().items()}


@pytest.mark.parametrize("selector", ["untrained", "fastv", "random", "visionzip"])
def test_control_trains_the_same_lm_steps_and_keeps_its_selection_frozen(teacher, selector):
    model, proc = teacher
    learned, h_learned = train_pruner(model, proc, _cfg())
    control, h = train_pruner(model, proc, _cfg(selector=selector))
    assert isinstance(control.pruner, FrozenSelector) and control.pruner.kind == selector
    # the same steps in both phases, at the same learning rates (phase 1: one schedule; phase 2: logged)
    assert h["step"] == h_learned["step"] and h["adapt"]["step"] == h_learned["adapt"]["step"]
    assert h["adapt"]["lr"] == pytest.approx(h_learned["adapt"]["lr"])
    assert h["config"]["lm_lr"] == h_learned["config"]["lm_lr"]
    # phase 1: the control's top-k follows the curriculum's ratio exactly (16 tokens: round(rho * 16) kept)
    assert h["keep_ratio"] == pytest.approx([max(1, round(t * 16)) / 16 for t in h["target"]])
    assert h["sparsity_weight"] == [0.0] * len(h["step"]) and h["multiplier"] == [0.0] * len(h["step"])
    # phase 2 keeps exactly the cycled budgets; no sampled-rule validation for a control
    assert set(h["adapt"]["keep_ratio"]) == {0.5, 0.25}
    assert [v["rule"] for v in h["val"]] == ["topk"] * len(h["val"]) and "adapt_best" in h
    # the language model moved (it was trained), the teacher did not
    assert any(not torch.equal(a, b) for a, b in zip(control.llava.state_dict().values(),
                                                      model.state_dict().values()))


def test_untrained_scorer_is_the_learned_initialisation_and_stays_frozen(teacher):
    model, proc = teacher
    torch.manual_seed(0)
    cfg = _cfg(selector="untrained", steps=4, adapt_steps=0, eval_every=0)
    control, _ = train_pruner(model, proc, cfg)
    # the learned run of the same seed starts from the same scorer: rebuild its step-0 pruner
    torch.manual_seed(cfg.seed)
    import vtp.train as T
    init = T._student(model, pruner_config("smoke", **{**vars(cfg), "selector": "learned"})).pruner
    for k, v in init.state_dict().items():
        assert torch.equal(control.pruner.scorer.state_dict()[k], v), k
    assert not any(p.requires_grad for p in control.pruner.parameters())


def test_selector_needs_matching_student_and_frozen_vision(teacher):
    model, proc = teacher
    with pytest.raises(ValueError, match="selector"):
        pruner_config("smoke", selector="fastv_scores")
    with pytest.raises(ValueError, match="vision_lr"):
        pruner_config("smoke", selector="random", vision_lr=1e-4)
    with pytest.raises(ValueError, match="eval_rule"):
        pruner_config("smoke", selector="random", eval_rule="threshold")
    student, _ = train_pruner(model, proc, _cfg(selector="random", steps=3, adapt_steps=0, eval_every=0))
    with pytest.raises(ValueError, match="selector"):
        train_pruner(model, proc, _cfg(steps=3, adapt_steps=2, eval_every=0), student=student)


@pytest.mark.parametrize("kind", ["fastv", "random", "untrained", "visionzip"])
@pytest.mark.parametrize("ratio", [1 / 16, 0.25, 7 / 16, 1.0])
def test_frozen_selections_keep_exactly_the_budget(teacher, kind, ratio):
    model, _ = teacher
    ref = PrunedVLM(model)
    scorer = GumbelVisionPruner(64, text_dim=64) if kind == "untrained" else None
    sel = FrozenSelector(kind, 0.5, scorer=scorer, reference=ref if kind in ("fastv", "visionzip") else None, seed=3)
    vlm = PrunedVLM(copy.deepcopy(model), sel).train()  # training mode too: a frozen selection is top-k always
    ids, px, mask, labels = _batch()
    out = vlm(ids, px, mask, labels, mode="policy", ratio=ratio, rule="topk")
    k = max(1, round(ratio * 16))
    assert out.visual_keep.sum(-1).tolist() == [k] * 3 and out.n_visual.tolist() == [k] * 3
    removed = vlm.eval()(ids, px, mask, labels, mode="remove", ratio=ratio)
    assert removed.n_visual.tolist() == [k] * 3
    with pytest.raises(ValueError, match="topk"):
        vlm(ids, px, mask, labels, mode="remove", rule="threshold")


def test_fastv_selection_reads_the_frozen_teacher(teacher):
    model, _ = teacher
    ref = PrunedVLM(model).eval()
    student = copy.deepcopy(model)
    with torch.no_grad():  # the adapted language model drifts; the selection must not follow it
        for p in student.model.language_model.parameters():
            p.add_(torch.randn_like(p))
    vlm = PrunedVLM(student, FrozenSelector("fastv", 0.25, reference=ref)).eval()
    ids, px, mask, labels = _batch()
    batch = {"input_ids": ids, "pixel_values": px, "attention_mask": mask, "labels": labels}
    expected = fastv_scores(batch, ref).topk(4, -1).indices.sort(-1).values
    kept = vlm(ids, px, mask, labels, ratio=0.25).visual_keep.nonzero()[:, 1].view(3, 4)
    assert torch.equal(kept, expected)
    # deepcopy shares the frozen reference and keeps it out of the state dict
    clone = copy.deepcopy(vlm)
    assert clone.pruner.reference is ref and not any(k.startswith("pruner.") for k in vlm.state_dict())


def test_visionzip_selection_is_the_frozen_towers_visionzip_mask_per_image(teacher):
    model, _ = teacher
    ref = PrunedVLM(model).eval()
    student = copy.deepcopy(model)
    with torch.no_grad():  # the adapted language model drifts; the selection reads the frozen tower only
        for p in student.model.language_model.parameters():
            p.add_(torch.randn_like(p))
    vlm = PrunedVLM(student, FrozenSelector("visionzip", 0.25, reference=ref)).eval()
    ids, px, mask, labels = _batch()
    keep, _ = VisionZip(0.25, merge=False).select(px, ref)  # dominant + contextual positions, no merging
    out = vlm(ids, px, mask, labels, ratio=0.25)
    assert torch.equal(out.visual_keep, keep) and out.n_visual.tolist() == [4] * 3
    # several questions per image: sample b gets the mask of image image_index[b]
    index = torch.tensor([2, 0, 2])
    shared = vlm(ids, px, mask, labels, ratio=0.25, image_index=index)
    assert torch.equal(shared.visual_keep, keep[index])
    # the same selection at another budget; the features are not merged (a selection, not VisionZip's merging)
    assert torch.equal(vlm(ids, px, mask, labels, ratio=0.5).visual_keep, VisionZip(0.5, merge=False).select(px, ref)[0])
    assert model.model.multi_modal_projector._forward_pre_hooks == {}
    with pytest.raises(ValueError, match="scores"):
        vlm.pruner.scores(torch.zeros(3, 16, 64))
    with pytest.raises(ValueError, match="reference"):
        FrozenSelector("visionzip")


def test_random_selection_draws_fresh_masks_from_its_seed():
    tokens = torch.zeros(4, 16, 8)
    a, b = FrozenSelector("random", 0.25, seed=1), FrozenSelector("random", 0.25, seed=1)
    m1, m2 = a(tokens).mask, a(tokens).mask
    assert not torch.equal(m1, m2) and torch.equal(m1, b(tokens).mask)
    with pytest.raises(ValueError, match="kind"):
        FrozenSelector("fast-v")
    with pytest.raises(ValueError, match="reference"):
        FrozenSelector("fastv")
    with pytest.raises(ValueError, match="scorer"):
        FrozenSelector("random", scorer=GumbelVisionPruner(8))


def test_saved_control_reloads_and_evaluates_with_its_selection(teacher, tmp_path):
    model, proc = teacher
    control, h = train_pruner(model, proc, _cfg(selector="fastv", steps=3, adapt_steps=0, eval_every=0))
    torch.save(control.state_dict(), tmp_path / "c.pt")
    again = load_student(model, h["config"], tmp_path / "c.pt")
    assert isinstance(again.pruner, FrozenSelector) and again.pruner.kind == "fastv"
    from vtp.data import load_split
    data = load_split("test").subset(32, seed=0)
    r1 = accuracy(control, data, proc, ratio=0.25)
    r2 = accuracy(again, data, proc, ratio=0.25)
    assert r1.accuracy == r2.accuracy and r1.visual_tokens == r2.visual_tokens == 4.0
