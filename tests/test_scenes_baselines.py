"""Scenes peers in vtp.baselines: [CLS] attention read from the tower equals the eager attention weights,
VisionZip-style selection (budget, dominant by attention, uniform contextual targets, one-shot merging), the
evidence oracle's order, evidence recall; the "scenes" preset gives 576 tokens with a readable [CLS] row."""
import pytest
import torch

from vtp.baselines import VisionZip, cls_attention, evidence_oracle, evidence_recall, keep_masks, merge_tokens
from vtp.evaluate import accuracy
from vtp.vlm import PrunedVLM, build_llava, num_visual_tokens


@pytest.fixture(scope="module")
def vlm():
    return PrunedVLM(build_llava("smoke", vocab_size=40, image_token_id=2, pad_token_id=0).eval())


def _batch(B=2, n_img=16, n_txt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((B, n_img), 2), torch.randint(5, 40, (B, n_txt), generator=g)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(B, 3, 64, 64, generator=g), "index": torch.arange(B)}


def test_cls_attention_equals_the_eager_attention_weights(vlm):
    px = _batch()["pixel_values"]
    att, keys = cls_attention(vlm, px)
    assert att.shape == (2, 16) and keys.shape == (2, 16, 64)
    tower = vlm.llava.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        ref = tower(pixel_values=px, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    assert torch.allclose(att, ref[-1].mean(1)[:, 0, 1:], atol=1e-6)
    assert torch.allclose(cls_attention(vlm, px, layer=0)[0], ref[0].mean(1)[:, 0, 1:], atol=1e-6)
    assert torch.all(att.sum(-1) < 1)  # the rest goes to [CLS] itself
    with pytest.raises(ValueError, match="layer"):
        cls_attention(vlm, px, layer=2)


def test_cls_attention_needs_a_cls_token():
    siglip = PrunedVLM(build_llava("smoke", vocab_size=40, vision="siglip").eval())
    with pytest.raises(ValueError, match="CLS"):
        cls_attention(siglip, torch.zeros(1, 3, 64, 64))


def test_merge_tokens_averages_groups():
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    out = merge_tokens(x, torch.tensor([[0, 0, 2, 2]]))
    assert out.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]  # 1 and 3 are not targets: unchanged
    with pytest.raises(ValueError, match="assign"):
        merge_tokens(x, torch.tensor([[0, 0]]))


def test_visionzip_selection(vlm):
    batch = _batch()
    vz = VisionZip(0.5, dominant_fraction=0.75, merge=False)
    keep, assign = vz.select(batch["pixel_values"], vlm)
    att, _ = cls_attention(vlm, batch["pixel_values"])
    assert keep.sum(-1).tolist() == [8.0, 8.0]
    for b in range(2):
        dominant = set(att[b].topk(6).indices.tolist())
        kept = set(keep[b].nonzero().squeeze(1).tolist())
        assert dominant < kept
        rest = [j for j in range(16) if j not in dominant]
        assert kept - dominant == {rest[0], rest[5]}  # 2 targets spaced uniformly over the 10 others
        for j in range(16):  # kept tokens are their own group; dropped ones join a contextual target
            a = int(assign[b, j])
            assert a == j if j in kept else a in kept - dominant
    assert torch.equal(vz(batch, vlm), keep)
    with pytest.raises(ValueError, match="dominant_fraction"):
        VisionZip(0.5, dominant_fraction=0.0)
    with pytest.raises(ValueError, match="ratio"):
        VisionZip(1.5)


def test_visionzip_merges_the_next_forward_only(vlm):
    batch = _batch()
    px = batch["pixel_values"]
    plain = vlm.visual_features(px)
    vz = VisionZip(0.25)
    _, assign = vz.select(px, vlm)
    vz(batch, vlm)
    captured = {}
    proj = vlm.llava.model.multi_modal_projector
    h = proj.register_forward_pre_hook(lambda m, args: captured.setdefault("in", args[0]), prepend=False)
    merged = vlm.visual_features(px)
    h.remove()
    feats = captured["in"]
    assert torch.allclose(merged, proj(feats)) and not torch.allclose(merged, plain)
    assert torch.allclose(vlm.visual_features(px), plain)  # one-shot: the next call is unmerged
    # the merged input is the group mean of the unmerged features
    h = proj.register_forward_pre_hook(lambda m, args: captured.__setitem__("raw", args[0]))
    vlm.visual_features(px)
    h.remove()
    assert torch.allclose(feats, merge_tokens(captured["raw"], assign), atol=1e-6)


def test_evidence_oracle_order(vlm):
    batch = _batch(B=1)
    px = torch.zeros(1, 3, 64, 64)
    px[:, :, 0:16, 48:64] = 1.0  # an object in grid cell 3 (row 0, column 3)
    px[:, :, 32:40, 0:16] = 1.0  # half of cell 8 (row 2, column 0)
    batch["pixel_values"] = px
    evidence = torch.zeros(1, 16, dtype=torch.bool)
    evidence[0, [8, 12]] = True
    keep = evidence_oracle(evidence, 4 / 16)(batch, vlm)  # evidence 8 (covered), 12, then object 3, background 0
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 3, 8, 12]
    keep = evidence_oracle(evidence, 1 / 16)(batch, vlm)  # budget below the evidence: the most covered first
    assert keep[0].nonzero().squeeze(1).tolist() == [8]
    with pytest.raises(ValueError, match="ratio"):
        evidence_oracle(evidence, 0)


def test_evidence_recall():
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]])
    ev = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert evidence_recall(keep, ev).tolist() == [0.5, 0.5]
    assert evidence_recall(torch.ones(2, 4), ev).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="evidence_mask"):
        evidence_recall(keep, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep_mask"):
        evidence_recall(keep[:, :3], ev)


def test_peers_run_through_accuracy_on_scenes():
    from vtp.scenes import SceneConfig, encode_scenes, generate_split, scene_processor

    tiny = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2,
                       max_objects=4, max_count=2)
    split = generate_split("val", 12, tiny)
    proc = scene_processor(tiny)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    enc = encode_scenes(split, proc)
    for fn in (VisionZip(4 / 16), evidence_oracle(split.evidence, 4 / 16)):
        res = accuracy(model, enc, proc, keep_fn=fn, batch_size=5)
        assert res.n == 12 and res.visual_tokens == 4.0


def test_scenes_preset_has_576_tokens_and_a_cls_row():
    llava = build_llava("scenes", vocab_size=40).eval()
    assert num_visual_tokens(llava) == 576
    att, _ = cls_attention(PrunedVLM(llava), torch.zeros(1, 3, 192, 192))
    assert att.shape == (1, 576) and bool((att > 0).all())


def test_keep_masks_and_recall_over_a_split():
    from vtp.baselines import keep_by_scores, random_scores
    from vtp.scenes import SceneConfig, encode_scenes, generate_split, scene_processor

    tiny = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2,
                       max_objects=4, max_count=2)
    split = generate_split("val", 10, tiny)
    proc = scene_processor(tiny)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    enc = encode_scenes(split, proc)
    full = keep_masks(evidence_oracle(split.evidence, 1.0), model, enc, proc, batch_size=3)
    assert full.shape == (10, 16) and full.all()
    oracle = keep_masks(evidence_oracle(split.evidence, 4 / 16), model, enc, proc, batch_size=3)
    small = split.evidence.sum(-1) <= 4  # evidence within the budget is kept whole
    assert torch.all(evidence_recall(oracle, split.evidence)[small] == 1.0)
    rnd = keep_masks(keep_by_scores(random_scores, 4 / 16, generator=torch.Generator().manual_seed(0)), model, enc,
                     proc, batch_size=3)
    assert torch.all(evidence_recall(rnd, split.evidence) <= evidence_recall(oracle, split.evidence) + 1e-6)
    vz = VisionZip(4 / 16)
    assert keep_masks(vz, model, enc, proc, batch_size=3).sum(-1).eq(4).all() and vz._hook is None
