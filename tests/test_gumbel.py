"""vtp.gumbel: law of the sampled mask, straight-through gradient, dtypes, input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from vtp.gumbel import keep_probability, one_gumbel_sigmoid, relaxed_bernoulli, sample_keep_mask

LOGITS = torch.linspace(-4.0, 4.0, 9)  # keep-minus-drop logits tested
DRAWS = 100_000


def _two_class(keep_logit):
    """[drop, keep] logits with the given keep-minus-drop difference, split across both channels."""
    return torch.stack([-keep_logit / 2, keep_logit / 2], dim=-1)


def test_keep_frequency_matches_softmax_within_4_standard_errors():
    torch.manual_seed(0)
    logits = _two_class(LOGITS).unsqueeze(0).expand(DRAWS, -1, -1)
    freq = sample_keep_mask(logits, tau=1.0).mean(0)
    p = torch.sigmoid(LOGITS)
    se = torch.sqrt(p * (1 - p) / DRAWS)
    assert torch.all((freq - p).abs() <= 4 * se), (freq, p)


def test_keep_frequency_does_not_depend_on_tau():
    torch.manual_seed(1)
    logits = _two_class(torch.tensor([1.5])).expand(DRAWS, -1)
    p = torch.sigmoid(torch.tensor(1.5))
    se = math.sqrt(p * (1 - p) / DRAWS)
    for tau in (0.1, 5.0):
        assert abs(sample_keep_mask(logits, tau).mean() - p) <= 4 * se


def test_hard_forward_is_exactly_binary_and_float32():
    torch.manual_seed(0)
    m = sample_keep_mask(torch.randn(64, 32, 2), tau=0.7)
    assert m.dtype == torch.float32 and m.shape == (64, 32)
    assert torch.equal(m, m.round()) and set(m.unique().tolist()) <= {0.0, 1.0}


def test_straight_through_gradient_equals_soft_gradient_with_same_noise():
    logits = torch.randn(16, 8, 2)
    w = torch.randn(16, 8)
    grads = []
    for hard in (True, False):
        x = logits.clone().requires_grad_(True)
        torch.manual_seed(123)
        (sample_keep_mask(x, tau=0.5, hard=hard) * w).sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_matches_gumbel_softmax_keep_channel():
    logits = torch.randn(10, 2)
    torch.manual_seed(7)
    ours = sample_keep_mask(logits, tau=0.3)
    torch.manual_seed(7)
    ref = F.gumbel_softmax(logits, tau=0.3, hard=True)[..., 1]
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_finite_masks(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(2000, 64, 2) * 8).to(dtype)
    m = sample_keep_mask(logits, tau=0.1)
    assert m.dtype == torch.float32 and torch.isfinite(m).all()
    soft = sample_keep_mask(logits, tau=0.1, hard=False)
    assert torch.isfinite(soft).all()


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), "1", None, torch.tensor([1.0, 2.0])])
def test_bad_tau_raises_naming_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        sample_keep_mask(torch.zeros(3, 2), tau)


def test_last_dim_must_be_two():
    with pytest.raises(ValueError, match="logits"):
        sample_keep_mask(torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="logits"):
        keep_probability(torch.zeros(4))


def test_relaxed_bernoulli_keeps_with_sigmoid_probability():
    g = torch.Generator().manual_seed(0)
    logit = LOGITS.unsqueeze(0).expand(DRAWS, -1)
    freq = relaxed_bernoulli(logit, tau=0.5, hard=True, generator=g).mean(0)
    p = torch.sigmoid(LOGITS)
    assert torch.all((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / DRAWS))


def test_relaxed_bernoulli_equals_two_class_softmax_given_the_noise():
    # sigmoid((l + L) / tau) with L = g1 - g0 is the keep channel of softmax(([0, l] + [g0, g1]) / tau).
    torch.manual_seed(0)
    l, g = torch.randn(1000), -torch.log(-torch.log(torch.rand(1000, 2)))
    two = (((torch.stack([torch.zeros_like(l), l], -1) + g) / 0.7).softmax(-1))[..., 1]
    one = torch.sigmoid((l + g[:, 1] - g[:, 0]) / 0.7)
    assert torch.allclose(one, two, atol=1e-6)


def test_one_gumbel_sigmoid_is_biased():
    g = torch.Generator().manual_seed(0)
    freq = one_gumbel_sigmoid(torch.zeros(DRAWS), tau=1.0, hard=True, generator=g).mean()
    expected = 1 - math.exp(-1)  # P(g > 0) = 1 - exp(-e^0) = 0.632
    se = math.sqrt(expected * (1 - expected) / DRAWS)
    assert abs(freq - expected) <= 4 * se
    assert abs(freq - 0.5) > 20 * se
