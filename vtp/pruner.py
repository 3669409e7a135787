r"""``GumbelVisionPruner``: score visual tokens and decide which to keep.

Scorer (the seed design, after a LayerNorm of the tokens): :math:`\text{Linear}(d, d/4) \to \text{ReLU} \to
\text{Linear}(d/4, 2)`, giving
logits :math:`[l_\text{drop}, l_\text{keep}]` per token and :math:`p_\text{keep} = \operatorname{softmax}(l)_1`.

**Question-aware scoring** (``text_dim`` set): a pooled embedding :math:`q` of the question enters the hidden
layer, :math:`h_i = \text{ReLU}(W_1 \operatorname{LN}(v_i) + U \operatorname{LN}(q) + b_1)`, so the same image can
keep different tokens for "what colour is the shape?" and "what shape is this?". :math:`U` starts at zero:
at step 0 the scorer is the question-blind seed design.

* **train mode**: a hard Gumbel-softmax sample (exact 0/1 forward, straight-through backward),
  :math:`E[\text{mask}] = p_\text{keep}`. ``sampler`` selects the alternatives that the lessons measure:
  ``"soft"`` (``hard=False``: masks in (0, 1) that inference cannot reproduce), ``"one_gumbel"`` (the
  biased one-Gumbel sigmoid), ``"ste"`` (deterministic :math:`p > 0.5` with a straight-through gradient,
  no exploration), ``"topk"`` (the inference rule itself, with a straight-through gradient: see
  :func:`topk_straight_through`; lesson 07's second training phase).
* **eval mode**: deterministic, no noise. ``rule="threshold"`` keeps :math:`p_\text{keep} > 0.5`;
  ``rule="topk"`` keeps the :math:`k = \max(\text{min\_keep}, \operatorname{round}(\text{ratio}\cdot N))`
  most probable of the :math:`N` valid tokens; ``rule="sample"`` draws each token's keep from Bernoulli(:math:`p`),
  the law of the training masks (stochastic: a diagnosis, not a deployment rule). At least ``min_keep`` tokens
  survive per sample.

**Non-finite input.** Checking values would cost a host-device synchronisation per call, so the pruner checks
shapes and dtypes only. A NaN token has a NaN keep probability: in eval mode it ranks after every other token
(top-k keeps it only when :math:`k` exceeds the sample's non-NaN tokens; the threshold rule never keeps it on its
own), so masks stay 0/1; in train mode its mask entry is NaN, and :class:`vtp.PruningLoss`, which reads its
components back anyway, raises ``FloatingPointError``.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .gumbel import check_tau, keep_probability, one_gumbel_sigmoid, sample_keep_mask

__all__ = ["PrunerOutput", "GumbelVisionPruner", "check_ratio", "topk_keep_mask", "threshold_keep_mask",
           "topk_straight_through"]

RULES = ("threshold", "topk", "sample")
SAMPLERS = ("gumbel", "soft", "one_gumbel", "ste", "topk")


class PrunerOutput(NamedTuple):
    """``mask`` [B, N] float 0/1 (straight-through in training), ``logits`` [B, N, 2], ``keep_prob`` [B, N]."""

    mask: torch.Tensor
    logits: torch.Tensor
    keep_prob: torch.Tensor


def check_ratio(ratio, name: str = "ratio") -> float:
    """Return ``ratio`` as a float, or raise ``ValueError`` unless ``0 < ratio <= 1``."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < r <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {ratio}")
    return r


def _valid(scores: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
    if valid_mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if valid_mask.shape != scores.shape:
        raise ValueError(
            f"valid_mask must have shape {tuple(scores.shape)} (batch, visual tokens), got {tuple(valid_mask.shape)}"
        )
    valid = valid_mask.bool()
    if not valid.any(dim=-1).all():
        raise ValueError("valid_mask: every sample needs at least one valid visual token")
    return valid


def _rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each token by descending score within its sample (0 = best), ties by position. NaN scores rank
    after every number (a NaN token is kept only when the budget exceeds the sample's non-NaN tokens), invalid
    tokens after those: two stable sorts, by score, then by validity."""
    s = scores.float()
    order = s.masked_fill(torch.isnan(s), float("-inf")).argsort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, (~valid).gather(-1, order).to(torch.int8).argsort(dim=-1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


def topk_keep_mask(scores, ratio, valid_mask=None, min_keep: int = 1) -> torch.Tensor:
    r"""Keep the :math:`k_b = \max(\text{min\_keep}, \operatorname{round}(\text{ratio} \cdot N_b))` highest
    scores among the :math:`N_b` valid tokens of each sample (never more than :math:`N_b`). Float 0/1 mask."""
    ratio = check_ratio(ratio)
    valid = _valid(scores, valid_mask)
    n_valid = valid.sum(-1)
    k = torch.clamp(torch.round(ratio * n_valid.float()).long(), min=min_keep)
    k = torch.minimum(k, n_valid)
    rank = _rank(scores, valid)
    return ((rank < k.unsqueeze(-1)) & valid).float()


def threshold_keep_mask(scores, threshold: float = 0.5, valid_mask=None, min_keep: int = 1) -> torch.Tensor:
    """Keep valid tokens whose score exceeds ``threshold``; top up to ``min_keep`` by score. Float 0/1 mask."""
    valid = _valid(scores, valid_mask)
    keep = (scores > threshold) & valid
    n_valid = valid.sum(-1)
    k_min = torch.minimum(torch.full_like(n_valid, min_keep), n_valid)
    rank = _rank(scores, valid)
    keep |= (rank < k_min.unsqueeze(-1)) & valid
    return keep.float()


def topk_straight_through(logits, ratio, valid_mask=None, min_keep: int = 1, temperature: float = 1.0):
    r"""The top-k rule of inference (ranked by :math:`p_\text{keep}`, :func:`topk_keep_mask`) in the forward
    pass, with the gradient of a scale-free relaxation in the backward pass:

    .. math::  \tilde m = k \operatorname{softmax}(z / T), \qquad
               z_i = \frac{g_i - \operatorname{mean}(g)}{\operatorname{std}(g)}, \quad g = l_\text{keep} - l_\text{drop},

    over each sample's valid tokens; mask = hard + (:math:`\tilde m` - stopgrad(:math:`\tilde m`)). Like the mask,
    :math:`\tilde m` sums to :math:`k`. Standardising :math:`g` makes the surrogate blind to the level of the
    gaps, which top-k ignores too (its gradient scales as 1/spread); so it cannot saturate the way
    :math:`p = \sigma(g)` does, whose gradient carries :math:`p(1-p)`, 0 once the gaps drift to one side."""
    check_tau(temperature, "temperature")
    keep_prob = keep_probability(logits)
    valid = _valid(keep_prob, valid_mask)
    hard = topk_keep_mask(keep_prob, ratio, valid_mask, min_keep)
    gap = (logits[..., 1] - logits[..., 0]).float()
    n = valid.sum(-1, keepdim=True)
    mean = gap.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / n
    var = (gap - mean).masked_fill(~valid, 0.0).pow(2).sum(-1, keepdim=True) / n
    # eps inside the root: equal gaps (var = 0, e.g. a question whose answer any token gives) must not
    # make d sqrt/d var infinite
    z = ((gap - mean) * torch.rsqrt(var + 1e-6)).masked_fill(~valid, float("-inf"))
    soft = hard.sum(-1, keepdim=True) * torch.softmax(z / temperature, dim=-1)
    return hard + (soft - soft.detach())  # forward: hard + 0, exactly 0/1


class GumbelVisionPruner(nn.Module, PyTorchModelHubMixin, library_name="vtp"):
    """Learned visual-token pruner: MLP scorer -> two logits ``[drop, keep]`` -> keep mask.

    Args:
        hidden_dim: width ``d`` of the visual tokens it scores.
        reduction: the scorer's bottleneck is ``d // reduction`` (seed: 4).
        rule: eval-mode rule, ``"threshold"`` (keep prob > ``threshold``) or ``"topk"`` (budget ``ratio``).
        ratio: default keep ratio in (0, 1] for ``rule="topk"``.
        threshold: keep-probability threshold for ``rule="threshold"``.
        min_keep: at least this many tokens per sample in eval mode (>= 1).
        tau: default Gumbel-softmax temperature (training sets it each step).
        keep_bias: initial bias of the keep logit minus the drop logit (0 = start at p_keep = 0.5).
        sampler: train-mode mask, ``"gumbel"`` (default, the method) or a lesson variant (module docstring).
        norm: LayerNorm the tokens before the scorer (as DynamicViT's predictor does). The seed scorer has
            none; but a LLaVA projector's outputs can be large (norm ~2,000 in our trained teacher, whose
            language model RMS-normalises them anyway), which saturates the keep probabilities at step 0.
        text_dim: width of a pooled question embedding that conditions the scores (``None`` = question-blind,
            the seed design); ``forward`` then needs ``text`` [B, text_dim].
    """

    def __init__(
        self,
        hidden_dim: int,
        reduction: int = 4,
        rule: str = "threshold",
        ratio: float = 0.25,
        threshold: float = 0.5,
        min_keep: int = 1,
        tau: float = 1.0,
        keep_bias: float = 0.0,
        sampler: str = "gumbel",
        norm: bool = True,
        text_dim: int | None = None,
    ):
        super().__init__()
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        if not isinstance(reduction, int) or not (1 <= reduction <= hidden_dim):
            raise ValueError(f"reduction must be an int in [1, hidden_dim={hidden_dim}], got {reduction!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not isinstance(min_keep, int) or min_keep < 1:
            raise ValueError(f"min_keep must be an int >= 1, got {min_keep!r}")
        if text_dim is not None and (not isinstance(text_dim, int) or text_dim < 1):
            raise ValueError(f"text_dim must be a positive int or None, got {text_dim!r}")
        if not (0.0 < float(threshold) < 1.0):
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.hidden_dim, self.rule, self.min_keep, self.sampler = hidden_dim, rule, min_keep, sampler
        self.text_dim = text_dim
        self.ratio, self.threshold, self.tau = check_ratio(ratio), float(threshold), check_tau(tau)
        inner = hidden_dim // reduction
        self.norm = nn.LayerNorm(hidden_dim) if norm else nn.Identity()
        self.scorer = nn.Sequential(nn.Linear(hidden_dim, inner), nn.ReLU(), nn.Linear(inner, 2))
        with torch.no_grad():
            self.scorer[-1].bias.copy_(torch.tensor([0.0, float(keep_bias)]))
        if text_dim is not None:
            self.text_norm = nn.LayerNorm(text_dim)
            self.text_proj = nn.Linear(text_dim, inner, bias=False)
            nn.init.zeros_(self.text_proj.weight)

    @classmethod
    def from_pretrained(cls, directory, map_location: str = "cpu", **kwargs) -> "GumbelVisionPruner":
        """A pruner saved with ``save_pretrained(directory)`` (``config.json``: the constructor's arguments;
        ``model.safetensors``: the weights), from a local directory only; every weight must match (strict), and
        it comes back in eval mode. ``kwargs`` override constructor arguments of the saved config."""
        if not Path(directory).is_dir():
            raise ValueError(f"directory must be a local directory written by save_pretrained, got {directory!r}")
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints where it loads from
            return super().from_pretrained(Path(directory), local_files_only=True, map_location=map_location,
                                           strict=True, **kwargs)

    def score(self, tokens: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, N, 2]`` = ``[drop, keep]`` of ``tokens`` [B, N, d] (given ``text`` [B, text_dim] when
        the pruner is question-aware). Floating-point inputs of another dtype (float16, bfloat16, float64) are
        cast to the pruner's; integer tokens, non-tensors, and ``text`` for a question-blind pruner raise."""
        tokens = self._check_input(tokens, "tokens")
        if tokens.dim() != 3 or tokens.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"tokens must have shape (batch, tokens, {self.hidden_dim}), got {tuple(tokens.shape)}"
            )
        if self.text_dim is None and text is not None:
            raise ValueError("text is read only by a question-aware pruner (text_dim set); this pruner is "
                             "question-blind (text_dim=None): pass text=None")
        h = self.scorer[0](self.norm(tokens))
        if self.text_dim is not None:
            text = None if text is None else self._check_input(text, "text")
            if text is None or tuple(text.shape) != (tokens.shape[0], self.text_dim):
                got = None if text is None else tuple(text.shape)
                raise ValueError(f"text must have shape ({tokens.shape[0]}, {self.text_dim}) (batch, text_dim) for "
                                 f"a question-aware pruner, got {got}")
            h = h + self.text_proj(self.text_norm(text)).unsqueeze(1)
        return self.scorer[2](self.scorer[1](h))

    def _check_input(self, x, name: str) -> torch.Tensor:
        """``x`` as a tensor of the pruner's dtype; ``TypeError`` unless a floating-point tensor (a dtype
        check, no read of the values)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16, ...), got {x.dtype}")
        return x.to(self.scorer[0].weight.dtype)

    def forward(self, tokens: torch.Tensor, valid_mask: torch.Tensor | None = None, tau: float | None = None,
                ratio: float | None = None, rule: str | None = None, text: torch.Tensor | None = None) -> PrunerOutput:
        """Score ``tokens`` [B, N, d]; ``valid_mask`` [B, N] marks real (non-padding) visual tokens; ``text``
        [B, text_dim] is the pooled question of a question-aware pruner.

        Training: hard Gumbel sample at temperature ``tau``. Eval: ``rule`` with ``ratio`` (top-k) or the
        threshold. Invalid tokens always get mask 0.
        """
        logits = self.score(tokens, text)
        keep_prob = keep_probability(logits)
        valid = _valid(keep_prob, valid_mask)
        if self.training and self.sampler == "topk":
            mask = topk_straight_through(logits, self.ratio if ratio is None else ratio, valid_mask, self.min_keep,
                                         self.tau if tau is None else tau)
        elif self.training:
            mask = self._sample(logits, keep_prob, self.tau if tau is None else tau) * valid.float()
        else:
            rule = self.rule if rule is None else rule
            if rule == "topk":
                mask = topk_keep_mask(keep_prob, self.ratio if ratio is None else ratio, valid_mask, self.min_keep)
            elif rule == "sample":  # one Bernoulli(p) draw per token: the training masks' law, for diagnosis
                mask = threshold_keep_mask(keep_prob - torch.rand_like(keep_prob), 0.0, valid_mask, self.min_keep)
            elif rule == "threshold":
                mask = threshold_keep_mask(keep_prob, self.threshold, valid_mask, self.min_keep)
            else:
                raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        return PrunerOutput(mask, logits, keep_prob)

    def _sample(self, logits, keep_prob, tau):
        if self.sampler == "gumbel":
            return sample_keep_mask(logits, tau, hard=True)
        if self.sampler == "soft":
            return sample_keep_mask(logits, tau, hard=False)
        if self.sampler == "one_gumbel":
            return one_gumbel_sigmoid(logits[..., 1].float() - logits[..., 0].float(), tau, hard=True)
        return (keep_prob > 0.5).float() - keep_prob.detach() + keep_prob  # "ste"
