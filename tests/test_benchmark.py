"""Tests of vtp.benchmark: the FLOPs model, the pruned prefill path and its inputs (CPU, tiny shapes)."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from vtp import GumbelVisionPruner
from vtp.attention import remove_tokens
from vtp.benchmark import (BenchConfig, DecoderStack, KVCache, PrunedPrefill, build_lm, check_goals,
                           kept_tokens, kv_cache_bytes, lm_config, main, prefill, prefill_flops,
                           reference_removal, run_benchmark, run_layers, speedup_bound, time_ms)
from vtp.selection import _linear_as_sum
from vtp.pruner import topk_keep_mask

SHAPE = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=16, vocab_size=10)


@pytest.fixture(scope="module")
def tiny():
    config = lm_config("tiny")
    model = build_lm(config, "cpu", torch.float32, seed=0)
    torch.manual_seed(1)
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk").eval()
    return config, model, pruner


def _embeds(B, L, d, seed=2):
    return torch.randn(B, L, d, generator=torch.Generator().manual_seed(seed))


def test_flops_model_hand_checked():
    c = lm_config(SHAPE)
    # L = 4, B = 1: projections 2*4*(2*64 + 2*64) = 2048; causal attention 4*8*(4*5/2) = 320;
    # MLP 2*4*3*8*16 = 3072; logits of the last token 2*8*10 = 160.
    f = prefill_flops(c, 4)
    assert (f["proj"], f["attention"], f["mlp"], f["lm_head"], f["total"]) == (2048, 320, 3072, 160, 5600)
    assert prefill_flops(c, 4, causal=False)["attention"] == 4 * 8 * 16
    assert prefill_flops(c, 4, batch=3)["total"] == 3 * 5600
    gqa = lm_config({**SHAPE, "num_key_value_heads": 1})  # K, V projections shrink to width 4
    assert prefill_flops(gqa, 4)["proj"] == 2 * 4 * (2 * 64 + 2 * 8 * 4)


def test_flops_model_matches_flop_counter():
    """Matrix-product FLOPs counted by torch (eager attention computes the full L x L scores)."""
    config = lm_config("tiny")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    h = _embeds(2, 10, config.hidden_size)
    with torch.no_grad():
        rope = model.model.rotary_emb(h, torch.arange(10).expand(2, 10))  # outside: not part of the model
        with FlopCounterMode(display=False) as fc:
            for layer in model.model.layers:
                h = layer(h, attention_mask=None, position_embeddings=rope)
            model.lm_head(model.model.norm(h)[:, -1])
    assert fc.get_total_flops() == prefill_flops(config, 10, batch=2, causal=False)["total"]


def test_speedup_bound_reproduces_reference_and_orders():
    c = lm_config("llava-7b")
    # The reference: 640 -> 208 tokens gives a 3.13x bound with full (non-causal) attention FLOPs.
    assert speedup_bound(c, 0.25, causal=False, with_pruner=False) == pytest.approx(3.13, abs=0.005)
    bounds = [speedup_bound(c, r) for r in (1.0, 0.5, 0.25, 0.11)]
    assert bounds[0] < 1.0 < bounds[1] < bounds[2] < bounds[3]  # ratio 1 pays the pruner for nothing


def test_kept_tokens_match_the_pruner(tiny):
    config, _, pruner = tiny
    tokens = _embeds(3, 576, config.hidden_size)
    for ratio, expected in [(1.0, 576), (0.5, 288), (0.25, 144), (0.11, 63), (0.1111, 64), (0.001, 1)]:
        assert kept_tokens(ratio, 576) == expected
        counts = pruner(tokens, rule="topk", ratio=ratio).mask.sum(-1)
        assert counts.tolist() == [expected] * 3


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.11])
def test_pruned_path_keeps_exact_counts(tiny, ratio):
    config, model, pruner = tiny
    embeds = _embeds(2, 640, config.hidden_size)
    run = PrunedPrefill(model, pruner, embeds, n_visual=576, text_before=16, ratio=ratio)
    removed = run.select_and_remove()
    k = 64 + round(ratio * 576)
    assert removed.lengths.tolist() == [k, k] and run.seq_len == k
    # text tokens always survive, visual ones up to the budget
    assert bool((removed.index < 16).sum(-1).eq(16).all()) and bool((removed.index >= 592).sum(-1).eq(48).all())
    with torch.no_grad():
        hidden, logits = run()
    assert hidden.shape == (2, k, config.hidden_size) and logits.shape == (2, config.vocab_size)
    assert run.cache.nbytes() == kv_cache_bytes(config, k, 2, torch.float32)


def test_selection_is_the_pruners_and_static_removal_equals_library(tiny):
    config, model, pruner = tiny
    embeds = _embeds(3, 100, config.hidden_size, seed=4)
    lib, static = (PrunedPrefill(model, pruner, embeds, n_visual=80, text_before=5, ratio=0.3, removal=m)
                   for m in ("library", "static"))
    with torch.no_grad():
        keep = lib._keep_mask()
        mask = pruner(embeds[:, 5:85], rule="topk", ratio=0.3).mask.bool()
        a, b = lib.select_and_remove(), static.select_and_remove()
    assert torch.equal(keep[:, 5:85], mask) and bool(keep[:, :5].all()) and bool(keep[:, 85:].all())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("B, n_vis, before, n_text", [(1, 40, 0, 8), (3, 50, 4, 9), (2, 30, 7, 7)])
@pytest.mark.parametrize("ratio, min_keep", [(1.0, 1), (0.5, 1), (0.25, 1), (0.11, 1), (0.01, 1), (0.01, 5)])
def test_static_selection_equals_topk_mask_and_stable_removal(tiny, B, n_vis, before, n_text, ratio, min_keep):
    """The direct top-k index == topk_keep_mask + remove_tokens: same index, embeds and positions."""
    config, model, pruner = tiny
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk", min_keep=min_keep).eval()
    pruner.load_state_dict(tiny[2].state_dict())
    embeds = _embeds(B, n_vis + n_text, config.hidden_size, seed=B + n_vis)
    run = PrunedPrefill(model, pruner, embeds, n_visual=n_vis, text_before=before, ratio=ratio, removal="static")
    with torch.no_grad():
        got = run.select_and_remove()
        prob = pruner(embeds[:, before:before + n_vis]).keep_prob
        keep = torch.ones(B, n_vis + n_text, dtype=torch.bool)
        keep[:, before:before + n_vis] = topk_keep_mask(prob, ratio, None, min_keep).bool()
        ref = remove_tokens(embeds, keep)
    assert run.k == max(min_keep, kept_tokens(ratio, n_vis)) and got.embeds.shape[1] == n_text + run.k
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


def test_static_selection_breaks_ties_like_topk_keep_mask(tiny):
    """Tied keep probabilities (saturated scores): the earlier visual token wins, as in topk_keep_mask."""
    config, model, pruner = tiny
    embeds = _embeds(2, 30, config.hidden_size, seed=11)
    run = PrunedPrefill(model, pruner, embeds, n_visual=24, text_before=2, ratio=0.25, removal="static")
    prob = torch.tensor([[1.0, 0.5] * 12, [0.5] * 12 + [1.0] * 12])
    run._keep_prob = lambda: prob
    index = run.select_and_remove().index
    mask = topk_keep_mask(prob, 0.25).bool()
    expected = torch.stack([torch.cat([torch.arange(2), m.nonzero()[:, 0] + 2, torch.arange(26, 30)]) for m in mask])
    assert torch.equal(index, expected) and index[0, 2:8].tolist() == [2, 4, 6, 8, 10, 12]


def test_decoder_stack_equals_the_modules(tiny):
    """The functional layer (uncompiled) computes what LlamaDecoderLayer does, cache included."""
    config, model, _ = tiny
    embeds = _embeds(2, 12, config.hidden_size, seed=9)
    pos = torch.arange(12).expand(2, 12)
    caches = [KVCache(config, 2, 13, dtype=torch.float32) for _ in range(2)]
    with torch.no_grad():
        ref = prefill(model, embeds, pos, caches[0])
        out = prefill(model, embeds, pos, caches[1], DecoderStack(model))
        with pytest.raises(ValueError, match="empty cache"):
            run_layers(model, embeds, pos, caches[1], DecoderStack(model))
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("removal", ["library", "static"])
def test_pruned_prefill_equals_reference_removal(tiny, removal, stack):
    config, model, pruner = tiny
    B, n_vis, before, n_text = 2, 40, 3, 8
    embeds = _embeds(B, n_vis + n_text, config.hidden_size, seed=5)
    run = PrunedPrefill(model, pruner, embeds, n_visual=n_vis, text_before=before, ratio=0.25, removal=removal,
                        layers=DecoderStack(model) if stack else None)
    with torch.no_grad():
        hidden, logits = run()
        # independent selection: torch.topk of the keep probabilities, in original order
        prob = pruner(embeds[:, before:before + n_vis]).keep_prob
        vis = prob.topk(10, dim=-1).indices.sort(-1).values + before
        text = torch.tensor(list(range(before)) + list(range(before + n_vis, n_vis + n_text))).expand(B, -1)
        index = torch.cat([text[:, :before], vis, text[:, before:]], dim=1)
        ref = reference_removal(model, embeds, index)
        # and masking = removal: the full sequence with the dropped keys masked, read at the kept positions
        keep = torch.zeros(B, n_vis + n_text, dtype=torch.long).scatter_(1, index, 1)
        masked = model.model(inputs_embeds=embeds, attention_mask=keep, use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, masked.gather(1, index.unsqueeze(-1).expand_as(ref)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.lm_head(ref[:, -1]), rtol=1e-5, atol=1e-5)


def test_ulp_sensitivity_is_the_references_change_under_one_ulp_of_input_noise(tiny):
    from vtp.benchmark import _ulp_sensitivity
    config, model, _ = tiny
    embeds = _embeds(2, 48, config.hidden_size, seed=5)
    index = torch.arange(0, 48, 2).expand(2, -1)
    with torch.no_grad():
        s = _ulp_sensitivity(model, embeds, index)
        assert s == _ulp_sensitivity(model, embeds, index)  # seeded
        assert s != _ulp_sensitivity(model, embeds, index, seed=1)
        assert s == _ulp_sensitivity(model, embeds, index, reference_removal(model, embeds, index))  # ref given
    # this tiny random-weight model is dominated by its residual stream: its output moves as much as its input
    assert 0.5 * 2 ** -8 < s < 2 * 2 ** -8


def test_full_prefill_and_cached_step_equal_hf_forward(tiny):
    config, model, _ = tiny
    embeds = _embeds(2, 12, config.hidden_size, seed=7)
    pos = torch.arange(12).expand(2, 12)
    cache = KVCache(config, 2, 13, dtype=torch.float32)
    with torch.no_grad():
        hidden, _ = prefill(model, embeds, pos, cache)
        new = _embeds(2, 1, config.hidden_size, seed=8)
        step = run_layers(model, new, torch.full((2, 1), 12), cache)
        ref = model.model(inputs_embeds=torch.cat([embeds, new], 1), use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden, ref[:, :12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], ref[:, 12], rtol=1e-5, atol=1e-5)
    assert cache.length == 13 and cache.nbytes() == kv_cache_bytes(config, 13, 2, torch.float32)
    with pytest.raises(ValueError, match="capacity"):
        run_layers(model, new, torch.full((2, 1), 13), cache)


def test_bad_inputs_raise_naming_the_argument(tiny):
    config, model, pruner = tiny
    for ratio in (0, 1.5, "x"):
        with pytest.raises(ValueError, match="ratio"):
            kept_tokens(ratio)
    with pytest.raises(ValueError, match="n_visual"):
        kept_tokens(0.5, n_visual=0)
    with pytest.raises(ValueError, match="seq_len"):
        prefill_flops(config, 0)
    with pytest.raises(ValueError, match="batch"):
        prefill_flops(config, 4, batch=0)
    with pytest.raises(ValueError, match="shape"):
        lm_config("llava-70b")
    embeds = _embeds(1, 20, config.hidden_size)
    with pytest.raises(ValueError, match="ratio"):
        PrunedPrefill(model, pruner, embeds, n_visual=10, ratio=0.0)
    with pytest.raises(ValueError, match="n_visual"):
        PrunedPrefill(model, pruner, embeds, n_visual=20, ratio=0.5)
    with pytest.raises(ValueError, match="text_before"):
        PrunedPrefill(model, pruner, embeds, n_visual=10, text_before=11, ratio=0.5)
    with pytest.raises(ValueError, match="removal"):
        PrunedPrefill(model, pruner, embeds, n_visual=10, ratio=0.5, removal="zero")
    with pytest.raises(ValueError, match="eval mode"):  # a training pruner would sample, not apply top-k
        PrunedPrefill(model, GumbelVisionPruner(config.hidden_size, rule="topk"), embeds, n_visual=10, ratio=0.5)
    eager = AutoModelForCausalLM.from_config(lm_config("tiny"), attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        run_layers(eager, embeds, torch.arange(20).expand(1, 20))
    with pytest.raises(ValueError, match="repeats"):
        time_ms(lambda: None, repeats=0, device="cpu")
    bad = [dict(batches=(0,)), dict(batches=()), dict(ratios=(1.2,)), dict(text_before=64), dict(n_text=0),
           dict(warmup=-1), dict(dtype="int8"), dict(shape="huge")]
    for kw, name in zip(bad, ["batches", "batches", "ratios", "text_before", "n_text", "warmup", "dtype", "shape"]):
        with pytest.raises(ValueError, match=name):
            BenchConfig.smoke(**kw).validate()


def test_cli_smoke_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    res = main(["--smoke", "--batches", "2", "--ratios", "1", "0.25", "--repeats", "2", "--warmup", "0",
                "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == res["device"] and len(saved["prefill"]) == 4  # 2 ratios x 2 removals
    assert [(r["keep_ratio"], r["removal"]) for r in saved["prefill"]] == [
        (1.0, "library"), (1.0, "static"), (0.25, "library"), (0.25, "static")]
    row = saved["prefill"][2]
    assert row["visual_kept"] == 144 and row["seq_len"] == 208 and row["method"] == "eager"
    assert row["speedup"] == pytest.approx(row["full_ms"] / row["pruned_ms"])
    assert row["kv_cache_mb_pruned"] / row["kv_cache_mb_full"] == pytest.approx(208 / 640)
    assert [d["cache_len"] for d in saved["decode"]] == [640, 208]
    assert [g["goal"] for g in saved["goals"]] == [
        f"pruner overhead / pruned prefill, batch 2 (worst ratio) [{m} removal]" for m in ("library", "static")]


def test_compile_is_skipped_without_cuda_graphs_and_best_goal_is_labelled():
    res = run_benchmark(BenchConfig.smoke(batches=(1,), ratios=(0.25,), repeats=1, warmup=0, decode=False,
                                          device="cpu"), log=lambda s: None)
    assert [(s["batch"], s["method"]) for s in res["skipped"]] == [(1, "compiled")]
    assert "CUDA" in res["skipped"][0]["reason"] and {r["method"] for r in res["prefill"]} == {"eager"}
    best = [g for g in res["goals"] if g["method"] == "best"]
    assert [g["goal"].split(" [")[0] for g in best] == ["speedup, keep 0.25, batch 1",
                                                        "pruner overhead / pruned prefill, batch 1 (worst ratio)"]
    assert all(g["removal"] == "best" and "[best: eager, " in g["goal"] for g in best)
    # the best row is the fastest of every method and removal measured at batch 1, keep 0.25
    rows = [dict(method=m, removal=r, batch=1, keep_ratio=0.25, speedup=s, overhead_frac=o)
            for m, r, s, o in [("graph", "library", 1.8, 0.03), ("graph", "static", 1.85, 0.01),
                               ("compiled", "library", 2.0, 0.02), ("compiled", "static", 2.1, 0.008)]]
    goals = check_goals(dict(prefill=rows))
    best = [g for g in goals if g["method"] == "best"]
    assert [(g["goal"], g["met"]) for g in best] == [
        ("speedup, keep 0.25, batch 1 [best: compiled, static removal]", True),
        ("pruner overhead / pruned prefill, batch 1 (worst ratio) [best: compiled, static removal]", True)]
    assert [g["met"] for g in goals if g["method"] == "graph" and "speedup" in g["goal"]] == [False, False]


def test_best_goals_at_batch_8_use_the_fastest_method():
    rows = [dict(method=m, removal="static", batch=8, keep_ratio=k, speedup=s, fraction_of_bound=f, overhead_frac=o)
            for m, k, s, f, o in [("graph", 0.25, 2.8, 0.91, 0.006), ("graph", 0.11, 4.9, 0.9, 0.0101),
                                  ("compiled", 0.25, 2.9, 0.93, 0.004), ("compiled", 0.11, 5.0, 0.92, 0.007)]]
    best = [(g["goal"], g["met"]) for g in check_goals(dict(prefill=rows)) if g["method"] == "best"]
    assert best == [("speedup / FLOPs bound, keep 0.25, batch 8 [best: compiled, static removal]", True),
                    ("pruner overhead / pruned prefill, batch 8 (worst ratio) [best: compiled, static removal]", True)]
    graph = [g for g in check_goals(dict(prefill=rows)) if g["method"] == "graph" and "overhead" in g["goal"]]
    assert [g["met"] for g in graph] == [False]  # the worst ratio of the graph method: 1.01%


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and torch.compile need a GPU")
def test_compiled_graphs_equal_reference_on_cuda():
    config = lm_config("tiny")
    model = build_lm(config, "cuda", torch.float32, seed=0)
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk").cuda().eval()
    embeds = _embeds(2, 48, config.hidden_size, seed=5).cuda()
    stack = DecoderStack(model, compile=True)
    with torch.no_grad():
        for removal in ("library", "static"):
            run = PrunedPrefill(model, pruner, embeds, 40, 3, 0.25, graphs=True, removal=removal, layers=stack)
            hidden = run()[0].clone()
            ref = reference_removal(model, embeds, run.select_and_remove().index)
            torch.testing.assert_close(hidden, ref, rtol=1e-4, atol=1e-4)


def test_question_aware_selection_reads_the_mean_of_the_text_tokens(tiny):
    config, model, _ = tiny
    torch.manual_seed(3)
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk", text_dim=config.hidden_size).eval()
    torch.nn.init.normal_(pruner.text_proj.weight)  # starts at zero: make the question matter
    embeds = _embeds(2, 48, config.hidden_size, seed=17)
    before, n_vis = 3, 40
    run = PrunedPrefill(model, pruner, embeds, n_visual=n_vis, text_before=before, ratio=0.25, removal="static")
    text = torch.cat([embeds[:, :before], embeds[:, before + n_vis:]], 1).mean(1)
    with torch.no_grad():
        expected = pruner(embeds[:, before:before + n_vis], text=text).keep_prob
        blind = pruner(embeds[:, before:before + n_vis], text=torch.zeros_like(text)).keep_prob
        got = run._keep_prob()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, blind, atol=1e-3)


@pytest.mark.parametrize("question_aware", [True, False])
def test_compiled_keep_prob_computes_the_last_linear_as_a_product_and_sum(tiny, question_aware):
    """Under torch.compile the selection computes the pruner's last Linear(inner, 2) as a product and a sum
    (fused with the ReLU on the GPU), and adds the first Linear's bias with the question term: the Linear's
    logits up to float rounding, tight enough to see the drop and keep rows swapped; compiled (on the CPU
    here), the keep probabilities are the eager ones, with and without the question."""
    config, model, _ = tiny
    torch.manual_seed(5)
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk", keep_bias=0.5,
                                text_dim=config.hidden_size if question_aware else None).eval()
    if question_aware:
        torch.nn.init.normal_(pruner.text_proj.weight)
    run = PrunedPrefill(model, pruner, _embeds(2, 48, config.hidden_size, seed=19), n_visual=40, text_before=3,
                        ratio=0.25, removal="static")
    head = pruner.scorer[2]
    with torch.no_grad():
        h = torch.relu(torch.randn(2, 40, pruner.scorer[2].in_features))  # any post-ReLU activations
        torch.testing.assert_close(_linear_as_sum(h, head.weight, head.bias), head(h), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(_linear_as_sum(h, head.weight.flip(0), head.bias), head(h), rtol=1e-6, atol=1e-6)
        eager, compiled = run._keep_prob(), torch.compile(type(run)._keep_prob, dynamic=False)(run)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("removal, compiled", [("library", False), ("static", False), ("static", True)])
def test_pruned_prefill_is_freed_without_the_garbage_collector(tiny, removal, compiled):
    """No reference cycle: ``del`` frees a PrunedPrefill (its graphs and KV cache) at once. The benchmark builds
    dozens of them; a cycle kept each alive until a gc pass and ran batch 32 out of GPU memory. The compiled
    static selection (compiled on the CPU here) must keep the eager selection's tokens."""
    import gc
    import weakref
    config, model, _ = tiny
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk", text_dim=config.hidden_size).eval()
    embeds = _embeds(2, 48, config.hidden_size, seed=13)
    layers = DecoderStack(model, compile=True) if compiled else None
    gc.disable()
    try:
        with torch.no_grad():
            run = PrunedPrefill(model, pruner, embeds, n_visual=40, text_before=3, ratio=0.25, removal=removal,
                                layers=layers)
            assert (run._compiled is not None) == compiled, getattr(run, "select_compile_error", None)
            if removal == "static":
                assert torch.equal(run.select_and_remove().index, run._static_select().index)
            run()
        ref = weakref.ref(run)
        del run
        assert ref() is None
    finally:
        gc.enable()
