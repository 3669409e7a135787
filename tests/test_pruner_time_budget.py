"""PrunerConfig.time_budget_s: a guard that stops phase 2 (never phase 1) once the run's training time reaches it,
validates the state reached and ends in the best validated state; history["stopped_early"] says where."""
import types

import pytest
import torch

import vtp.train.pruner as pruner_module
from vtp.train import pruner_config, train_pruner


@pytest.fixture(scope="module")
def teacher(smoke_teacher):
    return smoke_teacher


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, warmup_steps=2, train_questions=64, eval_every=2, eval_questions=16,
                log_every=1, target_ratio=0.25, adapt_steps=8, adapt_pruner=True, adapt_ratios=(0.5, 0.25))
    return pruner_config("smoke", **{**base, **kw})


def test_time_budget_must_be_positive_or_none():
    assert pruner_config("smoke").time_budget_s is None
    for bad in (0, -1.0, float("inf"), True, "10"):
        with pytest.raises(ValueError, match="time_budget_s"):
            pruner_config("smoke", time_budget_s=bad)


def test_no_budget_runs_every_step(teacher):
    model, proc = teacher
    _, h = train_pruner(model, proc, _cfg(adapt_steps=4))
    assert h["stopped_early"] is None and h["adapt"]["step"] == [6, 7, 8, 9]


def test_guard_stops_phase_2_and_keeps_the_best_validated_state(teacher, monkeypatch):
    model, proc = teacher
    clock = iter(range(10_000))  # every reading of the clock advances it by one second
    monkeypatch.setattr(pruner_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    student, h = train_pruner(model, proc, _cfg(time_budget_s=3.5))
    # the clock is read once at the start and once before every phase-2 step: steps 0, 1 and 2 run, then 4 s >= 3.5 s
    assert h["stopped_early"] == 6 + 3 and h["adapt"]["step"] == [6, 7, 8]
    assert len(h["step"]) == 6  # phase 1 ran to its end
    adapt_val = [v["step"] for v in h["val"] if v["phase"] == "adapt"]
    assert adapt_val == [8, 9]  # every eval_every = 2 steps, and the state reached when the guard fired
    assert h["adapt_best"]["step"] in adapt_val and not student.training


def test_guard_before_phase_2_ends_in_the_phase_1_state(teacher):
    model, proc = teacher
    torch.manual_seed(0)
    student, h = train_pruner(model, proc, _cfg(time_budget_s=1e-9))
    assert h["stopped_early"] == 6 and h["adapt"]["step"] == [] and "adapt_best" not in h
    assert len(h["step"]) == 6 and not student.training
