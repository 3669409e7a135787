"""The README's measured table quotes the committed results: each number is recomputed here from its file."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_teacher_rows():
    r06 = json.loads((ROOT / "results" / "06_small_vlm.json").read_text())
    assert f"({r06['device']}, sharing the GPU" in README
    assert f"| {_pct(r06['accuracy'])} after {r06['train_time_s']:.0f} s of training |" in README
    shipped = json.loads((ROOT / "pretrained" / "MANIFEST.json").read_text())["teacher_easyvqa"]
    assert f"`{shipped['command']}`".replace(" --out pretrained/teacher_easyvqa", "") in README
    assert f"{shipped['device']}, {shipped['train_time_s']:.0f} s), the teacher of lessons 07 and 08 | " \
           f"{_pct(shipped['test_accuracy'])} |" in README


def _generate_row(r) -> str:
    row = next(x for x in r["rows"] if x["pruned"] and x["batch"] == 8 and x["visual_kept"] == 64)
    goal = r["goals"][0]
    return (f"| time to first token through `generate()`, LLaVA-1.5-7B shape with its CLIP-L/336 tower, random weights "
            f"({r['device']}, `python -m vtp.generate_bench --full`), batch 8, 64 of 576 visual tokens: speedup "
            f"(fraction of the pipeline's FLOPs bound {row['pipeline_bound']:.2f}x) | {row['ttft_speedup']:.2f}x "
            f"({goal['measured']:.2f}: {'met' if goal['met'] else 'not met'}) | {goal['target']} of the bound |")


def _graphs_row(r) -> str:
    g, e = r["graphs"], r["eager"]
    pick = lambda x, b: next(row for row in x["rows"] if row["pruned"] and row["batch"] == b and row["visual_kept"] == 64)  # noqa: E731
    cells = " / ".join(f"{pick(g, b)['ttft_speedup']:.2f}x ({pick(g, b)['fraction_of_bound']:.2f}) vs "
                       f"{pick(e, b)['ttft_speedup']:.2f}x ({pick(e, b)['fraction_of_bound']:.2f})" for b in (1, 8))
    return (f"| the same, `--graphs` (the pruned prefill replayed as CUDA graphs) vs eager, run back to back on one "
            f"{g['device']}, batch 1 / 8, 64 of 576 visual tokens: speedup (fraction of the bound), graphs vs eager | "
            f"{cells} | >= 0.85 of the bound at batch 8 ({'met' if g['goals'][0]['met'] else 'not met'}) |")


def test_generate_graphs_row():
    r = json.loads((ROOT / "results" / "09_generate_graphs_vs_eager.json").read_text())
    g, e = r["graphs"], r["eager"]
    assert g["config"]["graphs"] is True and not e["config"].get("graphs") and g["device"] == e["device"] != "cpu"
    assert {k: v for k, v in g["config"].items() if k != "graphs"} == {k: v for k, v in e["config"].items() if k != "graphs"}
    assert _graphs_row(r) in README, "README row to paste:\n" + _graphs_row(r)
    # the README's words: graphs speed up batch 1 markedly (>= 1.5x eager's speedup) and batch 8 hardly (< 5%)
    speedup = lambda x, b: next(row["ttft_speedup"] for row in x["rows"]  # noqa: E731
                                if row["pruned"] and row["batch"] == b and row["visual_kept"] == 64)
    assert speedup(g, 1) >= 1.5 * speedup(e, 1) and abs(speedup(g, 8) / speedup(e, 8) - 1) < 0.05
    assert not g["goals"][0]["met"]


def test_generate_speed_row():
    r = json.loads((ROOT / "results" / "09_generate_speed.json").read_text())
    assert r["mode"] == "full" and r["device"] != "cpu"
    assert _generate_row(r) in README, "README row to paste:\n" + _generate_row(r)
