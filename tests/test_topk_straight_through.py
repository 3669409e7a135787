"""vtp.pruner.topk_straight_through: the top-k mask of phase 2 (adaptation to the inference rule)."""
import torch

from vtp.gumbel import keep_probability
from vtp.pruner import GumbelVisionPruner, topk_keep_mask, topk_straight_through


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
