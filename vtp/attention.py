r"""Attention-level pruning: the policy-weighted attention used in training, and physical token removal.

Physical removal (inference): gather the kept tokens in their original order, keep their ORIGINAL
position ids (RoPE sees the same positions as in the unpruned sequence), and right-pad samples whose kept
counts differ, with an attention mask marking the padding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Removed", "remove_tokens"]


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
    right-padded to the longest kept length.
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
    K = int(lengths.max())
    # Stable sort puts kept positions first, in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :K]
    valid = torch.arange(K, device=embeds.device).unsqueeze(0) < lengths.unsqueeze(1)
    index = torch.where(valid, order, torch.zeros_like(order))
    gathered = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    gathered = gathered * valid.unsqueeze(-1).to(gathered.dtype)
    pos = torch.where(valid, position_ids.gather(1, index), torch.zeros_like(index))
    return Removed(gathered, pos, valid.long(), index, lengths)
