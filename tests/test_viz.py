"""vtp.viz: plotting helpers draw what they claim; format_table aligns columns."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vtp.viz import bars, format_table, hist_vs_density, traces  # noqa: E402


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
