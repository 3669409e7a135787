"""PruningLoss(form="seed") computes the seed document's distillation and sparsity terms; PrunerConfig passes it."""
import pytest
import torch
import torch.nn.functional as F

from vtp.losses import PruningLoss, seed_distillation_kl
from vtp.train import pruner_config


def _inputs(B=3, L=10, V=7, N=4):
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    labels = torch.full((B, L), -100)
    labels[:, -1] = 2
    return logits, teacher, labels, torch.rand(B, N, generator=g)


def test_seed_kl_is_batchmean_over_every_position():
    s, t, _, _ = _inputs()
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")  # the seed's own line
    assert torch.allclose(seed_distillation_kl(s, t), ref, atol=1e-6)
    by_hand = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum() / s.shape[0]
    assert torch.allclose(seed_distillation_kl(s, t), by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        seed_distillation_kl(s, t[:, :-1])


def test_seed_form_terms():
    s, t, labels, p = _inputs()
    p[0] = 0.9  # per-sample ratios differ: batch-level and per-sample MSE differ
    _, seed = PruningLoss(0.25, sparsity_weight=1.0, form="seed")(s, labels, p, teacher_logits=t)
    _, ours = PruningLoss(0.25, sparsity_weight=1.0)(s, labels, p, teacher_logits=t)
    assert seed["ce"] == pytest.approx(ours["ce"])  # the task term is the same
    assert seed["sparsity"] == pytest.approx(((p.mean() - 0.25) ** 2).item(), rel=1e-5)
    assert ours["sparsity"] == pytest.approx(((p.mean(-1) - 0.25) ** 2).mean().item(), rel=1e-5)
    assert seed["sparsity"] < ours["sparsity"]  # Jensen: the square of the mean <= the mean of the squares
    assert seed["distill"] == pytest.approx(seed_distillation_kl(s, t).item(), rel=1e-5)
    assert seed["distill"] > ours["distill"]  # summed over 10 positions instead of averaged over 1 answer token


def test_form_is_checked_and_reaches_the_config():
    with pytest.raises(ValueError, match="form"):
        PruningLoss(0.25, form="paper")
    assert pruner_config("smoke", loss_form="seed").loss_form == "seed"
    with pytest.raises(ValueError, match="loss_form"):
        pruner_config("smoke", loss_form="paper")
