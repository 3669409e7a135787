r"""CLEVR-style 2-D scenes at 576 visual tokens: a benchmark where the choice of tokens matters.

A scene is a ``image_size`` x ``image_size`` canvas (192 px by default) cut by the vision tower into a
:math:`G \times G` grid of ``patch_size`` patches (:math:`G = 24`, :math:`N = G^2 = 576` tokens, as LLaVA-1.5).
It holds ``min_objects``..``max_objects`` small objects, each a (size, colour, shape), and optional clutter.

**Placement.** The canvas is tiled by :math:`C \times C` cells of side
:math:`c = 2 r_{max} + \text{gap} + \text{jitter}`;
each object takes its own cell at a uniform position that keeps it ``gap / 2`` px inside the cell (the largest
objects move by up to ``jitter`` px, smaller ones more), so two objects never overlap and stay ``gap`` px
apart. Hence at most :math:`C^2` objects fit: more raises ``ValueError``.

**Evidence.** Object :math:`o` covers the patch set
:math:`P(o) = \{(\lfloor y/p \rfloor, \lfloor x/p \rfloor) : \text{pixel } (y, x) \text{ of } o\}`, flattened to
indices :math:`G \lfloor y/p \rfloor + \lfloor x/p \rfloor`. A question's evidence is the set of objects its
answer is computed from and :math:`E = \bigcup_{o} P(o)` over them. Answers that assert absence (``exist``
"no", ``count`` "zero") depend on every object: their evidence is all objects.

**Question families** (``FAMILIES``), answers balanced within each family:

* ``exist``: "is there a large red circle?" (yes / no)
* ``count``: "how many red things are there?" (zero .. ``max_count``)
* ``query_color``: "what color is the small square?" (the description is unique; answer a colour)
* ``query_shape``: "what shape is the large blue thing?" (unique description; answer a shape)
* ``relation``: "is the red circle left of the small square?" (yes / no; both unique, their centres at
  least ``relation_margin`` px apart along the axis asked)
* ``compare``: "are there more circles than red things?" (yes / no; the two counts differ)

The questions are written by :mod:`vtp.scene_questions` (:func:`ask`, re-exported here).

**Difficulty knobs** (:class:`SceneConfig`): ``min_objects`` / ``max_objects`` (more objects: more binding
and counting), ``sizes`` (radii in px; smaller objects cover fewer patches, so random pruning loses them
more often), ``colors`` / ``shapes`` (fewer values: fewer attribute combinations to bind), ``clutter``
(grey specks that are not objects: distractors that cover patches), ``jitter`` / ``gap`` (placement freedom
and spacing; larger values fit fewer objects), ``families``.

**Splits.** ``val`` and ``test`` (fixed seeds; :func:`scene_split`), an endless training stream
(:func:`train_stream`) and ``compositional``: (colour, shape) pairs in ``held_out`` never appear in
train / val / test scenes; compositional scenes hold at least one and every question's evidence includes one.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import EncodedSplit, VQAProcessor, build_tokenizer, encode_questions
from .scene_questions import COUNT_WORDS, RELATIONS, ask, family_answers

__all__ = ["COLORS", "SHAPES", "SIZES", "FAMILIES", "COUNT_WORDS", "SceneConfig", "SceneObject", "SceneSplit",
           "render_scene", "ask", "family_answers", "generate_split", "scene_split", "train_stream",
           "scene_processor", "encode_scenes", "scene_accuracy"]

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 205, 40),
          "purple": (150, 60, 190), "cyan": (40, 195, 205)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6, "large": 10}
FAMILIES = ("exist", "count", "query_color", "query_shape", "relation", "compare")
BACKGROUND, CLUTTER = (128, 128, 128), (100, 100, 100)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2, "compositional": 3}
SPLIT_SIZES = {"val": 1800, "test": 10080, "compositional": 1800}  # multiples of 6 families x lcm(answers)


@dataclass(frozen=True)
class SceneConfig:
    """Scene distribution and question families (see the module docstring for each knob)."""

    image_size: int = 192
    patch_size: int = 8
    min_objects: int = 5
    max_objects: int = 9
    colors: tuple = tuple(COLORS)
    shapes: tuple = SHAPES
    sizes: tuple = (("small", 6), ("large", 10))
    gap: int = 2
    jitter: int = 6
    clutter: int = 0
    families: tuple = FAMILIES
    max_count: int = 4
    relation_margin: int = 8
    held_out: tuple = (("red", "triangle"), ("blue", "circle"), ("green", "square"))

    def __post_init__(self):
        size = self.image_size
        if not isinstance(size, int) or size < 1:
            if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] != size[1]:
                raise ValueError(f"image_size must give a square grid (one int), got {size}")
            raise ValueError(f"image_size must be a positive int, got {size!r}")
        if self.patch_size < 1 or size % self.patch_size:
            raise ValueError(f"patch_size must divide image_size={size}, got {self.patch_size}")
        if not self.families:
            raise ValueError("families must name at least one of " + str(FAMILIES))
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"families must be among {FAMILIES}, got {bad}")
        for name, vals, allowed in (("colors", self.colors, COLORS), ("shapes", self.shapes, SHAPES)):
            if len(vals) < 2 or len(set(vals)) != len(vals) or any(v not in allowed for v in vals):
                raise ValueError(f"{name} must be >= 2 distinct values of {tuple(allowed)}, got {vals}")
        if not self.sizes or any(n not in SIZES or not (2 <= r) for n, r in self.sizes):
            raise ValueError(f"sizes must be (name, radius >= 2) pairs, names from {tuple(SIZES)}, got {self.sizes}")
        if {"relation", "compare"} & set(self.families) and self.max_objects < 2:
            raise ValueError(f"max_objects must be >= 2 for relation / compare questions, got {self.max_objects}")
        if not (1 <= self.min_objects <= self.max_objects):
            raise ValueError(f"min_objects must be in [1, max_objects={self.max_objects}], got {self.min_objects}")
        if self.max_objects > self.cells ** 2:
            raise ValueError(f"max_objects must be <= {self.cells ** 2}: only {self.cells}x{self.cells} objects of "
                             f"radius {self.max_radius} (gap {self.gap}, jitter {self.jitter}) fit a {size} px canvas, "
                             f"got {self.max_objects}")
        if not (1 <= self.max_count <= min(self.max_objects, len(COUNT_WORDS) - 1)):
            raise ValueError(f"max_count must be in [1, {min(self.max_objects, 9)}], got {self.max_count}")
        if min(self.clutter, self.gap, self.jitter, self.relation_margin) < 0:
            raise ValueError("clutter, gap, jitter and relation_margin must be >= 0")
        pairs = [(c, s) for c, s in self.held_out if c in self.colors and s in self.shapes]
        if len(pairs) != len(self.held_out) or len(pairs) >= len(self.colors) * len(self.shapes):
            raise ValueError("held_out must be (colour, shape) pairs of this config, not all of them; "
                             f"got {self.held_out}")

    @property
    def max_radius(self) -> int:
        return max(r for _, r in self.sizes)

    @property
    def cells(self) -> int:
        """Placement cells per side, :math:`C = \\lfloor S / (2 r_{max} + gap + jitter) \\rfloor`."""
        return self.image_size // (2 * self.max_radius + self.gap + self.jitter)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2


@dataclass(frozen=True)
class SceneObject:
    """One object: attribute names and its centre (x, y) in pixels."""

    size: str
    color: str
    shape: str
    x: float
    y: float


def _object_mask(shape: str, r: int, x: float, y: float, image_size: int):
    """Pixels of an object: ``(y0, x0, mask)``, the mask over its bounding box (pixel centres tested)."""
    y0, x0 = max(0, int(y - r - 1)), max(0, int(x - r - 1))
    y1, x1 = min(image_size, int(y + r + 2)), min(image_size, int(x + r + 2))
    dy = np.arange(y0, y1)[:, None] + 0.5 - y
    dx = np.arange(x0, x1)[None, :] + 0.5 - x
    if shape == "circle":
        m = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":  # side 1.7 r: about the circle's area
        m = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    else:  # triangle, apex up: half-width grows linearly from the apex (y = -r) to the base (y = 0.8 r, < r)
        m = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.55 * (dy + r))
    return y0, x0, m


def render_scene(objects, cfg: SceneConfig, clutter=()):
    """Image uint8 [3, S, S] and object patch masks bool [n_objects, G*G] (the patches each object covers).
    ``clutter`` = (x, y) centres of grey specks (radius 2), drawn under the objects."""
    S, p, G = cfg.image_size, cfg.patch_size, cfg.grid
    img = np.empty((S, S, 3), np.uint8)
    img[:] = BACKGROUND
    for x, y in clutter:
        y0, x0, m = _object_mask("circle", 2, x, y, S)
        img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = CLUTTER
    radius = dict(cfg.sizes)
    patches = np.zeros((len(objects), G * G), bool)
    for i, o in enumerate(objects):
        y0, x0, m = _object_mask(o.shape, radius[o.size], o.x, o.y, S)
        img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = COLORS[o.color]
        ys, xs = np.nonzero(m)
        patches[i, ((y0 + ys) // p) * G + (x0 + xs) // p] = True
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(patches)


def _sample_objects(cfg: SceneConfig, rng, held_out: bool):
    """Objects on distinct placement cells; attribute pairs in ``cfg.held_out`` excluded, or (``held_out``)
    at least one of them included."""
    C, rmax = cfg.cells, cfg.max_radius
    c = 2 * rmax + cfg.gap + cfg.jitter
    off = (cfg.image_size - C * c) / 2
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(C * C, n, replace=False)
    banned = set(cfg.held_out)
    combos = [(a, b) for a in cfg.colors for b in cfg.shapes if (a, b) not in banned]
    objs = []
    for k, cell in enumerate(cells):
        size, r = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        pool = cfg.held_out if held_out and k == 0 else combos
        color, shape = pool[int(rng.integers(len(pool)))]
        jx, jy = rng.uniform(0, c - 2 * r - cfg.gap, 2)  # the object stays gap / 2 inside its cell
        objs.append(SceneObject(size, color, shape, off + (cell % C) * c + r + jx + cfg.gap / 2,
                                off + (cell // C) * c + r + jy + cfg.gap / 2))
    return objs


# ---- splits ---------------------------------------------------------------------------------------------

@dataclass
class SceneSplit:
    """Questions over rendered scenes: parallel lists ``questions``, ``answers``, ``families``,
    ``evidence_objects`` (object ids) and tensors ``image_ids`` [Q] (into ``images`` uint8 [I, 3, S, S]) and
    ``evidence`` bool [Q, G*G] (the patches of the evidence objects); ``objects`` [I] lists each scene's objects."""

    name: str
    cfg: SceneConfig
    questions: list
    answers: list
    families: list
    evidence_objects: list
    image_ids: torch.Tensor
    evidence: torch.Tensor
    images: torch.Tensor
    objects: list = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)

    def blank(self) -> "SceneSplit":
        """The same questions over empty canvases (background only): the blind baseline."""
        images = torch.tensor(BACKGROUND, dtype=torch.uint8).view(1, 3, 1, 1).expand_as(self.images).contiguous()
        return dataclasses.replace(self, images=images)


def _balanced_targets(cfg: SceneConfig, n: int, rng, compositional: bool) -> list:
    """``n`` (family, answer) targets: families in turn, each family's answers in turn, then shuffled."""
    out, seen = [], {f: 0 for f in cfg.families}
    for i in range(n):
        f = cfg.families[i % len(cfg.families)]
        answers = family_answers(f, cfg, compositional)
        out.append((f, answers[seen[f] % len(answers)]))
        seen[f] += 1
    return [out[i] for i in rng.permutation(n)]


def _questions_for_scene(objs, pending, cfg, rng, per_image, compositional):
    """Ask up to ``per_image`` distinct pending targets about ``objs``; returns (asked, still pending)."""
    held = {i for i, o in enumerate(objs) if (o.color, o.shape) in set(cfg.held_out)}
    asked, rest, texts = [], [], set()
    for k, (family, answer) in enumerate(pending):
        if len(asked) == per_image or k >= 4 * per_image:
            rest.extend(pending[k:])
            break
        out = ask(family, objs, answer, cfg, rng)
        if out is None or out[0] in texts or (compositional and not held & set(out[2])):
            rest.append((family, answer))
            continue
        texts.add(out[0])
        asked.append((family,) + out)
    return asked, rest


def generate_split(name: str, n_questions: int, cfg: SceneConfig | None = None, seed=0,
                   questions_per_image: int = 3) -> SceneSplit:
    """``n_questions`` questions, balanced over families and, within each, answers (counts differ by at most
    one), about scenes drawn for them (``questions_per_image`` distinct questions per scene at most; a scene
    that cannot answer a target is not rendered). Deterministic in (``name``, ``seed``, ``cfg``)."""
    cfg = cfg or SceneConfig()
    if name not in SPLIT_SEEDS:
        raise ValueError(f"name must be one of {tuple(SPLIT_SEEDS)}, got {name!r}")
    for arg, v in (("n_questions", n_questions), ("questions_per_image", questions_per_image)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if name == "compositional" and not cfg.held_out:
        raise ValueError("cfg.held_out must name (colour, shape) pairs for the compositional split, got ()")
    rng = np.random.default_rng([SPLIT_SEEDS[name], *np.atleast_1d(seed).tolist()])
    pending = _balanced_targets(cfg, n_questions, rng, name == "compositional")
    rows, images, masks, scenes = [], [], [], []
    for _ in range(50 * n_questions + 1000):
        if not pending:
            break
        objs = _sample_objects(cfg, rng, held_out=name == "compositional")
        asked, pending = _questions_for_scene(objs, pending, cfg, rng, questions_per_image, name == "compositional")
        if not asked:
            continue
        clutter = rng.uniform(3, cfg.image_size - 3, (cfg.clutter, 2))
        img, patches = render_scene(objs, cfg, clutter)
        rows += [(len(images),) + a for a in asked]
        masks += [patches[list(a[3])].any(0) for a in asked]
        images.append(img)
        scenes.append(objs)
    if pending:
        raise RuntimeError(f"could not find scenes for {len(pending)} targets, e.g. {pending[0]}: "
                           "raise max_objects or lower max_count")
    return SceneSplit(name, cfg, [r[2] for r in rows], [r[3] for r in rows], [r[1] for r in rows],
                      [r[4] for r in rows], torch.tensor([r[0] for r in rows]), torch.stack(masks),
                      torch.stack(images), scenes)


@functools.lru_cache(maxsize=4)
def scene_split(name: str, cfg: SceneConfig | None = None, n_questions: int | None = None) -> SceneSplit:
    """The fixed ``"val"``, ``"test"`` or ``"compositional"`` split (sizes ``SPLIT_SIZES``; cached)."""
    if name not in SPLIT_SIZES:
        raise ValueError(f"name must be one of {tuple(SPLIT_SIZES)} (training data: train_stream), got {name!r}")
    return generate_split(name, n_questions or SPLIT_SIZES[name], cfg or SceneConfig(), seed=0)


def train_stream(cfg: SceneConfig | None = None, seed: int = 0, chunk_questions: int = 3000,
                 questions_per_image: int = 3):
    """Endless training data: chunk :math:`k` is ``generate_split("train", chunk_questions, cfg, (seed, k))``."""
    k = 0
    while True:
        yield generate_split("train", chunk_questions, cfg, (seed, k), questions_per_image)
        k += 1


# ---- model inputs and evaluation ------------------------------------------------------------------------

def scene_processor(cfg: SceneConfig | None = None, question_first: bool = False) -> VQAProcessor:
    """A :class:`vtp.data.VQAProcessor` for scenes: ``cfg.num_tokens`` image tokens, ``cfg.image_size`` px,
    a word-level tokenizer over every word the question templates and answers can use; ``question_first``: the
    question before and after the image (:class:`~vtp.data.VQAProcessor`)."""
    cfg = cfg or SceneConfig()
    words = ["is there a how many are what color shape the more than thing things ?", *RELATIONS, *COLORS,
             *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *COUNT_WORDS, "yes no"]
    return VQAProcessor(build_tokenizer(words), cfg.num_tokens, cfg.image_size, question_first=question_first)


def _check_processor(processor: VQAProcessor, cfg: SceneConfig) -> None:
    if processor.num_image_tokens != cfg.num_tokens or processor.image_size != cfg.image_size:
        raise ValueError(f"processor must have {cfg.num_tokens} image tokens at {cfg.image_size} px for these "
                         f"scenes, got {processor.num_image_tokens} at {processor.image_size} px")


def encode_scenes(split: SceneSplit, processor: VQAProcessor, device=None) -> EncodedSplit:
    """Tokenize ``split`` once into the batch format of :mod:`vtp.data` (``qtype_ids`` index ``FAMILIES``)."""
    _check_processor(processor, split.cfg)
    families = [FAMILIES.index(f) for f in split.families]
    return encode_questions(split.questions, split.answers, families, split.image_ids, split.images, processor,
                            device, what="scene")


def scene_accuracy(model, split: SceneSplit, processor: VQAProcessor, encoded: EncodedSplit | None = None, **kwargs):
    """:func:`vtp.evaluate.accuracy` on scenes, with ``per_type`` by question family. The model's vision tower
    must give ``split.cfg.num_tokens`` tokens (576 by default), else ``ValueError``. ``kwargs`` go to
    :func:`vtp.evaluate.accuracy` (``ratio``, ``keep_fn``, ``pruner``, ...)."""
    from .evaluate import accuracy
    from .vlm import PrunedVLM, num_visual_tokens

    llava = model.llava if isinstance(model, PrunedVLM) else model
    n = num_visual_tokens(llava)
    if n != split.cfg.num_tokens:
        c = split.cfg
        raise ValueError(f"model: its vision tower gives {n} visual tokens, these scenes need "
                         f"{c.num_tokens} ({c.grid}x{c.grid} patches of {c.patch_size} px)")
    _check_processor(processor, split.cfg)
    encoded = encoded if encoded is not None else encode_scenes(split, processor)
    res = accuracy(model, encoded, processor, **kwargs)
    correct = (res.predictions == encoded.answer_ids[: res.n].cpu()).float()
    fam = encoded.qtype_ids[: res.n].cpu()
    per = {f: correct[fam == i].mean().item() for i, f in enumerate(FAMILIES) if (fam == i).any()}
    return dataclasses.replace(res, per_type=per)
