r"""How lesson 09's benchmarks read the clock (:mod:`vtp.benchmark`, :mod:`vtp.generate_bench`).

:func:`time_ms` times calls with CUDA events on a GPU (the device synchronised before each call, so every call
starts on an idle GPU) and with the host clock elsewhere; the benchmarks report the median and the interquartile
range (:func:`iqr`). :func:`time_interleaved` compares several configurations fairly: every configuration is
warmed up before any is timed (the first one timed would otherwise pay for the clock ramp, the allocator's growth
and the libraries' kernel choices), then the timed calls are interleaved, round after round in a seeded random
order, so that a drift of the clock or the temperature hits every configuration alike. :func:`measure_roofline`
measures this GPU's two ceilings, the bf16 matrix-product rate and the copy bandwidth. On a CPU the timings mean nothing for GPU inference; :data:`CPU_CAVEAT` says so in every report.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from statistics import median, quantiles

import torch

from .prefill_paths import _pos_int
from .runtime import default_device

__all__ = ["time_ms", "time_interleaved", "iqr", "rel_err", "measure_roofline", "CPU_CAVEAT", "write_results"]

CPU_CAVEAT = ("NOTE: timed on a CPU. These timings are not meaningful for GPU inference (no CUDA graphs, other "
              "kernels, other bottlenecks): the speedups, bounds and goals describe this CPU run only. Lesson 09's "
              "numbers come from a CUDA GPU.")


def time_ms(fn, warmup: int = 3, repeats: int = 20, device=None) -> list[float]:
    """Times of ``repeats`` calls in ms (CUDA events on CUDA, else the host clock), after ``warmup`` calls.
    The device is synchronized before each call, so every call starts on an idle GPU."""
    cuda = torch.device(device or default_device()).type == "cuda"
    for _ in range(_pos_int(warmup, "warmup", 0)):
        fn()
    times = []
    for _ in range(_pos_int(repeats, "repeats")):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_interleaved(calls: dict, repeats, warmup=1, device=None, seed: int = 0, log=None) -> dict:
    """Times in ms of the configurations ``calls`` = ``{key: fn}`` or ``{key: (setup, fn)}`` (``setup()``, not
    timed, puts the model in the configuration before each call), measured against each other: first ``warmup``
    untimed calls of every configuration, then ``max(repeats)`` rounds, each timing every configuration once
    (:func:`time_ms`, one call) in an order shuffled with ``seed``. ``repeats`` and ``warmup`` are ints or
    ``{key: int}``; a configuration timed fewer times than there are rounds is timed in rounds spread evenly
    over them. Returns ``{key: [ms, ...]}`` (in the order of the rounds)."""
    if not calls:
        raise ValueError("calls must not be empty")
    pairs = {k: v if isinstance(v, tuple) else (None, v) for k, v in calls.items()}
    per = lambda x, name, low: {k: _pos_int(x[k] if isinstance(x, dict) else x, name, low) for k in pairs}
    repeats, warmup = per(repeats, "repeats", 1), per(warmup, "warmup", 0)
    rounds = max(repeats.values())
    timed_in = {k: {j * rounds // n for j in range(n)} for k, n in repeats.items()}  # n distinct rounds of `rounds`

    def call(key):
        setup, fn = pairs[key]
        if setup is not None:
            setup()
        return fn

    for k in pairs:
        for _ in range(warmup[k]):
            call(k)()
    if log:
        log(f"warm-up done: {sum(warmup.values())} untimed calls; timing {rounds} interleaved rounds")
    rng, times = random.Random(seed), {k: [] for k in pairs}
    for r in range(rounds):
        keys = [k for k in pairs if r in timed_in[k]]
        rng.shuffle(keys)
        for k in keys:
            times[k].append(time_ms(call(k), 0, 1, device)[0])
    return times


def iqr(times) -> float:
    """Interquartile range of ``times`` (0 for a single time)."""
    q = quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return q[2] - q[0]


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def measure_roofline(device, size: int = 8192) -> dict:
    """This GPU's two ceilings, measured: bf16 matrix product TFLOP/s and device copy GB/s (read + write)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    t = median(time_ms(lambda: a @ b, 3, 10, device))
    x = torch.randn(2**28, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    tc = median(time_ms(lambda: y.copy_(x), 3, 10, device))
    return dict(matmul_tflops=2 * size**3 / t / 1e9, copy_gbps=2 * x.nbytes / tc / 1e6)


def write_results(res: dict, out: str | None):
    """Write ``res`` as indented JSON to ``out`` (its folder created) and say so; nothing when ``out`` is None."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
