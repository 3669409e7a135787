"""The README's measured table quotes the committed results: each number is recomputed here from its file."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_teacher_rows():
    r06 = json.loads((ROOT / "results" / "06_small_vlm.json").read_text())
    assert f"({r06['device']}, sharing the GPU" in README
    assert f"| {_pct(r06['accuracy'])} after {r06['train_time_s']:.0f} s of training |" in README
    shipped = json.loads((ROOT / "pretrained" / "MANIFEST.json").read_text())["teacher_easyvqa"]
    assert f"`{shipped['command']}`".replace(" --out pretrained/teacher_easyvqa", "") in README
    assert f"{shipped['device']}, {shipped['train_time_s']:.0f} s), the teacher of lessons 07 and 08 | " \
           f"{_pct(shipped['test_accuracy'])} |" in README


def test_previous_lesson_07_row():
    r07 = json.loads((ROOT / "results" / "07_train_pruner.json").read_text())
    if "rows" in r07:  # the rewritten lesson's file: tests/test_results_07.py checks its README rows
        return
    worst = " / ".join(_pct(r07["results"][k]["retention_worst"]) for k in ("0.2500", "0.1094", "0.0625"))
    assert f"previous lesson 07 ({r07['device'].split(' 80GB')[0]}" in README
    assert f"retention at keep 0.25 / 7 of 64 / 4 of 64 | {worst} |" in README
