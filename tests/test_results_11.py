"""results/11_pruning_at_576.json (written by lesson 11's full run): the ``summary`` object's exact schema, checked
on synthetic per-run results (always) and on the committed file (when the full run has written it); the goals and
paired differences recomputed from the rows; and lesson 11's prose free of typed measured numbers."""
import json
import math
import re
from pathlib import Path

import pytest

from vtp import scene_pruning as sp
from vtp.stats import paired_effect
from test_prose_numbers import strict_prose_problems

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "11_pruning_at_576.json"
NOTEBOOK = ROOT / "notebooks" / "11_pruning_at_576.ipynb"
N_TEST = 10_080


def _synthetic(n=N_TEST, seeds=3):
    """Per-run accuracies as the notebook passes them to build_summary: counts out of ``n`` questions."""
    frac = lambda count: count / n  # noqa: E731
    trained = {m: {b: [frac(n // 2 + 10 * i + j) for j in range(seeds)] for i, b in enumerate(sp.BUDGETS)}
               for m in ("learned", "adapted_control", "adapted_peer")}
    peers = {"random": {b: [frac(n // 3 + j) for j in range(seeds)] for b in sp.BUDGETS},
             **{m: {b: [frac(n // 4 + k)] for b in sp.BUDGETS} for k, m in enumerate(("fastv", "visionzip",
                                                                                        "evidence_oracle"))}}
    return trained, peers


def test_build_summary_has_exactly_the_schema():
    trained, peers = _synthetic()
    s = sp.build_summary(576, 7000 / N_TEST, 540.0, trained, peers)
    assert list(s) == ["visual_tokens", "teacher_accuracy", "teacher_train_s", "budgets"]
    assert s["visual_tokens"] == 576 and isinstance(s["teacher_train_s"], float)
    assert list(s["budgets"]) == ["192", "128", "64"]
    for b, row in s["budgets"].items():
        assert list(row) == ["learned", "adapted_control", "adapted_peer", "random", "fastv", "visionzip",
                             "evidence_oracle"]
        assert all(isinstance(row[m], list) and len(row[m]) == 3 for m in ("learned", "adapted_control", "adapted_peer"))
        assert row["random"] == pytest.approx(sum(peers["random"][b]) / 3)  # the mean of three draws
        assert all(isinstance(row[m], float) for m in ("random", "fastv", "visionzip", "evidence_oracle"))
    sp.check_summary(s, visual_tokens=576, n_questions=N_TEST)
    json.loads(json.dumps(s))  # JSON-ready
    # a smoke run writes the same structure (its own token count and questions)
    trained, peers = _synthetic(n=600)
    sp.check_summary(sp.build_summary(16, 0.5, 25.0, trained, peers), visual_tokens=16, n_questions=600)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("teacher_train_s"), "exactly"),
    (lambda s: s.update(extra=1), "exactly"),
    (lambda s: s["budgets"].pop("64"), "budgets"),
    (lambda s: s["budgets"]["64"]["learned"].pop(), "3 accuracies"),
    (lambda s: s["budgets"]["128"].update(learned_alone=0.5), "exactly the keys"),
    (lambda s: s["budgets"]["192"].update(fastv=1.2), "accuracy"),
    (lambda s: s["budgets"]["192"].update(visionzip=1), "accuracy"),  # an int is not a fraction
    (lambda s: s.update(visual_tokens=64), "576"),
    (lambda s: s["budgets"]["64"]["adapted_control"].__setitem__(0, 0.5 + 0.3 / N_TEST), "10080 questions"),
])
def test_check_summary_rejects(edit, match):
    trained, peers = _synthetic()
    s = sp.build_summary(576, 7000 / N_TEST, 540.0, trained, peers)
    edit(s)
    with pytest.raises(ValueError, match=match):
        sp.check_summary(s, visual_tokens=576, n_questions=N_TEST)


def test_adapted_peer_may_be_one_number():
    trained, peers = _synthetic()
    s = sp.build_summary(576, 0.7, 540.0, trained, peers)
    s["budgets"]["64"]["adapted_peer"] = 0.5
    sp.check_summary(s)


def test_goals_from_a_summary():
    trained, peers = _synthetic()
    s = sp.build_summary(576, 0.8, 540.0, trained, peers)
    row = s["budgets"]["64"]
    row.update(learned=[0.79, 0.795, 0.8], adapted_control=[0.7] * 3, adapted_peer=[0.75] * 3, visionzip=0.76,
               fastv=0.6, random=0.65)
    g = {x["goal"].split(" >=")[0].split(" at least")[0]: x for x in sp.goals(s)}
    ret = g["worst-seed retention at 64/576"]
    assert ret["measured"] == pytest.approx(0.79 / 0.8) and ret["met"] and ret["missed_by"] == 0
    margin = g["learned mean minus the best control or peer at 64/576"]
    assert margin["best_of"] == "visionzip" and margin["measured"] == pytest.approx(0.795 - 0.76) and margin["met"]
    rand = g["random at 64/576"]
    assert rand["measured"] == pytest.approx(0.15) and rand["met"]
    row["visionzip"] = 0.78
    margin = next(x for x in sp.goals(s) if "best_of" in x)
    assert not margin["met"] and margin["missed_by"] == pytest.approx(0.03 - 0.015)


def check_results(r: dict) -> None:
    """AssertionError / ValueError unless ``r`` is a complete lesson-11 results file whose numbers agree."""
    assert r["lesson"] == "11" and r["mode"] == "full" and isinstance(r["device"], str) and r["device"]
    assert re.fullmatch(r"[0-9a-f]{64}", r["teacher_sha256"])
    assert r["test_questions"] == N_TEST and len(r["seeds"]) == 3
    s = r["summary"]
    sp.check_summary(s, visual_tokens=576, n_questions=N_TEST)
    rows = r["rows"]
    for b, row in s["budgets"].items():
        for m in ("learned", "adapted_control", "adapted_peer"):
            assert rows[m]["accuracy"][b] == pytest.approx(row[m] if isinstance(row[m], list) else [row[m]])
        for m in ("fastv", "visionzip", "evidence_oracle", "random"):
            acc = rows[m]["accuracy"][b]
            assert row[m] == pytest.approx(sum(acc) / len(acc))
        for c in ("adapted_control", "adapted_peer"):  # paired differences learned - control, recomputed
            e, ref = r["paired_learned_minus"][b][c], paired_effect(row["learned"], row[c])
            assert e["per_seed"] == pytest.approx(ref["per_seed"]) and e["ci95"] == pytest.approx(ref["ci95"])
    assert r["control_peer"] in ("visionzip", "fastv")
    goals = {g["goal"]: g for g in r["goals"]}
    for g in sp.goals(s):
        assert goals[g["goal"]]["measured"] == pytest.approx(g["measured"]) and goals[g["goal"]]["met"] == g["met"]
    assert math.isfinite(r["notebook_time_s"]) and r["notebook_time_s"] > 0


def test_committed_results_11():
    if not RESULTS.exists():
        pytest.skip("results/11_pruning_at_576.json is written by lesson 11's full run on a GPU, not run yet")
    check_results(json.loads(RESULTS.read_text()))


# Lesson 11's markdown may contain settings, targets and exercise inputs, never a measured number (those are
# rendered by its code cells from the run).
# ("1.5": LLaVA-1.5; "32": float32; "256": SHA-256; "1/2": FastV's title; 2412.04467: an arXiv id)
ALLOWED_NUMBERS = {"11", "07", "10", "0", "1", "2", "3", "4", "5", "24", "64", "128", "192", "576", "0.1", "95", "98",
                   "99", "99.5", "2017", "2021", "2024", "2025", "1.5", "32", "256", "2412.04467", "1/2", "64/576",
                   "128/576", "192/576"}


def test_lesson_11_prose_has_no_typed_measurements():
    assert not strict_prose_problems(NOTEBOOK, ALLOWED_NUMBERS)


def test_lesson_11_outputs_come_from_the_run_of_its_results():
    """Committed without outputs until its GPU run; after it, every code cell executed and the outputs name the
    device and the notebook time of the results file."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    if not RESULTS.exists():
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
        return
    r = json.loads(RESULTS.read_text())
    assert all(c["execution_count"] is not None for c in code)
    text = json.dumps([c["outputs"] for c in code])
    assert f"device: {r['device']}" in text and f"notebook ran in {r['notebook_time_s']:.0f} s on {r['device']}" in text
    assert "Traceback" not in text and '"name": "stderr"' not in text


def _pts(e: dict) -> str:
    lo, hi = e["ci95"]
    return f"{100 * e['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def readme_rows(r: dict) -> list[str]:
    """The README table rows that quote lesson 11 (exact text, rendered from the results file)."""
    s, g = r["summary"], {x["goal"]: x for x in r["goals"]}
    avg = lambda v: sum(v) / len(v) if isinstance(v, list) else v  # noqa: E731
    ret = [g[f"worst-seed retention at {b}/576 >= {sp.GOALS['retention'][b]:.1%}"] for b in sp.BUDGETS]  # 192, 128, 64
    margin = next(x for x in r["goals"] if "best_of" in x)
    row = s["budgets"]["64"]
    peer = {"fastv": "FastV-style", "visionzip": "VisionZip-style"}[r["control_peer"]]
    paired = r["paired_learned_minus"]["64"]
    return [
        f"| lesson 11: learned pruner on the scenes ({r['device']}, {len(r['seeds'])} seeds, {r['test_questions']:,} "
        f"test questions), worst-seed retention at 192 / 128 / 64 of 576 | "
        + " / ".join(f"{100 * x['measured']:.2f}%" for x in ret)
        + f" ({'met' if all(x['met'] for x in ret) else 'not met'}) | 99.5% / 99% / 98% |",
        f"| lesson 11 at 64 of 576, test accuracy (mean over seeds): learned / control (a) untrained scorer / control "
        f"(b) {peer} selection, all three with the same language-model adaptation; VisionZip-style / FastV-style on "
        f"the frozen teacher | {100 * avg(row['learned']):.2f}% / {100 * avg(row['adapted_control']):.2f}% / "
        f"{100 * avg(row['adapted_peer']):.2f}%; {100 * row['visionzip']:.2f}% / {100 * row['fastv']:.2f}% | "
        f"learned >= 3 points above the best of the other four ({100 * margin['measured']:+.2f}: "
        f"{'met' if margin['met'] else 'not met'}) |",
        f"| lesson 11 at 64 of 576: learned minus control (a) / control (b), points, paired over {len(r['seeds'])} "
        f"seeds, mean [95% interval] | {_pts(paired['adapted_control'])} / {_pts(paired['adapted_peer'])} | |",
    ]


def test_readme_claims_about_lesson_11():
    """The README's words on lesson 11, checked on the results file at 64/576."""
    if not RESULTS.exists():
        pytest.skip("results/11_pruning_at_576.json is written by lesson 11's full run on a GPU, not run yet")
    r = json.loads(RESULTS.read_text())
    s, paired = r["summary"], r["paired_learned_minus"]["64"]
    assert paired["adapted_control"]["ci95"][0] > 0  # control (a): the interval excludes 0
    lo, hi = paired["adapted_peer"]["ci95"]
    assert lo < 0 < hi and r["control_peer"] == "fastv"  # control (b), FastV-style: within the noise
    assert min(r["evidence_recall_overall"]["fastv"].values()) > 0.99  # FastV-style keeps the evidence
    peer = s["budgets"]["64"]["adapted_peer"]
    assert s["teacher_accuracy"] - sum(peer) / len(peer) < sp.GOALS["margin_64"]  # no room for the margin goal
    # every training ran the planned 240 + 180 steps (the schedule the README names)
    assert r["equal_steps"] is True and {(v["phase1"], v["phase2"]) for v in r["steps"].values()} == {(240, 180)}
    assert all(v["stopped_early"] is None for v in r["steps"].values())
    # retention met at 128 and 64 of 576 on the worst seed, missed at 192; the recipe study met all three
    met = {x["goal"].split(" at ")[1].split("/")[0]: x["met"] for x in r["goals"] if x["goal"].startswith("worst-seed")}
    assert met == {"192": False, "128": True, "64": True}
    study = json.loads((ROOT / "results" / "11_recipe_study.json").read_text())
    assert study["teacher_sha256"] == r["teacher_sha256"] and all(study["variants"]["recipe"]["goals_met"].values())
    assert study["shared_overrides"]["adapt_steps"] == 180
    # on relation, the learned pruner's weakest family, its selection keeps the evidence
    for b in sp.BUDGETS:
        fam = r["per_family"]["learned"][b]
        assert min(fam, key=lambda f: fam[f] / r["teacher_per_family"][f]) == "relation"
        assert r["evidence_recall"]["learned"][b]["relation"] > 0.98


def test_readme_quotes_lesson_11():
    if not RESULTS.exists():
        pytest.skip("results/11_pruning_at_576.json is written by lesson 11's full run on a GPU, not run yet")
    readme = (ROOT / "README.md").read_text()
    missing = [row for row in readme_rows(json.loads(RESULTS.read_text())) if row not in readme]
    assert not missing, "README rows to paste (python tests/test_results_11.py):\n" + "\n".join(missing)


if __name__ == "__main__":
    print("\n".join(readme_rows(json.loads(RESULTS.read_text()))))
