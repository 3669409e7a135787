"""vtp.sweep: job order, errors naming the job, one real train_and_test run (smoke), and the test of the
phase-1 state (train_pruner's phase1_end) that lesson 08 compares its failure modes with."""
import dataclasses

import pytest
import torch

from vtp.sweep import run_jobs, train_and_test
from vtp.train import pruner_config, pruner_recipe, train_pruner


def _square(x, name=None):
    if x < 0:
        raise ValueError("negative")
    return x * x


def test_results_in_job_order_and_failures_named():
    assert run_jobs(_square, [{"x": 3}, {"x": 1}, {"x": 2}], workers=1) == [9, 1, 4]
    with pytest.raises(RuntimeError, match="job 'bad' failed: ValueError: negative"):
        run_jobs(_square, [{"x": 1}, {"x": -1, "name": "bad"}], workers=1)
    with pytest.raises(ValueError, match="workers"):
        run_jobs(_square, [{"x": 1}], workers=0)
    with pytest.raises(TypeError, match="jobs"):
        run_jobs(_square, [3])


def test_train_and_test_smoke_run():
    cfg = dataclasses.asdict(pruner_recipe(0.25, seed=1, mode="smoke", steps=12, warmup_steps=2, adapt_steps=2, eval_every=0))
    (res,) = run_jobs(train_and_test, [dict(config=cfg, mode="smoke", eval_ratios=(0.25, 0.5), threshold=True,
                                           test_questions=64, name="s")], workers=1)
    assert res["name"] == "s" and res["seed"] == 1 and set(res["accuracy"]) == {"0.2500", "0.5000"}
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert 0.0 < res["threshold"]["keep_ratio"] <= 1.0 and isinstance(res["teacher_sha256"], str)
    assert res["config"]["steps"] == 12 and len(res["history"]["step"]) > 0


def test_spawned_workers_give_the_sequential_results():
    from vtp.schedules import get_temperature

    jobs = [dict(step=s, total_steps=10) for s in (0, 3, 9)]
    assert run_jobs(get_temperature, jobs, workers=2) == run_jobs(get_temperature, jobs, workers=1)


def _state(vlm):
    return {k: v.detach().clone() for k, v in vlm.state_dict().items()}


def test_phase1_end_sees_the_phase1_only_run_and_changes_nothing(smoke_teacher):
    """The hook sees, bit for bit on the CPU, the state that the same recipe without phase 2 ends in; and the run
    with the hook (which evaluates, drawing random numbers) ends exactly as the run without it."""
    model, proc = smoke_teacher
    cfg = pruner_config("smoke", steps=4, batch_size=16, warmup_steps=1, train_questions=64, eval_every=2,
                        eval_questions=16, log_every=1, target_ratio=0.25, adapt_steps=3, adapt_pruner=True)
    seen = {}

    def hook(vlm):
        seen.update(state=_state(vlm), training=vlm.training)
        torch.rand(100)  # the hook may draw random numbers: phase 2 must not notice
        vlm.eval()  # and change modes: restored afterwards

    hooked, h1 = train_pruner(model, proc, cfg, phase1_end=hook)
    plain, h2 = train_pruner(model, proc, cfg)
    phase1_only, _ = train_pruner(model, proc, dataclasses.replace(cfg, adapt_steps=0, adapt_pruner=False))
    assert seen["training"]
    assert all(torch.equal(seen["state"][k], v) for k, v in _state(phase1_only).items())
    assert all(torch.equal(_state(plain)[k], v) for k, v in _state(hooked).items())
    assert h1["val"] == h2["val"] and h1["adapt"] == h2["adapt"]
    with pytest.raises(ValueError, match="phase1_end"):
        train_pruner(model, proc, dataclasses.replace(cfg, adapt_steps=0), phase1_end=hook)  # no phase 2
    with pytest.raises(ValueError, match="phase1_end"):
        train_pruner(model, proc, cfg, phase1_end="not callable")


def test_train_and_test_phase1_test():
    cfg = dataclasses.asdict(pruner_recipe(0.25, seed=1, mode="smoke", steps=4, warmup_steps=1, adapt_steps=2,
                                           eval_every=0, train_questions=64, batch_size=16))
    job = dict(mode="smoke", eval_ratios=(0.25,), threshold=True, test_questions=32)
    res = train_and_test(cfg, phase1_test=True, **job)
    only = train_and_test(dict(cfg, adapt_steps=0, adapt_pruner=False), **job)
    assert res["phase1"] == {k: only[k] for k in ("accuracy", "per_type", "threshold")} and only["phase1"] is None
    with pytest.raises(ValueError, match="phase1_end"):
        train_and_test(dict(cfg, adapt_steps=0), phase1_test=True, **job)
