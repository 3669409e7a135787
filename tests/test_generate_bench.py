"""Tests of vtp.generate_bench on a CPU, tiny shapes: the smoke run and its JSON, the interleaved timing protocol,
the pipeline's FLOPs model against torch's FlopCounterMode, the pruned pipeline really feeds k visual tokens to the
language model, ratio 1 generates the unpatched model's tokens, the patched prefill reads back to the host only
where documented, goals and bad input."""
import json

import pytest
from conftest import HostReads
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtp
from vtp.benchmark import CPU_CAVEAT, kept_tokens
from vtp.generate_bench import (GenerateBenchConfig, build_llava_model, cache_of, check_goals, decode_bound,
                                format_table, generate, llava_config, main, make_inputs, make_pruner, pipeline_bound,
                                pipeline_flops, timing_protocol, vision_flops)
from vtp.timing import time_interleaved

N_TEXT, BEFORE = 8, 3


@pytest.fixture(scope="module")
def tiny():
    """Tiny LLaVA (16 visual tokens), a question-aware pruner, and a batch of 2 prompts (float32, CPU)."""
    config = llava_config("tiny", "tiny")
    model = build_llava_model(config, "cpu", torch.float32, seed=0)
    pruner = make_pruner(config, "cpu", torch.float32, seed=1)
    inputs = make_inputs(config, 2, N_TEXT, BEFORE, seed=3, device="cpu", dtype=torch.float32)
    return config, model, pruner, inputs


def test_smoke_cli_writes_json_with_the_schema(tmp_path, capsys):
    out = tmp_path / "gen.json"
    res = main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    assert CPU_CAVEAT in capsys.readouterr().out  # the CPU note: timings not meaningful
    for key in ("device", "torch", "transformers", "mode", "config", "timing", "pruner", "n_visual",
                "lm_weight_bytes", "flops_per_image", "rows", "goals", "seconds"):
        assert key in data, key
    assert data["timing"] == timing_protocol(GenerateBenchConfig.smoke(), "cpu")
    assert data["timing"].startswith("global warm-up of every configuration, then 2 interleaved rounds")
    assert "question-aware" in data["pruner"]
    cfg = GenerateBenchConfig.smoke()
    assert len(data["rows"]) == len(cfg.batches) * (1 + len(cfg.ratios))
    row_keys = {"pruned", "batch", "keep_ratio", "visual_kept", "seq_len", "ttft_ms", "ttft_iqr_ms", "generate_ms",
                "decode_step_ms", "decode_tokens_per_s", "end_to_end_tokens_per_s", "flops", "tflops_ttft",
                "kv_cache_mb", "pipeline_bound", "decode_bound", "vision_ms", "ttft_speedup", "fraction_of_bound",
                "decode_speedup"}
    for r in data["rows"]:
        assert row_keys <= set(r), row_keys - set(r)
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["seq_len"] == r["visual_kept"] + cfg.n_text
        assert set(r["flops"]) == {"vision", "pruner", "prefill", "total"}
        assert len(r["ttft_times_ms"]) == cfg.repeats and r["ttft_ms"] == sorted(r["ttft_times_ms"])[0] + (
            sorted(r["ttft_times_ms"])[1] - sorted(r["ttft_times_ms"])[0]) / 2  # the median of 2
    kept = [(r["batch"], r["pruned"], r["visual_kept"]) for r in data["rows"]]
    assert kept == [(B, p, k) for B in cfg.batches for p, k in [(False, 16), (True, 16), (True, 8), (True, 4)]]
    assert data["goals"] == []  # no batch-8 row with 64 visual tokens in the smoke run
    assert "not evaluated" in format_table(res)


def test_time_interleaved_warms_up_every_configuration_then_interleaves():
    """Warm-up calls of every configuration before any timed call; each round times every configuration once (a
    sparser one in rounds spread evenly), in a seeded order that differs between rounds; setup before each call."""
    log, state = [], {}

    def setup(key):
        state["configured"] = key

    def fn(key):
        assert state["configured"] == key  # the configuration was set up before the call
        log.append(key)

    keys = "abcdef"
    calls = {k: ((lambda k=k: setup(k)), (lambda k=k: fn(k))) for k in keys}
    calls["g"] = lambda: log.append("g")  # a bare function: no setup
    repeats = {**{k: 6 for k in keys}, "g": 3}
    times = time_interleaved(calls, repeats, warmup={**{k: 2 for k in keys}, "g": 1}, device="cpu", seed=5)
    assert sorted(log[:13]) == sorted(2 * keys + "g")  # the global warm-up: 2 calls of each, 1 of g
    timed = log[13:]
    assert {k: len(v) for k, v in times.items()} == repeats and len(timed) == 6 * 6 + 3
    rounds, i = [], 0
    for r in range(6):
        n = 6 + (r in (0, 2, 4))  # g in 3 of the 6 rounds, spread evenly: 0, 2, 4
        rounds.append(timed[i:i + n])
        i += n
    assert all(sorted(rd) == sorted(keys + ("g" if r in (0, 2, 4) else "")) for r, rd in enumerate(rounds))
    assert len({tuple(rd) for rd in rounds}) > 1  # shuffled: not one fixed order
    log.clear()
    time_interleaved(calls, repeats, warmup={**{k: 2 for k in keys}, "g": 1}, device="cpu", seed=5)
    assert log[13:] == timed  # the same seed, the same order
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(calls, 0, device="cpu")
    with pytest.raises(ValueError, match="calls"):
        time_interleaved({}, 1, device="cpu")


def test_patched_prefill_reads_back_to_the_host_only_where_documented(tiny):
    """vtp.patch's top-k prefill never waits for the GPU, nor do the decode steps: its one read is the layout
    (image tokens per sample, the mask's padding), which on a GPU is a non-blocking copy queued at the start of the
    prefill (``HostCopy``; on the CPU read at once). Removed: ``bool(visual.any())`` before the prefill, the visual
    positions' ``nonzero``, the reads of the images' sizes, the copy of a host ``True``, the pruner's check of its
    validity mask (images of one size: no mask), the read of "all kept" / K / the padding side, and (no padding: no
    mask passed) the model's own check that the mask is all ones."""
    config, model, pruner, inputs = tiny
    counter = HostReads()
    masks = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    vtp.patch(model, pruner, ratio=0.25)
    try:
        with torch.no_grad():
            generate(model, inputs, 1)  # warm: nothing lazily built inside the counted call
            with counter:
                out = generate(model, inputs, 3)
    finally:
        vtp.unpatch(model)
        hook.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    reads = sorted(site for site in counter.sites if site[0] in ("patch.py", "patch_layout.py", "selection.py",
                                                                  "pruner.py"))
    assert reads == [("patch_layout.py", "__init__", "tolist")], counter.sites
    assert masks[-3] is None  # the prefill of the counted call: no padding, every sample keeps k, no mask


def test_vision_flops_hand_checked(tiny):
    config = tiny[0]
    # tiny CLIP: P = (32/8)^2 = 16 patches, T = 17 tokens, d_v = 32, f_v = 64, 2 layers; language width d = 64.
    f = vision_flops(config)
    assert f["patch_embed"] == 2 * 16 * (3 * 8 * 8) * 32
    assert f["per_layer"] == 2 * 17 * 4 * 32**2 + 4 * 32 * 17**2 + 2 * 17 * 2 * 32 * 64
    assert f["projector"] == 2 * 16 * (32 * 64 + 64 * 64)
    assert f["total"] == f["patch_embed"] + 2 * f["per_layer"] + f["projector"] == 1_024_256
    assert vision_flops(config, batch=3)["total"] == 3 * f["total"]
    big = vision_flops(llava_config())["total"]  # the module docstring's 0.41 TFLOPs per image
    assert 0.40e12 < big < 0.42e12


def test_vision_flops_match_flop_counter(tiny):
    """Exact (tolerance 0): the model counts the matrix products (patch convolution, projections, attention
    scores and values, MLP, projector) that torch counts. Eager attention: FlopCounterMode does not count the CPU
    SDPA kernel; the eager path computes the same products as matmuls."""
    config = tiny[0]
    model = build_llava_model(config, "cpu", torch.float32, seed=0, attn_implementation="eager")
    pixels = make_inputs(config, 3, N_TEXT, BEFORE, device="cpu", dtype=torch.float32)["pixel_values"]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.model.get_image_features(pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy)
    assert fc.get_total_flops() == vision_flops(config, batch=3)["total"]


@pytest.mark.parametrize("ratio", [None, 0.25])
def test_pipeline_flops_match_flop_counter_through_generate(tiny, ratio):
    """The whole TTFT path, generate(max_new_tokens=1): vision tower, projector, pruner, prefill of the kept tokens
    and the last token's logits, counted by torch (eager attention: full L x L scores, so causal=False). Exact up
    to the rotary table (inv_freq x positions, B * head_dim * L FLOPs), which some transformers versions compute
    as a matrix product (5.17) and others not (5.24): about 1e-5 of a layer's FLOPs at the LLaVA-7B shape."""
    config, _, pruner, inputs = tiny
    model = build_llava_model(config, "cpu", torch.float32, seed=0, attn_implementation="eager")
    kept = None
    if ratio is not None:
        vtp.patch(model, pruner, ratio=ratio)
        kept = kept_tokens(ratio, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        generate(model, inputs, 1)
    flops = pipeline_flops(config, kept, N_TEXT, batch=2, causal=False)["total"]
    text = config.text_config
    L = (16 if kept is None else kept) + N_TEXT
    assert 0 <= fc.get_total_flops() - flops <= 2 * (text.hidden_size // text.num_attention_heads) * L


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 1 / 16])
def test_pruned_pipeline_feeds_k_visual_tokens_to_the_language_model(tiny, ratio):
    config, model, pruner, inputs = tiny
    k = kept_tokens(ratio, 16)
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[1]),
        with_kwargs=True)
    vtp.patch(model, pruner, ratio=ratio)
    try:
        with torch.no_grad():
            out = generate(model, inputs, 1, return_dict_in_generate=True)
        assert cache_of(out).get_seq_length() == k + N_TEXT  # the cache after prefill: k visual + text
        assert seen == [k + N_TEXT]  # the first decoder layer's input at prefill
        assert model.vtp_last.n_visual.tolist() == [k, k]
    finally:
        vtp.unpatch(model)
        hook.remove()


def test_ratio_one_generates_the_unpatched_tokens(tiny):
    config, model, pruner, inputs = tiny
    with torch.no_grad():
        ref = generate(model, inputs, 6)
        vtp.patch(model, pruner, ratio=1.0)
        try:
            same = generate(model, inputs, 6)
            model.vtp_ratio = 0.25
            pruned = generate(model, inputs, 6)
        finally:
            vtp.unpatch(model)
    assert ref.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(same, ref)
    assert pruned.shape == ref.shape  # pruned generation still returns the prompt and 6 new tokens


def test_bounds_on_the_llava_7b_shape():
    config = llava_config()
    assert [kept_tokens(r, 576) for r in GenerateBenchConfig().ratios] == [576, 192, 128, 64]
    b = {k: pipeline_bound(config, k, 64, batch=8) for k in (192, 128, 64)}
    assert 1 < b[192] < b[128] < b[64] < 4.5  # the vision tower is a fixed cost: below the language model's ~5x
    assert pipeline_bound(config, 576, 64, 8) < 1  # ratio 1 pays the pruner for nothing
    weights = 13 * 2**30
    assert 1 < decode_bound(config, weights, 64, 64, batch=8) < 1.25  # decode reads the weights first


def test_goal_is_met_or_not_met_at_batch_8_and_64_tokens():
    row = dict(pruned=True, batch=8, visual_kept=64, fraction_of_bound=0.9, decode_speedup=1.02, decode_bound=1.15)
    goals = check_goals({"rows": [row, dict(row, batch=1)]})
    assert [g["met"] for g in goals] == [True, None]  # the TTFT goal; decode reported without a target
    text = format_table({"device": "GPU", "rows": [], "goals": goals})
    assert "-> met" in text and "-> reported" in text
    goals = check_goals({"rows": [dict(row, fraction_of_bound=0.8)]})
    assert goals[0]["met"] is False and "-> not met" in format_table({"device": "GPU", "rows": [], "goals": goals})


@pytest.mark.parametrize("kw, name", [(dict(ratios=(0.0,)), "ratio"), (dict(ratios=(1.5,)), "ratio"),
                                      (dict(batches=(0,)), "batch"), (dict(batches=()), "batches"),
                                      (dict(vision="vit-h"), "vision"), (dict(repeats=0), "repeats"),
                                      (dict(text_before=99), "text_before"), (dict(graphs=1), "graphs")])
def test_bad_config_raises_naming_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        GenerateBenchConfig.smoke(**kw).validate()


def test_bad_inputs_raise_naming_the_argument(tiny):
    config = tiny[0]
    with pytest.raises(ValueError, match="batch"):
        make_inputs(config, 0)
    with pytest.raises(ValueError, match="batch"):
        vision_flops(config, batch=0)
    with pytest.raises(ValueError, match="kept"):
        pipeline_flops(config, 17)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_full_without_a_gpu_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--full"])
    assert e.value.code == 2 and "--full" in capsys.readouterr().err


def test_ttft_figure_plots_the_pruned_rows_against_their_bound():
    import json
    from pathlib import Path

    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from vtp.viz import ttft_vs_bound

    res = json.loads((Path(__file__).resolve().parent.parent / "results" / "09_generate_speed.json").read_text())
    fig, ax = plt.subplots()
    ttft_vs_bound(ax, res, 8)
    bound, measured = ax.lines[0].get_ydata(), ax.lines[1].get_ydata()
    rows = sorted((r for r in res["rows"] if r["pruned"] and r["batch"] == 8), key=lambda r: r["visual_kept"])
    assert list(measured) == [r["ttft_speedup"] for r in rows] and list(bound) == [r["pipeline_bound"] for r in rows]
    assert len(ax.texts) == len(rows)  # each point labelled with its fraction of the bound
    with pytest.raises(ValueError, match="no pruned rows at batch 3"):
        ttft_vs_bound(ax, res, 3)
    plt.close(fig)


def test_profile_ttft_script_smoke():
    """scripts/profile_ttft.py runs its whole code path on tiny shapes (a CPU: no CUDA graph, no kernel times), with
    ``--graphs`` (the patched model's prefill through vtp.patch_graphs' buffers)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "scripts" / "profile_ttft.py"), "--smoke", "--repeats", "1", "--graphs"],
                         capture_output=True, text=True, timeout=600, cwd=root, check=True).stdout
    for line in ("generate(max_new_tokens=1): unpatched", "language model prefill", "patched forward, use_cache=False",
                 "unpatched forward, use_cache=False", "forward speedup", "patched call: GPU kernels"):
        assert line in out, out


def test_graphs_option_keeps_its_prefill_graphs_across_unpatch(tiny, tmp_path):
    """--graphs: the smoke run records the option, and _configure hands the patched model's prefill graphs back
    after the unpatched baseline's turn, so the timed calls replay what the warm-up captured."""
    from vtp.generate_bench import _configure

    data = json.loads(json.dumps(main(["--smoke", "--graphs", "--out", str(tmp_path / "g.json")])))
    assert data["config"]["graphs"] is True and "CUDA graphs" in data["pruner"]
    config, model, pruner, inputs = tiny
    _configure(model, pruner, 0.25, True)
    generate(model, inputs, 1)
    graphs = model._vtp.graphs
    assert model.vtp_graphs and len(graphs.graphs) == 1
    _configure(model, pruner, None)
    assert getattr(model, "_vtp", None) is None
    _configure(model, pruner, 0.25, True)
    assert model._vtp.graphs is graphs
    _configure(model, pruner, None)
