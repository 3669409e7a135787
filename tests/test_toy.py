"""vtp.toy: exact gradients by enumeration, estimator properties, goodness-of-fit test, toy trainings."""
import math

import pytest
import torch

from vtp.toy import (ESTIMATORS, MaskObjective, SelectionTask, bias_variance, chi_square_test,
                     gumbel_max_sample, importance_report, train_importance_pruner, train_selection)


@pytest.fixture(autouse=True)
def _one_thread():
    """Toy-sized tensors: one intra-op thread is fastest (and immune to CPU contention); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


OBJ = MaskObjective([2.0, -1.5, 1.0, -0.5, 3.0], bias=1.5)
THETA = torch.tensor([0.5, -1.0, 0.0, 2.0, -2.0])


def test_exact_gradient_matches_discrete_derivative():
    # dE/dθ_i = p_i (1 - p_i) * E_{m_-i}[f(m_i = 1) - f(m_i = 0)], computed here by direct enumeration
    p = torch.sigmoid(THETA)
    masks = OBJ.all_masks()
    expected = torch.empty(OBJ.n)
    for i in range(OBJ.n):
        others = [j for j in range(OBJ.n) if j != i]
        prob = (masks[:, others] * p[others] + (1 - masks[:, others]) * (1 - p[others])).prod(-1)
        on, off = masks.clone(), masks.clone()
        on[:, i], off[:, i] = 1.0, 0.0
        # each m_-i appears twice in the enumeration (m_i = 0 and 1): halve
        expected[i] = p[i] * (1 - p[i]) * 0.5 * (prob * (OBJ.loss(on) - OBJ.loss(off))).sum()
    assert torch.allclose(OBJ.exact_gradient(THETA), expected, atol=1e-6)


def test_expected_loss_matches_monte_carlo_within_4_standard_errors():
    g = torch.Generator().manual_seed(0)
    m = torch.bernoulli(torch.sigmoid(THETA).expand(200_000, -1), generator=g)
    f = OBJ.loss(m)
    assert abs(f.mean() - OBJ.expected_loss(THETA)) <= 4 * f.std() / math.sqrt(f.numel())


def test_reinforce_is_unbiased_and_ste_is_deterministic_and_biased():
    exact = OBJ.exact_gradient(THETA)
    torch.manual_seed(0)
    rf = bias_variance(OBJ.sample_gradients(THETA, "reinforce", 100_000), exact)
    assert rf["max_z"] < 4.0, rf
    st = OBJ.sample_gradients(THETA, "ste", 10)
    assert torch.equal(st, st[:1].expand_as(st))  # no noise
    assert bias_variance(st, exact)["bias"] > 0.1


def test_relaxed_estimators_trade_bias_for_variance_as_tau_falls():
    exact = OBJ.exact_gradient(THETA)
    for est in ("gumbel_soft", "gumbel_hard"):
        torch.manual_seed(1)
        hot = bias_variance(OBJ.sample_gradients(THETA, est, 20_000, tau=2.0), exact)
        cold = bias_variance(OBJ.sample_gradients(THETA, est, 20_000, tau=0.1), exact)
        assert cold["bias"] + 4 * cold["bias_se"] < hot["bias"], (est, hot, cold)
        assert cold["variance"] > 10 * hot["variance"], (est, hot, cold)


def test_sample_gradients_checks_its_arguments():
    with pytest.raises(ValueError, match="estimator"):
        OBJ.sample_gradients(THETA, "rebar", 10)
    with pytest.raises(ValueError, match="theta"):
        OBJ.sample_gradients(THETA[:3], "ste", 10)
    with pytest.raises(ValueError, match="tau"):
        OBJ.sample_gradients(THETA, "gumbel_hard", 10, tau=0.0)
    with pytest.raises(ValueError, match="weights"):
        MaskObjective(torch.ones(17))
    assert set(ESTIMATORS) == {"reinforce", "ste", "gumbel_soft", "gumbel_hard"}


def test_chi_square_p_value_matches_closed_form_for_two_degrees_of_freedom():
    # chi^2 with 2 dof has survival function exp(-x / 2)
    counts, probs = torch.tensor([30.0, 50.0, 20.0]), torch.tensor([0.25, 0.5, 0.25])
    stat, dof, p = chi_square_test(counts, probs)
    assert dof == 2 and stat == pytest.approx(5 ** 2 / 25 + 0 + 5 ** 2 / 25)
    assert p == pytest.approx(math.exp(-stat / 2), rel=1e-9)
    with pytest.raises(ValueError, match="sum to 1"):
        chi_square_test(counts, torch.tensor([0.2, 0.2, 0.2]))


def test_gumbel_max_samples_softmax_and_gaussian_noise_does_not():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(gumbel_max_sample(logits, 200_000, g), minlength=4)
    assert chi_square_test(counts, logits.softmax(0))[2] > 1e-3
    gauss = torch.bincount((logits + torch.randn(200_000, 4, generator=g)).argmax(-1), minlength=4)
    assert chi_square_test(gauss, logits.softmax(0))[2] < 1e-6


def test_selection_task_checks_arguments():
    with pytest.raises(ValueError, match="low_start"):
        SelectionTask(signal=(1.0, 1.0), low_start=(2,))
    with pytest.raises(ValueError, match="signal"):
        SelectionTask(n_tokens=4, signal=(1.0,) * 4)


def test_deterministic_ste_never_recovers_low_start_tokens_but_gumbel_does():
    task = SelectionTask(n_tokens=32)
    ste = train_selection(task, tau=None, steps=150, runs=8)
    gumbel = train_selection(task, tau=1.0, steps=150, runs=8)
    # a never-kept token's read-out receives no gradient: it stays exactly 0
    assert torch.all(ste.readout[:, list(task.low_start)] == 0)
    assert ste.metrics["recovered"] == 0.0
    assert gumbel.metrics["recovered"] >= 0.75, gumbel.metrics
    assert ste.keep_prob.shape == (151, 8, 32) and gumbel.flip_rate.shape == (150,)


def test_forgetting_the_visual_mask_drives_the_visual_ratio_below_target():
    direction = torch.randn(8, generator=torch.Generator().manual_seed(0))
    kw = dict(target_ratio=0.5, text_tokens=32, steps=150, batch=16, tokens=32)
    _, right = train_importance_pruner(direction, visual_only=True, **kw)
    _, wrong = train_importance_pruner(direction, visual_only=False, **kw)
    # averaging over 32 visual + 32 always-kept text tokens at 0.5 leaves (0.5*64 - 32)/32 = 0 for visual
    assert abs(sum(right[-20:]) / 20 - 0.5) < 0.1
    assert sum(wrong[-20:]) / 20 < 0.1


def test_importance_report_and_target_schedule():
    direction = torch.randn(8, generator=torch.Generator().manual_seed(1))
    pruner, ratios = train_importance_pruner(direction, target_ratio=0.25, steps=100, batch=8, tokens=16,
                                             target_schedule=lambda step: 1.0)
    assert sum(ratios[-10:]) / 10 > 0.8  # the schedule, not target_ratio, set the target
    rep = importance_report(pruner, direction, 0.25, batch=8, tokens=16)
    assert rep["kept_topk"] == 0.25  # exactly round(0.25 * 16) tokens per sample
    assert 0.0 <= rep["binarity"] <= 0.25 and 0.0 <= rep["recall_topk"] <= 1.0
    assert rep["kept_threshold"] >= rep["above_half"]  # threshold rule, topped up to min_keep
    with pytest.raises(ValueError, match="optimizer"):
        train_importance_pruner(direction, optimizer="rmsprop", steps=1)
