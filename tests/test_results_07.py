"""results/07_train_pruner.json (written by lesson 07's full run): its schema, the internal consistency of its
numbers (means, paired margins, retention, goals recomputed from the per-seed rows), the README rows that quote
it, and lesson 07's prose free of typed measured numbers.

``python tests/test_results_07.py`` prints the README rows that :func:`test_readme_quotes_lesson_07` expects.
"""
import json
import math
import re
from pathlib import Path

import pytest
from test_prose_numbers import strict_prose_problems

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "07_train_pruner.json"
ADAPTED = ("learned", "untrained", "fastv", "random")
FROZEN = ("free_random", "free_fastv", "free_object")
CONTROLS = ("untrained", "fastv", "random")
GOALS = {"0.2500": 0.998, "0.1094": 0.995, "0.0625": 0.990}


def load() -> dict:
    return json.loads(RESULTS.read_text())


def _mean(xs):
    return sum(xs) / len(xs)


def check_schema(r: dict) -> None:
    """Raise AssertionError unless ``r`` is a complete lesson-07 results file whose derived numbers agree."""
    assert r["mode"] == "full" and isinstance(r["device"], str) and r["device"]
    assert re.fullmatch(r"[0-9a-f]{64}", r["teacher_sha256"]), "teacher_sha256: the teacher's weights identity"
    assert 0 < r["teacher_accuracy"] <= 1 and r["test_questions"] > 0
    seeds, ratios = r["seeds"], r["ratios"]
    assert len(seeds) >= 3 and len(set(seeds)) == len(seeds)
    assert set(GOALS) <= set(ratios) and all(re.fullmatch(r"\d\.\d{4}", k) for k in ratios)
    rows = r["rows"]
    assert set(rows) == set(ADAPTED + FROZEN)
    for m in ADAPTED:  # every trained row: one run per seed at every budget, with the same adaptation
        row = rows[m]
        assert row["adapted"] is True and set(row["per_seed"]) == set(ratios), m
        for k, accs in row["per_seed"].items():
            assert len(accs) == len(seeds) and all(0 <= a <= 1 for a in accs), (m, k)
            assert row["mean"][k] == pytest.approx(_mean(accs)), (m, k)
    for m in FROZEN:
        row = rows[m]
        assert row["adapted"] is False and set(row["per_run"]) == set(ratios), m
        assert all(row["mean"][k] == pytest.approx(_mean(v)) for k, v in row["per_run"].items()), m
    assert all(len(v) == 3 for v in rows["free_random"]["per_run"].values())  # three random draws
    for c in CONTROLS:  # paired margins: learned minus control, seed by seed
        for k in ratios:
            e = r["margins_vs_adapted_controls"][c][k]
            diffs = [a - b for a, b in zip(rows["learned"]["per_seed"][k], rows[c]["per_seed"][k])]
            assert e["per_seed"] == pytest.approx(diffs) and e["mean"] == pytest.approx(_mean(diffs)), (c, k)
            assert e["ci95"][0] <= e["mean"] <= e["ci95"][1] and e["real"] == (e["ci95"][0] > 0 or e["ci95"][1] < 0)
    for m in FROZEN:
        for k in ratios:
            assert r["margins_vs_frozen_teacher_rows"][m][k] == pytest.approx(
                rows["learned"]["mean"][k] - rows[m]["mean"][k])
    goals = {g["goal"]: g for g in r["goals"]}
    for k, g in GOALS.items():
        worst = min(rows["learned"]["per_seed"][k]) / r["teacher_accuracy"]
        assert r["retention"][k]["worst"] == pytest.approx(worst)
        goal = goals[f"worst-seed retention at {k} >= {g}"]
        assert goal["measured"] == pytest.approx(worst) and goal["met"] == (worst >= g)
    time_goal = [g for g in r["goals"] if g["goal"].startswith("whole notebook")]
    assert len(time_goal) == 1 and time_goal[0]["measured"] == pytest.approx(r["notebook_time_s"])
    assert time_goal[0]["met"] == (r["notebook_time_s"] <= 600)
    s = r["settings"]  # equal budgets: the one-ratio phase 2 had as many steps as the multi-budget one
    assert r["alone"]["steps"] == s["alone"]["adapt_steps"] == s["phase2"]["adapt_steps"] > 0
    assert s["phase2"]["selector"] == s["phase1"]["selector"] == "learned"
    assert set(r["phase1_only"]) == set(ratios) and len(r["validation_by_phase"]) == len(seeds)


def _pct(x):
    return f"{100 * x:.2f}%"


def _pts(x):
    return f"{100 * x:+.2f}"


def readme_rows(r: dict) -> list[str]:
    """The README table rows that quote lesson 07 (exact text, rendered from the results file)."""
    keys, names = list(GOALS), "0.25 / 7 of 64 / 4 of 64"
    n = len(r["seeds"])
    retention = " / ".join(_pct(r["retention"][k]["worst"]) for k in keys)
    margins = []
    for k in keys:
        c = max(CONTROLS, key=lambda c: r["rows"][c]["mean"][k])
        e = r["margins_vs_adapted_controls"][c][k]
        margins.append(f"{_pts(e['mean'])} [{_pts(e['ci95'][0])}, {_pts(e['ci95'][1])}] ({r['rows'][c]['label']})")
    naive = " / ".join(_pts(r["margins_vs_frozen_teacher_rows"]["free_fastv"][k]) for k in keys)
    return [
        f"| lesson 07: learned pruner (one model per seed for every budget), worst of {n} seeds, retention at keep "
        f"{names} | {retention} | 99.8% / 99.5% / 99.0% |",
        f"| lesson 07: learned minus the strongest adapted control (same language-model training, frozen "
        f"selection), points, paired over {n} seeds, mean [95% interval], at keep {names} | "
        f"{' / '.join(margins)} | |",
        f"| lesson 07: learned minus FastV-style on the frozen teacher (no adaptation: not a fair margin), points, "
        f"at keep {names} | {naive} | |",
        f"| lesson 07 in one go ({r['device']}, shipped teacher `{r['teacher_sha256'][:12]}`) | "
        f"{r['notebook_time_s']:.0f} s | 10 min |",
    ]


def test_results_07_schema():
    check_schema(load())


def test_check_schema_catches_an_inconsistent_file():
    r = load()
    r["rows"]["learned"]["per_seed"]["0.2500"][0] -= 0.01  # a per-seed number edited by hand
    with pytest.raises(AssertionError):
        check_schema(r)


def test_readme_quotes_lesson_07():
    readme = (ROOT / "README.md").read_text()
    missing = [row for row in readme_rows(load()) if row not in readme]
    assert not missing, "README rows to paste (python tests/test_results_07.py):\n" + "\n".join(missing)


def test_readme_prose_on_lesson_07_matches_the_run():
    """README: the fair margins "stay under one point down to 4 of 64 tokens and grow as the budget shrinks"."""
    r = load()
    assert "stay under one point down to 4 of 64 tokens and grow as the" in (ROOT / "README.md").read_text()
    margins = r["margins_vs_adapted_controls"]
    fair = {k: min(margins[c][k]["mean"] for c in CONTROLS) for k in r["ratios"]}  # vs the strongest control
    assert all(fair[k] < 0.01 for k in ("0.2500", "0.1094", "0.0625")), fair
    small = sorted((k for k in r["ratios"] if float(k) <= 0.25), key=float, reverse=True)
    assert all(fair[a] <= fair[b] for a, b in zip(small, small[1:])), fair  # grows as the budget shrinks


# Lesson 07's markdown may contain recipe settings and exercise inputs, never a measured number: the numbers
# allowed in its prose, all of them settings (measured values are rendered by code cells from the run).
ALLOWED_NUMBERS = {"07", "0", "0.1", "0.5", "1", "1.0", "2", "3", "4", "5", "6", "7", "8", "10", "64", "0.25", "0.01",
                   "0.99", "0.02", "0.05", "0.975", "4.303", "0.990", "0.985", "0.992", "0.970", "0.972", "0.975",
                   "2,000", "99.8", "99.5", "99.0", "2017", "2021", "2024", "2025", "2015", "95", "03", "05", "06", "08",
                   "1/2", "7/64", "4/64", "0/1", "256"}


def test_lesson_07_prose_has_no_typed_measurements():
    assert not strict_prose_problems((ROOT / "notebooks" / "07_train_pruner.ipynb"), ALLOWED_NUMBERS)


if __name__ == "__main__":
    print("\n".join(readme_rows(load())))
