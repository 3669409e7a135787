"""The lessons stay readable: no markdown wall, the course's sections, hidden exercise solutions."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
APPENDICES = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("appendix_*.ipynb"))
CHECKED = NOTEBOOKS
MAX_WORDS = 300


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _text(cell):
    return "".join(cell["source"])


def _headings(cells):
    return [line.lstrip("#").strip() for c in cells if c["cell_type"] == "markdown"
            for line in _text(c).splitlines() if re.match(r"#{1,4} ", line)]


def test_every_lesson_is_checked():
    assert len(NOTEBOOKS) >= 10 and CHECKED == NOTEBOOKS


@pytest.mark.parametrize("path", CHECKED + APPENDICES, ids=lambda p: p.stem)
def test_no_markdown_cell_over_300_words(path):
    long = [(i, len(_text(c).split())) for i, c in enumerate(_cells(path))
            if c["cell_type"] == "markdown" and len(_text(c).split()) > MAX_WORDS]
    assert not long, f"{path.name}: markdown cells (index, words) over {MAX_WORDS} words: {long}"


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.stem)
def test_lesson_has_exercises_takeaways_and_references(path):
    heads = _headings(_cells(path))
    for section in ("Exercises", "Takeaways", "References"):
        assert any(section in h for h in heads), f"{path.name}: no '{section}' heading in {heads}"


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.stem)
def test_exercise_solutions_are_hidden(path):
    cells = _cells(path)
    start = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and re.search(r"^#+ .*Exercises", _text(c), re.M))
    solutions = [c for c in cells[start:] if c["cell_type"] == "code" and re.match(r"#\s*\d*\.?\s*solution|#\s*\d+\. ", _text(c), re.I)]
    hidden = any(c["cell_type"] == "code" and c["metadata"].get("jupyter", {}).get("source_hidden") for c in cells[start:])
    checked = any(c["cell_type"] == "code" and re.search(r"\bcheck\w*\(", _text(c)) for c in cells[start:])
    assert hidden or checked, f"{path.name}: no collapsed solution cell (or check(answer) helper) after the Exercises heading"
    shown = [c["id"] for c in solutions if not c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert not shown, f"{path.name}: solution cells not collapsed: {shown}"
