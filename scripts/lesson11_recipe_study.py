r"""Which schedule keeps lesson 11's learned pruner on its goals? A study beside lesson 11 (one GPU, ~7 minutes).

Lesson 11's first full run cut phase 2 short with its time guard (the cosine learning rate never decayed) and one
seed's phase-1 keep ratio fell far below its target (0.036 against 0.111). This script trains the learned pruner
of lesson 11 (:func:`vtp.scene_pruning.train_job`, lesson 10's teacher, the same pool, validation and test split)
under a few VARIANTS of :func:`vtp.scene_pruning.scene_pruner_config`, every seed of every variant at once on
one GPU, and reports per variant and seed: the test accuracy at 192, 128 and 64 of 576 tokens, its retention
(accuracy / teacher accuracy) against the lesson's goals, the phase-1 training keep ratio (mean of the last
five logged steps) and the steps each run trained.

    python3 scripts/lesson11_recipe_study.py --out study.json [--variants recipe,dual_0.3] [--seeds 0,1,2]
    python3 scripts/lesson11_recipe_study.py --smoke --out study.json     # CPU: the code path only

Only the learned selection is trained here: a variant chosen for lesson 11 applies to its controls too (they
share every field but the selection), and lesson 11 measures them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vtp import scene_pruning as sp  # noqa: E402
from vtp.runtime import default_device, device_name  # noqa: E402
from vtp.scene_teacher import load_or_train_scene_teacher, scene_config, training_pool  # noqa: E402
from vtp.scenes import scene_accuracy, scene_split  # noqa: E402
from vtp.sweep import run_jobs  # noqa: E402

#: variant name -> overrides of scene_pruner_config (on top of the shared ones of --adapt-steps / --guard-s)
VARIANTS = {
    "recipe": {},  # lesson 11's recipe, phase 2 short enough to finish inside the guard
    "dual_0.3": {"controller_lr": 0.3},  # a slower dual step: less overshoot of the keep ratio after the curriculum
    "topk_phase1": {"sampler": "topk"},  # phase 1 through top-k at the budget: its keep ratio is exact by design
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--adapt-steps", type=int, default=None, help="phase-2 steps (default: the preset's)")
    ap.add_argument("--guard-s", type=float, default=None, help="time guard per training (default: the preset's)")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    mode = "smoke" if a.smoke else "full"
    os.environ["VTP_MODE"] = mode  # the spawned jobs and every default read the mode from here
    names = a.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    shared = {k: v for k, v in (("adapt_steps", a.adapt_steps), ("time_budget_s", a.guard_s)) if v is not None}
    start = time.perf_counter()
    S = sp.settings(mode)
    device = default_device()
    teacher, processor, info = load_or_train_scene_teacher(mode, device=device)
    scene = scene_config(info["recipe"])
    work = Path(tempfile.mkdtemp(prefix="vtp11-study-"))
    data, test = work / "data.pt", work / "test.pt"
    pool = training_pool(scene, S["pool_images"], S["pool_questions_per_image"], min(S["pool_processes"], os.cpu_count()))
    sp.save_data(data, pool=pool, val=scene_split("val", scene, S["val_questions"]))
    test_split = scene_split("test", scene, S["test_questions"])
    sp.save_data(test, test=test_split)
    teacher_acc = scene_accuracy(teacher, test_split, processor, batch_size=S["eval_batch_size"]).accuracy
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    jobs = [dict(kind="train", name=f"{v}-{s}", seed=s, selector="learned", data_file=str(data), test_file=str(test),
                 mode=mode, overrides={**shared, **VARIANTS[v]}) for v in names for s in seeds]
    runs = {r["name"]: r for r in run_jobs(sp.lesson11_job, jobs, workers=len(jobs) if torch.cuda.is_available() else 1,
                                            desc="study")}
    report = {"device": device_name(device), "mode": mode, "teacher_sha256": info.get("sha256"),
              "teacher_accuracy": teacher_acc, "test_questions": len(test_split), "shared_overrides": shared,
              "variants": {}, "seconds": None}
    for v in names:
        rows = {}
        for s in seeds:
            r = runs[f"{v}-{s}"]
            h = r["history"]
            rows[str(s)] = {"accuracy": {b: r["test"][b]["accuracy"] for b in sp.BUDGETS},
                            "evidence_recall_64": r["test"]["64"]["evidence_recall_overall"],
                            "phase1_keep_last5": sum(h["keep_ratio"][-5:]) / len(h["keep_ratio"][-5:]),
                            "phase1_target": h["target"][-1], "phase2_steps": r["phase2_steps"],
                            "stopped_early": r["stopped_early"], "train_time_s": r["train_time_s"],
                            "best": h.get("adapt_best")}
        worst = {b: min(row["accuracy"][b] for row in rows.values()) / teacher_acc for b in sp.BUDGETS}
        report["variants"][v] = {"overrides": {**shared, **VARIANTS[v]}, "seeds": rows, "worst_retention": worst,
                                 "goals_met": {b: worst[b] >= sp.GOALS["retention"][b] for b in sp.BUDGETS}}
    report["seconds"] = time.perf_counter() - start
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['device']}: teacher {teacher_acc:.4f} on {len(test_split)} test questions; {len(jobs)} trainings "
          f"in {report['seconds']:.0f} s")
    for v, rep in report["variants"].items():
        print(f"{v}: worst-seed retention " + ", ".join(
            f"{b}/576 {rep['worst_retention'][b]:.4f} ({'met' if rep['goals_met'][b] else 'NOT met'})" for b in sp.BUDGETS))
        for s, row in rep["seeds"].items():
            print(f"   seed {s}: " + ", ".join(f"{b} {row['accuracy'][b]:.4f}" for b in sp.BUDGETS)
                  + f"; recall@64 {row['evidence_recall_64']:.3f}; phase-1 keep {row['phase1_keep_last5']:.3f} "
                  f"(target {row['phase1_target']:.3f}); phase 2 {row['phase2_steps']} steps"
                  + (" (time guard)" if row["stopped_early"] is not None else "")
                  + f"; {row['train_time_s']:.0f} s")


if __name__ == "__main__":
    main()
