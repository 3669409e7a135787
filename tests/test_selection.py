"""vtp.selection: the one scoring/selection path. select_visual (vtp.patch, PrunedVLM, the benchmark's library
removal) and its static-shape split, visual_keep_prob + topk_index (the benchmark's static removal), agree."""
import pytest
import torch

from vtp import GumbelVisionPruner
from vtp.pruner import topk_keep_mask
from vtp.selection import select_visual, topk_index, visual_keep_prob


@pytest.mark.parametrize("question_aware", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_static_split_selects_what_select_visual_selects(question_aware, dtype):
    torch.manual_seed(0)
    d, n, ratio = 16, 40, 0.25
    pruner = GumbelVisionPruner(d, rule="topk", text_dim=d if question_aware else None).eval()
    if question_aware:
        torch.nn.init.normal_(pruner.text_proj.weight)  # starts at zero: make the question matter
    tokens, text = torch.randn(3, n, d, dtype=dtype), torch.randn(3, d, dtype=dtype)  # float64: cast to the pruner's
    with torch.no_grad():
        out = select_visual(pruner, tokens, text=text, ratio=ratio)
        prob = visual_keep_prob(pruner, tokens, text)
        index = topk_index(prob, round(ratio * n))
    assert prob.dtype == torch.float32
    torch.testing.assert_close(prob, out.keep_prob, rtol=0, atol=0)
    assert torch.equal(index, out.mask.nonzero()[:, 1].view(3, -1))
    if question_aware:  # the question is read: another question, other scores
        assert not torch.allclose(prob, visual_keep_prob(pruner, tokens, -text), atol=1e-3)


def test_topk_index_breaks_ties_like_topk_keep_mask():
    """Saturated keep probabilities tie (float32 rounds them to 1.0): the earlier token wins, as in the mask."""
    prob = torch.tensor([[1.0, 0.5] * 6, [0.5] * 6 + [1.0] * 6, [0.3, 1.0, 1.0, 0.2, 1.0, 1.0] * 2])
    for k in (1, 3, 5, 12):
        expected = topk_keep_mask(prob, k / 12).bool().nonzero()[:, 1].view(3, k)
        assert torch.equal(topk_index(prob, k), expected)
        assert torch.equal(topk_index(prob, k, torch.arange(11, -1, -1)), expected)  # precomputed tiebreak
    assert topk_index(prob, 3)[0].tolist() == [0, 2, 4] and topk_index(prob, 3)[1].tolist() == [6, 7, 8]
