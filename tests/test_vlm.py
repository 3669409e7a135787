"""Small LLaVA builder and PrunedVLM."""
import pytest
import torch

from vtp.pruner import GumbelVisionPruner
from vtp.vlm import PrunedVLM, answer_logits, build_llava, num_visual_tokens, vlm_config
from transformers import LlavaForConditionalGeneration


def _batch(llava, B=2, n_text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = num_visual_tokens(llava)
    ids = torch.cat([torch.full((B, N), 2), torch.randint(3, 24, (B, n_text), generator=g)], 1)
    return ids, torch.randn(B, 3, 64, 64, generator=g)


def test_presets_visual_tokens():
    assert num_visual_tokens(build_llava("smoke", vocab_size=24)) == 16
    assert (vlm_config("full").image_size // vlm_config("full").patch_size) ** 2 >= 64
    assert num_visual_tokens(build_llava("smoke", vocab_size=24, vision="siglip", patch_size=8)) == 64
    with pytest.raises(ValueError, match="preset"):
        vlm_config("huge")
    with pytest.raises(ValueError, match="patch_size"):
        build_llava("smoke", vocab_size=24, patch_size=7)


def test_unpruned_path_equals_llava_forward():
    llava = build_llava("smoke", vocab_size=24).eval()
    ids, px = _batch(llava)
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=px).logits
        out = PrunedVLM(llava)(ids, px, mode="none")
    assert torch.allclose(out.logits, ref, atol=1e-5)


def test_save_load_identical_logits(tmp_path):
    llava = build_llava("smoke", vocab_size=24, vision="siglip", text="qwen2").eval()
    ids, px = _batch(llava)
    llava.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(llava(input_ids=ids, pixel_values=px).logits, loaded(input_ids=ids, pixel_values=px).logits)


def test_padded_batch_equals_per_sample_runs():
    """Threshold rule: kept counts differ per sample; the right-padded batch must equal one-by-one runs."""
    llava = build_llava("smoke", vocab_size=24).eval()
    vlm = PrunedVLM(llava).eval()
    ids, px = _batch(llava, B=3)
    scores = torch.rand(3, num_visual_tokens(llava), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = vlm(ids, px, scores=scores)  # threshold 0.5
        assert len(set(out.n_visual.tolist())) > 1
        for b in range(3):
            one = vlm(ids[b: b + 1], px[b: b + 1], scores=scores[b: b + 1])
            n = one.logits.shape[1]
            assert torch.allclose(out.logits[b, :n], one.logits[0], atol=1e-5)
            assert out.attention_mask[b, :n].all() and not out.attention_mask[b, n:].any()


def test_pruner_modes_and_counts():
    llava = build_llava("smoke", vocab_size=24)
    N = num_visual_tokens(llava)
    pruner = GumbelVisionPruner(llava.config.text_config.hidden_size, rule="topk", ratio=0.25)
    vlm = PrunedVLM(llava, pruner)
    ids, px = _batch(llava)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    vlm.train()
    out = vlm(ids, px, labels=labels, tau=1.0)  # policy mode, Gumbel sample
    assert out.logits.shape[1] == ids.shape[1] and out.keep_prob.shape == (2, N)
    assert set(out.visual_keep.unique().tolist()) <= {0.0, 1.0}
    out.logits.sum().backward()
    assert pruner.scorer[0].weight.grad is not None and pruner.scorer[0].weight.grad.abs().sum() > 0
    vlm.eval()
    with torch.no_grad():
        ev = vlm(ids, px, labels=labels)
    assert ev.n_visual.tolist() == [round(0.25 * N)] * 2
    assert ev.logits.shape[1] == ids.shape[1] - N + round(0.25 * N)
    # labels follow the removal: the answer is still the last supervised token
    assert ev.labels[:, -1].tolist() == ids[:, -1].tolist()
    lg, tgt = answer_logits(ev.logits, ev.labels)
    assert lg.shape == (2, 24) and tgt.tolist() == ids[:, -1].tolist()


def test_bad_inputs_raise():
    llava = build_llava("smoke", vocab_size=24)
    vlm = PrunedVLM(llava).eval()
    ids, px = _batch(llava)
    with pytest.raises(ValueError, match="pixel_values"):
        vlm(ids, px[:, :, :32])
    with pytest.raises(ValueError, match="image tokens"):
        vlm(ids[:, 1:], px)
    with pytest.raises(ValueError, match="keep must have shape"):
        vlm(ids, px, keep=torch.ones(2, 3))
    with pytest.raises(ValueError, match="mode"):
        vlm(ids, px, mode="drop")
