"""vtp.sweep: job order, errors naming the job, and one real train_and_test run (smoke)."""
import dataclasses

import pytest

from vtp.sweep import run_jobs, train_and_test
from vtp.train import pruner_recipe


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
