"""vtp.scene_eval: peers at a budget on scenes, accuracy and evidence recall per family in one pass, summaries."""
import dataclasses
import json

import pytest
import torch

from vtp.baselines import evidence_recall, keep_masks
from vtp.scene_eval import (PEERS, PeerResult, RecordedKeep, evaluate_peer, evaluate_peers, family_means,
                            peer_keep_fn, summarize_runs)
from vtp.scenes import SceneConfig, encode_scenes, scene_accuracy, scene_processor, scene_split
from vtp.vlm import build_llava

CFG = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2, max_objects=4,
                  max_count=2, families=("exist", "count", "query_color", "query_shape", "relation"))
N = CFG.num_tokens  # 16


@pytest.fixture(scope="module")
def setup():
    proc = scene_processor(CFG, question_first=True)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id, image_size=64, patch_size=16).eval()
    split = scene_split("test", CFG, 50)
    return model, proc, split, encode_scenes(split, proc)


def test_peer_keep_fns_and_bad_names(setup):
    model, proc, split, enc = setup
    assert set(PEERS) == {"random", "fastv", "visionzip", "object", "evidence_oracle"}
    for name in PEERS:
        assert callable(peer_keep_fn(name, 0.25, split))
    with pytest.raises(ValueError, match="split"):
        peer_keep_fn("evidence_oracle", 0.25)
    with pytest.raises(ValueError, match="name"):
        peer_keep_fn("learned", 0.25, split)


def test_recorded_keep_stores_masks_by_question_index():
    rec = RecordedKeep(lambda batch, vlm: torch.stack([torch.arange(4) == i % 4 for i in batch["index"].tolist()]), 6)
    out = rec({"index": torch.tensor([4, 1])}, None)
    assert out.shape == (2, 4)
    assert rec.seen.tolist() == [False, True, False, False, True, False]
    assert rec.masks[4].tolist() == [True, False, False, False] and rec.masks[1].tolist() == [False, True, False, False]
    assert not rec.masks[0].any()
    rec.discard()  # no discard on a plain function: nothing to forward


def test_family_means():
    got = family_means([1.0, 0.0, 0.5, 1.0], ["count", "exist", "count", "relation"])
    assert list(got) == ["exist", "count", "relation"]  # FAMILIES order
    assert got == {"exist": 0.0, "count": 0.75, "relation": 1.0}
    with pytest.raises(ValueError, match="same length"):
        family_means([1.0], ["exist", "count"])


@pytest.mark.parametrize("name", ["object", "evidence_oracle", "visionzip", "fastv"])
def test_one_pass_gives_the_accuracy_and_recall_of_separate_passes(setup, name):
    model, proc, split, enc = setup
    ratio = 4 / N
    res = evaluate_peer(model, split, proc, name, ratio, encoded=enc, batch_size=16)
    assert isinstance(res, PeerResult) and res.n == len(split) and res.keep.shape == (len(split), N)
    assert res.visual_tokens == 4 and bool((res.keep.sum(-1) == 4).all())
    fn = peer_keep_fn(name, ratio, split)
    ref = scene_accuracy(model, split, proc, encoded=enc, keep_fn=fn, batch_size=16)
    assert res.accuracy == pytest.approx(ref.accuracy) and res.per_family == pytest.approx(ref.per_type)
    masks = keep_masks(peer_keep_fn(name, ratio, split), model, enc, proc, batch_size=16)
    assert torch.equal(res.keep, masks)
    recall = evidence_recall(masks, split.evidence)
    assert res.evidence_recall_overall == pytest.approx(recall.mean().item())
    assert res.evidence_recall == pytest.approx(family_means(recall, split.families))
    assert res.seed is None


def test_the_oracle_keeps_all_the_evidence_it_can(setup):
    model, proc, split, enc = setup
    k = 3
    res = evaluate_peer(model, split, proc, "evidence_oracle", k / N, encoded=enc)
    size = split.evidence.sum(-1).float()
    best = torch.clamp(k / size, max=1.0)  # no selection of k tokens keeps more of E_q
    recall = evidence_recall(res.keep, split.evidence)
    assert torch.allclose(recall, best)
    rnd = evaluate_peer(model, split, proc, "random", k / N, encoded=enc)
    assert bool((evidence_recall(rnd.keep, split.evidence) <= best + 1e-6).all())


def test_first_questions_only(setup):
    model, proc, split, enc = setup
    res = evaluate_peer(model, split, proc, "random", 0.5, seed=3, encoded=enc, max_questions=20)
    assert res.n == 20 and res.keep.shape == (20, N) and res.seed == 3
    assert res.evidence_recall_overall == pytest.approx(evidence_recall(res.keep, split.evidence[:20]).mean().item())


def test_evaluate_peers_and_summaries(setup):
    model, proc, split, enc = setup
    out = evaluate_peers(model, split, proc, 4 / N, peers=("random", "object"), seeds=(0, 1, 2), encoded=enc)
    assert list(out) == ["random", "object"] and len(out["random"]) == 3 and len(out["object"]) == 1
    assert [r.seed for r in out["random"]] == [0, 1, 2]
    assert not torch.equal(out["random"][0].keep, out["random"][1].keep)  # seeds draw different masks
    again = evaluate_peer(model, split, proc, "random", 4 / N, seed=1, encoded=enc)
    assert torch.equal(again.keep, out["random"][1].keep)  # and the same seed the same masks
    s = summarize_runs(out["random"])
    accs = [r.accuracy for r in out["random"]]
    assert s["accuracy"] == pytest.approx(sum(accs) / 3)
    assert s["accuracy_min"] == min(accs) and s["accuracy_max"] == max(accs) and len(s["per_seed"]) == 3
    for f, v in s["evidence_recall"].items():
        assert v == pytest.approx(sum(r.evidence_recall[f] for r in out["random"]) / 3)
    one = summarize_runs(out["object"])
    assert one["accuracy"] == out["object"][0].accuracy and "per_seed" not in one
    json.dumps({"random": s, "object": one})  # JSON-ready
    with pytest.raises(ValueError, match="one peer"):
        summarize_runs(out["random"] + out["object"])
    with pytest.raises(ValueError, match="non-empty"):
        summarize_runs([])


def test_relation_axis_accuracy_splits_left_right_from_above_below():
    from vtp.scene_eval import relation_axis_accuracy
    from vtp.scenes import SceneConfig, generate_split

    split = generate_split("val", 300, SceneConfig(), seed=(9, 0))
    horizontal = torch.tensor([f == "relation" and (" left of " in q or " right of " in q)
                               for f, q in zip(split.families, split.questions)])
    vertical = torch.tensor([f == "relation" and (" above " in q or " below " in q)
                             for f, q in zip(split.families, split.questions)])
    assert horizontal.any() and vertical.any()
    got = relation_axis_accuracy(split, horizontal)  # right exactly on the left / right questions
    assert got == {"horizontal": (1.0, int(horizontal.sum())), "vertical": (0.0, int(vertical.sum()))}
    none = dataclasses.replace(split, families=["exist"] * len(split))
    assert relation_axis_accuracy(none, horizontal) == {"horizontal": (None, 0), "vertical": (None, 0)}
    with pytest.raises(ValueError, match="one value per question"):
        relation_axis_accuracy(split, horizontal[:-1])
