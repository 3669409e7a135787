"""vtp.viz: plotting helpers draw what they claim; format_table aligns columns; examples are picked per type."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vtp.viz import (bars, examples_per_type, format_table, hist_vs_density, kept_tokens_grid,  # noqa: E402
                     traces)


def test_hist_vs_density_draws_histogram_and_curve():
    fig, ax = plt.subplots()
    x = torch.linspace(-3, 3, 50)
    hist_vs_density(ax, torch.randn(1000), x, torch.exp(-x**2 / 2) / 2.5066)
    assert len(ax.patches) == 60 and len(ax.lines) == 1
    plt.close(fig)


def test_bars_labels_and_target_line():
    fig, ax = plt.subplots()
    bars(ax, ["a", "b", "c"], [0.1, 0.5, 0.9], target=0.25)
    assert len(ax.patches) == 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert any(line.get_ydata()[0] == 0.25 for line in ax.lines)
    with pytest.raises(ValueError, match="same length"):
        bars(ax, ["a"], [1.0, 2.0])
    plt.close(fig)


def test_traces_highlights_requested_columns():
    fig, ax = plt.subplots()
    traces(ax, torch.rand(10, 5), highlight=[1, 3])
    assert len(ax.lines) == 5
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["token 1", "token 3"]
    with pytest.raises(ValueError, match="shape"):
        traces(ax, torch.rand(10))
    plt.close(fig)


def test_format_table_aligns_columns():
    text = format_table([{"name": "a", "x": 0.12345}, {"name": "long", "x": float("nan")}])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "0.123" in lines[2] and lines[3].endswith("nan")
    with pytest.raises(ValueError, match="non-empty"):
        format_table([])


def test_examples_per_type_distinct_images_right_types_deterministic():
    qtypes = ["a", "b", "c"] * 20
    image_ids = torch.arange(60) // 2  # two questions per image
    picks = examples_per_type(qtypes, image_ids, per_type=3, types=["c", "a"])
    assert list(picks) == ["c", "a"] and all(len(v) == 3 for v in picks.values())
    assert all(qtypes[i] == t for t, v in picks.items() for i in v)
    chosen = [i for v in picks.values() for i in v]
    assert len({int(image_ids[i]) for i in chosen}) == len(chosen) == 6
    assert picks == examples_per_type(qtypes, image_ids, per_type=3, types=["c", "a"])
    assert picks != examples_per_type(qtypes, image_ids, per_type=3, types=["c", "a"], seed=1)
    assert list(examples_per_type(qtypes, image_ids, per_type=1)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="fewer than"):
        examples_per_type(["a", "a", "b"], [0, 0, 1], per_type=2)


def test_kept_tokens_grid_outlines_kept_patches_with_titles_and_row_labels():
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    keep = torch.zeros(6, 64, dtype=torch.bool)
    for i in range(6):
        keep[i, torch.randperm(64, generator=torch.Generator().manual_seed(i))[: i + 1]] = True
    titles = [f"what shape is in image number {i} of this test?" for i in range(6)]
    fig = kept_tokens_grid(images, keep, titles, xlabels=[f"ans {i}" for i in range(6)], row_labels=["r0", "r1"],
                           ncols=3)
    axes = fig.axes
    assert len(axes) == 6
    for i, ax in enumerate(axes):
        rects = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
        assert len(rects) == 2 * (i + 1)  # one white and one black outline per kept token
        assert {tuple(r.get_edgecolor()[:3]) for r in rects} == {(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)}
        r, c = divmod(int(keep[i].nonzero()[0]), 8)
        assert any(rect.get_xy() == (c * 8 - 0.5, r * 8 - 0.5) for rect in rects)
        assert ax.get_title().replace("\n", " ") == titles[i] and "\n" in ax.get_title()
        assert ax.get_xlabel() == f"ans {i} | {i + 1}/64 kept"
    assert [axes[0].get_ylabel(), axes[3].get_ylabel()] == ["r0", "r1"] and axes[1].get_ylabel() == ""
    plt.close(fig)
    with pytest.raises(ValueError, match="square"):
        kept_tokens_grid(images, keep[:, :60], titles)
    with pytest.raises(ValueError, match="row label"):
        kept_tokens_grid(images, keep, titles, row_labels=["r0"], ncols=3)
