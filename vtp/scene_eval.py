r"""Training-free peers on the scenes benchmark at one visual-token budget, with evidence recall per family.

For a keep ratio :math:`\rho` each peer's ``keep_fn`` (:mod:`vtp.baselines`) keeps
:math:`k = \max(1, \operatorname{round}(\rho N))` of the :math:`N` visual tokens of question :math:`q`, the set
:math:`K_q`; the dropped tokens are physically removed (:func:`vtp.scenes.scene_accuracy`). One pass over the
questions gives both numbers a peer is judged by:

* **accuracy**, overall and per question family;
* **evidence recall** :math:`r_q = |K_q \cap E_q| / |E_q|` (:func:`vtp.baselines.evidence_recall`), with
  :math:`E_q` the patches the answer is computed from, averaged per family:

  .. math:: R_f = \frac{1}{|Q_f|} \sum_{q \in Q_f} r_q .

The keep masks are recorded while the accuracy pass runs (:class:`RecordedKeep`), so recall costs no second
pass. Random keeps :math:`\rho` of the evidence in expectation, :math:`E[r_q] = k/N`; the evidence oracle keeps
:math:`\min(1, k/|E_q|)` of it, the most any selection can.

The peers (``PEERS``): ``random`` (one run per seed), ``fastv`` (FastV-style: attention of the answer-predicting
position at an early language-model layer), ``visionzip`` (VisionZip-style: [CLS] attention + merged contextual
tokens), ``object`` (the pixel-object reference: patches that differ from the background) and
``evidence_oracle`` (the evidence patches first: the upper bound of selection).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .baselines import (VisionZip, evidence_oracle, evidence_recall, fastv_scores, keep_by_scores, object_scores,
                        random_scores)
from .scene_questions import RELATIONS
from .scenes import FAMILIES, encode_scenes, scene_accuracy

__all__ = ["PEERS", "peer_keep_fn", "RecordedKeep", "family_means", "PeerResult", "evaluate_peer", "evaluate_peers",
           "summarize_runs", "RELATION_AXES", "relation_axis_accuracy"]

#: peer name -> label for tables and figures
PEERS = {"random": "random", "fastv": "FastV-style", "visionzip": "VisionZip-style", "object": "pixel-object reference",
         "evidence_oracle": "evidence oracle"}


def peer_keep_fn(name: str, ratio: float, split=None, seed: int = 0):
    """The ``keep_fn`` of peer ``name`` (a key of ``PEERS``) at keep ratio ``ratio``. ``evidence_oracle`` needs
    the :class:`~vtp.scenes.SceneSplit` whose questions it is run on (``split.evidence``, indexed by the batches'
    ``index``); ``random`` draws from a generator seeded with ``seed``."""
    if name == "random":
        return keep_by_scores(random_scores, ratio, generator=torch.Generator().manual_seed(seed))
    if name == "fastv":
        return keep_by_scores(fastv_scores, ratio)
    if name == "visionzip":
        return VisionZip(ratio)
    if name == "object":
        return keep_by_scores(object_scores, ratio)
    if name == "evidence_oracle":
        if split is None:
            raise ValueError("evidence_oracle needs split= (the questions' evidence patches)")
        return evidence_oracle(split.evidence, ratio)
    raise ValueError(f"name must be one of {tuple(PEERS)}, got {name!r}")


class RecordedKeep:
    """Wraps a ``keep_fn`` and records the masks it returns: ``masks`` bool [n_questions, N] (CPU) by the
    batches' ``index``, ``seen`` bool [n_questions] the questions it was called on."""

    def __init__(self, keep_fn, n_questions: int):
        self.keep_fn, self.n_questions = keep_fn, n_questions
        self.masks, self.seen = None, torch.zeros(n_questions, dtype=torch.bool)

    def __call__(self, batch, vlm) -> torch.Tensor:
        keep = self.keep_fn(batch, vlm)
        if self.masks is None:
            self.masks = torch.zeros(self.n_questions, keep.shape[-1], dtype=torch.bool)
        idx = batch["index"].cpu()
        self.masks[idx], self.seen[idx] = keep.bool().cpu(), True
        return keep

    def discard(self) -> None:
        """Forwarded to the wrapped ``keep_fn`` if it has one (:meth:`vtp.baselines.VisionZip.discard`)."""
        if hasattr(self.keep_fn, "discard"):
            self.keep_fn.discard()


def family_means(values, families) -> dict:
    """Mean of ``values`` [Q] per question family (``families`` [Q] names), in ``FAMILIES`` order, for the
    families present."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if len(values) != len(families):
        raise ValueError(f"values and families must have the same length, got {len(values)} and {len(families)}")
    out = {}
    for f in FAMILIES:
        sel = torch.tensor([x == f for x in families], dtype=torch.bool)
        if sel.any():
            out[f] = values[sel].mean().item()
    return out


#: axis -> the relations that compare centres along it
RELATION_AXES = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}


def relation_axis_accuracy(split, correct) -> dict:
    """Mean of ``correct`` [Q] (1 = right) over the ``relation`` questions of ``split``, per axis of
    :data:`RELATION_AXES` (with the number of questions; ``None`` when there are none): ``{"horizontal": (acc, n),
    "vertical": (acc, n)}``. The visual tokens reach the language model in row-major order, so its own positions
    order the rows but not the columns: a teacher can answer one axis and not the other."""
    correct = torch.as_tensor(correct, dtype=torch.float64)
    if len(correct) != len(split):
        raise ValueError(f"correct must have one value per question ({len(split)}), got {len(correct)}")
    axis = {rel: a for a, rels in RELATION_AXES.items() for rel in rels}
    found = {a: [] for a in RELATION_AXES}
    for q, (fam, text) in enumerate(zip(split.families, split.questions)):
        if fam == "relation":
            found[axis[next(r for r in RELATIONS if f" {r} " in text)]].append(q)
    return {a: (correct[qs].mean().item() if qs else None, len(qs)) for a, qs in found.items()}


@dataclass
class PeerResult:
    """One evaluation of one peer: ``accuracy``, ``per_family`` accuracy, ``evidence_recall`` per family and
    ``evidence_recall_overall``, ``visual_tokens`` the language model saw per question, ``n`` questions (the
    split's first ``n``), ``seed`` (random only) and ``keep`` bool [n, N] the keep masks, in split order."""

    name: str
    ratio: float
    accuracy: float
    per_family: dict
    evidence_recall: dict
    evidence_recall_overall: float
    visual_tokens: float
    n: int
    seed: int | None = None
    keep: torch.Tensor = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """JSON-ready (without the keep masks)."""
        d = dataclasses.asdict(self)
        d.pop("keep")
        return d


def evaluate_peer(model, split, processor, name: str, ratio: float, seed: int = 0, encoded=None,
                  max_questions: int | None = None, batch_size: int = 256) -> PeerResult:
    """Accuracy and evidence recall of peer ``name`` at keep ratio ``ratio`` on the first ``max_questions``
    questions of ``split`` (all by default), in one pass; ``encoded`` = ``encode_scenes(split, processor,
    device)`` if already made."""
    encoded = encoded if encoded is not None else encode_scenes(split, processor, next(model.parameters()).device)
    rec = RecordedKeep(peer_keep_fn(name, ratio, split, seed), len(split))
    res = scene_accuracy(model, split, processor, encoded=encoded, keep_fn=rec, max_questions=max_questions,
                         batch_size=batch_size)
    n = res.n
    if not bool(rec.seen[:n].all()):
        raise RuntimeError(f"{name}: keep masks were recorded for {int(rec.seen[:n].sum())} of {n} questions")
    recall = evidence_recall(rec.masks[:n], split.evidence[:n])
    return PeerResult(name, float(ratio), res.accuracy, res.per_type, family_means(recall, split.families[:n]),
                      recall.mean().item(), res.visual_tokens, n, seed if name == "random" else None, rec.masks[:n])


def evaluate_peers(model, split, processor, ratio: float, peers=tuple(PEERS), seeds=(0, 1, 2), encoded=None,
                   max_questions: int | None = None, batch_size: int = 256) -> dict:
    """:func:`evaluate_peer` for every peer of ``peers`` at ``ratio``: ``{name: [PeerResult, ...]}``, one result
    per seed of ``seeds`` for ``random``, one for every other peer."""
    encoded = encoded if encoded is not None else encode_scenes(split, processor, next(model.parameters()).device)
    kw = dict(encoded=encoded, max_questions=max_questions, batch_size=batch_size)
    return {name: [evaluate_peer(model, split, processor, name, ratio, seed=s, **kw)
                   for s in (seeds if name == "random" else (0,))] for name in peers}


def summarize_runs(runs) -> dict:
    """JSON-ready summary of one peer's runs (a list of :class:`PeerResult`): the means over runs of
    ``accuracy``, ``per_family``, ``evidence_recall`` (per family), ``evidence_recall_overall`` and
    ``visual_tokens``; ``n``; and, for several runs (random seeds), ``accuracy_min`` / ``accuracy_max`` and
    ``per_seed`` (each run's :meth:`PeerResult.as_dict`)."""
    runs = list(runs)
    if not runs or len({(r.name, r.ratio, r.n) for r in runs}) != 1:
        raise ValueError("runs must be a non-empty list of one peer's results at one ratio on the same questions")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {"name": runs[0].name, "ratio": runs[0].ratio, "n": runs[0].n,
           "accuracy": mean([r.accuracy for r in runs]),
           "per_family": {f: mean([r.per_family[f] for r in runs]) for f in runs[0].per_family},
           "evidence_recall": {f: mean([r.evidence_recall[f] for r in runs]) for f in runs[0].evidence_recall},
           "evidence_recall_overall": mean([r.evidence_recall_overall for r in runs]),
           "visual_tokens": mean([r.visual_tokens for r in runs])}
    if len(runs) > 1:
        accs = [r.accuracy for r in runs]
        out.update(accuracy_min=min(accs), accuracy_max=max(accs), per_seed=[r.as_dict() for r in runs])
    return out
