"""vtp.losses: each component against a hand computation; visual-only sparsity; controller; checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from vtp import DualAscentController, PruningLoss
from vtp.losses import answer_ce, distillation_kl, visual_keep_ratio


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    teacher = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 3], labels[1, 2] = 4, 1, 6  # three supervised tokens (aligned with logits)
    keep_prob = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.5, 0.5, 0.3, 0.7]])
    return logits, teacher, labels, keep_prob


def test_ce_only_on_answer_tokens(batch):
    logits, _, labels, _ = batch
    by_hand = -(torch.log_softmax(logits[0, 3], -1)[4] + torch.log_softmax(logits[1, 3], -1)[1]
                + torch.log_softmax(logits[1, 2], -1)[6]) / 3
    assert torch.allclose(answer_ce(logits, labels, shift_labels=False), by_hand, atol=1e-6)
    # shifted (transformers) convention: logits[:, t] predicts labels[:, t + 1]
    assert torch.allclose(answer_ce(logits, labels.roll(1, dims=1), shift_labels=True), by_hand, atol=1e-6)
    changed = logits.clone()
    changed[0, 0] += 100.0  # an unsupervised position does not matter
    assert torch.allclose(answer_ce(changed, labels, shift_labels=False), by_hand, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_per_answer_token_with_T_squared(batch, T):
    logits, teacher, labels, _ = batch
    terms = []
    for b, t in [(0, 3), (1, 3), (1, 2)]:
        pt = torch.softmax(teacher[b, t] / T, -1)
        ps = torch.softmax(logits[b, t] / T, -1)
        terms.append((pt * (pt.log() - ps.log())).sum())
    by_hand = torch.stack(terms).mean() * T * T
    got = distillation_kl(logits, teacher, labels, temperature=T, shift_labels=False)
    assert torch.allclose(got, by_hand, atol=1e-6)


def test_kl_is_zero_for_identical_models_and_teacher_gets_no_gradient(batch):
    logits, _, labels, _ = batch
    s = logits.clone().requires_grad_(True)
    t = logits.clone().requires_grad_(True)
    kl = distillation_kl(s, t, labels, shift_labels=False)
    assert kl.abs() < 1e-6
    (distillation_kl(s, t + torch.randn_like(t), labels, shift_labels=False)).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_sparsity_ratio_mse_per_sample(batch):
    logits, teacher, labels, keep_prob = batch
    loss = PruningLoss(target_ratio=0.25, distill_weight=0.0, sparsity_weight=1.0, shift_labels=False)
    _, parts = loss(logits, labels, keep_prob)
    by_hand = ((keep_prob.mean(-1) - 0.25) ** 2).mean()
    assert math.isclose(parts["sparsity"], float(by_hand), rel_tol=1e-6)
    assert math.isclose(parts["keep_ratio"], float(keep_prob.mean()), rel_tol=1e-6)


def test_l1_and_binarize_terms(batch):
    logits, _, labels, keep_prob = batch
    loss = PruningLoss(target_ratio=0.5, distill_weight=0.0, sparsity_weight=0.5, sparsity="l1",
                       binarize_weight=2.0, shift_labels=False)
    total, parts = loss(logits, labels, keep_prob)
    assert math.isclose(parts["sparsity"], float(keep_prob.mean()), rel_tol=1e-6)
    assert math.isclose(parts["binarize"], float((keep_prob * (1 - keep_prob)).mean()), rel_tol=1e-6)
    expected = parts["ce"] + 0.5 * parts["sparsity"] + 2.0 * parts["binarize"]
    assert math.isclose(float(total), expected, rel_tol=1e-6)


def test_total_is_weighted_sum(batch):
    logits, teacher, labels, keep_prob = batch
    loss = PruningLoss(target_ratio=0.3, distill_weight=0.7, sparsity_weight=3.0, distill_temperature=2.0,
                       shift_labels=False)
    total, parts = loss(logits, labels, keep_prob, teacher_logits=teacher)
    assert math.isclose(float(total), parts["ce"] + 0.7 * parts["distill"] + 3.0 * parts["sparsity"], rel_tol=1e-6)
    assert math.isclose(parts["total"], float(total), rel_tol=1e-6)
    _, no_w = loss(logits, labels, keep_prob, teacher_logits=teacher, sparsity_weight=0.0)
    assert math.isclose(no_w["total"], parts["ce"] + 0.7 * parts["distill"], rel_tol=1e-6)


def test_text_tokens_do_not_change_the_sparsity_term(batch):
    logits, _, labels, keep_prob = batch
    loss = PruningLoss(target_ratio=0.25, distill_weight=0.0, shift_labels=False)
    _, visual_only = loss(logits, labels, keep_prob)
    # the same visual tokens embedded in a longer sequence whose text positions have keep = 1
    full = torch.cat([torch.ones(2, 3), keep_prob, torch.ones(2, 5)], dim=1)
    visual = torch.zeros_like(full, dtype=torch.bool)
    visual[:, 3:7] = True
    _, with_text = loss(logits, labels, full, visual_mask=visual)
    assert math.isclose(with_text["sparsity"], visual_only["sparsity"], rel_tol=1e-6)
    _, averaged_over_all = loss(logits, labels, full)  # the bug: text counted as kept tokens
    assert averaged_over_all["keep_ratio"] > visual_only["keep_ratio"] + 0.2


def test_sparsity_on_hard_mask_uses_straight_through_mask(batch):
    logits, _, labels, keep_prob = batch
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]], requires_grad=True)
    loss = PruningLoss(target_ratio=0.25, distill_weight=0.0, sparsity_weight=1.0, sparsity_on="mask",
                       shift_labels=False)
    total, parts = loss(logits, labels, keep_prob, keep_mask=mask)
    assert math.isclose(parts["sparsity"], ((0.25 - 0.25) ** 2 + (0.5 - 0.25) ** 2) / 2, rel_tol=1e-6)
    assert math.isclose(parts["keep_ratio"], 0.375, rel_tol=1e-6)
    total.backward()
    assert mask.grad.abs().sum() > 0


def test_visual_keep_ratio_per_sample_then_mean():
    keep = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    vm = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(visual_keep_ratio(keep, vm), torch.tensor([0.5, 0.75]))


def test_bad_inputs_raise_naming_the_argument(batch):
    logits, teacher, labels, keep_prob = batch
    loss = PruningLoss(shift_labels=False)
    with pytest.raises(ValueError, match="labels"):
        loss(logits, labels[:, :3], keep_prob)
    with pytest.raises(ValueError, match="labels"):
        loss(logits, torch.full_like(labels, -100), keep_prob)
    with pytest.raises(ValueError, match="teacher_logits"):
        loss(logits, labels, keep_prob, teacher_logits=teacher[:, :2])
    with pytest.raises(ValueError, match="visual_mask"):
        loss(logits, labels, keep_prob, visual_mask=torch.zeros_like(keep_prob, dtype=torch.bool))
    with pytest.raises(ValueError, match="visual_mask"):
        loss(logits, labels, keep_prob, visual_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep_mask"):
        PruningLoss(sparsity_on="mask", shift_labels=False)(logits, labels, keep_prob)
    with pytest.raises(ValueError, match="target_ratio"):
        loss(logits, labels, keep_prob, target_ratio=0.0)
    for kwargs, name in [(dict(target_ratio=1.2), "target_ratio"), (dict(sparsity="l2"), "sparsity"),
                         (dict(sparsity_on="logits"), "sparsity_on"), (dict(distill_weight=-1), "distill_weight"),
                         (dict(distill_temperature=0), "distill_temperature")]:
        with pytest.raises(ValueError, match=name):
            PruningLoss(**kwargs)


def test_non_finite_loss_is_reported():
    logits = torch.randn(1, 3, 4)
    logits[0, 1, 0] = float("nan")
    labels = torch.tensor([[-100, 2, -100]])
    with pytest.raises(FloatingPointError):
        PruningLoss(shift_labels=False)(logits, labels, torch.rand(1, 4))


def test_dual_ascent_holds_the_keep_ratio():
    """Free keep logits whose task utility log(p) has diminishing returns, plus the Lagrangian penalty."""
    torch.manual_seed(0)
    logit = torch.zeros(64, requires_grad=True)
    ctrl = DualAscentController(target_ratio=0.25, lr=1.0)
    opt = torch.optim.SGD([logit], lr=5.0)
    for _ in range(600):
        p = torch.sigmoid(logit)
        task = -(torch.linspace(0.5, 1.5, 64) * torch.log(p)).mean()  # every token looks useful
        loss = task + ctrl.penalty(p.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.update(p.mean().detach())
    assert abs(torch.sigmoid(logit).mean().item() - 0.25) < 0.01
    # stationarity: w_i (1 - p_i) = lambda p_i (1 - p_i)  =>  p_i = w_i / lambda, mean(w) = 1  =>  lambda = 4
    assert abs(ctrl.multiplier - 4.0) < 0.1
    with pytest.raises(ValueError, match="target_ratio"):
        DualAscentController(0.0)
    with pytest.raises(ValueError, match="lr"):
        DualAscentController(0.5, lr=0)
