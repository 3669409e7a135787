"""vtp.toy.RedundantTask / train_two_phase (lesson 04, section 4) and the toy options lessons 03-04 use."""
import pytest
import torch

from vtp.toy import (RedundantTask, SelectionTask, train_importance_pruner, train_question_scorer, train_selection,
                     train_two_phase)


def test_redundant_task_shapes_and_coverage():
    task = RedundantTask()
    v, y = task.batch(3, 5, torch.Generator().manual_seed(0))
    assert v.shape == (3, 5, 16) and y.shape == (3, 5) and task.ratio == 0.25
    mask = torch.zeros(2, 16)
    mask[0, [0, 2, 4, 6]] = 1  # one copy of each latent
    mask[1, [0, 1, 2, 3]] = 1  # both copies of two latents
    assert task.coverage(mask).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError):
        RedundantTask(n_tokens=4, n_latent=4, copies=2)


def test_phase_through_topk_closes_the_deployment_gap():
    task = RedundantTask()
    top = train_two_phase(task, 200, 100, phase2="topk", runs=16)
    ctl = train_two_phase(task, 200, 100, phase2="sample", runs=16)
    i = top["step"].index(200)
    assert top["deployed_mse"][i] == ctl["deployed_mse"][i]  # same phase 1
    assert top["deployed_mse"][i] > top["sampled_mse"][i] + 0.3  # sampled law looks better than deployment
    assert top["deployed_mse"][-1] < ctl["deployed_mse"][-1] - 0.3
    with pytest.raises(ValueError):
        train_two_phase(task, phase2="threshold")
    with pytest.raises(ValueError):
        train_two_phase(task, phase1_steps=0)


def test_ste_learns_when_the_readout_already_reads_every_token():
    task = SelectionTask()
    zero = train_selection(task, None, steps=200, runs=16)
    signal = train_selection(task, None, steps=200, runs=16, readout_init="signal")
    assert zero.metrics["recovered"] == 0.0 and signal.metrics["recovered"] >= 0.9
    with pytest.raises(ValueError):
        train_selection(task, None, steps=10, readout_init="random")


def test_fixed_penalty_next_to_the_dual_controller():
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    _, alone = train_importance_pruner(direction, dual_lr=1.0, sparsity_weight=20.0, steps=300)
    _, both = train_importance_pruner(direction, dual_lr=1.0, sparsity_weight=20.0, penalty_with_dual=True, steps=300)
    held = lambda r: abs(sum(r[-100:]) / 100 - 0.25) < 0.02 and max(r[-150:]) - min(r[-150:]) < 0.15
    assert held(both) and not held(alone)


def test_budget_cycling_serves_every_budget():
    task = RedundantTask()
    budgets = (4 / 16, 8 / 16)
    cyc = train_two_phase(task, 200, 100, phase2_ratios=budgets, eval_ratios=budgets, runs=16)["final_mse"]
    four = train_two_phase(task, 200, 100, eval_ratios=budgets, runs=16)["final_mse"]
    assert set(cyc) == set(budgets) and cyc[8 / 16] < four[8 / 16] - 0.2 and cyc[4 / 16] < four[4 / 16] + 0.3
    with pytest.raises(ValueError):
        train_two_phase(task, 10, 10, phase2_ratios=(0.0,))


def test_question_aware_scorer_keeps_what_each_question_needs():
    task = RedundantTask()
    blind = train_question_scorer(task, question_aware=False, runs=16)
    aware = train_question_scorer(task, question_aware=True, runs=16)
    assert min(aware["coverage"]) > 0.9 > 0.7 > max(blind["coverage"])
    assert max(aware["mse"]) < min(blind["mse"]) - 0.3
    with pytest.raises(ValueError):
        train_question_scorer(RedundantTask(n_latent=3), question_aware=True)
