"""vtp.schedules: endpoints, monotonicity, warm-up, curriculum, input checks."""
import math

import pytest

from vtp.schedules import SCHEDULES, get_temperature, sparsity_weight_schedule, target_ratio_schedule


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_temperature_endpoints_and_monotone(schedule):
    total = 1000
    taus = [get_temperature(s, total, 5.0, 0.1, schedule) for s in range(total + 1)]
    assert math.isclose(taus[0], 5.0) and math.isclose(taus[-1], 0.1)
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert get_temperature(5 * total, total, schedule=schedule) == pytest.approx(0.1)  # floor holds past the end


def test_seed_schedule_is_exponential():
    assert get_temperature(500, 1000) == pytest.approx(5.0 * (0.1 / 5.0) ** 0.5)
    assert get_temperature(500, 1000, schedule="linear") == pytest.approx(2.55)
    assert get_temperature(500, 1000, schedule="cosine") == pytest.approx(2.55)


def test_sparsity_weight_warmup():
    w = [sparsity_weight_schedule(s, 100, 2.0) for s in range(101)]
    assert w[:10] == [0.0] * 10 and w[10:] == [2.0] * 91
    ramp = [sparsity_weight_schedule(s, 100, 2.0, warmup_frac=0.1, ramp_frac=0.2) for s in range(101)]
    assert ramp[10] == 0.0 and ramp[20] == pytest.approx(1.0) and ramp[30] == pytest.approx(2.0)
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))


def test_target_ratio_curriculum():
    r = [target_ratio_schedule(s, 100, 0.25) for s in range(101)]
    assert r[0] == 1.0 and r[50] == pytest.approx(0.25) and r[-1] == pytest.approx(0.25)
    assert all(a >= b for a, b in zip(r, r[1:]))
    assert target_ratio_schedule(0, 100, 0.25, curriculum_frac=0.0) == 0.25


@pytest.mark.parametrize("call, name", [
    (lambda: get_temperature(0, 0), "total_steps"),
    (lambda: get_temperature(-1, 10), "step"),
    (lambda: get_temperature(float("nan"), 10), "step"),
    (lambda: get_temperature(0, 10, min_temp=0.0), "min_temp"),
    (lambda: get_temperature(0, 10, max_temp=float("inf")), "max_temp"),
    (lambda: get_temperature(0, 10, max_temp=0.05, min_temp=0.1), "min_temp"),
    (lambda: get_temperature(0, 10, schedule="step"), "schedule"),
    (lambda: sparsity_weight_schedule(0, 10, -1.0), "weight"),
    (lambda: sparsity_weight_schedule(0, 10, 1.0, warmup_frac=1.5), "warmup_frac"),
    (lambda: target_ratio_schedule(0, 10, 0.0), "target"),
    (lambda: target_ratio_schedule(0, 10, 0.5, curriculum_frac=-0.1), "curriculum_frac"),
])
def test_bad_arguments_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()
