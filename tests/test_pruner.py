"""vtp.pruner: train-mode law, eval determinism, top-k counts, min_keep, input checks."""
import pytest
import torch

from vtp import GumbelVisionPruner
from vtp.pruner import threshold_keep_mask, topk_keep_mask


def _pruner_with_fixed_logits(keep_logits: torch.Tensor) -> GumbelVisionPruner:
    """A pruner whose scorer ignores the input and returns [0, keep_logit] per token (identity trick)."""
    n = keep_logits.numel()
    pruner = GumbelVisionPruner(hidden_dim=n, reduction=1, norm=False)
    with torch.no_grad():
        pruner.scorer[0].weight.copy_(torch.eye(n))
        pruner.scorer[0].bias.zero_()
        pruner.scorer[2].weight.zero_()
        pruner.scorer[2].weight[1].copy_(keep_logits)  # keep logit = <one-hot(token), keep_logits>
        pruner.scorer[2].bias.zero_()
    return pruner


def test_seed_architecture():
    p = GumbelVisionPruner(64)
    shapes = [tuple(m.weight.shape) for m in p.scorer if isinstance(m, torch.nn.Linear)]
    assert shapes == [(16, 64), (2, 16)]
    assert isinstance(p.scorer[1], torch.nn.ReLU)


def test_train_mode_keep_frequency_matches_keep_probability():
    torch.manual_seed(0)
    keep_logits = torch.linspace(-4, 4, 9)
    pruner = _pruner_with_fixed_logits(keep_logits).train()
    draws = 100_000
    tokens = torch.eye(9).unsqueeze(0).expand(draws, -1, -1)
    with torch.no_grad():
        out = pruner(tokens, tau=1.0)
    p = torch.sigmoid(keep_logits)
    assert torch.allclose(out.keep_prob[0], p, atol=1e-6)
    freq = out.mask.mean(0)
    assert torch.all((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / draws))


def test_train_mask_is_binary_and_differentiable():
    torch.manual_seed(0)
    pruner = GumbelVisionPruner(32).train()
    x = torch.randn(4, 20, 32)
    out = pruner(x, tau=0.5)
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    (out.mask * torch.randn(4, 20)).sum().backward()
    assert pruner.scorer[0].weight.grad.abs().sum() > 0


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    pruner = GumbelVisionPruner(32).eval()
    x = torch.randn(4, 20, 32)
    for rule in ("threshold", "topk"):
        a, b = pruner(x, rule=rule).mask, pruner(x, rule=rule).mask
        assert torch.equal(a, b)


def test_threshold_rule_keeps_probability_above_half():
    torch.manual_seed(0)
    pruner = GumbelVisionPruner(32).eval()
    x = torch.randn(4, 50, 32)
    out = pruner(x, rule="threshold")
    expected = out.keep_prob > 0.5
    # min_keep may add tokens only in samples where fewer than min_keep passed the threshold.
    short = expected.sum(-1) < 1
    assert torch.equal(out.mask.bool()[~short], expected[~short])


@pytest.mark.parametrize("ratio", [0.11, 0.25, 0.5, 1.0])
def test_topk_returns_exact_counts(ratio):
    torch.manual_seed(0)
    pruner = GumbelVisionPruner(32, rule="topk").eval()
    x = torch.randn(3, 64, 32)
    out = pruner(x, ratio=ratio)
    k = max(1, round(ratio * 64))
    assert out.mask.sum(-1).tolist() == [k] * 3
    # the kept tokens are the k most probable ones
    kth = out.keep_prob.topk(k, dim=-1).values[:, -1:]
    assert torch.all(out.keep_prob[out.mask.bool()].view(3, k) >= kth)


def test_topk_counts_only_valid_tokens():
    scores = torch.rand(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    mask = topk_keep_mask(scores, 0.5, valid)
    assert mask.sum(-1).tolist() == [5, 3]
    assert mask[1, 6:].sum() == 0


def test_min_keep_holds_when_every_score_is_low():
    scores = torch.full((3, 16), 0.01)
    scores[:, 5] = 0.02
    m = threshold_keep_mask(scores, 0.5, min_keep=2)
    assert m.sum(-1).tolist() == [2, 2, 2] and m[:, 5].all()
    pruner = GumbelVisionPruner(8, min_keep=3, keep_bias=-20.0).eval()
    out = pruner(torch.randn(2, 12, 8))
    assert out.mask.sum(-1).tolist() == [3, 3]
    assert topk_keep_mask(torch.rand(2, 64), 0.01, min_keep=4).sum(-1).tolist() == [4, 4]


def test_train_mode_respects_valid_mask():
    pruner = GumbelVisionPruner(8, keep_bias=20.0).train()
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 4:] = False
    out = pruner(torch.randn(2, 6, 8), valid_mask=valid)
    assert out.mask[0, 4:].sum() == 0 and out.mask[1].sum() == 6


@pytest.mark.parametrize("kwargs, name", [
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(hidden_dim=8, rule="best"), "rule"),
    (dict(hidden_dim=8, min_keep=0), "min_keep"),
    (dict(hidden_dim=8, ratio=0.0), "ratio"),
    (dict(hidden_dim=8, ratio=1.5), "ratio"),
    (dict(hidden_dim=8, tau=0.0), "tau"),
    (dict(hidden_dim=8, threshold=1.0), "threshold"),
])
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GumbelVisionPruner(**kwargs)


def test_bad_forward_arguments():
    pruner = GumbelVisionPruner(8)
    with pytest.raises(ValueError, match="tokens"):
        pruner(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="tau"):
        pruner(torch.randn(2, 5, 8), tau=float("nan"))
    with pytest.raises(ValueError, match="valid_mask"):
        pruner(torch.randn(2, 5, 8), valid_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid_mask"):
        pruner(torch.randn(2, 5, 8), valid_mask=torch.zeros(2, 5, dtype=torch.bool))
    pruner.eval()
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            pruner(torch.randn(2, 5, 8), rule="topk", ratio=bad)


def test_lesson_samplers():
    torch.manual_seed(0)
    x = torch.randn(4, 30, 16)
    soft = GumbelVisionPruner(16, sampler="soft").train()(x, tau=1.0).mask
    assert ((soft > 0) & (soft < 1)).float().mean() > 0.9  # relaxed values, not 0/1
    ste = GumbelVisionPruner(16, sampler="ste").train()
    out = ste(x)
    assert torch.equal(out.mask, (out.keep_prob > 0.5).float())  # deterministic: no exploration
    one = GumbelVisionPruner(16, sampler="one_gumbel").train()(x, tau=1.0).mask
    assert set(one.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="sampler"):
        GumbelVisionPruner(16, sampler="bernoulli")


def test_input_norm_makes_scores_scale_invariant():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    normed = GumbelVisionPruner(16).eval()
    assert torch.allclose(normed(x).keep_prob, normed(2000 * x).keep_prob, atol=1e-5)
    raw = GumbelVisionPruner(16, norm=False).eval()
    assert not torch.allclose(raw(x).keep_prob, raw(2000 * x).keep_prob, atol=1e-2)


def test_score_is_the_scorer_on_the_normed_tokens_plus_the_question_term():
    """``score`` = W2 ReLU(W1 LN(v) + U LN(q) + b1) + b2 (no U term when question-blind), bit for bit; it checks
    its inputs."""
    torch.manual_seed(0)
    tokens, text = torch.randn(2, 7, 16), torch.randn(2, 8)
    blind, aware = GumbelVisionPruner(16), GumbelVisionPruner(16, text_dim=8, keep_bias=1.0)
    torch.nn.init.normal_(aware.text_proj.weight)
    assert torch.equal(blind.score(tokens), blind.scorer(blind.norm(tokens)))
    pre = aware.scorer[0](aware.norm(tokens)) + aware.text_proj(aware.text_norm(text)).unsqueeze(1)
    assert torch.equal(aware.score(tokens, text), aware.scorer[2](aware.scorer[1](pre)))
    for bad in (None, torch.randn(2, 7), torch.randn(3, 8)):
        with pytest.raises(ValueError, match="text must have shape"):
            aware.score(tokens, bad)
    with pytest.raises(ValueError, match="tokens must have shape"):
        blind.score(torch.randn(2, 7, 15))
