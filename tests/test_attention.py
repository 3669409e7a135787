"""Policy-weighted attention: math, transformers integration, equality with physical removal."""
import pytest
import torch

from vtp.attention import POLICY_ATTENTION, policy_attention, policy_softmax, remove_tokens
from vtp.vlm import PrunedVLM, build_llava, num_visual_tokens

# Two differently shaped LLaVAs: CLIP tower + Llama LM (multi-head) and SigLIP tower + Qwen2 LM (grouped-query
# attention, biased q/k/v projections, different patch size).
CONFIGS = {
    "clip-llama": dict(vision="clip", text="llama"),
    "siglip-qwen2": dict(vision="siglip", text="qwen2", patch_size=8, text_width=48, text_heads=4, text_kv_heads=2,
                         vision_width=48, text_layers=3),
}


def _inputs(llava, B=3, n_text=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = num_visual_tokens(llava)
    ids = torch.cat([torch.full((B, N), 2), torch.randint(3, llava.config.text_config.vocab_size, (B, n_text), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # sample 1 is right-padded
    ids[1, -2:] = 0
    pixels = torch.randn(B, 3, 64, 64, generator=g)
    keep = (torch.rand(B, N, generator=g) < 0.5).float()
    keep[:, 0] = 1.0
    keep[2, :] = 1.0  # sample 2 keeps everything: kept counts differ across the batch
    return ids, mask, pixels, keep


def _at_kept(full_logits, removed):
    idx = removed.index.unsqueeze(-1).expand(-1, -1, full_logits.shape[-1])
    return full_logits.gather(1, idx)[removed.attention_mask.bool()], removed.logits[removed.attention_mask.bool()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_policy_equals_removal(name):
    llava = build_llava("smoke", vocab_size=24, **CONFIGS[name]).eval()
    vlm = PrunedVLM(llava)
    ids, mask, pixels, keep = _inputs(llava)
    with torch.no_grad():
        pol = vlm(ids, pixels, mask, mode="policy", keep=keep)
        rem = vlm(ids, pixels, mask, mode="remove", keep=keep)
        full = vlm(ids, pixels, mask, mode="none")
    a, b = _at_kept(pol.logits, rem)
    assert (a - b).abs().max().item() <= 1e-4
    # the check has teeth: the unpruned model differs at the same positions by far more
    c, _ = _at_kept(full.logits, rem)
    assert (c - b).abs().max().item() > 1e-2
    assert rem.n_visual.tolist() == keep.sum(-1).long().tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zeroing_is_not_removal(name):
    llava = build_llava("smoke", vocab_size=24, **CONFIGS[name]).eval()
    vlm = PrunedVLM(llava)
    ids, mask, pixels, keep = _inputs(llava)
    with torch.no_grad():
        zero = vlm(ids, pixels, mask, mode="zero", keep=keep)
        rem = vlm(ids, pixels, mask, mode="remove", keep=keep)
    a, b = _at_kept(zero.logits, rem)
    assert (a - b).abs().max().item() > 1e-2
    assert zero.n_visual.tolist() == [num_visual_tokens(llava)] * 3  # zeros are still in the sequence


def test_gradient_reaches_dropped_tokens():
    llava = build_llava("smoke", vocab_size=24).eval()
    vlm = PrunedVLM(llava)
    ids, mask, pixels, keep = _inputs(llava)
    keep = keep.clone().requires_grad_(True)
    out = vlm(ids, pixels, mask, mode="policy", keep=keep)
    out.logits[:, -3].pow(2).sum().backward()
    dropped = keep.detach() == 0
    assert dropped.any()
    assert (keep.grad[dropped].abs() > 0).all()


def test_minus_inf_mask_gives_no_gradient():
    """The contrast: an additive mask (keep - 1) * 1e4 (what -inf masks amount to) passes exactly zero
    gradient to the keep values of dropped keys; the multiplicative policy passes a non-zero one."""
    torch.manual_seed(0)
    s, w = torch.randn(1, 1, 5, 5), torch.randn(1, 1, 5, 5)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], requires_grad=True)
    ((s + (keep - 1)[:, None, None, :] * 1e4).softmax(-1) * w).sum().backward()
    assert (keep.grad[0, [1, 3]] == 0).all()
    keep.grad = None
    pol = policy_softmax(s, keep)
    assert torch.allclose(pol.sum(-1), torch.ones(1, 1, 5), atol=1e-5)
    (pol * w).sum().backward()
    assert torch.isfinite(keep.grad).all() and (keep.grad[0, [1, 3]].abs() > 1e-3).all()


def test_policy_softmax_matches_softmax_when_all_kept():
    torch.manual_seed(1)
    s = torch.randn(2, 3, 4, 4) * 5
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    ref = s.masked_fill(~causal, float("-inf")).softmax(-1)
    got = policy_softmax(s, torch.ones(2, 4), causal)
    assert torch.allclose(got, ref, atol=1e-5)
    # G_ii = 1: a query whose own key is "dropped" still attends to itself
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0]] * 2)
    w = policy_softmax(s, keep, causal)
    assert (w[..., 2, 2] > 0).all() and (w[..., 3, 2] == 0).all()


def test_bf16_model_runs_and_stays_close():
    llava = build_llava("smoke", vocab_size=24).eval()
    ids, mask, pixels, keep = _inputs(llava)
    with torch.no_grad():
        rem32 = PrunedVLM(llava)(ids, pixels, mask, mode="remove", keep=keep)
        vlm = PrunedVLM(llava.to(torch.bfloat16))
        pol = vlm(ids, pixels.bfloat16(), mask, mode="policy", keep=keep)
        rem = vlm(ids, pixels.bfloat16(), mask, mode="remove", keep=keep)
    assert pol.logits.dtype == torch.bfloat16 and torch.isfinite(pol.logits.float()).all()
    a, b = _at_kept(pol.logits.float(), rem)
    scale = rem32.logits.abs().max().item()
    # bf16 has an 8-bit mantissa: agreement to a few percent of the logit scale
    assert (a - b.float()).abs().max().item() <= 0.05 * scale


def test_policy_context_restores_implementation():
    llava = build_llava("smoke", vocab_size=24)
    lm = llava.model.language_model
    before = lm.config._attn_implementation
    with policy_attention(lm):
        assert lm.config._attn_implementation == POLICY_ATTENTION
    assert lm.config._attn_implementation == before


def test_policy_length_mismatch_raises():
    llava = build_llava("smoke", vocab_size=24).eval()
    lm = llava.model.language_model
    x = torch.randn(2, 5, llava.config.text_config.hidden_size)
    with policy_attention(lm), pytest.raises(ValueError, match="keep_policy"):
        lm(inputs_embeds=x, attention_mask=torch.ones(2, 5, dtype=torch.long), keep_policy=torch.ones(2, 4),
           use_cache=False)


def test_remove_tokens_keeps_order_and_positions():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    keep = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 1, 1]])
    r = remove_tokens(x, keep)
    assert r.lengths.tolist() == [3, 4]
    assert r.position_ids.tolist() == [[0, 2, 4, 0], [1, 2, 3, 4]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert r.embeds[0, :3, 0].tolist() == [0.0, 2.0, 4.0] and r.embeds[0, 3, 0] == 0
    with pytest.raises(ValueError, match="keep must have shape"):
        remove_tokens(x, keep[:, :4])


def test_attention_implementation_switches_and_restores_after_an_error():
    from vtp.attention import attention_implementation

    lm = build_llava("smoke").model.language_model
    before = lm.config._attn_implementation
    with attention_implementation(lm, "eager") as m:
        assert m is lm and lm.config._attn_implementation == "eager"
    assert lm.config._attn_implementation == before
    with pytest.raises(RuntimeError), attention_implementation(lm, POLICY_ATTENTION):
        raise RuntimeError("inside")
    assert lm.config._attn_implementation == before
