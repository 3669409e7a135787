r"""Lesson 11: lesson 07's learned pruner on the scenes benchmark (576 visual tokens), its fair controls and peers.

**Budgets.** :data:`BUDGETS`: 192, 128 and 64 of :math:`N = 576` tokens, as keep ratios :math:`\rho = k/N`.

**Training jobs** (:func:`train_job`), one per (selection, seed), all with :func:`scene_pruner_config`: lesson 07's
recipe (:func:`vtp.pruner_recipe`) with phase 1 at the smallest budget and phase 2 cycling the three budgets, so
that ONE model per seed serves every budget, with the step counts of :data:`PRESETS`. ``selector`` is the method
(``"learned"``) or an adapted control (:class:`vtp.controls.FrozenSelector`): control (a) ``"untrained"`` (the
frozen scorer at its random initialisation) and control (b) the strongest training-free peer's selection
(``"visionzip"`` or ``"fastv"``). A control's language model trains exactly like the learned one (same steps,
learning rates, batches, teacher, seed, validations); only its selection is frozen.

**Data.** The training pool and the validation split are made once (:func:`save_data`) and read by every job
(:func:`load_data`); the training batches group questions by image (:func:`image_batches`: the vision tower runs
once per image) and are never flipped (a horizontal flip turns "left of" into "right of").

**Peers job** (:func:`peers_job`): makes the test split, saves it for the training jobs (they wait for it with
:func:`wait_for` once trained), and evaluates the training-free peers on the frozen teacher
(:func:`vtp.scene_eval.evaluate_peer`), plus the VisionZip-style selection without merging, which is what control
(b) sees when the peer is VisionZip-style.

**Evaluation** of a trained student (:func:`evaluate_student`): real removal, top-k at each budget, accuracy and
evidence recall :math:`r_q = |K_q \cap E_q| / |E_q|` per family in one pass.

**Summary.** :func:`build_summary` assembles the results file's ``summary`` object, :func:`check_summary` checks
it, :func:`goals` computes the lesson's goals from it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .baselines import VisionZip, evidence_recall
from .scene_eval import RecordedKeep, evaluate_peer, family_means
from .scenes import encode_scenes, scene_accuracy, scene_split

__all__ = ["BUDGETS", "SHARED", "PRESETS", "settings", "scene_pruner_config", "save_data", "load_data", "wait_for",
           "image_batches", "evaluate_student", "evaluate_keep_fn", "train_job", "peers_job", "lesson11_job",
           "SUMMARY_METHODS", "build_summary", "check_summary", "GOALS", "goals"]

#: budget label -> keep ratio (k of the 576 tokens; in smoke runs the same ratios of the smoke scenes' tokens)
BUDGETS = {"192": 192 / 576, "128": 128 / 576, "64": 64 / 576}
SHARED = BUDGETS["64"]  # phase 1 trains at the smallest budget, as lesson 07 does

# Step counts (data, so that a slower or faster GPU is one edit away). A step at batch 64 (32 images x 2 questions,
# ~610 tokens each) costs ~2 TFLOP (student forward + backward, frozen teacher, two vision-tower forwards, float32
# policy attention); the ten jobs share one GPU, and control (b), which runs the FastV-style score at every step, is
# the slowest (``train_time_s`` in results/11_pruning_at_576.json). 240 + 180 steps finish inside the guard on one
# H200, so phase 2's cosine learning rate decays to its end and every run trains the same steps; the first full run
# (240 + 360 steps, a 330 s guard) cut phase 2 short, and ``scripts/lesson11_recipe_study.py`` measured this
# schedule (results/11_recipe_study.json). ``time_budget_s`` = 400 s per training only guards a slower GPU (phase 2
# then stops early and the lesson says so). The pool of 6,000 images x 4 questions is seen about once per training.
# ``eval_batch_size`` = 64: a FastV-style score at ~601 tokens keeps a [batch, 4 heads, 601, 601] float32 attention
# map (0.35 GiB at 64, 2.76 GiB at 512), in ten processes at once.
PRESETS = {
    "full": dict(seeds=(0, 1, 2), steps=240, adapt_steps=180, eval_every=120, batch_size=64, questions_per_image=2,
                 eval_questions=1800, log_every=10, time_budget_s=400.0, pool_images=6000, pool_questions_per_image=4,
                 pool_processes=16, test_questions=None, val_questions=None, eval_batch_size=64),
    # CPU, seconds per training: the same code path on the smoke teacher's 16-token scenes.
    "smoke": dict(seeds=(0, 1, 2), steps=12, adapt_steps=12, eval_every=6, batch_size=16, questions_per_image=2,
                  eval_questions=120, log_every=1, time_budget_s=120.0, pool_images=150, pool_questions_per_image=4,
                  pool_processes=1, test_questions=600, val_questions=600, eval_batch_size=200),
}


def settings(mode: str | None = None) -> dict:
    """The preset of ``mode`` (``"smoke"`` / ``"full"``, default :func:`vtp.runtime.run_mode`), a copy."""
    from .runtime import run_mode

    mode = mode or run_mode()
    if mode not in PRESETS:
        raise ValueError(f"mode must be one of {tuple(PRESETS)}, got {mode!r}")
    return dict(PRESETS[mode])


def scene_pruner_config(selector: str = "learned", seed: int = 0, mode: str | None = None, **overrides):
    """The :class:`vtp.PrunerConfig` of one lesson-11 training: ``pruner_recipe(SHARED, seed, mode)`` with phase 2
    cycling :data:`BUDGETS`, ``selector``, the step counts and batch of :func:`settings`, no augmentation (a flip
    changes left / right answers) and the time guard; ``overrides`` last."""
    from .train import pruner_recipe

    s = settings(mode)
    fields = dict(adapt_ratios=tuple(BUDGETS.values()), selector=selector, steps=s["steps"],
                  adapt_steps=s["adapt_steps"], eval_every=s["eval_every"], batch_size=s["batch_size"],
                  eval_questions=s["eval_questions"], eval_batch_size=s["eval_batch_size"], log_every=s["log_every"],
                  time_budget_s=s["time_budget_s"], augment={}, train_questions=None)
    return pruner_recipe(SHARED, seed, mode, **{**fields, **overrides})


def save_data(path, **splits) -> Path:
    """Save :class:`vtp.scenes.SceneSplit` objects under their names to ``path``, atomically (written beside it,
    then renamed: a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(splits, tmp)
    os.replace(tmp, path)
    return path


def load_data(path) -> dict:
    """The splits :func:`save_data` wrote to ``path`` (a dict name -> :class:`vtp.scenes.SceneSplit`)."""
    return torch.load(path, weights_only=False, mmap=True)


def wait_for(path, timeout_s: float = 1800.0, poll_s: float = 0.5) -> Path:
    """Wait until ``path`` exists (another job writes it); ``RuntimeError`` if ``path.failed`` appears (that job
    failed) or after ``timeout_s`` seconds."""
    path = Path(path)
    failed = path.with_name(path.name + ".failed")
    start = time.perf_counter()
    while not path.exists():
        if failed.exists():
            raise RuntimeError(f"the job writing {path.name} failed: {failed.read_text()}")
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return path


def image_batches(split, processor, cfg, device=None, questions_per_image: int = 2):
    """Endless training batches of ``cfg.batch_size`` questions of ``split``, ``questions_per_image`` per image
    (:func:`vtp.data.iterate_image_batches`: the vision tower runs once per image), drawn with a CPU generator
    seeded with ``cfg.seed`` (the same batches for the learned run and its controls), never augmented."""
    from .data import iterate_image_batches

    if cfg.batch_size % questions_per_image:
        raise ValueError(f"questions_per_image must divide batch_size={cfg.batch_size}, got {questions_per_image}")
    data = encode_scenes(split, processor, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    return iterate_image_batches(data, processor, cfg.batch_size // questions_per_image, questions_per_image,
                                 generator, augment=None)


def _result(correct: torch.Tensor, keep: torch.Tensor, seen: torch.Tensor, split, n: int) -> dict:
    """Accuracy and evidence recall, overall and per family, of the first ``n`` questions of ``split``."""
    recall = evidence_recall(keep, split.evidence[:n])
    families = split.families[:n]
    return {"accuracy": correct.mean().item(), "per_family": family_means(correct, families),
            "evidence_recall": family_means(recall, families), "evidence_recall_overall": recall.mean().item(),
            "visual_tokens": seen.float().mean().item(), "n": n}


@torch.no_grad()
def evaluate_student(student, split, processor, ratio: float, encoded=None, max_questions: int | None = None,
                     batch_size: int = 256, bf16: bool = True) -> dict:
    """A trained :class:`vtp.PrunedVLM` (learned pruner or adapted control) on the first ``max_questions``
    questions of ``split`` with real removal, top-k at ``ratio``: ``{"accuracy", "per_family", "evidence_recall"
    (per family), "evidence_recall_overall", "visual_tokens", "n"}`` from one pass (the keep masks are read from the
    model's output). The accuracy equals :func:`vtp.scenes.scene_accuracy`'s at the same ``ratio``."""
    from .data import iterate_batches
    from .evaluate import autocast
    from .vlm import answer_logits

    device = next(student.parameters()).device
    encoded = (encoded if encoded is not None else encode_scenes(split, processor, device)).to(device)
    n = len(encoded) if max_questions is None else min(int(max_questions), len(encoded))
    was_training = student.training
    student.eval()
    preds, keeps, seen = [], [], []
    try:
        for batch in iterate_batches(encoded, processor, batch_size, indices=torch.arange(n, device=device)):
            with autocast(device, bf16):
                out = student(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"],
                              mode="remove", ratio=ratio, rule="topk")
            logits, _ = answer_logits(out.logits, out.labels)
            preds.append(logits.float().argmax(-1).cpu())
            keeps.append(out.visual_keep.bool().cpu())
            seen.append(out.n_visual.cpu())
    finally:
        student.train(was_training)
    correct = (torch.cat(preds) == encoded.answer_ids[:n].cpu()).float()
    return _result(correct, torch.cat(keeps), torch.cat(seen), split, n)


def evaluate_keep_fn(model, split, processor, keep_fn, encoded=None, max_questions: int | None = None,
                     batch_size: int = 256) -> dict:
    """:func:`evaluate_student`'s numbers for the frozen ``model`` pruned by any ``keep_fn`` (as
    :func:`vtp.scene_eval.evaluate_peer` for the named peers): one :func:`vtp.scenes.scene_accuracy` pass, the
    masks recorded on the way (:class:`vtp.scene_eval.RecordedKeep`)."""
    rec = RecordedKeep(keep_fn, len(split))
    res = scene_accuracy(model, split, processor, encoded=encoded, keep_fn=rec, max_questions=max_questions,
                         batch_size=batch_size)
    enc = encoded if encoded is not None else encode_scenes(split, processor)
    correct = (res.predictions == enc.answer_ids[: res.n].cpu()).float()
    out = _result(correct, rec.masks[: res.n], torch.full((res.n,), res.visual_tokens), split, res.n)
    out["accuracy"] = res.accuracy
    return out


def _one_thread_per_process():
    """On a GPU machine a job is one process among many: one CPU thread each."""
    if torch.cuda.is_available():
        torch.set_num_threads(1)


def _test_split(test_file, timeout_s: float):
    return load_data(wait_for(test_file, timeout_s))["test"]


def train_job(name: str, seed: int, selector: str, data_file, test_file, mode: str | None = None,
              save_dir=None, wait_s: float = 1800.0, overrides: dict | None = None) -> dict:
    """One lesson-11 training (a module-level function for :func:`vtp.sweep.run_jobs`): the scenes teacher of
    ``mode`` (:func:`vtp.scene_teacher.load_or_train_scene_teacher`), :func:`scene_pruner_config` of ``selector``
    and ``seed`` trained on the pool of ``data_file`` (validated on its ``val`` split), then evaluated with
    :func:`evaluate_student` at every budget on the test split of ``test_file`` (written by :func:`peers_job`;
    waited for). ``save_dir`` saves the student's ``state_dict`` as ``{name}.pt``; ``overrides`` go to
    :func:`scene_pruner_config` (a recipe study: ``scripts/lesson11_recipe_study.py``). Returns a picklable dict:
    ``name``, ``seed``, ``selector``, ``config``, ``history``, ``test`` (per budget label), ``train_time_s``,
    ``phase2_steps``, ``stopped_early``, ``job_s``, ``teacher_sha256``, ``device``, ``saved``."""
    from .runtime import default_device
    from .scene_teacher import load_or_train_scene_teacher
    from .train import train_pruner

    start = time.perf_counter()
    _one_thread_per_process()
    teacher, processor, info = load_or_train_scene_teacher(mode, device=default_device())
    device = next(teacher.parameters()).device
    data = load_data(data_file)
    cfg = scene_pruner_config(selector, seed, mode, **(overrides or {}))
    s = settings(mode)
    batches = image_batches(data["pool"], processor, cfg, device, s["questions_per_image"])
    val = encode_scenes(data["val"], processor, device)
    student, history = train_pruner(teacher, processor, cfg, val_data=val, batches=batches)
    test = _test_split(test_file, wait_s)
    enc = encode_scenes(test, processor, device)
    results = {label: evaluate_student(student, test, processor, r, encoded=enc, batch_size=s["eval_batch_size"],
                                       bf16=cfg.bf16) for label, r in BUDGETS.items()}
    saved = None
    if save_dir is not None:
        saved = str(Path(save_dir) / f"{name}.pt")
        torch.save(student.state_dict(), saved)
    return {"name": name, "seed": seed, "selector": selector, "config": history["config"], "history": history,
            "test": results, "test_questions": len(enc), "train_time_s": history["train_time_s"],
            "phase2_steps": cfg.adapt_steps if history["stopped_early"] is None else history["stopped_early"] - cfg.steps,
            "stopped_early": history["stopped_early"], "job_s": time.perf_counter() - start,
            "teacher_sha256": info.get("sha256"), "device": history["device"], "saved": saved}


def peers_job(test_file, mode: str | None = None, seeds=(0, 1, 2), name: str = "peers") -> dict:
    """Make the test split of the teacher's scenes (all 10,080 questions, or ``test_questions`` of the smoke
    preset), save it to ``test_file`` for the training jobs (``test_file.failed`` with the error if this job fails
    first), then evaluate on the frozen teacher (no adaptation) at every budget: ``random`` (one run per seed),
    ``fastv``, ``visionzip``, ``visionzip_selection`` (VisionZip-style without merging: control (b)'s selection)
    and ``evidence_oracle``. Returns ``{"name", "teacher": {"accuracy", "per_family"}, "methods": {method:
    {label: result or [result per seed]}}, "test_questions", "teacher_sha256", "device", "job_s"}``."""
    from .runtime import default_device, device_name
    from .scene_teacher import load_or_train_scene_teacher, scene_config

    start = time.perf_counter()
    test_file = Path(test_file)
    try:
        _one_thread_per_process()
        s = settings(mode)
        teacher, processor, info = load_or_train_scene_teacher(mode, device=default_device())
        test = scene_split("test", scene_config(info["recipe"]), s["test_questions"])
        save_data(test_file, test=test)
    except Exception as err:
        test_file.with_name(test_file.name + ".failed").write_text(f"{type(err).__name__}: {err}")
        raise
    device = next(teacher.parameters()).device
    enc = encode_scenes(test, processor, device)
    bs = s["eval_batch_size"]
    full = scene_accuracy(teacher, test, processor, encoded=enc, batch_size=bs)
    methods = {m: {} for m in ("random", "fastv", "visionzip", "visionzip_selection", "evidence_oracle")}
    for label, r in BUDGETS.items():
        peer = lambda peer_name, seed=0: evaluate_peer(teacher, test, processor, peer_name, r, seed=seed,  # noqa: E731
                                                       encoded=enc, batch_size=bs).as_dict()
        methods["random"][label] = [peer("random", seed) for seed in seeds]
        for m in ("fastv", "visionzip", "evidence_oracle"):
            methods[m][label] = peer(m)
        methods["visionzip_selection"][label] = evaluate_keep_fn(teacher, test, processor, VisionZip(r, merge=False),
                                                                 encoded=enc, batch_size=bs)
    return {"name": name, "teacher": {"accuracy": full.accuracy, "per_family": full.per_type}, "methods": methods,
            "test_questions": len(enc), "teacher_sha256": info.get("sha256"), "device": device_name(device),
            "job_s": time.perf_counter() - start}


def lesson11_job(kind: str, **kwargs) -> dict:
    """One job of lesson 11's :func:`vtp.sweep.run_jobs` call: ``kind`` = ``"train"`` (:func:`train_job`) or
    ``"peers"`` (:func:`peers_job`), with ``kwargs``."""
    jobs = {"train": train_job, "peers": peers_job}
    if kind not in jobs:
        raise ValueError(f"kind must be one of {tuple(jobs)}, got {kind!r}")
    return jobs[kind](**kwargs)


# ---- the results file's summary and goals -------------------------------------------------------------------

#: the summary's methods per budget: the three trained ones (a list per seed) and the frozen-teacher peers
SUMMARY_METHODS = ("learned", "adapted_control", "adapted_peer", "random", "fastv", "visionzip", "evidence_oracle")
TRAINED = ("learned", "adapted_control", "adapted_peer")


def build_summary(visual_tokens: int, teacher_accuracy: float, teacher_train_s: float, trained: dict,
                  peers: dict) -> dict:
    """The ``summary`` object of ``results/11_pruning_at_576.json``: ``{"visual_tokens", "teacher_accuracy",
    "teacher_train_s", "budgets": {label: {"learned": [acc per seed], "adapted_control": [...], "adapted_peer":
    [...], "random": mean of its runs, "fastv", "visionzip", "evidence_oracle"}}}``. ``trained[method][label]`` =
    the per-seed accuracies of ``learned``, ``adapted_control`` (control (a)) and ``adapted_peer`` (control (b));
    ``peers[method][label]`` = an accuracy, or a list of runs (``random``: their mean). Checked by
    :func:`check_summary`."""
    budgets = {}
    for label in BUDGETS:
        row = {m: [float(a) for a in trained[m][label]] for m in TRAINED}
        for m in SUMMARY_METHODS[3:]:
            v = peers[m][label]
            row[m] = float(sum(v) / len(v)) if isinstance(v, (list, tuple)) else float(v)
        budgets[label] = row
    summary = {"visual_tokens": int(visual_tokens), "teacher_accuracy": float(teacher_accuracy),
               "teacher_train_s": float(teacher_train_s), "budgets": budgets}
    check_summary(summary)
    return summary


def _accuracy(x, what: str) -> None:
    if not (isinstance(x, float) and 0.0 <= x <= 1.0):
        raise ValueError(f"{what} must be an accuracy (a float in [0, 1]), got {x!r}")


def _on_questions(x: float, n: int, what: str) -> None:
    """``ValueError`` unless ``x`` is a count out of ``n`` questions (to float32 precision)."""
    if abs(x * n - round(x * n)) > 0.01:
        raise ValueError(f"{what} = {x!r} is not a fraction of {n} questions")


def check_summary(summary: dict, visual_tokens: int | None = None, n_questions: int | None = None,
                  seeds: int = 3) -> None:
    """``ValueError`` unless ``summary`` has exactly the keys :func:`build_summary` writes, ``seeds`` accuracies per
    trained method, every accuracy in [0, 1], ``adapted_peer`` a float or a list of ``seeds``; with
    ``visual_tokens``, that many tokens; with ``n_questions``, every accuracy a count out of that many questions
    (``random``: out of ``n_questions`` per run, averaged over the seeds)."""
    if not isinstance(summary, dict) or set(summary) != {"visual_tokens", "teacher_accuracy", "teacher_train_s",
                                                         "budgets"}:
        raise ValueError(f"summary must have exactly visual_tokens, teacher_accuracy, teacher_train_s and budgets, "
                         f"got {sorted(summary) if isinstance(summary, dict) else summary!r}")
    if not isinstance(summary["visual_tokens"], int) or summary["visual_tokens"] < 1:
        raise ValueError(f"visual_tokens must be a positive int, got {summary['visual_tokens']!r}")
    if visual_tokens is not None and summary["visual_tokens"] != visual_tokens:
        raise ValueError(f"visual_tokens must be {visual_tokens}, got {summary['visual_tokens']}")
    _accuracy(summary["teacher_accuracy"], "teacher_accuracy")
    if not (isinstance(summary["teacher_train_s"], float) and summary["teacher_train_s"] > 0):
        raise ValueError(f"teacher_train_s must be a positive float, got {summary['teacher_train_s']!r}")
    budgets = summary["budgets"]
    if not isinstance(budgets, dict) or list(budgets) != list(BUDGETS):
        raise ValueError(f"budgets must have the keys {list(BUDGETS)} in that order, got {budgets!r}")
    counts = [("teacher_accuracy", summary["teacher_accuracy"], 1)]
    for label, row in budgets.items():
        if not isinstance(row, dict) or set(row) != set(SUMMARY_METHODS):
            raise ValueError(f"budgets[{label!r}] must have exactly the keys {SUMMARY_METHODS}, got {row!r}")
        for m in SUMMARY_METHODS:
            v = row[m]
            listed = m in ("learned", "adapted_control") or (m == "adapted_peer" and isinstance(v, list))
            if listed:
                if not (isinstance(v, list) and len(v) == seeds):
                    raise ValueError(f"budgets[{label!r}][{m!r}] must list {seeds} accuracies (one per seed), got {v!r}")
                for i, a in enumerate(v):
                    _accuracy(a, f"budgets[{label!r}][{m!r}][{i}]")
                    counts.append((f"budgets[{label!r}][{m!r}][{i}]", a, 1))
            else:
                _accuracy(v, f"budgets[{label!r}][{m!r}]")
                counts.append((f"budgets[{label!r}][{m!r}]", v, seeds if m == "random" else 1))
    if n_questions is not None:
        for what, a, runs in counts:
            _on_questions(a, n_questions * runs, what)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if isinstance(xs, (list, tuple)) else float(xs)


#: the lesson's goals: worst-seed retention per budget, the margin at 64 over the best control or peer, random's gap
GOALS = {"retention": {"64": 0.98, "128": 0.99, "192": 0.995}, "margin_64": 0.03, "random_gap_64": 0.10}


def goals(summary: dict) -> list[dict]:
    """The lesson-11 goals measured on ``summary``: dicts ``goal``, ``measured``, ``target``, ``met`` and
    ``missed_by`` (0 when met): worst-seed retention (accuracy / teacher accuracy) of the learned pruner at each
    budget; at 64/576 the learned mean minus the best of control (a), control (b), VisionZip-style and FastV-style
    (``best_of`` names it); random at 64/576 below the teacher by at least 10 points."""
    teacher, rows, out = summary["teacher_accuracy"], summary["budgets"], []
    for label, target in GOALS["retention"].items():
        worst = min(rows[label]["learned"]) / teacher
        out.append({"goal": f"worst-seed retention at {label}/576 >= {target:.1%}", "measured": worst,
                    "target": target, "met": worst >= target, "missed_by": max(0.0, target - worst)})
    r = rows["64"]
    others = {m: _mean(r[m]) for m in ("adapted_control", "adapted_peer", "visionzip", "fastv")}
    best = max(others, key=others.get)
    margin = _mean(r["learned"]) - others[best]
    target = GOALS["margin_64"]
    out.append({"goal": f"learned mean minus the best control or peer at 64/576 >= {100 * target:.0f} points",
                "measured": margin, "target": target, "met": margin >= target, "missed_by": max(0.0, target - margin),
                "best_of": best})
    gap, target = teacher - r["random"], GOALS["random_gap_64"]
    out.append({"goal": f"random at 64/576 at least {100 * target:.0f} points below the teacher", "measured": gap,
                "target": target, "met": gap >= target, "missed_by": max(0.0, target - gap)})
    return out
