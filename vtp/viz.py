"""Small plotting and display helpers shared by the notebooks (matplotlib only)."""
from __future__ import annotations

import math

import torch

__all__ = ["hist_vs_density", "bars", "traces", "format_table"]


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def hist_vs_density(ax, samples, x, density, bins: int = 60, label: str = "samples", curve_label: str = "density"):
    """Normalised histogram of ``samples`` with the curve ``density`` evaluated on the grid ``x``."""
    ax.hist(_np(samples).ravel(), bins=bins, density=True, alpha=0.5, label=label)
    ax.plot(_np(x), _np(density), "k-", lw=1.5, label=curve_label)
    ax.legend(fontsize=8)
    return ax


def bars(ax, labels, values, errors=None, target=None, ylabel: str | None = None, fmt: str = "{:.2f}"):
    """Bar chart with optional error bars, a dashed ``target`` line and the values written on the bars."""
    values = [float(v) for v in values]
    if len(labels) != len(values):
        raise ValueError(f"labels and values must have the same length, got {len(labels)} and {len(values)}")
    pos = range(len(values))
    ax.bar(pos, values, yerr=errors, capsize=3, color=[f"C{i}" for i in pos], alpha=0.8)
    for i, v in zip(pos, values):
        ax.text(i, v, fmt.format(v), ha="center", va="bottom", fontsize=8)
    if target is not None:
        ax.axhline(target, ls="--", c="k", lw=1, label=f"target {target:g}")
        ax.legend(fontsize=8)
    ax.set_xticks(list(pos))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel)
    return ax


def traces(ax, values, highlight=(), label: str = "token", alpha: float = 0.25):
    """Plot every column of ``values [T, N]`` against its row index; columns in ``highlight`` in colour."""
    values = _np(values)
    if values.ndim != 2:
        raise ValueError(f"values must have shape (steps, series), got {values.shape}")
    highlight = list(highlight)
    for j in range(values.shape[1]):
        if j not in highlight:
            ax.plot(values[:, j], c="0.6", lw=0.7, alpha=alpha)
    for n, j in enumerate(highlight):
        ax.plot(values[:, j], c=f"C{n}", lw=1.8, label=f"{label} {j}")
    if highlight:
        ax.legend(fontsize=8)
    return ax


def format_table(rows, columns=None, floatfmt: str = "{:.3f}") -> str:
    """Plain-text table of ``rows`` (a list of dicts); ``columns`` picks and orders the keys."""
    if not rows:
        raise ValueError("rows must be a non-empty list of dicts")
    columns = list(columns or rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    table = [[str(c) for c in columns]] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ttft_vs_bound(ax, res: dict, batch: int):
    """Time-to-first-token speedup of :func:`vtp.generate_bench.run_generate_bench`'s pruned rows at ``batch``
    against the pipeline's FLOPs bound, by visual tokens kept (the unpatched model at 1x)."""
    rows = sorted((r for r in res["rows"] if r["pruned"] and r["batch"] == batch), key=lambda r: r["visual_kept"])
    if not rows:
        raise ValueError(f"res has no pruned rows at batch {batch}")
    kept = [r["visual_kept"] for r in rows]
    ax.plot(kept, [r["pipeline_bound"] for r in rows], "k--", label="FLOPs bound (vision tower + pruner + prefill)")
    ax.plot(kept, [r["ttft_speedup"] for r in rows], "o-", label="measured TTFT speedup")
    for r in rows:
        ax.annotate(f"{r['fraction_of_bound']:.2f}", (r["visual_kept"], r["ttft_speedup"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_xlabel(f"visual tokens kept of {res['n_visual']}")
    ax.set_ylabel("speedup over the unpatched model")
    ax.set_title(f"time to first token, batch {batch} ({res['device']})")
    ax.legend(fontsize=8)
    return ax

