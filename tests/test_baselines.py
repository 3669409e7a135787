"""vtp.baselines: score shapes, exact budgets, the pixel reference finds the object, FastV's attention rows."""
import pytest
import torch

from vtp.baselines import fastv_scores, keep_by_scores, object_scores, random_scores
from vtp.vlm import PrunedVLM, build_llava


@pytest.fixture(scope="module")
def vlm():
    return PrunedVLM(build_llava("smoke", vocab_size=40, image_token_id=2, pad_token_id=0).eval())


def _batch(B=3, n_img=16, n_txt=5):
    ids = torch.cat([torch.full((B, n_img), 2), torch.randint(5, 40, (B, n_txt))], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.zeros(B, 3, 64, 64)}


def test_object_scores_find_the_shape(vlm):
    batch = _batch()
    batch["pixel_values"][:, :, 16:32, 48:64] = 1.0  # a square filling grid cell (row 1, col 3) of the 4x4 grid
    s = object_scores(batch, vlm)
    assert s.shape == (3, 16)
    assert torch.all(s[:, 1 * 4 + 3] == 1.0) and s.sum() == 3.0
    keep = keep_by_scores(object_scores, 1 / 16)(batch, vlm)
    assert torch.all(keep[:, 7] == 1) and keep.sum(-1).tolist() == [1, 1, 1]


def test_fastv_scores_are_attention_probabilities(vlm):
    torch.manual_seed(0)
    batch = _batch()
    batch["pixel_values"] = torch.randn(3, 3, 64, 64)
    s = fastv_scores(batch, vlm, layer=1)
    assert s.shape == (3, 16) and torch.all(s >= 0) and torch.all(s.sum(-1) <= 1 + 1e-5)
    with pytest.raises(ValueError, match="layer"):
        fastv_scores(batch, vlm, layer=5)


def test_fastv_scores_match_every_layers_attentions_and_leave_no_hook(vlm):
    """Stopping after the scored layer changes nothing: the rows equal those of a full forward that returns every
    layer's attention weights; the hook is gone afterwards, and the model still runs to its last layer."""
    from vtp.attention import policy_attention

    torch.manual_seed(1)
    batch = _batch()
    batch["pixel_values"] = torch.randn(3, 3, 64, 64)
    lm = vlm.language_model
    ids = batch["input_ids"]
    visual = ids == vlm.image_token_id
    embeds = vlm.llava.get_input_embeddings()(ids).masked_scatter(
        visual.unsqueeze(-1), vlm.visual_features(batch["pixel_values"]))
    with torch.no_grad(), policy_attention(lm):
        full = lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True, use_cache=False)
    query = (batch["labels"][:, 1:] != -100).int().argmax(-1)
    hooks = [len(layer.self_attn._forward_hooks) for layer in lm.layers]
    for layer in range(lm.config.num_hidden_layers):
        with torch.no_grad():
            s = fastv_scores(batch, vlm, layer=layer)
        ref = full.attentions[layer].float().mean(1)[torch.arange(3), query][visual].view(3, -1)
        assert torch.allclose(s, ref, atol=1e-6), layer
    assert [len(layer.self_attn._forward_hooks) for layer in lm.layers] == hooks
    with torch.no_grad():
        assert len(lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states) == lm.config.num_hidden_layers + 1


def test_random_scores_are_seeded_and_budgets_exact(vlm):
    batch = _batch()
    a = random_scores(batch, vlm, torch.Generator().manual_seed(1))
    b = random_scores(batch, vlm, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    keep = keep_by_scores(random_scores, 0.25, generator=torch.Generator().manual_seed(0))(batch, vlm)
    assert keep.sum(-1).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="ratio"):
        keep_by_scores(random_scores, 0.0)
