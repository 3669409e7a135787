"""Exercise answers checked without being shown: :func:`check` says right or wrong, never the answer.

The answers are stored as SHA-256 digests of the value rounded to the exercise's precision, so reading this
file does not give them away either. A lesson's solution cell (collapsed in the notebook) derives the answer
and checks it the same way.
"""
from __future__ import annotations

import hashlib
import math

__all__ = ["ANSWERS", "check", "digest"]

# exercise id -> (decimals the answer is rounded to, SHA-256 of the rounded value)
ANSWERS = {
    "00.1": (2, "f88afaea4207e3bdbf9381c1649835a1780019d246fe640dd86f1abe706462c0"),
    "00.2": (0, "e7f6c011776e8db7cd330b54174fd76f7d0216b612387a5ffcfb81e6f0919683"),
    "00.3": (4, "f3499b6fd23711d2e243b8074433b1e25ba1fe9f21b6040a0133d8f6ab50050c"),
}


def digest(value, decimals: int) -> str:
    """SHA-256 of ``value`` rounded to ``decimals`` places (``-0`` counts as ``0``)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"answer must be a finite number, got {value}")
    text = f"{round(value, decimals) + 0.0:.{decimals}f}"
    return hashlib.sha256(text.encode()).hexdigest()


def check(exercise: str, answer) -> bool:
    """Print whether ``answer`` is right for ``exercise`` (e.g. ``"00.1"``) and return it; ``None`` = not answered."""
    if exercise not in ANSWERS:
        raise KeyError(f"unknown exercise {exercise!r}; known: {sorted(ANSWERS)}")
    if answer is None:
        print(f"exercise {exercise}: not answered yet")
        return False
    decimals, expected = ANSWERS[exercise]
    right = digest(answer, decimals) == expected
    print(f"exercise {exercise}: {'right' if right else 'not right yet, try again'}")
    return right
