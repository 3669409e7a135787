"""The question-aware pruner: scores conditioned on the pooled question, its plumbing through PrunedVLM and the
prefill benchmark, the ``sample`` eval rule and the scheduled binarization term."""
import pytest
import torch

from vtp.benchmark import PrunedPrefill, build_lm, lm_config
from vtp.losses import PruningLoss
from vtp.pruner import GumbelVisionPruner, topk_keep_mask
from vtp.vlm import PrunedVLM, build_llava, num_visual_tokens


def test_question_changes_scores_and_starts_question_blind():
    torch.manual_seed(0)
    tokens, q1, q2 = torch.randn(3, 10, 16), torch.randn(3, 8), torch.randn(3, 8)
    aware = GumbelVisionPruner(16, text_dim=8).eval()
    blind = GumbelVisionPruner(16).eval()
    blind.load_state_dict({k: v for k, v in aware.state_dict().items() if not k.startswith("text_")})
    # U starts at zero: at step 0 the question-aware scorer is the seed's
    assert torch.equal(aware.score(tokens, q1), blind.score(tokens))
    torch.nn.init.normal_(aware.text_proj.weight)
    s1, s2 = aware.score(tokens, q1), aware.score(tokens, q2)
    assert not torch.allclose(s1, s2)
    # the question enters per sample: sample 0's scores do not depend on sample 1's question
    q3 = q1.clone()
    q3[1:] = q2[1:]
    assert torch.equal(aware.score(tokens, q3)[0], s1[0])
    assert torch.equal(aware(tokens, text=q1).logits, s1)


def test_question_aware_inputs_are_checked():
    p = GumbelVisionPruner(16, text_dim=8)
    with pytest.raises(ValueError, match="text must have shape"):
        p(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="text must have shape"):
        p(torch.randn(2, 5, 16), text=torch.randn(2, 7))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="text_dim"):
            GumbelVisionPruner(16, text_dim=bad)


def _vqa_batch(llava, B=4, n_text=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = num_visual_tokens(llava)
    ids = torch.cat([torch.full((B, N), 2), torch.randint(3, 24, (B, n_text), generator=g)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # the last token is the answer
    return ids, torch.randn(B, 3, 64, 64, generator=g), labels


def test_question_embedding_never_reads_the_answer():
    llava = build_llava("smoke", vocab_size=24).eval()
    d = llava.config.text_config.hidden_size
    vlm = PrunedVLM(llava, GumbelVisionPruner(d, rule="topk", ratio=0.25, text_dim=d)).eval()
    ids, px, labels = _vqa_batch(llava)
    other = ids.clone()
    other[:, -1] = (ids[:, -1] - 3 + 1) % 21 + 3  # another answer token
    emb = llava.get_input_embeddings()
    vis, att = ids == 2, torch.ones_like(ids)
    q = vlm.question_embedding(emb(ids), vis, att, labels)
    assert torch.equal(q, vlm.question_embedding(emb(other), vis, att, labels))
    # by hand: the mean embedding of the question tokens (not image, not answer)
    assert torch.allclose(q, emb(ids[:, vis.shape[1] - 6:-1]).mean(1), atol=1e-6)
    # without labels every text token counts, the answer included
    assert not torch.allclose(q, vlm.question_embedding(emb(ids), vis, att))
    torch.nn.init.normal_(vlm.pruner.text_proj.weight)
    with torch.no_grad():
        kept = vlm(ids, px, labels=labels).visual_keep
        assert torch.equal(kept, vlm(other, px, labels=labels).visual_keep)
        assert kept.sum(-1).tolist() == [4.0] * 4  # top-k at 0.25 of 16


def test_question_aware_policy_training_step_reaches_the_question_projection():
    llava = build_llava("smoke", vocab_size=24)
    d = llava.config.text_config.hidden_size
    vlm = PrunedVLM(llava, GumbelVisionPruner(d, text_dim=d)).train()
    ids, px, labels = _vqa_batch(llava)
    out = vlm(ids, px, labels=labels, tau=1.0)
    loss, _ = PruningLoss(0.25)(out.logits, out.labels, out.keep_prob, out.visual_keep)
    loss.backward()
    assert vlm.pruner.text_proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_sample_rule_draws_bernoulli_p():
    torch.manual_seed(0)
    pruner = GumbelVisionPruner(8).eval()
    tokens = torch.randn(4000, 16, 8)
    out = pruner(tokens, rule="sample")
    p, m = out.keep_prob, out.mask
    assert ((m == 0) | (m == 1)).all() and (m.sum(-1) >= 1).all()
    # E[mask] = p (the min_keep top-up needs all 16 draws to fail: negligible at p ~ 0.5); 4 standard errors
    se = (p * (1 - p)).sum().sqrt() / p.numel()
    assert abs(float(m.mean() - p.mean())) < 4 * float(se)
    assert not torch.equal(pruner(tokens, rule="sample").mask, m)  # stochastic


def test_binarize_weight_override():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.full((2, 5), -100)
    labels[:, 3] = 1
    p = torch.full((2, 4), 0.5)
    loss = PruningLoss(0.5, distill_weight=0.0, sparsity_weight=0.0)
    base, parts = loss(logits, labels, p)
    with_b, _ = loss(logits, labels, p, binarize_weight=2.0)
    assert float(with_b - base) == pytest.approx(2.0 * parts["binarize"]) and parts["binarize"] == pytest.approx(0.25)


def test_benchmark_static_removal_with_a_question_aware_pruner():
    config = lm_config("tiny")
    model = build_lm(config, "cpu", torch.float32, seed=0)
    d = config.hidden_size
    pruner = GumbelVisionPruner(d, rule="topk", text_dim=d).eval()
    torch.nn.init.normal_(pruner.text_proj.weight, std=d ** -0.5)
    embeds = torch.randn(2, 40, d, generator=torch.Generator().manual_seed(3))
    run = PrunedPrefill(model, pruner, embeds, n_visual=24, text_before=3, ratio=0.25, removal="static")
    text = torch.cat([embeds[:, :3], embeds[:, 27:]], 1).mean(1)
    keep = topk_keep_mask(pruner(embeds[:, 3:27], text=text).keep_prob, 0.25)
    kept = run.select_and_remove().index[:, 3:3 + 6] - 3
    assert torch.equal(kept, keep.nonzero()[:, 1].view(2, 6))
