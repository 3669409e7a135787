"""vtp.patch / vtp.unpatch on tiny random models of every supported family (LLaVA, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL): ratio 1 is the unpatched model, generate() equals a manual greedy loop over the kept tokens with their
original positions, exact kept counts per image, unpatch restores, a padded batch equals per-sample runs,
train-mode policy masking equals removal, the top-k prefill reads nothing back to the host (the threshold rule its
kept counts), and bad input raises."""
import inspect

import pytest
from conftest import HostReads, run_readme_snippet
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

import vtp
from vtp import GumbelVisionPruner, patch, unpatch
from vtp.vlm import build_llava

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
V, IMG, VS, VE, VID = 40, 3, 5, 6, 4  # vocab; image, vision-start, vision-end, video token ids
TEXT_A, TEXT_B = ((7, 8), (9, 10, 11)), ((12, 13, 14, 15), (16, 17))  # per-sample text before / after the image


def _text_config(**kw):
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False,
                max_position_embeddings=256, **kw)


def _qwen_model(family):
    text = _text_config(rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        cfg = Qwen2VLConfig(vision_config=dict(vision, embed_dim=32, hidden_size=32, mlp_ratio=2), text_config=text,
                            image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
                            tie_word_embeddings=False)
        return Qwen2VLForConditionalGeneration(cfg)
    cfg = Qwen2_5_VLConfig(vision_config=dict(vision, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                                              window_size=16, fullatt_block_indexes=[0]),
                           text_config=text, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                           vision_end_token_id=VE, tie_word_embeddings=False)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def make_model(family):
    """A tiny random model of ``family`` in eval mode (float32, SDPA)."""
    torch.manual_seed(0)
    if family == "llava":
        model = build_llava("smoke", vocab_size=V, image_token_id=IMG)
    elif family == "llava_next":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8)
        cfg = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_text_config()), image_token_id=IMG,
                              image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], tie_word_embeddings=False,
                              vision_feature_select_strategy="default", vision_feature_layer=-1)
        model = LlavaNextForConditionalGeneration(cfg)
    else:
        model = _qwen_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.float().eval()


def _images(family, b):
    """Sample ``b``'s image inputs and its number of image tokens."""
    g = torch.Generator().manual_seed(10 + b)
    if family == "llava":
        return {"pixel_values": torch.randn(1, 3, 64, 64, generator=g)}, 16
    if family == "llava_next":
        size = [[32, 64], [64, 32]][b]
        return {"pixel_values": torch.randn(1, 3, 3, 32, 32, generator=g), "image_sizes": torch.tensor([size])}, \
            [52, 56][b]
    grid = torch.tensor([[[1, 8, 8], [1, 8, 12]][b]])
    return {"pixel_values": torch.randn(int(grid.prod()), 96, generator=g), "image_grid_thw": grid}, \
        int(grid.prod()) // 4


def make_inputs(family, samples=(0, 1), side="left"):
    """Prompts ``text, <image tokens>, text`` of different lengths, padded on ``side``, with their images."""
    rows, images = [], []
    for b in samples:
        image, n = _images(family, b)
        body = [IMG] * n if family.startswith("llava") else [VS] + [IMG] * n + [VE]
        rows.append(list(TEXT_A[b]) + body + list(TEXT_B[b]))
        images.append(image)
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    inputs.update({k: torch.cat([im[k] for im in images]) for k in images[0]})
    if family.startswith("qwen"):
        inputs["mm_token_type_ids"] = (ids == IMG).int()
    return inputs


def make_pruner(model, **kw):
    torch.manual_seed(1)
    pruner = GumbelVisionPruner(model.config.text_config.hidden_size, **kw)
    with torch.no_grad():  # spread the keep probabilities so that the ranking is not a near-tie
        pruner.scorer[-1].weight.mul_(20)
    return pruner


def generate(model, inputs, n=4, scores=False):
    """Greedy tokens [B, n] (and, with ``scores``, the logits of every step [B, n, V])."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return (tokens, torch.stack(out.logits, dim=1)) if scores else tokens


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return make_model(family)


def test_ratio_one_reproduces_the_model(family, model):
    inputs = make_inputs(family)
    ref, (ref_tokens, ref_scores) = logits(model, inputs), generate(model, inputs, scores=True)
    patch(model, make_pruner(model), ratio=1.0)
    try:
        assert torch.allclose(logits(model, inputs), ref, atol=1e-5, rtol=0)
        tokens, scores = generate(model, inputs, scores=True)
        assert torch.equal(tokens, ref_tokens) and torch.allclose(scores, ref_scores, atol=1e-5, rtol=0)
        assert model.vtp_last.mask[model.vtp_last.valid].all()
    finally:
        unpatch(model)


def _merged(model, inputs):
    """Unpatched pieces: the merged input embeddings [B, L, d] and the original position ids."""
    image_keys = ("pixel_values", "image_sizes", "image_grid_thw")
    feats = model.model.get_image_features(**{k: v for k, v in inputs.items() if k in image_keys}).pooler_output
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == IMG).unsqueeze(-1), torch.cat(list(feats)).to(embeds.dtype))
    if hasattr(model.model, "get_rope_index"):
        pos, _ = model.model.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"],
                                            mm_token_type_ids=inputs["mm_token_type_ids"])
    else:
        pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return embeds, pos


def _reference_keep(model, pruner, embeds, ids, ratio):
    """The top-k decision recomputed from the pruner's scores of the one image's scorable tokens (no newlines)."""
    visual = ids[0] == IMG
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        visual &= ~(embeds[0] == newline).all(-1)
    p = vtp.keep_probability(pruner.score(embeds[:, visual]))[0]
    k = max(1, round(ratio * p.numel()))
    keep = torch.ones_like(visual)
    best = p.argsort(descending=True, stable=True)[:k]
    keep[visual.nonzero()[:, 0]] = torch.zeros_like(p, dtype=torch.bool).scatter(0, best, True)
    return keep


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_greedy_loop_over_kept_tokens(family, model, attn):
    inputs = make_inputs(family, samples=(1,))
    model.set_attn_implementation(attn)
    pruner = make_pruner(model).eval()
    patch(model, pruner, ratio=0.25)
    try:
        tokens, scores = generate(model, inputs, n=5, scores=True)
        with torch.no_grad():
            embeds, pos = _merged(model, inputs)
            keep = _reference_keep(model, pruner, embeds, inputs["input_ids"], 0.25)
            lm = model.model.language_model
            cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
            x, p, cache, mask, out, ref = embeds[:, keep], pos[..., keep], None, torch.ones(1, int(keep.sum())), [], []
            nxt = pos[..., 0, :].amax(dim=-1) if pos.dim() == 2 else pos.amax(dim=(0, 2))  # last original position
            for t in range(5):
                o = lm(inputs_embeds=x, position_ids=p, attention_mask=mask, use_cache=True, **{cache_kw: cache})
                cache = o[1]
                ref.append(model.lm_head(o[0][:, -1]))
                out.append(ref[-1].argmax(-1))
                x = model.get_input_embeddings()(out[-1])[:, None]
                p = (nxt + 1 + t).view(1, 1)
                mask = torch.cat([mask, torch.ones(1, 1)], dim=1)
        assert torch.equal(tokens[0], torch.stack(out, dim=1)[0])
        assert torch.allclose(scores[0], torch.stack(ref, dim=1)[0], atol=1e-5, rtol=0)
        assert torch.equal(model.vtp_last.index[0], keep.nonzero()[:, 0])
    finally:
        unpatch(model)
        model.set_attn_implementation("sdpa")


def test_decode_steps_without_position_ids_continue_at_the_original_positions(family, model):
    """A hand-written decode loop through the patched model (cache, growing mask, no position ids) = generate()."""
    inputs = make_inputs(family, samples=(0,))
    patch(model, make_pruner(model), ratio=0.25)
    try:
        tokens, scores = generate(model, inputs, n=4, scores=True)
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        mask, step, out = inputs["attention_mask"], inputs, []
        with torch.no_grad():
            for _ in range(4):
                o = model(**step, use_cache=True)
                out.append(o.logits[:, -1])
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
                step = {"input_ids": out[-1].argmax(-1, keepdim=True), "attention_mask": mask, cache_kw: o[1]}
        assert model.vtp_last.index.shape[1] < inputs["input_ids"].shape[1]  # the cache holds the kept tokens only
        assert torch.allclose(torch.stack(out, dim=1), scores, atol=1e-5, rtol=0)
        assert torch.equal(torch.stack(out, dim=1).argmax(-1), tokens)
    finally:
        unpatch(model)


@pytest.mark.parametrize("ratio,min_keep", [(0.25, 1), (0.5, 1), (0.01, 3)])
def test_exact_kept_count_per_image(family, model, ratio, min_keep):
    inputs = make_inputs(family)
    patch(model, make_pruner(model), ratio=ratio, min_keep=min_keep)
    try:
        out = logits(model, inputs)
        state = model.vtp_last
        n = state.valid.sum(-1)
        expected = torch.clamp(torch.round(ratio * n.float()).long(), min=min_keep)
        assert torch.equal(state.mask.sum(-1).long(), expected)
        newlines = (inputs["input_ids"] == IMG).sum(-1) - n  # one image per sample
        assert bool((newlines > 0).all()) == (family == "llava_next")
        assert torch.equal(state.n_visual, expected + newlines)  # image-newline tokens are never pruned
        n_text = (inputs["attention_mask"].sum(-1) - (inputs["input_ids"] == IMG).sum(-1))
        dropped = (inputs["input_ids"] == IMG).sum(-1) - state.n_visual  # padding stays where it was
        assert out.shape[1] == int((inputs["input_ids"].shape[1] - dropped).max())
        assert torch.equal(state.attention_mask.sum(-1), n_text + state.n_visual)
    finally:
        unpatch(model)


LAYOUT_READ = ("patch_layout.py", "__init__", "tolist")  # on a GPU: a non-blocking copy queued at the prefill's start
WAITS = {  # the reads beyond it where a size depends on the GPU's data (conftest.HostReads: file, function, op)
    "llava_next": [("patch.py", "_prefill", "tolist"),  # newline tokens found by value: sizes, then kept counts
                   ("patch_layout.py", "count_images", "nonzero"), ("patch_layout.py", "count_images", "tolist"),
                   ("patch_layout.py", "on_device", "lift_fresh")],  # pinned and non-blocking on a GPU: no wait
    "mixed sizes": [("patch_layout.py", "on_device", "lift_fresh"),  # the same copy of the images' sizes
                    ("pruner.py", "_valid", "_local_scalar_dense"),  # the pruner checks the padded images' mask,
                    ("pruner.py", "_valid", "_local_scalar_dense")],  # in forward and again in its rule
    "threshold": [("patch.py", "_prefill", "tolist")],  # the kept counts
}


def host_reads(model, inputs, new_tokens=None):
    """What vtp's code reads back to the host (:class:`conftest.HostReads`) in one patched forward, or in
    generate() of ``new_tokens`` (decode steps included)."""
    with torch.no_grad():
        logits(model, inputs)  # warm: nothing lazily built inside the counted call
        with HostReads() as counter:
            logits(model, inputs) if new_tokens is None else generate(model, inputs, new_tokens)
    return sorted(counter.sites)


@pytest.mark.parametrize("side", ["left", "right"])
def test_topk_prefill_never_waits_for_the_gpu(family, model, side):
    """Top-k: every size is a host number, so a patched forward and generate() read nothing back but the layout
    (image tokens per sample, the mask's padding) — prompts padded on either side included. Would fail on any
    ``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero`` or boolean-mask index brought back into the path."""
    samples = (0, 0) if family.startswith("qwen") else (0, 1)  # qwen's samples 0 and 1 have images of two sizes
    inputs = make_inputs(family, samples=samples, side=side)
    patch(model, make_pruner(model), ratio=0.25)
    try:
        expected = sorted([LAYOUT_READ] + WAITS.get(family, []))
        assert host_reads(model, inputs) == expected
        assert host_reads(model, inputs, new_tokens=3) == expected
        assert model.vtp_last.index.shape[1] < inputs["input_ids"].shape[1]
    finally:
        unpatch(model)


def test_prefill_waits_only_where_a_size_depends_on_the_data(family, model):
    """The reads that remain: the threshold rule's kept counts; images of several sizes (the pruner's check of their
    validity mask); LLaVA-NeXT's sizes."""
    patch(model, make_pruner(model), ratio=0.25)
    try:
        mixed = WAITS["mixed sizes"] if family.startswith("qwen") else []
        assert host_reads(model, make_inputs(family)) == sorted([LAYOUT_READ] + mixed + WAITS.get(family, []))
        model.vtp_rule = "threshold"
        reads = host_reads(model, make_inputs(family))
        assert reads == sorted([LAYOUT_READ] + mixed + WAITS.get(family, WAITS["threshold"]))
    finally:
        unpatch(model)


def test_no_cache_and_no_mask_keeps_the_gaps_in_the_positions(family, model):
    """Without a cache and a mask the model would take the gaps that pruning leaves in the position ids for the
    boundaries of packed sequences: the patched prefill passes the mask then."""
    inputs = {k: v for k, v in make_inputs(family, samples=(0,)).items() if k != "attention_mask"}
    patch(model, make_pruner(model), ratio=0.25)
    try:
        with torch.no_grad():
            cached, uncached = model(**inputs, use_cache=True).logits, model(**inputs, use_cache=False).logits
        assert torch.allclose(uncached, cached, atol=1e-5, rtol=0)
    finally:
        unpatch(model)


def test_ratio_is_a_knob_and_unpatch_restores(family, model):
    inputs = make_inputs(family)
    ref = logits(model, inputs)
    patch(model, make_pruner(model), ratio=0.5)
    short = logits(model, inputs).shape[1]
    model.vtp_ratio = 1.0
    assert torch.allclose(logits(model, inputs), ref, atol=1e-5, rtol=0)
    model.vtp_ratio = 0.25
    assert logits(model, inputs).shape[1] < short
    unpatch(model)
    assert torch.equal(logits(model, inputs), ref)
    assert "forward" not in vars(model) and "forward" not in vars(model.model.language_model)
    assert not any(n.startswith("vtp") for n in vars(model)) and not hasattr(model, "vtp_pruner")


def test_padded_batch_equals_per_sample(family, model):
    pruner = make_pruner(model)
    patch(model, pruner, ratio=0.25)
    try:
        tokens, scores = generate(model, make_inputs(family, side="left"), scores=True)
        right = make_inputs(family, side="right")
        batch = logits(model, right)
        index, mask = model.vtp_last.index, model.vtp_last.attention_mask.bool()
        for b in (0, 1):
            one = make_inputs(family, samples=(b,))
            one_tokens, one_scores = generate(model, one, scores=True)
            assert torch.equal(one_tokens[0], tokens[b])
            assert torch.allclose(one_scores[0], scores[b], atol=1e-5, rtol=0)
            single = logits(model, one)[0]
            assert torch.allclose(batch[b][mask[b]], single, atol=1e-5, rtol=0)
            assert torch.equal(index[b][mask[b]], model.vtp_last.index[0])
        model.vtp_rule = "threshold"  # kept counts differ per sample: left-padded compaction keeps the last column
        pruner.threshold = 0.3
        tokens, scores = generate(model, make_inputs(family, side="left"), scores=True)
        assert len(set(model.vtp_last.n_visual.tolist())) > 1 or family == "llava"
        for b in (0, 1):
            one_tokens, one_scores = generate(model, make_inputs(family, samples=(b,)), scores=True)
            assert torch.equal(one_tokens[0], tokens[b])
            assert torch.allclose(one_scores[0], scores[b], atol=1e-5, rtol=0)
    finally:
        unpatch(model)


def test_train_mode_masks_and_equals_removal(family, model):
    inputs = make_inputs(family, side="right")
    pruner = make_pruner(model)
    patch(model, pruner, ratio=0.25)
    try:
        removed = logits(model, inputs)
        index, mask = model.vtp_last.index, model.vtp_last.attention_mask.bool()
        model.train()
        pruner.eval()  # the deterministic top-k mask, applied as an attention policy instead of removal
        with torch.no_grad():
            masked = model(**inputs).logits
        assert masked.shape[1] == inputs["input_ids"].shape[1]
        for b in (0, 1):
            assert torch.allclose(masked[b, index[b][mask[b]]], removed[b][mask[b]], atol=1e-4, rtol=0)
        pruner.train()  # Gumbel samples; gradients reach the pruner through the policy
        out = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
        state = model.vtp_last
        assert state.keep_prob.requires_grad and set(state.mask[state.valid].unique().tolist()) <= {0.0, 1.0}
        (out.loss + state.keep_prob[state.valid].mean()).backward()
        assert pruner.scorer[0].weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        unpatch(model)


def test_eval_labels_follow_the_kept_tokens(family, model):
    inputs = make_inputs(family, side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMG, -100)
    patch(model, make_pruner(model), ratio=0.25)
    try:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        state = model.vtp_last
        kept = labels.gather(1, state.index).masked_fill(state.attention_mask == 0, -100)
        expected = model.loss_function(logits=out.logits, labels=kept, vocab_size=V)
        assert type(out).__name__.endswith("OutputWithPast") and torch.allclose(out.loss, expected)
    finally:
        unpatch(model)


def test_bad_input_raises():
    model = make_model("llava")
    pruner = make_pruner(model)
    with pytest.raises(TypeError, match="unexpected keyword"):
        patch(model, pruner, ratio=0.25, rulle="topk")
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"):
        patch(model.model.language_model, pruner)
    with pytest.raises(ValueError, match=r"hidden_dim=48.*hidden size 64"):
        patch(model, GumbelVisionPruner(48))
    with pytest.raises(ValueError, match=r"text_dim=16.*64"):
        patch(model, GumbelVisionPruner(64, text_dim=16))
    for bad in (0.0, 1.5, -1, "half"):
        with pytest.raises(ValueError, match="ratio"):
            patch(model, pruner, ratio=bad)
    with pytest.raises(ValueError, match="rule"):
        patch(model, pruner, rule="sample")
    with pytest.raises(ValueError, match="min_keep"):
        patch(model, pruner, min_keep=0)
    assert not hasattr(model, "vtp_ratio") and "forward" not in vars(model)  # nothing done before raising
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    patch(model, pruner)
    model.vtp_ratio = 2.0
    with pytest.raises(ValueError, match="ratio"):
        logits(model, make_inputs("llava"))


def test_readme_snippet_runs():
    """The README's "Prune your own model" snippet, run as written on the tiny model it builds."""
    scope = run_readme_snippet("## Prune your own model")
    model = scope["model"]
    assert model.vtp_last.n_visual.tolist() == [4] and model.vtp_ratio == 0.5  # 16 visual tokens at ratio 0.25
    assert scope["tokens"].shape == (1, 22)


@pytest.mark.parametrize("text_dim", [None, 64])
def test_prunedvlm_shares_the_selection_and_rejects_unknown_arguments(text_dim):
    """PrunedVLM and the patched model select through the same function: same kept tokens, same logits (also for
    a question-aware pruner, which reads the pooled question)."""
    model = make_model("llava")
    pruner = make_pruner(model, text_dim=text_dim).eval()  # its own rule is the threshold: a ratio alone = top-k
    if text_dim:
        torch.nn.init.normal_(pruner.text_proj.weight, std=0.5)  # each question keeps other tokens
    vlm = vtp.PrunedVLM(model, pruner).eval()
    inputs = make_inputs("llava", side="right")
    args = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with torch.no_grad():
        out = vlm(*args, ratio=0.25)
    assert out.n_visual.tolist() == [4, 4]
    with pytest.raises(TypeError):
        vlm(*args, ratio=0.25, rulle="topk")
    patch(model, pruner, ratio=0.25)
    try:
        patched = logits(model, inputs)
        state = model.vtp_last
        for b in (0, 1):
            mine, theirs = state.attention_mask[b].bool(), out.attention_mask[b].bool()
            assert torch.equal(state.index[b][mine], out.index[b][theirs])
            assert torch.allclose(patched[b][mine], out.logits[b][theirs], atol=1e-5, rtol=0)
    finally:
        unpatch(model)


def test_position_ids_broadcast_over_the_batch():
    """Position ids [1, L] for a batch of B (as transformers accepts them): every sample keeps its own."""
    model = make_model("llava")
    inputs = make_inputs("llava", samples=(0, 0))  # two equal-length prompts, no padding
    L = inputs["input_ids"].shape[1]
    patch(model, make_pruner(model), ratio=0.25)
    try:
        one = logits(model, {**inputs, "position_ids": torch.arange(L)[None]})
        assert torch.allclose(one, logits(model, {**inputs, "position_ids": torch.arange(L).expand(2, L)}), atol=1e-6)
    finally:
        unpatch(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bfloat16_model_with_a_float32_pruner(family):
    """The usual deployment: a bfloat16 model (on the GPU when there is one) and a float32 pruner."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(family).to(device, torch.bfloat16)
    inputs = {k: v.to(device) for k, v in make_inputs(family).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    reference = generate(model, inputs)
    pruner = make_pruner(model)
    patch(model, pruner.to(device), ratio=1.0)
    try:
        assert torch.equal(generate(model, inputs), reference)
        model.vtp_ratio = 0.25
        generate(model, inputs)
        state = model.vtp_last
        assert state.keep_prob.dtype == torch.float32 and pruner.scorer[0].weight.dtype == torch.float32
        assert torch.equal(state.mask.sum(-1).long(), torch.round(0.25 * state.valid.sum(-1).float()).long())
    finally:
        unpatch(model)


def _other_image(family, inputs):
    """The same prompt with other pixels (same shapes: the same prefill signature)."""
    g = torch.Generator().manual_seed(99)
    return {**inputs, "pixel_values": torch.randn(inputs["pixel_values"].shape, generator=g)}


def test_prefill_graphs_path_equals_eager_and_hands_over_its_cache(family, model):
    """graphs=True (vtp.patch_graphs): on a CPU the static buffers and the cache hand-over run without a graph;
    tokens and logits equal the eager patched model's, one graph per signature serves new inputs, a returned cache
    is not overwritten by the next call, and a padded batch does not use the path."""
    a = make_inputs(family, samples=(0,))
    b = _other_image(family, a)
    patch(model, make_pruner(model), ratio=0.25)
    ref = [generate(model, x, scores=True) for x in (a, b)]
    model.vtp_graphs = True
    with torch.no_grad():
        first = model.generate(**a, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    kept_keys = cache.layers[0].keys.clone()
    for x, (tokens, scores) in zip((a, b, a), ref + ref[:1]):
        got_tokens, got_scores = generate(model, x, scores=True)
        assert torch.equal(got_tokens, tokens)
        assert torch.allclose(got_scores, scores, atol=1e-5, rtol=0)
    graphs = model._vtp.graphs.graphs
    assert len(graphs) == 1 and not model._vtp.graphs.failed
    assert torch.equal(cache.layers[0].keys, kept_keys)  # the later calls did not write into it
    generate(model, make_inputs(family))  # left padding: an attention mask, the eager prefill
    assert len(graphs) == 1
    unpatch(model)
    assert not hasattr(model, "vtp_graphs")
    with pytest.raises(ValueError, match="graphs"):
        patch(model, make_pruner(model), graphs=1)


class _AnyHostReads(HostReads):
    """HostReads that records reads made by ANY code (transformers' included), as ``(file, function, op)``."""

    def record(self, op):
        import traceback
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename.replace("\\", "/")
                  and not f.filename.endswith("conftest.py") and f.filename != __file__]
        self.sites.append((frames[-1].filename.replace("\\", "/").rsplit("/", 1)[-1], frames[-1].name, op))


def test_what_a_prefill_graph_captures_never_waits_for_the_gpu(family, model, monkeypatch):
    """A CUDA graph cannot capture an operation that waits for the GPU. What vtp.patch_graphs captures is the
    language model's prefill as the patched model calls it (kept embeddings and positions, no attention mask, an
    empty dynamic cache whose layers were initialised before): no code in it, transformers' included, reads a
    device tensor back or copies host data to the device."""
    from vtp.patch_graphs import PrefillGraph

    seen = []
    run = PrefillGraph.__init__

    def spy(self, forward, kwargs, cache_key):
        run(self, forward, kwargs, cache_key)
        with torch.no_grad(), _AnyHostReads() as counter:
            self._run()  # exactly what capture_graph captures
        seen.append(sorted(counter.sites))

    monkeypatch.setattr(PrefillGraph, "__init__", spy)
    patch(model, make_pruner(model), ratio=0.25, graphs=True)
    try:
        generate(model, make_inputs(family, samples=(0,)), n=1)
    finally:
        unpatch(model)
    assert seen == [[]]


def test_host_read_spy_sees_transformers_reads(model):
    """The check above can fail: with an attention mask, transformers' mask code reads it back (``.all()``)."""
    lm, d = model.model.language_model, model.config.text_config.hidden_size
    from transformers import DynamicCache
    with torch.no_grad(), _AnyHostReads() as counter:
        lm(inputs_embeds=torch.randn(1, 5, d), attention_mask=torch.ones(1, 5, dtype=torch.long),
           cache=DynamicCache(config=lm.config), use_cache=True)
    assert any(op == "_local_scalar_dense" for _, _, op in counter.sites), counter.sites
