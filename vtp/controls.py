r"""Adapted controls: the comparisons that make a learned pruner's margin fair (DESIGN 1c), and lesson 07's jobs.

A learned pruner's language model is fine-tuned behind its own selection; a training-free baseline run on the
frozen teacher is not. Their accuracy gap therefore mixes two things: the quality of the selection, and the
language model's adaptation to pruned inputs. An **adapted control** removes the second: the same language-model
training (phases, steps, learning rates, data, teacher, seed, budgets; ``PrunerConfig.selector``) behind a
frozen selection, :class:`FrozenSelector`. The difference learned - control, paired by seed, is then the
selection's own contribution (:func:`vtp.stats.paired_effect` gives its mean and 95% t-interval over seeds).

:func:`train_and_evaluate` is one lesson-07 job for :func:`vtp.sweep.run_jobs`: phase 1, then phase 2 over the
budgets from it (and optionally a phase 2 at one ratio alone, from the same phase-1 model), each evaluated
with real removal on the test split; :func:`evaluate_training_free` tests the training-free baselines on the
frozen teacher; :func:`lesson07_job` runs either, so that one :func:`vtp.sweep.run_jobs` call runs them all.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .baselines import VisionZip, fastv_scores
from .pruner import PrunerOutput, check_ratio, topk_keep_mask

__all__ = ["SELECTORS", "REFERENCE_SELECTORS", "FrozenSelector", "train_and_evaluate", "evaluate_training_free", "lesson07_job",
           "load_student"]

SELECTORS = ("untrained", "fastv", "random", "visionzip")
#: the selections that read the frozen teacher (``reference``)
REFERENCE_SELECTORS = ("fastv", "visionzip")


class FrozenSelector(nn.Module):
    r"""A frozen selection in the pruner's slot of a :class:`vtp.PrunedVLM` (the adapted controls).

    It keeps the top :math:`k = \max(1, \operatorname{round}(\rho N))` of its scores (:func:`vtp.pruner.topk_keep_mask`,
    the learned pruner's inference rule and budget) in training and eval mode alike, and nothing in it learns:

    * ``"untrained"``: the keep probability of ``scorer``, a :class:`vtp.GumbelVisionPruner` at its random
      initialisation, frozen (``requires_grad`` off, always in eval mode, run without gradient);
    * ``"fastv"``: :func:`vtp.baselines.fastv_scores` of ``reference``, the frozen unpruned teacher (a
      :class:`vtp.PrunedVLM`), on the sample's own prompt and visual tokens: the scores never follow the
      language model being adapted;
    * ``"random"``: uniform scores, a fresh draw per call from a CPU generator seeded with ``seed``;
    * ``"visionzip"``: the VisionZip-style selection of ``reference``'s frozen vision tower
      (:meth:`vtp.baselines.VisionZip.select`: the dominant tokens by [CLS] attention, then the contextual
      targets spread over the rest) at the requested budget, question-blind. A selection only: the contextual
      tokens are kept as they are, not merged with the tokens assigned to them (merging rewrites features; a
      frozen selection in the pruner's slot only chooses). Its budget is the same :math:`k`.

    ``forward`` takes the pruner's arguments plus ``prompt``: a dict with ``input_ids``, ``attention_mask``,
    ``labels``, ``visual_tokens``, ``pixel_values`` and ``image_index``, which :class:`vtp.PrunedVLM` passes
    because ``reads_prompt`` is true. It
    returns a :class:`vtp.PrunerOutput` whose ``keep_prob`` is the 0/1 mask itself (a deterministic selection
    keeps a token with probability 0 or 1) and whose ``logits`` are ``None``. Only the top-k rule exists
    (``rule`` ``"topk"`` or ``None``): without keep probabilities there is no threshold. ``copy.deepcopy``
    shares the reference (frozen) instead of copying it; it is not part of ``state_dict``.
    """

    reads_prompt = True
    sampler = "topk"  # training and inference apply the same top-k rule

    def __init__(self, kind: str, ratio: float = 0.25, scorer: nn.Module | None = None, reference=None,
                 seed: int = 0, layer: int = 1):
        super().__init__()
        if kind not in SELECTORS:
            raise ValueError(f"kind must be one of {SELECTORS}, got {kind!r}")
        if (kind == "untrained") != (scorer is not None):
            raise ValueError(f"scorer must be given for kind='untrained' and only then (kind={kind!r})")
        if (kind in REFERENCE_SELECTORS) != (reference is not None):
            raise ValueError(f"reference (the frozen teacher, a PrunedVLM) must be given for kind in "
                             f"{REFERENCE_SELECTORS} and only then (kind={kind!r})")
        self.kind, self.ratio, self.seed, self.layer = kind, check_ratio(ratio), seed, layer
        self.scorer = scorer.requires_grad_(False).eval() if scorer is not None else None
        if reference is not None:
            reference.requires_grad_(False).eval()
        self._reference = (reference,)  # a tuple: not registered as a submodule (not copied, not in state_dict)
        self.generator = torch.Generator().manual_seed(seed)
        self.text_dim = getattr(scorer, "text_dim", None)  # the question embedding an untrained scorer reads

    @property
    def reference(self):
        """The frozen model whose attention the FastV-style or VisionZip-style selection reads (``None``
        otherwise)."""
        return self._reference[0]

    def __deepcopy__(self, memo):
        new = FrozenSelector(self.kind, self.ratio, copy.deepcopy(self.scorer, memo), self.reference, self.seed,
                             self.layer)
        new.generator.set_state(self.generator.get_state())
        return new.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.scorer is not None:
            self.scorer.eval()  # a frozen scorer never samples Gumbel masks
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ratio={self.ratio:g}, seed={self.seed}"

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor, text: torch.Tensor | None = None, prompt: dict | None = None):
        """Scores [B, N] of the visual ``tokens`` [B, N, d]: the higher, the earlier kept. (A VisionZip-style
        selection has no scores, only a mask per budget: :meth:`forward`.)"""
        B, N = tokens.shape[:2]
        if self.kind == "visionzip":
            raise ValueError("a VisionZip-style selection has no scores: call the selector with a ratio")
        if self.kind == "random":
            return torch.rand(B, N, generator=self.generator).to(tokens.device)
        if self.kind == "untrained":
            return self.scorer(tokens, rule="topk", ratio=self.ratio, text=text).keep_prob.float()
        if prompt is None:
            raise ValueError("a FastV-style selection needs prompt: input_ids, attention_mask, labels, visual_tokens")
        return fastv_scores(prompt, self.reference, self.layer)

    def forward(self, tokens: torch.Tensor, valid_mask: torch.Tensor | None = None, tau: float | None = None,
                ratio: float | None = None, rule: str | None = None, text: torch.Tensor | None = None,
                prompt: dict | None = None) -> PrunerOutput:
        """Top-k keep mask [B, N] of :meth:`scores` at ``ratio`` (default ``self.ratio``); ``tau`` is ignored."""
        if rule not in (None, "topk"):
            raise ValueError(f"rule must be 'topk' or None for a frozen {self.kind!r} selection, got {rule!r}")
        ratio = self.ratio if ratio is None else ratio
        if self.kind == "visionzip":
            mask = self._visionzip_mask(tokens, ratio, prompt)
        else:
            mask = topk_keep_mask(self.scores(tokens, text, prompt), ratio, valid_mask)
        return PrunerOutput(mask, None, mask)

    @torch.no_grad()
    def _visionzip_mask(self, tokens: torch.Tensor, ratio: float, prompt: dict | None) -> torch.Tensor:
        """Keep mask [B, N] of the VisionZip-style selection of the prompt's images, one row per sample."""
        if prompt is None or prompt.get("pixel_values") is None:
            raise ValueError("a VisionZip-style selection needs prompt['pixel_values'] (the images)")
        keep, _ = VisionZip(ratio, merge=False).select(prompt["pixel_values"], self.reference)
        index = prompt.get("image_index")
        keep = keep if index is None else keep[index]
        if keep.shape != tokens.shape[:2]:
            raise ValueError(f"the images give keep masks {tuple(keep.shape)}, the tokens need {tuple(tokens.shape[:2])}")
        return keep.to(tokens.device)


# ----------------------------------------------------------------------------------------------------------
# Lesson 07's job: one seed of the learned model or of a control, trained and tested
# ----------------------------------------------------------------------------------------------------------
def train_and_evaluate(seed: int, selector: str = "learned", mode: str | None = None, ratios=(0.25,),
                       shared: float = 0.25, alone_ratio: float | None = None, phase1_test: bool = False,
                       threshold: bool = False, test_questions: int | None = None, save_dir: str | None = None,
                       overrides: dict | None = None, name: str = "") -> dict:
    """One lesson-07 job (a module-level function for :func:`vtp.sweep.run_jobs`): the teacher of ``mode``
    (:func:`vtp.load_or_train_teacher`), then

    1. phase 1 at keep ratio ``shared``: ``pruner_recipe(shared, seed, mode, adapt_steps=0, selector=selector)``;
    2. phase 2 from that model over every budget of ``ratios``:
       ``pruner_recipe(shared, seed, mode, adapt_ratios=ratios, selector=selector)`` (``student=`` phase 1);
    3. if ``alone_ratio``: a phase 2 at that ratio alone from the same phase-1 model, with the same number of
       steps and validations as step 2 (``pruner_recipe(alone_ratio, ...)`` with step 2's ``adapt_steps`` and
       ``eval_every``).

    ``overrides`` (recipe fields, e.g. shorter runs) apply to every recipe. Each model is tested on the test
    split (a fixed subset of ``test_questions`` questions if given) with real removal: the phase-2
    model top-k at every ratio (and the threshold rule if ``threshold``), the phase-1 model likewise if
    ``phase1_test``, the one-ratio model at ``alone_ratio``. ``save_dir`` saves the phase-2 model's (and the
    one-ratio model's) ``state_dict`` there as ``{name}.pt`` (``{name}_alone.pt``); :func:`load_student`
    rebuilds them. Returns a picklable dict: ``name``, ``seed``, ``selector``, the test results (``accuracy``,
    ``per_type``, ``visual_tokens``, ``keep_ratio`` keyed by ``f"{ratio:.4f}"``), ``phase1``, ``alone``,
    ``threshold``, both phases' histories and configs, ``train_time_s``, ``teacher_sha256``, ``device``, ``saved``.
    """
    from .data import encode_split, load_split
    from .evaluate import accuracy_at_ratios, encoded_test_split
    from .train import load_or_train_teacher, pruner_recipe, train_pruner

    _one_thread_per_process()
    ratios = tuple(check_ratio(r, "ratios") for r in ratios)
    over = dict(overrides or {})
    teacher, processor, info = load_or_train_teacher(mode)
    device = next(teacher.parameters()).device
    cfg1 = pruner_recipe(shared, seed, mode, **{**over, "adapt_steps": 0, "selector": selector})
    cfg2 = pruner_recipe(shared, seed, mode, **{"adapt_ratios": ratios, **over, "selector": selector})
    val = encode_split(load_split("val"), processor, device)
    test = encoded_test_split(processor, device, test_questions)

    phase1, h1 = train_pruner(teacher, processor, cfg1, val_data=val)
    model, h2 = train_pruner(teacher, processor, cfg2, val_data=val, student=phase1)
    out = {"name": name, "seed": seed, "selector": selector, **accuracy_at_ratios(model, test, processor, ratios, cfg2.bf16),
           "phase1": accuracy_at_ratios(phase1, test, processor, ratios, cfg1.bf16) if phase1_test else None,
           "threshold": None, "alone": None, "history": {"phase1": h1, "phase2": h2},
           "config": {"phase1": h1["config"], "phase2": h2["config"]},
           "train_time_s": {"phase1": h1["train_time_s"], "phase2": h2["train_time_s"]},
           "test_questions": len(test), "teacher_sha256": info.get("sha256"), "device": h2["device"], "saved": {}}
    if threshold:
        out["threshold"] = _threshold_accuracy(model, test, processor, cfg2.bf16)
    if save_dir is not None:
        out["saved"]["model"] = _save(model, save_dir, f"{name or seed}.pt")
    if alone_ratio is not None:
        cfg3 = pruner_recipe(alone_ratio, seed, mode, **{**over, "adapt_steps": cfg2.adapt_steps,
                                                         "eval_every": cfg2.eval_every, "selector": selector})
        alone, out["alone"], seconds = _train_alone(teacher, processor, cfg3, alone_ratio, phase1, val, test)
        out["train_time_s"]["alone"] = seconds
        if save_dir is not None:
            out["saved"]["alone"] = _save(alone, save_dir, f"{name or seed}_alone.pt")
    return out


def _one_thread_per_process():
    """On a GPU machine a job is one process among many: one CPU thread each, no oversubscription."""
    if torch.cuda.is_available():
        torch.set_num_threads(1)


def _threshold_accuracy(model, test, processor, bf16: bool) -> dict:
    """Test accuracy of ``model`` with the threshold rule (keep prob > 0.5) instead of top-k: ``accuracy``,
    ``keep_ratio`` (the share of visual tokens the rule kept) and ``per_type``."""
    from .evaluate import accuracy

    res = accuracy(model, test, processor, rule="threshold", bf16=bf16)
    return {"accuracy": res.accuracy, "keep_ratio": res.keep_ratio, "per_type": res.per_type}


def _save(model, directory, filename: str) -> str:
    """Save ``model``'s ``state_dict`` as ``directory/filename``; return that path as a string."""
    from pathlib import Path

    path = str(Path(directory) / filename)
    torch.save(model.state_dict(), path)
    return path


def _train_alone(teacher, processor, cfg, ratio: float, phase1, val, test):
    """Step 3 of :func:`train_and_evaluate`: phase 2 at one ``ratio`` alone (recipe ``cfg``) from the phase-1 model
    ``phase1``, tested top-k at that ratio. Returns ``(model, result, train_time_s)``; ``result`` = the test
    results with ``ratio``, ``adapt_best``, ``val`` and ``config``."""
    from .evaluate import accuracy_at_ratios
    from .train import train_pruner

    alone, history = train_pruner(teacher, processor, cfg, val_data=val, student=phase1)
    res = accuracy_at_ratios(alone, test, processor, (ratio,), cfg.bf16)
    result = {"ratio": ratio, **res, "adapt_best": history.get("adapt_best"), "val": history["val"],
              "config": history["config"]}
    return alone, result, history["train_time_s"]


def load_student(teacher, config: dict, path):
    """The :class:`vtp.PrunedVLM` that :func:`train_and_evaluate` saved to ``path``, rebuilt around a copy of
    ``teacher`` from its recipe ``config`` (a ``PrunerConfig`` as a dict), in eval mode."""
    from .train.student import student_from_recipe

    student = student_from_recipe(teacher, config)
    student.load_state_dict(torch.load(path, map_location=next(teacher.parameters()).device, weights_only=True))
    return student.eval()


def evaluate_training_free(mode: str | None = None, ratios=(0.25,), test_questions: int | None = None,
                           random_seeds=(0, 1, 2), name: str = "training-free") -> dict:
    """The training-free baselines of :mod:`vtp.baselines` on the FROZEN teacher of ``mode`` (no language-model
    adaptation), top-k with real removal at each ratio on the test split (a fixed subset of ``test_questions``, as
    :func:`train_and_evaluate`): ``random`` (one generator seed per entry of ``random_seeds``), ``fastv`` and
    ``object`` (the pixel reference). Returns ``{"name", "teacher_accuracy", "teacher_per_type",
    "teacher_sha256", "accuracy": {method: {f"{r:.4f}": [acc, ...]}}, "per_type": {method: {f"{r:.4f}":
    per-type of the first run}}, "device"}``."""
    from .baselines import fastv_scores, keep_by_scores, object_scores, random_scores
    from .evaluate import accuracy, encoded_test_split
    from .runtime import device_name
    from .train import load_or_train_teacher

    _one_thread_per_process()
    teacher, processor, info = load_or_train_teacher(mode)
    device = next(teacher.parameters()).device
    test = encoded_test_split(processor, device, test_questions)
    full = accuracy(teacher, test, processor)
    out = {"name": name, "teacher_accuracy": full.accuracy, "teacher_per_type": full.per_type,
           "teacher_sha256": info.get("sha256"), "test_questions": len(test), "device": device_name(device),
           "accuracy": {"random": {}, "fastv": {}, "object": {}}, "per_type": {"random": {}, "fastv": {}, "object": {}}}
    for r in (check_ratio(r, "ratios") for r in ratios):
        key = f"{r:.4f}"
        runs = {"random": [accuracy(teacher, test, processor, keep_fn=keep_by_scores(
                    random_scores, r, generator=torch.Generator().manual_seed(s))) for s in random_seeds],
                "fastv": [accuracy(teacher, test, processor, keep_fn=keep_by_scores(fastv_scores, r))],
                "object": [accuracy(teacher, test, processor, keep_fn=keep_by_scores(object_scores, r))]}
        for method, results in runs.items():
            out["accuracy"][method][key] = [res.accuracy for res in results]
            out["per_type"][method][key] = results[0].per_type
    return out


def lesson07_job(kind: str, **kwargs) -> dict:
    """One job of lesson 07's :func:`vtp.sweep.run_jobs` call: ``kind`` = ``"train"``
    (:func:`train_and_evaluate`) or ``"training-free"`` (:func:`evaluate_training_free`), with ``kwargs``."""
    jobs = {"train": train_and_evaluate, "training-free": evaluate_training_free}
    if kind not in jobs:
        raise ValueError(f"kind must be one of {tuple(jobs)}, got {kind!r}")
    return jobs[kind](**kwargs)
