r"""Attention-level pruning: the policy-weighted attention used in training, and physical token removal.

**Training: policy-weighted attention** (DynamicViT, Rao et al. 2021). A keep policy :math:`k \in [0, 1]^L`
(1 for text tokens, the sampled Gumbel mask for visual tokens) acts as a *key* mask in every attention layer:

.. math::

    A_{ij} = \frac{\exp(s_{ij} - m_i)\, G_{ij}}{\sum_l \exp(s_{il} - m_i)\, G_{il} + \varepsilon},
    \qquad G_{ij} = \begin{cases} 1 & i = j \\ k_j & i \ne j \end{cases}

over the positions :math:`j` the causal / padding mask allows, with scores :math:`s = QK^\top / \sqrt{d}`
in float32. With a hard 0/1 policy a dropped key gets exactly zero weight, so the outputs at kept positions
equal those of the sequence with the dropped tokens *removed* (same position ids). Unlike a :math:`-\infty`
additive mask, :math:`\partial A_{ij} / \partial k_j = \exp(s_{ij} - m_i) / Z_i\, (\ldots) \ne 0` at
:math:`k_j = 0`: the gradient reaches the decision to drop.

The stabiliser :math:`m_i = \max_j (s_{ij} + \log G_{ij})` (detached) makes the largest *weighted* term 1,
so :math:`Z_i \ge 1` and the relative effect of :math:`\varepsilon` stays below :math:`\varepsilon`;
exponents of keys with :math:`G_{ij} = 0` are capped at :data:`EXP_CAP` = 0, i.e. at the largest kept score: the
forward value is unchanged (their weight is 0) and the gradient :math:`\partial A_{ij}/\partial k_j` stays below
:math:`1/Z_i \le 1`. Uncapped, a dropped key that out-scores every kept one sends a gradient of
:math:`e^{s_{ij} - m_i}` (measured: ~1e7 on our teacher), which drowns the sparsity term.

The function is registered under the name :data:`POLICY_ATTENTION` in transformers' ``AttentionInterface``
(and a boolean mask builder in ``AttentionMaskInterface``); transformers forwards extra keyword arguments of
the model's ``forward`` to every attention call, so ``language_model(..., keep_policy=k)`` reaches all layers.
Use :func:`policy_attention` to switch a model to it temporarily.

**Inference: physical removal.** :func:`remove_tokens` gathers the kept tokens in their original order,
keeps their ORIGINAL position ids (RoPE sees the same positions as in the unpruned sequence), and
right-pads samples whose kept counts differ, with an attention mask marking the padding.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

__all__ = [
    "POLICY_ATTENTION",
    "EXP_CAP",
    "policy_softmax",
    "policy_attention_forward",
    "attention_implementation",
    "policy_attention",
    "register_policy_attention",
    "Removed",
    "remove_tokens",
]

POLICY_ATTENTION = "vtp_policy"
EXP_CAP = 0.0


def policy_softmax(scores: torch.Tensor, keep: torch.Tensor | None, allowed: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    r"""Policy-weighted softmax over the last dim, in float32 (formula in the module docstring).

    ``scores`` [B, H, Lq, Lk]; ``keep`` [B, Lk] (values in [0, 1], ``None`` = all ones); ``allowed``
    boolean, broadcastable to ``scores`` (causal and padding mask; ``None`` = everything allowed). The
    diagonal ``G_ii = 1`` applies when ``Lq == Lk``. Rows with no allowed key return zeros.
    """
    s = scores.float()
    Lq, Lk = s.shape[-2:]
    if allowed is None:
        allowed = torch.ones((1, 1, Lq, Lk), dtype=torch.bool, device=s.device)
    if keep is None:
        G = torch.ones((1, 1, 1, Lk), device=s.device)
    else:
        G = keep.float()[:, None, None, :].expand(-1, 1, Lq, Lk)
        if Lq == Lk:
            eye = torch.eye(Lk, dtype=torch.bool, device=s.device)
            G = torch.where(eye, torch.ones_like(G), G)
    G = G * allowed
    with torch.no_grad():
        m = (s + torch.log(G)).amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = s - m
    z = torch.where(G > 0, z, z.clamp(max=EXP_CAP))
    e = torch.exp(z) * G
    return e / (e.sum(dim=-1, keepdim=True) + eps)


def policy_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             keep_policy=None, policy_eps: float = 1e-6, **kwargs):
    """Attention function with transformers' signature: ``query`` [B, H, Lq, D], ``key``/``value``
    [B, H_kv, Lk, D] (grouped-query heads are repeated), ``attention_mask`` boolean (True = attend) or
    additive float, ``keep_policy`` [B, Lk] or ``None``. Returns ``(output [B, Lq, H, D], weights)``."""
    B, H, Lq, D = query.shape
    Lk = key.shape[-2]
    if keep_policy is not None and tuple(keep_policy.shape) != (B, Lk):
        raise ValueError(
            f"keep_policy must have shape {(B, Lk)} (batch, sequence length), got {tuple(keep_policy.shape)}"
        )
    n_rep = H // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scaling = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    allowed = None
    if attention_mask is not None:
        mask = attention_mask[..., :Lk]
        if mask.dtype == torch.bool:
            allowed = mask
        else:  # additive float mask (0 = attend, very negative = masked)
            allowed = mask > torch.finfo(mask.dtype).min / 2
            scores = scores + mask.float().masked_fill(~allowed, 0.0)
    elif Lq == Lk:
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()[None, None]
    weights = policy_softmax(scores, keep_policy, allowed, policy_eps)
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights, value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights.to(query.dtype)


def _policy_mask(*args, **kwargs):
    """Boolean [B, 1, Lq, Lk] causal + padding mask (never the ``None`` shortcut of sdpa)."""
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("allow_torch_fix", None)
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def register_policy_attention() -> str:
    """Register :func:`policy_attention_forward` and its mask builder under :data:`POLICY_ATTENTION`."""
    AttentionInterface.register(POLICY_ATTENTION, policy_attention_forward)
    AttentionMaskInterface.register(POLICY_ATTENTION, _policy_mask)
    return POLICY_ATTENTION


register_policy_attention()


@contextlib.contextmanager
def attention_implementation(model, implementation: str):
    """Temporarily run ``model`` (a transformers model) with the attention function registered under
    ``implementation`` (``"eager"``, ``"sdpa"``, :data:`POLICY_ATTENTION` or one registered with
    ``transformers.AttentionInterface``); restores the previous setting on exit, also after an error."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield model
    finally:
        config._attn_implementation = previous


def policy_attention(model):
    """Temporarily run ``model`` (a transformers model, e.g. the LLaVA language model) with the
    policy-weighted attention; pass ``keep_policy=`` to its ``forward``. Restores the previous setting."""
    return attention_implementation(model, POLICY_ATTENTION)


class Removed(NamedTuple):
    """Result of :func:`remove_tokens`: ``embeds`` [B, K, d], ``position_ids`` [B, K], ``attention_mask``
    [B, K] (1 = real token, 0 = padding), ``index`` [B, K] (original positions, padding -> 0), ``lengths`` [B]."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    lengths: torch.Tensor


def remove_tokens(embeds: torch.Tensor, keep: torch.Tensor, position_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None) -> Removed:
    """Physically drop the positions where ``keep`` is 0 from ``embeds`` [B, L, d].

    ``keep`` [B, L] (bool or 0/1) covers the whole sequence (text positions should be 1). ``position_ids``
    default to ``0..L-1`` (or the cumulative sum of ``attention_mask`` minus 1 when one is given); kept
    tokens carry theirs over. Positions masked out by ``attention_mask`` are dropped too. Samples are
    right-padded to the longest kept length. Every sample must keep at least one position, otherwise
    ``ValueError`` (checked in the same read-back that sizes the output; a pruner's ``min_keep`` guarantees it
    for the visual part).

    Pass the returned ``attention_mask`` to the model together with the position ids: without a 2-D mask,
    transformers reads gaps in the position ids as boundaries of packed sequences.
    """
    if embeds.dim() != 3:
        raise ValueError(f"embeds must have shape (batch, seq, dim), got {tuple(embeds.shape)}")
    B, L, _ = embeds.shape
    if keep.shape != (B, L):
        raise ValueError(f"keep must have shape {(B, L)} (batch, seq), got {tuple(keep.shape)}")
    keep = keep.bool()
    if attention_mask is not None:
        if attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask must have shape {(B, L)}, got {tuple(attention_mask.shape)}")
        keep = keep & attention_mask.bool()
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(L, device=embeds.device).expand(B, L)
    elif position_ids.shape != (B, L):
        raise ValueError(f"position_ids must have shape {(B, L)}, got {tuple(position_ids.shape)}")
    lengths = keep.sum(-1)
    shortest, K = torch.stack(torch.aminmax(lengths)).tolist()  # one read-back: the output's size and the check
    if shortest == 0:
        raise ValueError("keep: every sample must keep at least one position (of those attention_mask allows); "
                         f"sample {int((lengths == 0).nonzero()[0, 0])} keeps none")
    # Stable sort puts kept positions first, in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :K]
    valid = torch.arange(K, device=embeds.device).unsqueeze(0) < lengths.unsqueeze(1)
    index = torch.where(valid, order, torch.zeros_like(order))
    gathered = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    gathered = gathered * valid.unsqueeze(-1).to(gathered.dtype)
    pos = torch.where(valid, position_ids.gather(1, index), torch.zeros_like(index))
    return Removed(gathered, pos, valid.long(), index, lengths)
