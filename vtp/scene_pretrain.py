r"""Dense patch labels for the scenes of :mod:`vtp.scenes`, and a vision tower pretrained on them.

LLaVA starts from a CLIP tower that already describes each patch; a tower trained from scratch through one
answer token per question learns that slowly (the question-only loss stays near the blind baseline for thousands
of steps). The scene generator knows what lies under every patch, so the tower can first learn it directly.

**Labels.** For patch :math:`j` of image :math:`i`, let :math:`o^*(j)` be the object covering most of its pixels
(none if no object pixel lies in it). The targets are the colour, shape and size of :math:`o^*(j)` (class 0 =
background), a centre flag, 1 iff :math:`j` holds the centre of :math:`o^*(j)` (counting objects then means
counting flagged patches, whatever an object's size), the patch's own row and column in the grid (so that
where a patch lies stays readable in the features the language model gets: spatial questions compare it), and
the centre :math:`(x, y)` of :math:`o^*(j)` in pixels (-1 on background).

**Why the centre as a number.** A relation question compares two objects' centres. The language model reads the
visual tokens in row-major order, so its own 1-D positions already order the rows (which object is above) but not
the columns; and a column *class* has no order either. Measured on the first scenes teacher (lesson 10): above /
below answered, left / right at chance. Regressing the owner's centre puts :math:`x` and :math:`y` on directions of
the feature space, where "left of" is the sign of a difference.

**The [CLS] token.** LLaVA's CLIP tower has a [CLS] token trained (contrastively) to summarise the image, and
VisionZip-style selection ranks patches by its attention. Ours gets a summary target too: which (colour, shape)
pairs the scene holds, predicted from the [CLS] output. Without it the [CLS] token is never trained and its
attention is arbitrary (in the first scenes teacher it avoided the objects).

**Evidence roles** (:func:`evidence_roles`), for an auxiliary loss of the teacher on the language model's
visual positions: per question and patch, 0 = not evidence, 1 = a patch of the (first) described object(s),
2 = a patch of the second object of a ``relation`` question. Answers that assert absence (``exist`` "no",
``count`` "zero") describe no object: all 0. **Evidence centres** (:func:`evidence_centres`): the centres of the
objects a question describes uniquely (the queried object, the two objects of a relation), for the teacher's
"where" term (:class:`vtp.scene_teacher.EvidenceLoss`).

**Loss.** Linear heads on the tower's last hidden states :math:`h_j` (the features LLaVA's projector reads);
with :math:`\ell_{a,j} = -\log \operatorname{softmax}(W_a h_j)_{y_{a,j}}` and :math:`O` the patches an object
owns (a few % of them: they get a mean of their own),

.. math::
    \mathcal{L} = \sum_{a \in \{\text{colour}, \text{shape}, \text{size}, \text{centre}, \text{row}, \text{col}\}}
    \Big(\frac{1}{N}\sum_j \ell_{a,j} + \frac{1}{|O|}\sum_{j \in O} \ell_{a,j}\Big)
    + \lambda_\text{pos} \frac{6}{|O|}\sum_{j \in O} \big\lVert U h_j - c_{o^*(j)} / S \big\rVert^2
    + \lambda_\text{cls}\, \operatorname{BCE}(V h_\text{CLS}, z),

with :math:`c` the owner's centre (divided by the canvas side :math:`S`; the factor 6 is :math:`1 / (2 \cdot
\tfrac{1}{12})`, so that guessing the canvas centre for a uniform centre costs about 1, like a cross-entropy
term) and :math:`z \in \{0, 1\}^{C \times S_h}` the (colour, shape) pairs present.
"""
from __future__ import annotations

import functools
import math
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .scenes import SceneConfig, _object_mask
from .train.schedule import lr_factor, set_lr
from .train.steps import step

__all__ = ["LABELS", "CENTRE_XY", "ROLES", "DESCRIBED", "patch_labels", "evidence_roles", "evidence_centres",
           "pretrain_vision"]

LABELS = ("color", "shape", "size", "centre", "row", "col")  # classes; then CENTRE_XY, regression targets
CENTRE_XY = ("x", "y")  # the owner's centre, px (-1 on background): label columns len(LABELS), len(LABELS) + 1
ROLES = ("none", "first", "second")  # evidence_roles classes
DESCRIBED = ("query_color", "query_shape", "relation")  # families whose evidence objects are uniquely described


def _label_one(objects, cfg: SceneConfig) -> np.ndarray:
    """Labels int64 [G*G, 8] of one scene (see the module docstring)."""
    S, p, G = cfg.image_size, cfg.patch_size, cfg.grid
    radius, sizes = dict(cfg.sizes), [n for n, _ in cfg.sizes]
    best = np.zeros(G * G)  # pixels of the patch's owner so far
    owner = np.full(G * G, -1)
    for k, o in enumerate(objects):
        y0, x0, m = _object_mask(o.shape, radius[o.size], o.x, o.y, S)
        ys, xs = np.nonzero(m)
        count = np.bincount(((y0 + ys) // p) * G + (x0 + xs) // p, minlength=G * G)
        win = count > best
        best[win], owner[win] = count[win], k
    out = np.zeros((G * G, len(LABELS) + len(CENTRE_XY)), np.int64)
    out[:, len(LABELS):] = -1
    for k, o in enumerate(objects):
        mine = owner == k
        out[mine, :3] = (cfg.colors.index(o.color) + 1, cfg.shapes.index(o.shape) + 1, sizes.index(o.size) + 1)
        out[mine, len(LABELS):] = (round(o.x), round(o.y))
        centre = int(min(o.y, S - 1) // p) * G + int(min(o.x, S - 1) // p)
        out[centre, 3] = owner[centre] == k
    out[:, 4], out[:, 5] = np.divmod(np.arange(G * G), G)
    return out


def patch_labels(split) -> torch.Tensor:
    """Dense labels int64 [I, G*G, 8] (colour, shape, size, centre, row, column, then the owner's centre x, y in
    px) of every scene of a :class:`vtp.scenes.SceneSplit`."""
    return torch.from_numpy(np.stack([_label_one(objs, split.cfg) for objs in split.objects]))


def _patches(obj, cfg: SceneConfig) -> np.ndarray:
    """Flat indices of the patches ``obj`` has pixels in (its evidence patches, as in :mod:`vtp.scenes`)."""
    y0, x0, m = _object_mask(obj.shape, dict(cfg.sizes)[obj.size], obj.x, obj.y, cfg.image_size)
    ys, xs = np.nonzero(m)
    return np.unique(((y0 + ys) // cfg.patch_size) * cfg.grid + (x0 + xs) // cfg.patch_size)


def evidence_roles(split) -> torch.Tensor:
    """Evidence roles int64 [Q, G*G] of every question of a :class:`vtp.scenes.SceneSplit` (see the module
    docstring): 1 on the patches of the described objects, 2 on the second object of a relation, 0 elsewhere
    and everywhere for answers that assert absence."""
    cfg = split.cfg
    out = np.zeros((len(split), cfg.num_tokens), np.int64)
    images = split.image_ids.tolist()
    for q, (fam, ans, ev) in enumerate(zip(split.families, split.answers, split.evidence_objects)):
        if (fam, ans) in (("exist", "no"), ("count", "zero")):
            continue
        objs = split.objects[images[q]]
        for k, i in enumerate(ev):
            role = 2 if fam == "relation" and k == 1 else 1
            out[q, _patches(objs[i], cfg)] = role
    return torch.from_numpy(out)


def evidence_centres(split) -> torch.Tensor:
    """Centres float32 [Q, 2, 2] of the objects each question describes uniquely, in canvas units (px / side):
    ``[q, 0]`` the (first) described object's (x, y), ``[q, 1]`` the second object of a ``relation``; NaN where a
    question describes no such object (families outside :data:`DESCRIBED`, and ``[q, 1]`` outside relations)."""
    out = torch.full((len(split), 2, 2), float("nan"))
    images = split.image_ids.tolist()
    for q, (fam, ev) in enumerate(zip(split.families, split.evidence_objects)):
        if fam in DESCRIBED:
            objs = split.objects[images[q]]
            for k, i in enumerate(ev[:2]):
                out[q, k] = torch.tensor([objs[i].x, objs[i].y]) / split.cfg.image_size
    return out


def _heads(width: int, cfg: SceneConfig) -> nn.ModuleDict:
    classes = {"color": len(cfg.colors) + 1, "shape": len(cfg.shapes) + 1, "size": len(cfg.sizes) + 1, "centre": 2,
               "row": cfg.grid, "col": cfg.grid}
    heads = {k: nn.Linear(width, n) for k, n in classes.items()}
    heads.update(xy=nn.Linear(width, len(CENTRE_XY)), contents=nn.Linear(width, len(cfg.colors) * len(cfg.shapes)))
    return nn.ModuleDict(heads)


def _contents(y: torch.Tensor, n_shapes: int, n_pairs: int) -> torch.Tensor:
    """Multi-hot [B, n_pairs] of the (colour, shape) pairs owning patches in labels ``y`` [B, N, 8] (no host sync)."""
    on = y[..., 0] > 0
    pair = torch.where(on, (y[..., 0] - 1) * n_shapes + (y[..., 1] - 1), n_pairs)
    return torch.zeros(y.shape[0], n_pairs + 1, device=y.device).scatter_(1, pair, 1.0)[:, :n_pairs]


def _dense_loss(tower, heads, images, labels, idx, processor, cfg: SceneConfig, position_weight, contents_weight):
    """The loss of the module docstring on images ``idx``, and what the accuracies need."""
    device = labels.device
    y = labels[idx.to(device)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = tower(pixel_values=processor.preprocess_images(images[idx], device)).last_hidden_state
        h, cls = out[:, 1:], out[:, 0]  # patches, [CLS]
        logits = {k: heads[k](h).float() for k in LABELS}
        xy, contents = heads["xy"](h).float(), heads["contents"](cls).float()
    on_obj = y[..., 0] > 0  # objects cover a few % of the patches: their patches get a term of their own
    loss = sum(F.cross_entropy(logits[k].flatten(0, 1), y[..., i].flatten())
               + F.cross_entropy(logits[k][on_obj], y[..., i][on_obj]) for i, k in enumerate(LABELS))
    err = (xy - y[..., len(LABELS):].float() / cfg.image_size)[on_obj]  # [O, 2], canvas units
    present = _contents(y, len(cfg.shapes), len(cfg.colors) * len(cfg.shapes))
    if position_weight:
        loss = loss + position_weight * 6.0 * err.pow(2).sum() / on_obj.sum().clamp(min=1)
    if contents_weight:
        loss = loss + contents_weight * F.binary_cross_entropy_with_logits(contents, present)
    return loss, (logits, y, on_obj, err, contents, present)


def _dense_accuracy(parts, cfg: SceneConfig, position_weight, contents_weight) -> dict:
    """Accuracies of one batch (see :func:`pretrain_vision`)."""
    logits, y, on_obj, err, contents, present = parts
    acc = {k: (logits[k].argmax(-1) == y[..., i])[on_obj].float().mean().item() for i, k in enumerate(LABELS)}
    if position_weight:
        acc["xy"] = (err.abs().amax(-1) * cfg.image_size < cfg.patch_size / 2).float().mean().item()
    if contents_weight:
        acc["contents"] = ((contents > 0).float() == present).all(-1).float().mean().item()
    return acc


def pretrain_vision(llava, images: torch.Tensor, labels: torch.Tensor, processor, cfg: SceneConfig,
                    steps: int = 1000, time_budget_s: float | None = None, batch_size: int = 64, lr: float = 1e-3,
                    warmup_steps: int = 50, seed: int = 0, log_every: int = 50, position_weight: float = 0.0,
                    contents_weight: float = 0.0) -> dict:
    """Train ``llava.vision_tower`` (in place) to predict ``labels`` [I, N, 8] of ``images`` uint8 [I, 3, S, S]
    with linear heads (dropped afterwards): AdamW, the shared schedule (:func:`vtp.train.schedule.lr_factor`:
    warm-up, then cosine to 0) over ``steps`` or ``time_budget_s``, whichever ends first, the shared
    :func:`vtp.train.steps.step`, bf16 autocast on CUDA. ``position_weight`` (:math:`\\lambda_\\text{pos}`) and
    ``contents_weight`` (:math:`\\lambda_\\text{cls}`) switch on the centre and [CLS] terms of the module docstring.
    Returns the history: ``step``, ``loss`` and accuracies (``acc``) every ``log_every`` steps: per label on
    object patches, ``xy`` (centre within half a patch on both axes) and ``contents`` (every pair of the scene
    right), the last two when their terms are on; ``steps_done``, ``train_time_s``."""
    width = len(LABELS) + len(CENTRE_XY)
    if images.shape[0] != labels.shape[0] or labels.shape[-1] != width:
        raise ValueError(f"labels must be [I, N, {width}] for I = {images.shape[0]} images, got "
                         f"{tuple(labels.shape)}")
    for name, w in (("position_weight", position_weight), ("contents_weight", contents_weight)):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    tower = llava.model.vision_tower if hasattr(llava, "model") else llava.vision_tower
    device = next(tower.parameters()).device
    heads = _heads(tower.config.hidden_size, cfg).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    weights = (position_weight, contents_weight)
    compute_loss = functools.partial(_dense_loss, tower, heads, images, labels.to(device), processor=processor,
                                     cfg=cfg, position_weight=position_weight, contents_weight=contents_weight)
    hist = {"step": [], "loss": [], "acc": []}
    schedule = SimpleNamespace(warmup_steps=warmup_steps, min_lr_ratio=0.0)  # warm-up, then cosine to 0
    tower.train()
    start = time.perf_counter()
    t = 0
    while t < steps:
        frac = max(t / steps, (time.perf_counter() - start) / time_budget_s if time_budget_s else 0.0)
        if frac >= 1:
            break
        set_lr(opt, [lr], lr_factor(schedule, t, frac))
        loss, parts = step(opt, compute_loss, torch.randint(images.shape[0], (batch_size,), generator=gen), 1.0, params)
        if t % log_every == 0:
            hist["step"].append(t)
            hist["loss"].append(loss.item())
            hist["acc"].append(_dense_accuracy(parts, cfg, *weights))
        t += 1
    hist["steps_done"], hist["train_time_s"] = t, time.perf_counter() - start
    tower.eval()
    return hist
