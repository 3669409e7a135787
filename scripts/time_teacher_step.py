"""Seconds per teacher training step for several batch sizes (solo, after warm-up): what a larger batch costs.

    python scripts/time_teacher_step.py [--steps 200] [--batch 256 512 1024] [--compile]
"""
import argparse
import json
import time

import torch

from vtp.train import teacher_config, train_teacher

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=200)
p.add_argument("--batch", type=int, nargs="+", default=[256, 512, 1024])
p.add_argument("--compile", action="store_true")
args = p.parse_args()
train_teacher(teacher_config("full", steps=20, warmup_steps=10, time_budget_s=None, eval_every=0))  # device and data warm-up
for batch in args.batch:
    times = {}
    for steps in (20, 20 + args.steps):  # the difference removes set-up and warm-up
        cfg = teacher_config("full", batch_size=batch, steps=steps, warmup_steps=10, time_budget_s=None,
                             eval_every=0, compile=args.compile)
        start = time.perf_counter()
        train_teacher(cfg)
        torch.cuda.synchronize()
        times[steps] = time.perf_counter() - start
    per_step = (times[20 + args.steps] - times[20]) / args.steps
    print(json.dumps({"batch": batch, "compile": args.compile, "ms_per_step": round(1e3 * per_step, 2),
                      "questions_per_s": round(batch / per_step)}), flush=True)
