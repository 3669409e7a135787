r"""The prefill benchmark's results (:func:`vtp.benchmark.run_benchmark`): one row per measurement with the
numbers derived from it, the lesson's speed goals, and the table the command line prints.

A row (:func:`prefill_row`) holds the medians and interquartile ranges of the full and pruned prefill, the speedup
:math:`t_\text{full} / t_\text{pruned}`, the FLOPs bound (:func:`vtp.flops.speedup_bound`) and the fraction of it
reached, the pruner's share of the pruned prefill, the achieved TFLOP/s, the KV cache of both, and, on a GPU, the
roofline floor :math:`\max(F / \text{peak rate},\ W / \text{bandwidth})` of each (weights :math:`W` read once).
"""
from __future__ import annotations

from statistics import median

import torch

from .flops import kv_cache_bytes, prefill_flops, pruner_flops, speedup_bound
from .prefill_paths import REMOVALS, kept_tokens
from .timing import CPU_CAVEAT, iqr

__all__ = ["prefill_row", "format_row", "check_goals", "format_table"]


def prefill_row(config, cfg, res, method, removal, B, r, full_t, t, over) -> dict:
    """One measurement of :func:`vtp.benchmark.run_benchmark` (``method``, ``removal``, batch ``B``, keep ratio ``r``;
    times ``full_t``, ``t`` and the pruner's ``over`` in ms) with the numbers derived from it (module docstring)."""
    L, k, dtype = cfg.n_visual + cfg.n_text, kept_tokens(r, cfg.n_visual), getattr(torch, cfg.dtype)
    f_full = prefill_flops(config, L, B)["total"]
    f_pruned = prefill_flops(config, k + cfg.n_text, B)["total"] + pruner_flops(config.hidden_size, cfg.n_visual, B)
    full_ms, pruned_ms, over_ms = median(full_t), median(t), median(over)
    bound = speedup_bound(config, r, cfg.n_visual, cfg.n_text, B)
    row = dict(method=method, removal=removal, batch=B, keep_ratio=r, visual_kept=k, seq_len=k + cfg.n_text, full_ms=full_ms,
               pruned_ms=pruned_ms, full_iqr_ms=iqr(full_t), pruned_iqr_ms=iqr(t), speedup=full_ms / pruned_ms,
               bound=bound, fraction_of_bound=full_ms / pruned_ms / bound, overhead_ms=over_ms,
               overhead_frac=over_ms / pruned_ms, samples_per_s=1e3 * B / pruned_ms,
               tflops_full=f_full / full_ms / 1e9, tflops_pruned=f_pruned / pruned_ms / 1e9,
               kv_cache_mb_full=kv_cache_bytes(config, L, B, dtype) / 2**20,
               kv_cache_mb_pruned=kv_cache_bytes(config, k + cfg.n_text, B, dtype) / 2**20)
    if res["roofline"]:  # roofline floor: max(FLOPs / peak rate, weight bytes / bandwidth)
        peak, bw = res["roofline"]["matmul_tflops"] * 1e9, res["roofline"]["copy_gbps"] * 1e6
        row["floor_full_ms"] = max(f_full / peak, res["weight_bytes"] / bw)
        row["floor_pruned_ms"] = max(f_pruned / peak, res["weight_bytes"] / bw)
    return row


def format_row(r) -> str:
    """One row as a line of the table."""
    return (f"{r['method']:>8} {r['removal']:>7} B={r['batch']:<3d} keep={r['keep_ratio']:<5g}({r['visual_kept']:>3d} vis) "
            f"full {r['full_ms']:8.2f} ms  pruned {r['pruned_ms']:8.2f} ms  speedup {r['speedup']:5.2f}x  "
            f"bound {r['bound']:5.2f}x ({r['fraction_of_bound']:4.0%})  pruner {r['overhead_frac']:6.2%}")


def check_goals(res: dict) -> list[dict]:
    """The lesson's speed goals: target, measured value, met or not.

    First on the main method's rows (graphs on CUDA), for each removal; the ``library`` rows are the ones
    the goals are about. Then the batch-1 and batch-8 goals once more for the fastest method and removal at
    keep 0.25 (``compiled`` where it ran), labelled ``[best: method, removal]``, with ``method`` and
    ``removal`` "best".
    """
    rows, goals = res["prefill"], []
    main = rows[0]["method"] if rows else None

    def add(name, label, target, value, met, method, removal):
        goals.append(dict(goal=f"{name} [{label}]", method=method, removal=removal, target=target,
                          measured=value, met=bool(met)))

    def worst_overhead(B, method, removal):
        return max(r["overhead_frac"] for r in rows
                   if r["batch"] == B and r["method"] == method and r["removal"] == removal)

    for removal in REMOVALS:
        at = {(r["batch"], r["keep_ratio"]): r for r in rows if r["method"] == main and r["removal"] == removal}
        label = f"{removal} removal"
        for B in (8, 32):
            if (B, 0.25) in at:
                frac = at[B, 0.25]["fraction_of_bound"]
                add(f"speedup / FLOPs bound, keep 0.25, batch {B}", label, ">= 0.90", frac, frac >= 0.90, main, removal)
        if (1, 0.25) in at:
            s = at[1, 0.25]["speedup"]
            add("speedup, keep 0.25, batch 1", label, ">= 2.0", s, s >= 2.0, main, removal)
        for B in sorted({b for b, _ in at}):
            worst = worst_overhead(B, main, removal)
            add(f"pruner overhead / pruned prefill, batch {B} (worst ratio)", label, "<= 0.01", worst, worst <= 0.01,
                main, removal)
    for B in (1, 8):  # the fastest method and removal at keep 0.25 (compiled, where it ran)
        at_025 = [r for r in rows if r["batch"] == B and r["keep_ratio"] == 0.25]
        if not at_025:
            continue
        best = max(at_025, key=lambda r: r["speedup"])
        label = f"best: {best['method']}, {best['removal']} removal"
        if B == 1:
            add("speedup, keep 0.25, batch 1", label, ">= 2.0", best["speedup"], best["speedup"] >= 2.0, "best", "best")
        else:
            frac = best["fraction_of_bound"]
            add(f"speedup / FLOPs bound, keep 0.25, batch {B}", label, ">= 0.90", frac, frac >= 0.90, "best", "best")
        worst = worst_overhead(B, best["method"], best["removal"])
        add(f"pruner overhead / pruned prefill, batch {B} (worst ratio)", label, "<= 0.01", worst, worst <= 0.01,
            "best", "best")
    return goals


def format_table(res: dict, prefill: bool = True) -> str:
    """Plain-text tables of the prefill rows (unless ``prefill=False``: the command line has printed them as
    they were measured), the decode rows, what was skipped and the goals; on a CPU, :data:`CPU_CAVEAT` first."""
    lines = [f"device: {res['device']}"] + ([CPU_CAVEAT] if str(res["device"]).startswith("CPU") else [])
    lines += [format_row(r) for r in res["prefill"]] if prefill else []
    lines += [f"decode B={d['batch']:<3d} cache {d['cache_len']:>4d} tokens ({d['kv_cache_mb']:8.1f} MiB): "
              f"{d['step_ms']:7.2f} ms/step, {d['tokens_per_s']:9.1f} tokens/s" for d in res["decode"]]
    lines += [f"skipped B={s['batch']} {s['method']}: {s['reason']}" for s in res.get("skipped", [])] if prefill else []
    lines += [f"goal {g['goal']}: {g['target']}, measured {g['measured']:.3f} -> {'met' if g['met'] else 'MISSED'}"
              for g in res.get("goals", [])]
    return "\n".join(lines)
