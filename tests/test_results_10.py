"""Lesson 10 (scenes at 576 tokens): its prose types no measured number, and, once its full GPU run has written
``results/10_scenes.json``, that file has the promised schema, numbers that agree with each other and goal flags
that follow from the recorded values."""
import json
import math
import re
from pathlib import Path

import pytest
from test_prose_numbers import typed_measurements

from vtp.scene_eval import PEERS
from vtp.scene_teacher import SCENE_TEACHER_RECIPE, scene_config
from vtp.scenes import SPLIT_SIZES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "10_scenes.json"
NOTEBOOK = ROOT / "notebooks" / "10_scenes.ipynb"
BUDGETS = ("192", "128", "64")
GOALS = {"teacher_accuracy", "teacher_worst_family", "teacher_time", "random_gap_64", "lesson_time"}


def _cells():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def test_lesson_10_types_no_measured_number_in_markdown():
    typed = [(i, t) for i, c in enumerate(_cells()) if c["cell_type"] == "markdown"
             for t in typed_measurements("".join(c["source"]), "10")]
    assert not typed, f"numbers typed into lesson 10's markdown (cell index, number): {typed}; render them from the run"


def test_lesson_10_cells_with_outputs_have_execution_counts():
    bad = [i for i, c in enumerate(_cells()) if c["cell_type"] == "code" and c.get("outputs")
           and c.get("execution_count") is None]
    assert not bad, f"code cells with outputs but no execution count (nbval fails on them): {bad}"


def test_lesson_10_writes_results_in_full_mode_only():
    src = "\n".join("".join(c["source"]) for c in _cells() if c["cell_type"] == "code")
    assert re.search(r'REPO_ROOT / "results" / "10_scenes.json" if FULL else', src)


@pytest.fixture(scope="module")
def res():
    if not RESULTS.exists():
        pytest.skip(f"results/{RESULTS.name} is absent: it is written by lesson 10's full run on a GPU")
    return json.loads(RESULTS.read_text())


@pytest.fixture(scope="module")
def families(res):
    return list(scene_config(res["teacher"]["recipe"]).families)


def _fraction(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_written_by_a_full_gpu_run(res):
    assert res["lesson"] == "10_scenes" and res["mode"] == "full"
    assert not res["device"].startswith("CPU"), res["device"]
    assert re.fullmatch(r"[0-9a-f]{64}", res["teacher"]["sha256"])
    assert res["visual_tokens"] == 576 and res["scenes"]["image_size"] == 192 and res["scenes"]["patch_size"] == 8
    assert res["seeds"] == [0, 1, 2]
    assert res["notebook_time_s"] > 0


def test_teacher(res, families):
    t = res["teacher"]
    assert scene_config(t["recipe"]) == scene_config(SCENE_TEACHER_RECIPE), "the teacher of another scene distribution"
    assert t["steps"] > 0 and t["dense_steps"] > 0 and 0 < t["train_time_s"] < t["total_s"]
    assert isinstance(t["trained_now"], bool) and t["trained_on"]
    for name, n in (("test", SPLIT_SIZES["test"]), ("blank", SPLIT_SIZES["test"]),
                    ("compositional", SPLIT_SIZES["compositional"])):
        assert t[name]["n"] == n, name
        assert _fraction(t[name]["accuracy"]) and list(t[name]["per_family"]) == families, name
        assert all(_fraction(v) for v in t[name]["per_family"].values()), name
    # balanced families: the overall accuracy is the mean of the per-family ones
    assert t["test"]["accuracy"] == pytest.approx(sum(t["test"]["per_family"].values()) / len(families), abs=1e-3)
    assert res["splits"]["test"]["questions"] == SPLIT_SIZES["test"]
    assert set(res["splits"]["test"]["per_family"]) == set(families)


def test_peers_at_every_budget(res, families):
    assert list(res["budgets"]) == list(BUDGETS)
    subset = res["subset_questions"]
    assert 1000 <= subset < SPLIT_SIZES["test"]
    for key, b in res["budgets"].items():
        assert b["of_576"] == int(key) == b["kept"] and b["ratio"] == pytest.approx(int(key) / 576)
        assert b["questions"] == (SPLIT_SIZES["test"] if key == "64" else subset), key
        peers = b["peers"]
        assert set(peers) == set(PEERS), key
        for name, p in peers.items():
            assert p["n"] == b["questions"] and p["visual_tokens"] == b["kept"], (key, name)
            assert _fraction(p["accuracy"]) and _fraction(p["evidence_recall_overall"]), (key, name)
            assert list(p["per_family"]) == families and list(p["evidence_recall"]) == families, (key, name)
            assert all(_fraction(v) for v in [*p["per_family"].values(), *p["evidence_recall"].values()]), (key, name)
            for f in families:  # no selection keeps more of the evidence than the oracle
                assert p["evidence_recall"][f] <= peers["evidence_oracle"]["evidence_recall"][f] + 1e-9, (key, name, f)
        rnd = peers["random"]
        seeds = rnd["per_seed"]
        assert [s["seed"] for s in seeds] == res["seeds"]
        accs = [s["accuracy"] for s in seeds]
        assert rnd["accuracy"] == pytest.approx(sum(accs) / len(accs))
        assert rnd["accuracy_min"] == min(accs) and rnd["accuracy_max"] == max(accs)
        for f in families:
            assert rnd["per_family"][f] == pytest.approx(sum(s["per_family"][f] for s in seeds) / len(seeds))
        p, n = b["kept"] / 576, b["questions"]
        assert abs(rnd["evidence_recall_overall"] - p) < 4 * math.sqrt(p * (1 - p) / n), key  # E[r] = k / N


def test_goal_flags_follow_from_the_values(res):
    goals, t = res["goals"], res["teacher"]
    assert set(goals) == GOALS
    for key, g in goals.items():
        assert g["op"] in (">=", "<=") and isinstance(g["met"], bool) and g["goal"], key
        met = g["value"] >= g["target"] if g["op"] == ">=" else g["value"] <= g["target"]
        if key == "teacher_time":
            met = met and "H200" in t["trained_on"]
        assert g["met"] == met, key
    assert goals["teacher_accuracy"]["value"] == t["test"]["accuracy"] and goals["teacher_accuracy"]["target"] == 0.97
    assert goals["teacher_worst_family"]["value"] == min(t["test"]["per_family"].values())
    assert goals["teacher_worst_family"]["target"] == 0.93
    assert goals["teacher_time"]["value"] == t["total_s"] and goals["teacher_time"]["target"] == 600
    gap = t["test"]["accuracy"] - res["budgets"]["64"]["peers"]["random"]["accuracy"]
    assert goals["random_gap_64"]["value"] == pytest.approx(gap) and goals["random_gap_64"]["target"] == 0.10
    assert goals["lesson_time"]["value"] == res["notebook_time_s"] and goals["lesson_time"]["target"] == 600


def _p(x: float) -> str:
    return f"{100 * x:.1f}%"


def readme_rows(r: dict) -> list[str]:
    """The README table rows that quote lesson 10 (exact text, rendered from the results file)."""
    t, fam = r["teacher"], r["teacher"]["test"]["per_family"]
    worst = min(fam, key=fam.get)
    peers = r["budgets"]["64"]["peers"]
    names = {"random": "random (3 seeds)", "fastv": "FastV-style", "visionzip": "VisionZip-style",
             "evidence_oracle": "evidence oracle"}
    acc = " / ".join(_p(peers[k]["accuracy"]) for k in names)
    recall = " / ".join(f"{peers[k]['evidence_recall_overall']:.2f}" for k in names)
    return [
        f"| lesson 10: scenes teacher ({t['trained_on']}, {t['total_s']:.0f} s with data generation), test accuracy "
        f"overall / worst family ({worst}) / blank images | {_p(t['test']['accuracy'])} / {_p(fam[worst])} / "
        f"{_p(t['blank']['accuracy'])} | >= 97% / >= 93% / - |",
        f"| lesson 10: frozen scenes teacher at 64 of 576 tokens, {' / '.join(names.values())}: accuracy (evidence "
        f"recall) | {acc} ({recall}) | random >= 10 points below the teacher |",
    ]


def test_readme_quotes_lesson_10(res):
    readme = (ROOT / "README.md").read_text()
    missing = [row for row in readme_rows(res) if row not in readme]
    assert not missing, "README rows to paste (python tests/test_results_10.py):\n" + "\n".join(missing)


if __name__ == "__main__":
    print("\n".join(readme_rows(json.loads(RESULTS.read_text()))))
