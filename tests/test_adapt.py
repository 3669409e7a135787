"""Phase 2 of pruner training (adaptation to the top-k rule) and its straight-through top-k mask."""
import pytest
import torch

from vtp.data import build_processor
from vtp.diagnose import diagnose
from vtp.gumbel import keep_probability
from vtp.pruner import GumbelVisionPruner, topk_keep_mask, topk_straight_through
from vtp.train import pruner_config, pruner_recipe, train_pruner
from vtp.vlm import build_llava


def test_forward_is_the_inference_rule_and_the_surrogate_sums_to_k():
    torch.manual_seed(0)
    logits = torch.randn(3, 20, 2, requires_grad=True)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 15:] = False
    mask = topk_straight_through(logits, 0.25, valid, min_keep=2)
    assert torch.equal(mask.detach(), topk_keep_mask(keep_probability(logits), 0.25, valid, min_keep=2))
    # the surrogate sums to k in every sample, so the gradient of the kept count is exactly zero
    mask.sum().backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad), atol=1e-6)


def test_surrogate_ignores_level_and_scale_of_the_gaps_and_survives_equal_gaps():
    torch.manual_seed(1)
    base = torch.randn(2, 16, 2)
    weights = torch.randn(2, 16)

    def grad(logits):
        logits = logits.clone().requires_grad_(True)
        (topk_straight_through(logits, 0.25) * weights).sum().backward()
        return logits.grad

    g = grad(base)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    # gap -> 10 * gap + 3: the same standardised z, so the gradient scales by 1/10 (p = sigmoid(gap) would
    # saturate instead: its gradient carries p(1 - p))
    scaled = base * 10
    scaled[..., 1] += 3.0
    torch.testing.assert_close(grad(scaled), g / 10, rtol=1e-3, atol=1e-6)
    assert torch.isfinite(grad(torch.zeros(2, 16, 2))).all()  # var = 0: no inf * 0


def test_topk_sampler_in_train_mode_keeps_exactly_k():
    pruner = GumbelVisionPruner(8, ratio=0.25, sampler="topk").train()
    tokens = torch.randn(4, 16, 8)
    a, b = pruner(tokens).mask, pruner(tokens).mask
    assert torch.equal(a, b) and (a.sum(-1) == 4).all() and set(a.unique().tolist()) == {0.0, 1.0}


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
    assert pruner_recipe(0.5, mode="smoke").adapt_steps == 20
    assert pruner_recipe(0.5, mode="full", adapt_steps=0).adapt_steps == 0  # overrides last
    with pytest.raises(ValueError, match="ratio"):
        pruner_recipe(1.5, mode="smoke")


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
