r"""Questions about a 2-D scene (:mod:`vtp.scenes`): descriptions of objects, the six question families, and the
evidence (the objects each answer is computed from).

A **description** is a dict of some of an object's attributes (``size``, ``color``, ``shape``); it *matches* the
objects that have all of them. :func:`ask` writes a question of one family whose answer is a given value, or
returns None when the scene has no such question (the split generator then draws another scene):

* ``exist``: a sub-description of a random object (answer yes) or one that matches nothing (no);
* ``count``: a description that matches exactly :math:`k` objects;
* ``query_color`` / ``query_shape``: an object with the asked value, described uniquely without that attribute;
* ``relation``: two uniquely described objects whose centres are at least ``cfg.relation_margin`` px apart
  along the axis asked;
* ``compare``: two descriptions with different match counts.

Answers that assert absence (``exist`` "no", ``count`` "zero") depend on every object: their evidence is all
objects. Scenes and configurations are duck-typed here (:class:`vtp.scenes.SceneObject`,
:class:`vtp.scenes.SceneConfig`), so this module imports nothing from :mod:`vtp.scenes`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from .scenes import SceneConfig, SceneObject

__all__ = ["COUNT_WORDS", "RELATIONS", "ATTRS", "family_answers", "ask"]

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left of", "right of", "above", "below")
ATTRS = ("size", "color", "shape")


def _phrase(desc: dict, plural: bool = False) -> str:
    """``{"size": "small", "color": "red"}`` -> "small red thing" (or "things")."""
    noun = desc.get("shape", "thing") + ("s" if plural else "")
    return " ".join([desc[a] for a in ("size", "color") if a in desc] + [noun])


def _matches(objs, desc) -> list:
    return [i for i, o in enumerate(objs) if all(getattr(o, a) == v for a, v in desc.items())]


def _subsets(rng, keys=ATTRS):
    """Non-empty attribute subsets of ``keys`` in random order."""
    subs = [tuple(k for j, k in enumerate(keys) if m >> j & 1) for m in range(1, 2 ** len(keys))]
    return [subs[i] for i in rng.permutation(len(subs))]


def _unique_desc(objs, i, rng, keys=ATTRS):
    """A description of object ``i`` (attributes from ``keys``) that matches it alone, or None."""
    for sub in _subsets(rng, keys):
        d = {a: getattr(objs[i], a) for a in sub}
        if _matches(objs, d) == [i]:
            return d
    return None


def _random_desc(cfg, rng):
    sub = _subsets(rng)[0]
    vals = {"size": [n for n, _ in cfg.sizes], "color": cfg.colors, "shape": cfg.shapes}
    return {a: vals[a][int(rng.integers(len(vals[a])))] for a in sub}


def _sub_desc(obj: SceneObject, rng) -> dict:
    """A random non-empty part of ``obj``'s description (it matches ``obj``)."""
    return {a: getattr(obj, a) for a in _subsets(rng)[0]}


def _desc_with_count(objs, k, cfg, rng, tries=12):
    """A description matching exactly ``k`` objects (``k`` = 0: none), or None."""
    for _ in range(tries):
        d = _random_desc(cfg, rng) if k == 0 else _sub_desc(objs[int(rng.integers(len(objs)))], rng)
        if len(_matches(objs, d)) == k:
            return d
    return None


def family_answers(family: str, cfg: SceneConfig, compositional: bool = False) -> tuple:
    """The answers of ``family`` under ``cfg`` (balanced in every split). In the compositional split a query's
    answer must be an attribute of a held-out pair (the queried object is the whole evidence)."""
    if family in ("exist", "relation", "compare"):
        return ("yes", "no")
    if family == "count":
        return COUNT_WORDS[: cfg.max_count + 1]
    j = 0 if family == "query_color" else 1
    values = cfg.colors if j == 0 else cfg.shapes
    return tuple(v for v in values if not compositional or v in {p[j] for p in cfg.held_out})


def _ask_count_like(family, objs, answer, cfg, rng):
    everything = tuple(range(len(objs)))
    if family == "exist":
        if answer == "yes":  # a sub-description of a random object: at least one match
            d = _sub_desc(objs[int(rng.integers(len(objs)))], rng)
        else:
            d = _desc_with_count(objs, 0, cfg, rng)
        if d is None:
            return None
        hit = tuple(_matches(objs, d))
        return f"is there a {_phrase(d)}?", answer, hit or everything
    k = COUNT_WORDS.index(answer)
    d = _desc_with_count(objs, k, cfg, rng)
    if d is None:
        return None
    return f"how many {_phrase(d, True)} are there?", answer, tuple(_matches(objs, d)) or everything


def _ask_query(family, objs, answer, cfg, rng):
    attr = "color" if family == "query_color" else "shape"
    cands = [i for i, o in enumerate(objs) if getattr(o, attr) == answer]
    for i in (cands[j] for j in rng.permutation(len(cands))):
        d = _unique_desc(objs, i, rng, tuple(a for a in ATTRS if a != attr))
        if d is not None:
            return f"what {attr} is the {_phrase(d)}?", answer, (i,)
    return None


def _relation_holds(a: SceneObject, b: SceneObject, rel: str, margin: float):
    """True / False when the relation is clear (centres >= ``margin`` apart on its axis), else None."""
    d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
    return None if abs(d) < margin else d > 0


def _ask_relation(objs, answer, cfg, rng):
    n = len(objs)
    for _ in range(8):
        i, j = (int(v) for v in rng.choice(n, 2, replace=False)) if n > 1 else (0, 0)
        if i == j:
            return None
        rel = RELATIONS[int(rng.integers(4))]
        holds = _relation_holds(objs[i], objs[j], rel, cfg.relation_margin)
        if holds is None or holds != (answer == "yes"):
            continue
        di, dj = _unique_desc(objs, i, rng), _unique_desc(objs, j, rng)
        if di is not None and dj is not None:
            return f"is the {_phrase(di)} {rel} the {_phrase(dj)}?", answer, (i, j)
    return None


def _ask_compare(objs, answer, cfg, rng):
    for _ in range(8):
        d1, d2 = _random_desc(cfg, rng), _random_desc(cfg, rng)
        m1, m2 = _matches(objs, d1), _matches(objs, d2)
        if d1 == d2 or len(m1) == len(m2) or (len(m1) > len(m2)) != (answer == "yes"):
            continue
        return f"are there more {_phrase(d1, True)} than {_phrase(d2, True)}?", answer, tuple(sorted(set(m1 + m2)))
    return None


def ask(family: str, objs, answer: str, cfg: SceneConfig, rng):
    """A question of ``family`` about ``objs`` whose answer is ``answer``: ``(question, answer, evidence object
    ids)``, or None when this scene has no such question (the caller draws another scene)."""
    if family in ("exist", "count"):
        return _ask_count_like(family, objs, answer, cfg, rng)
    if family in ("query_color", "query_shape"):
        return _ask_query(family, objs, answer, cfg, rng)
    return _ask_relation(objs, answer, cfg, rng) if family == "relation" else _ask_compare(objs, answer, cfg, rng)
