r"""How lesson 09's benchmarks read the clock (:mod:`vtp.benchmark`, :mod:`vtp.generate_bench`).

:func:`time_ms` times calls with CUDA events on a GPU (the device synchronised before each call, so every call
starts on an idle GPU) and with the host clock elsewhere; the benchmarks report the median and the interquartile
range (:func:`iqr`). :func:`measure_roofline` measures this GPU's two ceilings, the bf16 matrix-product rate and the
copy bandwidth. On a CPU the timings mean nothing for GPU inference; :data:`CPU_CAVEAT` says so in every report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import median, quantiles

import torch

from .prefill_paths import _pos_int
from .runtime import default_device

__all__ = ["time_ms", "iqr", "rel_err", "measure_roofline", "CPU_CAVEAT", "write_results"]

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
