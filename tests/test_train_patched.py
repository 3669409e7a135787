"""vtp.train_patched: a pruner trained through the patched model, for every family vtp.patch supports, on the
model's own batches (LLaVA-NeXT's image_sizes, Qwen2-VL's image_grid_thw travel with the batch)."""
import pytest
import torch
from test_patch import FAMILIES, generate, make_inputs, make_model, make_pruner

import vtp


def _batches(family, n=3):
    """Batches of the tiny models' prompts with a one-token answer appended (labels: that token only)."""
    out = []
    for k in range(n):
        inputs = make_inputs(family, side="left")
        ans = torch.tensor([[20 + k], [21 + k]])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ans], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ans)], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ans).int()], 1)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -1] = ans[:, 0]
        out.append({**inputs, "labels": labels})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_the_pruner_and_deploys_with_generate(family):
    model = make_model(family)
    lm_before = [p.detach().clone() for p in model.get_decoder().parameters()]
    pruner = make_pruner(model)
    w0 = pruner.scorer[0].weight.detach().clone()
    model, hist = vtp.train_patched(model, pruner, _batches(family), steps=6, ratio=0.25, log_every=1)
    assert not torch.equal(w0, pruner.scorer[0].weight)  # the pruner learned
    assert all(torch.equal(a, b) for a, b in zip(lm_before, model.get_decoder().parameters()))  # lm_lr = 0: frozen
    assert len(hist["step"]) == 6 and hist["tau"][0] > hist["tau"][-1]  # annealed 5 -> 0.1
    assert all(0 <= k <= 1 for k in hist["keep_ratio"]) and all(torch.isfinite(torch.tensor(hist["total"])))
    assert not model.training and model.vtp_ratio == 0.25
    tokens = generate(model, make_inputs(family))  # deployed: top-k removal at the prefill
    assert tokens.shape == (2, 4)
    n = model.vtp_last.valid.sum(-1)
    assert torch.equal(model.vtp_last.mask.sum(-1), torch.clamp(torch.round(0.25 * n), min=1))


def test_language_model_is_fine_tuned_with_lm_lr():
    model = make_model("qwen2_vl")
    before = [p.detach().clone() for p in model.get_decoder().parameters()]
    vision = [p.detach().clone() for p in model.model.visual.parameters()]
    vtp.train_patched(model, make_pruner(model), _batches("qwen2_vl"), steps=3, lm_lr=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.get_decoder().parameters()))
    assert all(torch.equal(a, b) for a, b in zip(vision, model.model.visual.parameters()))  # the tower is frozen


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps must be an int >= 1"),
    (dict(steps=2, lr=0), ValueError, "lr must be > 0"),
    (dict(steps=2, lm_lr=float("nan")), ValueError, "lm_lr must be a finite number"),
    (dict(steps=2, ratio=1.5), ValueError, "ratio"),
    (dict(steps=2, warmup_frac=1.0), ValueError, "warmup_frac"),
])
def test_bad_arguments_raise_before_any_work(kwargs, error, match):
    model = make_model("llava")
    with pytest.raises(error, match=match):
        vtp.train_patched(model, make_pruner(model), _batches("llava"), **kwargs)
    assert getattr(model, "vtp_pruner", None) is None  # nothing patched


def test_unsupported_model_raises():
    with pytest.raises(TypeError, match="model must be one of"):
        vtp.train_patched(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), [], steps=1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sampled_keep_ratio_reaches_the_target(family):
    model = make_model(family)
    torch.manual_seed(0)
    pruner = vtp.GumbelVisionPruner(model.config.text_config.hidden_size)  # starts near keep 0.5
    _, hist = vtp.train_patched(model, pruner, _batches(family), steps=80, ratio=0.25, lr=1e-2, log_every=10)
    assert hist["keep_ratio"][0] > 0.4
    assert abs(sum(hist["keep_ratio"][-3:]) / 3 - 0.25) < 0.06


def test_readme_snippet_runs():
    from conftest import run_readme_snippet

    scope = run_readme_snippet("### Any family `vtp.patch` supports")
    model = scope["model"]
    assert scope["tokens"].shape == (4, scope["prompt"]["input_ids"].shape[1] + 2)
    assert model.vtp_last.n_visual.tolist() == [4] * 4 and not model.training
    assert len(scope["history"]["step"]) > 0
