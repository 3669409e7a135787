r"""Teacher recipe search on the scenes benchmark (:mod:`vtp.scenes`, 576 visual tokens): K configurations
trained CONCURRENTLY on one GPU, one subprocess each, inside one wall-clock budget.

    python3 scripts/scenes_teacher_sweep.py --out DIR [--budget-s 480] [--configs a,b] [--smoke]

Each worker trains one recipe with :func:`vtp.scene_teacher.train_scene_teacher` (training pool, dense
pre-training of the vision tower, question answering, optionally the evidence loss) in a time budget that ends
``EVAL_RESERVE_S`` before the deadline, ships the teacher as ``DIR/<config>_teacher.tar`` and evaluates it on
the test split: overall and per family, the blind baseline (blank images), and 64 of 576 tokens kept by random
pruning (3 seeds), the VisionZip-style selection and the evidence oracle, each with its evidence recall per
family. It writes ``DIR/<config>.json`` and its log ``DIR/<config>.log``; the driver writes
``DIR/summary.json`` (ranking, the best configuration, the issue's teacher goals as met / not met). At most 6
configurations; the GPU's throughput is shared, so fewer configurations train more steps each.

Measured on one H200 (``results/scenes_teacher_sweep.json``): five configurations at once, ~1,100 steps each
in 240 s, stayed at their blank-image baselines; ``qfirst_dense60_5fam`` alone, 8,077 steps in 320 s, reached
76% (blank images 35%) with relation questions still at chance. ``*_ev`` adds the evidence loss, aimed at
exactly that: which patches a question is about, and which object is which in a relation.

``--smoke``: tiny scenes (64 px, 16 tokens), the CPU "smoke" model, 2 configurations, a 45 s budget.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EVAL_RESERVE_S = {"full": 50.0, "smoke": 12.0}  # evaluation: 7 passes over 10,080 questions
KEEP = 64 / 576  # the tightest budget
_BASE = {"model": {}, "scene": {}, "lr": 5e-4, "batch_size": 128, "questions_per_image": 4, "warmup_steps": 300,
         "pool_images": 24_000, "dense_pretrain_s": 0, "question_first": False, "compile": False, "evidence_weight": 0.0,
         "position_weight": 0.0, "contents_weight": 0.0, "where_weight": 0.0}
CONFIGS = {
    "pilot_qpi4": {},
    "lr1e-3_b256": {"lr": 1e-3, "batch_size": 256, "questions_per_image": 8, "warmup_steps": 500},
    "deep6": {"model": {"vision_layers": 6, "text_layers": 6}, "lr": 4e-4},
    "wide384": {"model": {"vision_width": 384, "vision_heads": 6, "text_width": 384, "text_heads": 6,
                          "text_kv_heads": 6, "text_layers": 6}, "lr": 3e-4},
    "pilot_compiled": {"compile": True},  # as pilot_qpi4, the loss torch.compile'd: is compile worth its time?
    # the vision tower first learns what lies under each patch (vtp.scene_pretrain), for dense_pretrain_s seconds
    "dense60": {"dense_pretrain_s": 60},
    "dense120": {"dense_pretrain_s": 120, "lr": 7e-4},
    # the question before the image too: visual positions see what is asked (vtp.data.VQAProcessor)
    "qfirst_dense60": {"dense_pretrain_s": 60, "question_first": True},
    # compiled, longer dense pre-training, the question on both sides of the image; full scenes and a five-family
    # variant without two-count comparisons (fewer objects, counts to three)
    "qfirst_dense90": {"dense_pretrain_s": 90, "question_first": True, "compile": True},
    "qfirst_dense60_5fam": {"dense_pretrain_s": 60, "question_first": True, "compile": True,
                            "scene": {"families": ["exist", "count", "query_color", "query_shape", "relation"],
                                      "min_objects": 3, "max_objects": 7, "max_count": 3}},
    # + the auxiliary evidence loss on the language model's visual positions (vtp.scene_teacher.EvidenceLoss)
    "qfirst_dense60_5fam_ev": {"dense_pretrain_s": 60, "question_first": True, "compile": True, "evidence_weight": 1.0,
                               "scene": {"families": ["exist", "count", "query_color", "query_shape", "relation"],
                                         "min_objects": 3, "max_objects": 7, "max_count": 3}},
    # + the owning object's centre as a number and a summary target for [CLS] in dense pre-training
    # (vtp.scene_pretrain): left / right was at chance while above / below was answered; VisionZip-style
    # selection reads the attention of a [CLS] token that nothing trained
    "qfirst_dense60_5fam_ev_pos": {"dense_pretrain_s": 60, "question_first": True, "compile": True,
                                   "evidence_weight": 1.0, "position_weight": 1.0, "contents_weight": 1.0,
                                   "scene": {"families": ["exist", "count", "query_color", "query_shape", "relation"],
                                             "min_objects": 3, "max_objects": 7, "max_count": 3}},
    # + the where loss (vtp.scene_teacher.EvidenceLoss): the answer position states the described objects' centres,
    # at the learning rate of lesson 10's second full run (5e-4 sat on a plateau for half the run)
    "qfirst_dense60_5fam_ev_pos_where": {"dense_pretrain_s": 60, "question_first": True, "compile": True, "lr": 2.5e-4,
                                         "evidence_weight": 1.0, "position_weight": 1.0, "contents_weight": 1.0,
                                         "where_weight": 1.0,
                                         "scene": {"families": ["exist", "count", "query_color", "query_shape",
                                                            "relation"], "min_objects": 3, "max_objects": 7,
                                                   "max_count": 3}},
    "qfirst_dense60_ev": {"dense_pretrain_s": 60, "question_first": True, "compile": True, "evidence_weight": 1.0},
    "qfirst_dense90_5fam": {"dense_pretrain_s": 90, "question_first": True, "compile": True,
                            "scene": {"families": ["exist", "count", "query_color", "query_shape", "relation"],
                                      "min_objects": 3, "max_objects": 7, "max_count": 3}},
    "easy_scenes": {"scene": {"colors": ["red", "green", "blue", "yellow"], "sizes": [["small", 7], ["large", 11]],
                              "min_objects": 4, "max_objects": 7}},
}
DEFAULT = ("pilot_qpi4", "lr1e-3_b256", "deep6", "pilot_compiled", "easy_scenes")  # wide384: --configs
SMOKE_SCENE = {"image_size": 64, "patch_size": 16, "sizes": [["small", 4], ["large", 6]], "min_objects": 2,
               "max_objects": 4, "max_count": 2}
SMOKE_CONFIGS = {"smoke_a": {"lr": 2e-3}, "smoke_b": {"lr": 1e-3, "questions_per_image": 2},
                 "smoke_dense": {"lr": 2e-3, "dense_pretrain_s": 5},
                 "smoke_ev": {"lr": 2e-3, "dense_pretrain_s": 5, "question_first": True, "evidence_weight": 1.0},
                 "smoke_ev_pos": {"lr": 2e-3, "dense_pretrain_s": 5, "question_first": True, "evidence_weight": 1.0,
                                  "position_weight": 1.0, "contents_weight": 1.0},
                 "smoke_ev_pos_where": {"lr": 2e-3, "dense_pretrain_s": 5, "question_first": True,
                                        "evidence_weight": 1.0, "position_weight": 1.0, "contents_weight": 1.0,
                                        "where_weight": 1.0}}


def _recipe(name: str, smoke: bool) -> dict:
    spec = {**_BASE, **(SMOKE_CONFIGS if smoke else CONFIGS)[name]}
    if smoke:
        spec.update(scene={**SMOKE_SCENE, **spec["scene"]}, batch_size=16, warmup_steps=5, pool_images=80)
    return spec


def _evaluate(model, processor, test, device, result: dict, save) -> None:
    """Into ``result`` (saved after each entry, so that a worker stopped at the hard limit keeps what it has):
    test accuracy unpruned, blind, and at 64/576 kept tokens (random x3, VisionZip-style, evidence oracle),
    with each method's evidence recall per family."""
    import torch

    from vtp.baselines import VisionZip, evidence_oracle, evidence_recall, keep_by_scores, keep_masks, random_scores
    from vtp.scene_eval import relation_axis_accuracy
    from vtp.scenes import FAMILIES, encode_scenes, scene_accuracy

    enc = encode_scenes(test, processor, device)
    run = lambda **kw: scene_accuracy(model, test, processor, encoded=enc, batch_size=256, **kw)  # noqa: E731
    full = run()
    correct = full.predictions == enc.answer_ids.cpu()
    result["test"] = {"accuracy": full.accuracy, "per_family": full.per_type, "n": full.n,
                      "relation_axes": relation_axis_accuracy(test, correct)}
    save()
    blank = scene_accuracy(model, test.blank(), processor, batch_size=256)
    result["blank"] = {"accuracy": blank.accuracy, "per_family": blank.per_type}
    save()
    rnd = lambda seed: keep_by_scores(random_scores, KEEP, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    accs = [run(keep_fn=rnd(seed)).accuracy for seed in range(3)]
    result["random_64"] = {"seeds": accs, "mean": sum(accs) / 3}
    save()
    fam = torch.tensor([FAMILIES.index(f) for f in test.families])
    peers = {"random_64": rnd(0), "visionzip_64": VisionZip(KEEP),
             "evidence_oracle_64": evidence_oracle(test.evidence, KEEP)}
    for key, fn in peers.items():
        if key != "random_64":
            r = run(keep_fn=fn)
            result[key] = {"accuracy": r.accuracy, "per_family": r.per_type, "visual_tokens": r.visual_tokens}
        recall = evidence_recall(keep_masks(fn, model, enc, processor), test.evidence)
        result[key]["evidence_recall"] = {f: recall[fam == i].mean().item() for i, f in enumerate(FAMILIES)
                                          if (fam == i).any()}
        save()


def worker(name: str, out_dir: Path, deadline: float, smoke: bool) -> None:
    """Train one configuration (:func:`vtp.scene_teacher.train_scene_teacher`) until ``deadline -
    EVAL_RESERVE_S``, save it, evaluate it, write JSON."""
    t0 = time.time()
    import torch

    from vtp.scene_teacher import scene_config, train_scene_teacher
    from vtp.scenes import scene_split

    spec = _recipe(name, smoke)
    budget = deadline - EVAL_RESERVE_S["smoke" if smoke else "full"] - time.time()
    model, processor, info = train_scene_teacher(
        spec, budget, "cpu" if smoke else None, preset="smoke" if smoke else "scenes",
        processes=int(os.environ.get("OMP_NUM_THREADS", "1")), val_questions=60 if smoke else None,
        eval_every=50 if smoke else 500, log=lambda m: print(f"{name}: {m}", flush=True))
    _save_teacher(model, processor, out_dir / f"{name}_teacher.tar", {"recipe": info["recipe"], "steps": info["steps"]})
    result = {"name": name, **info, "data_gen_s": info["data_s"]}
    path = out_dir / f"{name}.json"
    save = lambda: path.write_text(json.dumps({**result, "wall_s": time.time() - t0}, indent=2))  # noqa: E731
    save()
    device = next(model.parameters()).device
    _evaluate(model, processor, scene_split("test", scene_config(spec), 120 if smoke else None), device, result, save)


def _save_teacher(model, processor, tar_path: Path, info: dict) -> None:
    """The trained teacher (:func:`vtp.train.save_teacher`, bf16) as one tar file, to ship if it is the best."""
    import tarfile

    from vtp.train import save_teacher

    with tempfile.TemporaryDirectory() as tmp:
        save_teacher(model, processor, Path(tmp) / "teacher", info)
        with tarfile.open(tar_path, "w") as tar:
            tar.add(Path(tmp) / "teacher", arcname="teacher")


def _summary(names, out_dir: Path, logs: dict, wall: float) -> dict:
    runs = {}
    for n in names:
        f = out_dir / f"{n}.json"
        if f.exists():
            runs[n] = json.loads(f.read_text())
        else:  # the worker failed: keep the end of its log as the record
            tail = logs[n].read_text()[-3000:] if logs[n].exists() else ""
            runs[n] = {"name": n, "error": tail}
            f.write_text(json.dumps(runs[n], indent=2))
    ok = {n: r for n, r in runs.items() if "random_64" in r}  # trained and evaluated at least that far
    ranking = sorted(ok, key=lambda n: -ok[n]["test"]["accuracy"])
    summary = {"wall_s": wall, "ranking": [{"name": n, "accuracy": ok[n]["test"]["accuracy"], "steps": ok[n]["steps"],
                                            "worst_family": min(ok[n]["test"]["per_family"].values()),
                                            "random_64": ok[n]["random_64"]["mean"]} for n in ranking],
               "failed": sorted(set(runs) - set(ok))}
    if ranking:
        best = ok[ranking[0]]
        acc, per = best["test"]["accuracy"], best["test"]["per_family"]
        summary["best"] = {k: best.get(k) for k in ("name", "recipe", "device", "steps", "train_time_s", "test",
                                                    "blank", "random_64", "visionzip_64", "evidence_oracle_64")}
        summary["goals"] = {"teacher >= 0.97 overall": acc >= 0.97,
                            "teacher >= 0.93 on every family": min(per.values()) >= 0.93,
                            "random at 64/576 >= 10 points below the teacher": acc - best["random_64"]["mean"] >= 0.10}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for <config>.json and summary.json")
    p.add_argument("--budget-s", type=float, default=None, help="total wall-clock seconds (default 480, smoke 45)")
    p.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        return worker(a.worker, out, a.deadline, a.smoke)
    table = SMOKE_CONFIGS if a.smoke else CONFIGS
    names = a.configs.split(",") if a.configs else list(table if a.smoke else DEFAULT)
    if not names or len(names) > 6 or any(n not in table for n in names):
        p.error(f"--configs must name 1 to 6 of {list(table)}, got {a.configs!r}")
    budget = a.budget_s or (45.0 if a.smoke else 480.0)
    if budget < (20 if a.smoke else 200):
        p.error(f"--budget-s too small: {budget}")
    t0 = time.time()
    deadline = t0 + budget - 10  # workers finish by here; the driver then writes the summary
    logs = {n: out / f"{n}.log" for n in names}
    threads = max(1, (os.cpu_count() or 2) // len(names))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VTP_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    procs = {}
    for n in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", n, "--out", str(out),
               "--deadline", str(deadline)] + (["--smoke"] if a.smoke else [])
        procs[n] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[n].open("w"), stderr=subprocess.STDOUT,
                                    start_new_session=True)
    for n, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline + 5 - time.time()))
        except subprocess.TimeoutExpired:  # past the hard limit: stop this worker (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"{n}: exit {proc.returncode}", flush=True)
    summary = _summary(names, out, logs, time.time() - t0)
    print(json.dumps({k: summary[k] for k in summary if k != "best"}, indent=2))


if __name__ == "__main__":
    main()
