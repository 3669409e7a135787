"""Numbers in prose come from code: the markdown of lessons 00-05 types no measured number.

A results sentence is either rendered by a code cell from the run's own values (``IPython.display.Markdown``) or it
quotes no number. The scan flags, in every markdown cell, the decimals and percentages with two or more significant
digits (``0.63``, ``2.1``, ``13%``) and any decimal or percentage right after a hedge (``about 0.2``, ``≈ 0.5``,
``measured 0.01``): the forms a measurement is typed in. Numbers that are not measurements but look like one are
allowed below, each with its reason; keep the list short, and prefer rewriting the sentence (a definition such as
sigma(1) instead of its value, or a pointer to the cell that prints it).
"""
import json
import re
from pathlib import Path

import pytest

LESSONS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0[0-5]_*.ipynb"))

# token -> (lessons where it may appear, why it is not a measurement)
ALLOWED = {
    "0.25": (("00", "03"), "the target keep ratio rho, a hyper-parameter the lessons' code sets"),
    "0.125": (("03",), "the second target keep ratio of lesson 03's exercise 2, set in its solution"),
    "0.5772": (("02",), "Euler's constant gamma, the mean of a standard Gumbel"),
    "0.632": (("02",), "1 - 1/e, the one-Gumbel gate's keep rate at l = 0 in closed form"),
    "63%": (("02",), "1 - 1/e again, as a share of tokens"),
    "1.05": (("04",), "0.5^2 + 4 * 0.5^2 / (1 + 0.5^2), the best 4-token error of the RedundantTask, in closed form"),
}

# citations and names that contain a decimal point but no quantity: arXiv identifiers, versioned model names
_NOT_QUANTITIES = re.compile(r"arXiv:\s*\d+\.\d+|\b[A-Za-z][\w]*-\d+(?:\.\d+)+")
_NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+(?:\s*\\?%)?|\d+\s*\\?%)")
_HEDGE = re.compile(r"(?:\babout|\baround|\broughly|\bapproximately|\bnearly|\bmeasured|≈|\\approx|~|\\sim)"
                    r"[\s$:({]*$", re.IGNORECASE)


def _normalise(token: str) -> str:
    return re.sub(r"\s|\\", "", token)


def significant_digits(token: str) -> int:
    """Digits from the first non-zero one to the last non-zero one: 0.25 -> 2, 5.0 -> 1, 20% -> 1, 0.047 -> 2."""
    return len(re.sub(r"\D", "", token).strip("0"))


def typed_measurements(text: str, lesson: str) -> list[str]:
    """The numbers of a markdown text that read as typed measurements and are not allowed in ``lesson``."""
    text = _NOT_QUANTITIES.sub(" ", text)
    found = []
    for m in _NUMBER.finditer(text):
        token = _normalise(m.group(1))
        hedged = bool(_HEDGE.search(text[max(0, m.start() - 30):m.start()]))
        if (significant_digits(token) >= 2 or hedged) and lesson not in ALLOWED.get(token, ((), ""))[0]:
            found.append(token)
    return found


def strict_prose_problems(path: Path, allowed: set, max_words: int = 320) -> list[str]:
    """The strict scan of the GPU lessons' markdown: outside formulas and code names, every number must be in
    ``allowed`` (budgets, step counts, lesson numbers: never a measurement), and no cell is over ``max_words``."""
    problems = []
    for i, text in _markdown_cells(path):
        text = re.sub(r"`[^`]*`", " ", re.sub(r"\$[^$]*\$", " ", text))  # formulas and code: symbols, not measurements
        numbers = set(re.findall(r"\d+(?:[.,/]\d+)*", text))
        if not numbers <= allowed:
            problems.append(f"cell {i}: numbers typed in prose {sorted(numbers - allowed)}")
        if len(text.split()) > max_words:
            problems.append(f"cell {i}: {len(text.split())} words (split it)")
    return problems


def _markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def test_lessons_00_to_05_are_scanned():
    assert [p.name[:2] for p in LESSONS] == ["00", "01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_no_typed_measurement_in_markdown(path):
    lesson = path.name[:2]
    typed = [(i, token) for i, text in _markdown_cells(path) for token in typed_measurements(text, lesson)]
    assert not typed, (f"{path.name}: numbers typed into markdown (cell index, number): {typed}. Render the sentence "
                       "from the run's values with IPython.display.Markdown, or drop the number; a constant that is "
                       "not a measurement goes into ALLOWED with its reason")


@pytest.mark.parametrize("sentence", [
    "Without the fix, accuracy drops to 0.63.",
    "the bias is 0.13, far above the noise floor",
    "One epoch takes 2.1 s on the CPU.",
    "the multiplier oscillates between 0.4 and 1.7",
    "the STE's per-step error (about 0.2) is no worse",
    "threshold 0.5 keeps 20% instead of 25% of the tokens",
    r"a gap of $\approx 0.3$",
    "zero in our toy (measured 0.01)",
    "the one-Gumbel gate keeps 63% of the tokens",
])
def test_the_scan_flags_typed_measurements(sentence):
    assert typed_measurements(sentence, "01"), sentence


@pytest.mark.parametrize("sentence", [
    r"anneal $\tau$ exponentially from 5.0 to 0.1; DynamicViT keeps $\tau = 1$",
    "keep ratio 0.5, 20,000 draws, a tolerance of 4 standard errors, the top 4 of 64 tokens",
    "arXiv:1308.3432, 2013; LLaVA-1.5's vocabulary",
    "a 1% tolerance, half of the tokens (50%)",
])
def test_the_scan_passes_definitions_and_citations(sentence):
    assert not typed_measurements(sentence, "01"), sentence


def test_allowed_constants_are_still_used():
    texts = {p.name[:2]: " ".join(t for _, t in _markdown_cells(p)) for p in LESSONS}
    for token, (lessons, reason) in ALLOWED.items():
        assert reason and lessons
        for lesson in lessons:
            used = [_normalise(m.group(1)) for m in _NUMBER.finditer(_NOT_QUANTITIES.sub(" ", texts[lesson]))]
            assert token in used, f"ALLOWED[{token!r}] is no longer used in lesson {lesson}: remove it"
