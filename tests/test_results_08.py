"""The committed results of lesson 08 (written by its full GPU run): the schema the lesson promises, effects
that recompute from the per-seed accuracies, the shipped teacher, and no measured number typed into its prose."""
import json
import re
from pathlib import Path

import pytest

from vtp.stats import paired_effect

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "08_why_accuracy_drops.json"
NOTEBOOK = ROOT / "notebooks" / "08_why_accuracy_drops.ipynb"



@pytest.fixture(scope="module")
def res():
    assert RESULTS.exists(), f"{RESULTS.name} is missing: execute lesson 08 in full mode on a GPU"
    data = json.loads(RESULTS.read_text())
    missing = [k for k in ("teacher_sha256", "ladder", "leave_one_out", "variants", "fixes", "mask_law", "answer")
               if k not in data]
    assert not missing, f"{RESULTS.name} lacks {missing}: it predates the controlled experiment; execute lesson 08 " \
                        "in full mode on a GPU to replace it"
    return data


def test_written_by_a_full_run_with_the_shipped_teacher(res):
    assert res.get("mode") == "full", "the committed results must come from the full (GPU) run of lesson 08"
    shipped = json.loads((ROOT / "pretrained" / "MANIFEST.json").read_text())["teacher_easyvqa"]["sha256"]
    assert res["teacher_sha256"] == shipped
    assert len(res["seeds"]) >= 3 and len(set(res["seeds"])) == len(res["seeds"])
    assert 0 < res["target_ratio"] <= 0.25


def test_ladder_and_leave_one_out(res):
    ladder, loo, variants = res["ladder"], res["leave_one_out"], res["variants"]
    assert ladder[0] == "user recipe" and ladder[-1] == "recommended recipe"
    assert len(ladder) == len(res["fixes"]) + 1 >= 3 and len(loo) == len(res["fixes"])
    assert set(ladder) | set(loo) == set(variants)
    assert variants["user recipe"]["reference"] == "recommended recipe"
    for prev, rung in zip(ladder, ladder[1:]):
        assert variants[rung]["reference"] == prev
    assert all(variants[n]["reference"] == "recommended recipe" for n in loo)
    gap = variants["recommended recipe"]["mean"] - variants["user recipe"]["mean"]
    assert sum(variants[n]["diff_vs_reference"] for n in ladder[1:]) == pytest.approx(gap, abs=1e-9)


def test_every_effect_recomputes_from_the_seeds(res):
    n = len(res["seeds"])
    for name, v in res["variants"].items():
        assert len(v["per_seed"]) == n >= 3 and all(0 <= a <= 1 for a in v["per_seed"]), name
        assert v["mean"] == pytest.approx(sum(v["per_seed"]) / n)
        eff = paired_effect(v["per_seed"], res["variants"][v["reference"]]["per_seed"])
        assert v["diff_per_seed"] == pytest.approx(eff["per_seed"], abs=1e-12), name
        assert v["diff_vs_reference"] == pytest.approx(eff["mean"], abs=1e-12), name
        assert len(v["ci95"]) == 2 and v["ci95"] == pytest.approx(eff["ci95"], abs=1e-9), name
        assert v["real"] == (v["ci95"][0] > 0 or v["ci95"][1] < 0), name
        assert 0 < v["keep_ratio"] <= 1 and v["rule"] in ("topk", "threshold")


def test_mask_law_and_rendered_answer(res):
    law = res["mask_law"]["per_seed"]
    assert len(law) == len(res["seeds"]) and all(
        0 <= x[k] <= 1 for x in law for k in ("phase1_topk", "phase1_sample", "phase2_topk"))
    gap = paired_effect([x["phase1_sample"] for x in law], [x["phase1_topk"] for x in law])
    assert res["mask_law"]["sample_minus_topk"]["ci95"] == pytest.approx(gap["ci95"])
    user, rec = res["variants"]["user recipe"], res["variants"]["recommended recipe"]
    for number in (user["mean"], user["keep_ratio"], rec["mean"], res["teacher_accuracy"]):
        assert f"{100 * number:.1f}%" in res["answer"]  # the answer quotes the measured values


def test_lesson_prose_types_no_measured_number():
    """Lesson 08's results are rendered by code: its markdown cells carry no percentage or point figures."""
    nb = json.loads(NOTEBOOK.read_text())
    typed = re.compile(r"\d+\.\d+\s?%|[+-]?\d+\.\d+\s?points")  # measured values carry decimals
    for i, cell in enumerate(nb["cells"][2:], 2):  # cell 1: the full run's answer, checked below
        if cell["cell_type"] == "markdown":
            src = "".join(cell["source"])
            assert not typed.search(src), f"markdown cell {i} types a measured number: {typed.search(src).group()}"
    rendered = [c for c in nb["cells"] if c["cell_type"] == "code" and "display(Markdown(" in "".join(c["source"])]
    assert len(rendered) >= 3  # the tables, the answer and the takeaways are rendered from the run


def test_readme_states_the_answer(res):
    readme = (ROOT / "README.md").read_text()
    assert "> " + res["answer"] in readme, "README: paste results/08_why_accuracy_drops.json's `answer` after " \
                                          "'Lesson 08's answer'"


def test_lesson_opens_with_the_full_runs_answer(res):
    """The first cell after the title is the answer paragraph of the committed full run, verbatim."""
    cell = json.loads(NOTEBOOK.read_text())["cells"][1]
    assert cell["cell_type"] == "markdown" and "".join(cell["source"]).rstrip().endswith(res["answer"])
    assert res["device"] in "".join(cell["source"])


def test_lesson_07_appendix_on_the_input_layernorm_matches(res):
    """Lesson 07's appendix: the input LayerNorm 'changes nothing measurable' when removed from the recommended
    recipe, and 'costs accuracy' when added on the ladder: both read from this run."""
    text = "".join(json.loads((ROOT / "notebooks" / "07_train_pruner.ipynb").read_text())["cells"][47]["source"])
    assert "changes nothing measurable" in text and "costs accuracy" in text
    loo, rung = res["variants"]["recommended - input LayerNorm"], res["variants"]["+ input LayerNorm"]
    assert not loo["real"]
    assert rung["real"] and rung["diff_vs_reference"] < 0
