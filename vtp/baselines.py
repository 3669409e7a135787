r"""Training-free pruning baselines, as ``keep_fn(batch, vlm) -> keep [B, N]`` for :func:`vtp.evaluate.accuracy`.

Each scores the :math:`N` visual tokens of every sample and keeps the top :math:`k = \max(1,
\operatorname{round}(\rho N))` (:func:`vtp.pruner.topk_keep_mask`); the kept tokens are then physically
removed as for the learned pruner.

* **random**: uniform scores (a fresh draw per batch from a seeded generator).
* **FastV-style** (Chen et al. 2024): the attention that the position predicting the answer (the last
  question token) pays to each image token in an early language-model layer, averaged over heads, in the
  unpruned model. FastV ranks by the attention of layer :math:`K-1` and drops tokens after layer
  :math:`K = 2`; here the scores of layer index 1 prune the input, the same removal the learned pruner gets.
* **object (pixel reference)**: the fraction of a patch's pixels whose colour differs from the image's
  background (its top-left pixel). easy-VQA images hold one shape on a plain background, so this is an
  oracle-like reference of "where the object is", not a method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import policy_attention
from .pruner import check_ratio, topk_keep_mask

__all__ = ["random_scores", "fastv_scores", "object_scores", "keep_by_scores", "BASELINES"]


def random_scores(batch, vlm, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores [B, N]."""
    B, N = batch["input_ids"].shape[0], _n_visual(vlm)
    return torch.rand(B, N, generator=generator).to(batch["input_ids"].device)


def _n_visual(vlm) -> int:
    from .vlm import num_visual_tokens
    return num_visual_tokens(vlm.llava)


@torch.no_grad()
def fastv_scores(batch, vlm, layer: int = 1) -> torch.Tensor:
    """Head-averaged attention [B, N] from the answer-predicting position to each image token at ``layer``."""
    lm = vlm.language_model
    n_layers = lm.config.num_hidden_layers
    if not (0 <= layer < n_layers):
        raise ValueError(f"layer must be in [0, {n_layers - 1}], got {layer}")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tokens = vlm.visual_features(batch["pixel_values"])
    visual = ids == vlm.image_token_id
    embeds = vlm.llava.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(visual.unsqueeze(-1), tokens.to(embeds.dtype))
    with policy_attention(lm):  # returns attention weights (SDPA does not)
        out = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True, use_cache=False)
    att = out.attentions[layer].float().mean(1)  # [B, L, L]
    query = (batch["labels"][:, 1:] != -100).int().argmax(-1)  # position that predicts the answer
    rows = att[torch.arange(ids.shape[0], device=ids.device), query]  # [B, L]
    return rows[visual].view(ids.shape[0], -1)


def object_scores(batch, vlm, tol: float = 0.05) -> torch.Tensor:
    """Fraction [B, N] of each patch's pixels that differ from the background colour (top-left pixel)."""
    px = batch["pixel_values"].float()
    diff = (px - px[:, :, :1, :1]).abs().amax(1, keepdim=True) > tol  # [B, 1, H, W]
    n = _n_visual(vlm)
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"object scores need a square grid of visual tokens, got {n}")
    return F.adaptive_avg_pool2d(diff.float(), side).flatten(1)


def keep_by_scores(score_fn, ratio: float, **kwargs):
    """A ``keep_fn`` for :func:`vtp.evaluate.accuracy`: top-k of ``score_fn(batch, vlm, **kwargs)``."""
    ratio = check_ratio(ratio)

    def keep_fn(batch, vlm):
        return topk_keep_mask(score_fn(batch, vlm, **kwargs), ratio)

    return keep_fn


BASELINES = {"random": random_scores, "fastv": fastv_scores, "object": object_scores}
