"""vtp.stats: the t quantile against printed tables, t-intervals, paired effects."""
import math
import random

import pytest

from vtp.stats import paired_effect, t_interval, t_quantile


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_other_levels_and_bad_input():
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=2e-4)
    for q, df in [(0.975, 0), (0.975, 2.0), (1.0, 3), (0.4, 3)]:
        with pytest.raises(ValueError):
            t_quantile(q, df)


def test_t_interval_by_hand():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 / math.sqrt(3)  # s = 1
    assert mean == 2.0 and low == pytest.approx(2 - half, abs=1e-3) and high == pytest.approx(2 + half, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, float("nan")])


def test_paired_effect_uses_the_pairs():
    ref = [0.80, 0.90, 0.70]
    better = [r + 0.02 + e for r, e in zip(ref, (0.001, -0.001, 0.0))]  # seeds differ by 0.2, pairs by 0.002
    eff = paired_effect(better, ref)
    assert eff["per_seed"] == pytest.approx([0.021, 0.019, 0.020])
    assert eff["mean"] == pytest.approx(0.02) and eff["real"] and eff["ci95"][0] > 0
    # the same numbers unpaired would not separate: the seed spread is ten times the effect
    assert not paired_effect([0.80, 0.93, 0.71], [0.81, 0.90, 0.70])["real"]
    with pytest.raises(ValueError, match="pair up"):
        paired_effect([1.0, 2.0], [1.0])


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    hits = sum(lo <= 0.3 <= hi for lo, hi in
               (t_interval([rng.gauss(0.3, 1.0) for _ in range(3)])[1:] for _ in range(2000)))
    assert 0.93 < hits / 2000 < 0.97
