r"""The one scoring and selection path: which visual tokens a pruner keeps.

:func:`select_visual` is the call that :func:`vtp.patch`, :class:`vtp.PrunedVLM` and the benchmark's library
removal (:class:`vtp.prefill_paths.PrunedPrefill`) make: the pruner scores the tokens and applies its rule. For a
:class:`vtp.GumbelVisionPruner` the scores are :math:`p_\text{keep} = \operatorname{softmax}(l)_1` of its logits
:math:`l = [l_\text{drop}, l_\text{keep}]` (:meth:`vtp.GumbelVisionPruner.score`), and its eval-mode top-k rule
keeps the :math:`k = \max(\text{min\_keep}, \operatorname{round}(\rho N))` most probable tokens, a tie going to the
earlier token (:func:`vtp.pruner.topk_keep_mask`).

A CUDA graph needs static shapes and no read-back to the host; for a budget :math:`k` known in advance the same
selection splits into two functions that a graph can hold:

* :func:`visual_keep_prob`: the scores alone, from the same inputs as :func:`select_visual` and the same
  :meth:`~vtp.GumbelVisionPruner.score` (under ``torch.compile``, the same math arranged for fused kernels);
* :func:`topk_index`: the indices of the :math:`k` tokens that top-k keeps, with one ``torch.topk``.

:func:`kept_tokens` is that budget, a host number: what top-k keeps of an image of :math:`N` tokens, known without
looking at the scores. :func:`question_embedding` is the pooled question that a question-aware pruner reads.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .gumbel import keep_probability
from .pruner import check_ratio

__all__ = ["question_embedding", "select_visual", "visual_keep_prob", "topk_index", "kept_tokens"]


def question_embedding(embeds, visual_mask, attention_mask=None, labels=None) -> torch.Tensor:
    r"""Mean input embedding ``[B, d]`` of each prompt's text tokens, :math:`q_b = \frac{1}{|T_b|}\sum_{i \in T_b}
    e_{b,i}` over :math:`T_b` = positions that are not image tokens, not padding and (``labels`` given) not
    supervised answer tokens, so a pruner never reads the answer. Detached: the language model owns them."""
    text = ~visual_mask
    if attention_mask is not None:
        text = text & attention_mask.bool()
    if labels is not None:
        text = text & (labels == -100)
    w = text.unsqueeze(-1).to(embeds.dtype)
    return ((embeds * w).sum(1) / w.sum(1).clamp(min=1)).detach()


def _pruner_inputs(pruner, tokens, text):
    """``(tokens, kwargs)`` as the pruner receives them: ``kwargs = {"text": text}`` for a question-aware pruner
    (``text_dim`` set), else empty; outside autocast, tokens and text cast to the pruner's dtype."""
    kwargs = {} if getattr(pruner, "text_dim", None) is None else {"text": text}
    param = next(pruner.parameters(), None)
    if param is not None and tokens.dtype != param.dtype and not torch.is_autocast_enabled(tokens.device.type):
        tokens = tokens.to(param.dtype)
        kwargs = {k: v.to(param.dtype) for k, v in kwargs.items()}
    return tokens, kwargs


def select_visual(pruner, tokens, valid_mask=None, text=None, ratio=None, rule=None, tau=None, min_keep=None,
                  **pruner_kwargs):
    """The one scoring/selection path: ``pruner`` scores ``tokens`` [B, N, d] (``valid_mask`` [B, N] marks real
    tokens; ``text`` [B, d] is the pooled question, read only by a question-aware pruner; ``pruner_kwargs`` go
    to the pruner as they are). A ``ratio`` without a ``rule`` means top-k; ``min_keep`` (default: the pruner's)
    applies to this call. Tokens are cast to the pruner's dtype outside autocast. Returns the pruner's
    :class:`vtp.PrunerOutput` (mask, logits, keep_prob)."""
    if rule is None and ratio is not None:
        rule = "topk"
    tokens, kwargs = _pruner_inputs(pruner, tokens, text)
    kwargs.update(pruner_kwargs)
    if min_keep is None:
        return pruner(tokens, valid_mask=valid_mask, tau=tau, ratio=ratio, rule=rule, **kwargs)
    previous, pruner.min_keep = pruner.min_keep, min_keep
    try:
        return pruner(tokens, valid_mask=valid_mask, tau=tau, ratio=ratio, rule=rule, **kwargs)
    finally:
        pruner.min_keep = previous


def visual_keep_prob(pruner, tokens, text=None) -> torch.Tensor:
    r"""Keep probabilities ``[B, N]`` of a :class:`vtp.GumbelVisionPruner`, no rule applied:
    :math:`p = \operatorname{softmax}(\text{pruner.score}(v, q))_1`, what its ``forward`` computes before the
    rule, from the inputs :func:`select_visual` prepares. Without ``forward``'s check of a validity mask nothing
    is read back to the host, so a CUDA graph can hold it.

    Under ``torch.compile`` the same math is arranged for the compiler (:func:`_fused_keep_prob`); bf16 rounds it
    differently, so near-ties may order differently."""
    tokens, kwargs = _pruner_inputs(pruner, tokens, text)
    if torch.compiler.is_compiling():
        return _fused_keep_prob(pruner, tokens, kwargs.get("text"))
    return keep_probability(pruner.score(tokens, **kwargs))


def _linear_as_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few outputs, as a product and a sum over the input features."""
    return (x.unsqueeze(-2) * weight).sum(-1) + bias


def _fused_keep_prob(pruner, tokens, text) -> torch.Tensor:
    r""":meth:`vtp.GumbelVisionPruner.score`'s keep probabilities, written for ``torch.compile``:
    :math:`h = \operatorname{relu}(W_1 \operatorname{LN}(v) + (b_1 + U \operatorname{LN}(q)))`, :math:`l = W_2 h + b_2`.

    The last ``Linear(inner, 2)`` is a product and a sum, which the compiler fuses with the ReLU into one reduction
    kernel; as a GEMM with 2 outputs it ran as a poorly used tensor-core kernel (H100, batch 1, in a CUDA graph: the
    selection took 67.2 -> 57.6 us). The first Linear's bias is added with the question term: a plain matrix
    product is faster than one with a fused bias (batch 1, keep 0.25: 76-78 -> 64-66 us)."""
    first, head = pruner.scorer[0], pruner.scorer[2]
    bias = first.bias if text is None else first.bias + pruner.text_proj(pruner.text_norm(text))
    h = F.relu(F.linear(pruner.norm(tokens), first.weight) + bias.unsqueeze(-2))
    return keep_probability(_linear_as_sum(h, head.weight, head.bias))


def topk_index(keep_prob: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    r"""Top-k for a budget ``k`` known in advance (static shapes): the indices ``[B, k]``, ascending, of the tokens
    that :func:`vtp.pruner.topk_keep_mask` keeps when its budget is ``k`` (finite keep probabilities, no padding).

    The k best are the first k of a stable descending sort of ``keep_prob``: a tie goes to the earlier token.
    ``torch.topk`` leaves ties unspecified, and they do occur: float32 rounds p = sigmoid(l_keep - l_drop) to 1.0
    for logit gaps above about 17 (so the ranking is on p, not on the logit gap, although sigmoid is monotone).
    Ties are made impossible instead: each token's key packs the bits of p (ordered like p, as p >= 0) above
    ``tiebreak`` :math:`= n - 1 - i`, so equal p rank the earlier token first, and one ``topk`` over unique int64
    keys replaces the sort of all n probabilities. ``tiebreak`` may be passed precomputed (a CUDA graph then
    replays one kernel fewer)."""
    prob = keep_prob.float()
    n = prob.shape[-1]
    if tiebreak is None:
        tiebreak = torch.arange(n - 1, -1, -1, device=prob.device)
    key = (prob.view(torch.int32).long() << 32) | tiebreak
    best = (n - 1) - (key.topk(k, dim=-1, sorted=False).values & 0xFFFFFFFF)
    return best.sort(dim=-1).values


def kept_tokens(ratio, n_visual: int = 576, min_keep: int = 1) -> int:
    r"""Tokens the top-k rule keeps of :math:`N` = ``n_visual``:
    :math:`\min(N, \max(\text{min\_keep}, \operatorname{round}(\rho N)))`, in the float32 arithmetic of
    :func:`vtp.pruner.topk_keep_mask`, on the host (nothing read from a device)."""
    r = check_ratio(ratio, "ratio")
    for value, name in ((n_visual, "n_visual"), (min_keep, "min_keep")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    k = int(np.round(np.float32(r) * np.float32(n_visual)))  # float32, rounded half to even as torch.round
    return min(n_visual, max(min_keep, k))
