"""Small plotting and display helpers shared by the notebooks (matplotlib only)."""
from __future__ import annotations

import math
import textwrap

import torch

__all__ = ["hist_vs_density", "bars", "traces", "format_table", "ttft_vs_bound", "examples_per_type",
           "kept_tokens_grid"]


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



def examples_per_type(qtypes, image_ids, per_type: int = 3, types=None, seed: int = 0) -> dict:
    """Indices of ``per_type`` questions of each question type, every one on a different image.

    ``qtypes`` [Q] question types and ``image_ids`` [Q] image ids (e.g. a :class:`vtp.data.VQASplit`'s
    ``qtypes`` and ``image_ids``); ``types`` the types wanted, in order (default: those of ``qtypes``, in order
    of first appearance). Questions are visited in a permutation drawn with ``seed``, so the choice is
    deterministic and spread over the split; no image is used twice, across all types. Returns
    ``{type: [index, ...]}``; raises ``ValueError`` if some type has fewer than ``per_type`` such questions.
    """
    if not isinstance(per_type, int) or per_type < 1:
        raise ValueError(f"per_type must be a positive int, got {per_type!r}")
    qtypes, image_ids = list(qtypes), [int(i) for i in _np(image_ids)]
    if len(qtypes) != len(image_ids):
        raise ValueError(f"qtypes and image_ids must have the same length, got {len(qtypes)} and {len(image_ids)}")
    types = list(dict.fromkeys(qtypes) if types is None else types)
    picks, used = {t: [] for t in types}, set()
    for i in torch.randperm(len(qtypes), generator=torch.Generator().manual_seed(seed)).tolist():
        t = qtypes[i]
        if t in picks and len(picks[t]) < per_type and image_ids[i] not in used:
            picks[t].append(i)
            used.add(image_ids[i])
    short = {t: len(v) for t, v in picks.items() if len(v) < per_type}
    if short:
        raise ValueError(f"fewer than {per_type} questions on distinct images for types {short}")
    return picks


def kept_tokens_grid(images, keep_masks, titles, xlabels=None, row_labels=None, ncols: int | None = None,
                     width: int = 28, size: float = 2.3):
    """Images with their kept visual-token patches outlined (white under black), in a grid; returns the figure.

    ``images`` [n, 3, H, W] (uint8 or floats in [0, 1]) or [n, H, W, 3]; ``keep_masks`` [n, N] with ``N`` a
    square number of patches in row-major order over the image; ``titles`` [n] (e.g. the questions), wrapped at
    ``width`` characters; each image's x-label reads ``"{xlabels[i]} | {k}/{N} kept"`` (``k`` its kept patches).
    ``ncols`` images per row (default: all in one row); ``row_labels`` one label per row, written on the left.
    """
    import matplotlib.pyplot as plt

    images, keep_masks = _np(images), _np(keep_masks).astype(bool)
    n = len(images)
    if images.ndim != 4 or keep_masks.ndim != 2 or len(keep_masks) != n or len(titles) != n:
        raise ValueError(f"need images [n, 3, H, W], keep_masks [n, N] and n titles, got {images.shape}, "
                         f"{keep_masks.shape} and {len(titles)} titles")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    N = keep_masks.shape[1]
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"keep_masks must cover a square grid of patches, got {N}")
    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"need one row label per row ({nrows}), got {len(row_labels)}")
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.6, (size + 0.9) * nrows), squeeze=False)
    ph, pw = images.shape[1] / side, images.shape[2] / side
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i])
        for j in keep_masks[i].nonzero()[0].tolist():
            r, c = divmod(j, side)
            for ec, lw in (("white", 2), ("black", 0.7)):
                ax.add_patch(plt.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec=ec, lw=lw))
        ax.set_title(textwrap.fill(str(titles[i]), width), fontsize=8)
        kept = f"{int(keep_masks[i].sum())}/{N} kept"
        ax.set_xlabel(kept if xlabels is None else f"{xlabels[i]} | {kept}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if row_labels is not None and i % ncols == 0:
            ax.set_ylabel(row_labels[i // ncols], fontsize=10, fontweight="bold")
    fig.tight_layout()
    return fig
