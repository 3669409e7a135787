r"""Keep/drop sampling for token pruning, on top of ``torch.nn.functional.gumbel_softmax``.

A pruner emits two logits per token, :math:`l = [l_\text{drop}, l_\text{keep}]`. The Gumbel-max trick
samples the decision exactly:

.. math::  \text{keep} = \arg\max_c (l_c + g_c), \quad g_c = -\log(-\log u_c),\ u_c \sim U(0, 1)

so that :math:`P(\text{keep}) = \operatorname{softmax}(l)_\text{keep} = \sigma(l_\text{keep} - l_\text{drop})`.
Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017) replaces the argmax by a tempered softmax,

.. math::  y_c = \frac{\exp((l_c + g_c)/\tau)}{\sum_{c'} \exp((l_{c'} + g_{c'})/\tau)},

and ``hard=True`` returns ``y_hard - y_soft.detach() + y_soft``: an exact one-hot forward and the
gradient of the relaxed sample backward (straight-through).

Binary view: the difference of two independent Gumbels is Logistic, so the keep channel equals
:math:`\sigma\big((l_\text{keep} - l_\text{drop} + \log u - \log(1-u))/\tau\big)` — a *relaxed Bernoulli*
(:func:`relaxed_bernoulli`). Adding ONE Gumbel sample to a single logit (:func:`one_gumbel_sigmoid`) is
a common bug: its keep rate is not :math:`\sigma(l)`.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from .distributed import rows_of_global_draw

__all__ = [
    "TAU_MIN",
    "check_tau",
    "sample_keep_mask",
    "keep_probability",
    "logistic_noise",
    "relaxed_bernoulli",
    "one_gumbel_sigmoid",
]


TAU_MIN = 1e-6
r"""Smallest temperature accepted. Below it nothing changes in the hard sample (the argmax), the
straight-through gradient peaks at :math:`1/(4\tau) > 2.5\cdot10^5`, and as :math:`\tau` approaches
:math:`10^{-38}` the quotient :math:`(l + g)/\tau` leaves the float32 range and the mask turns NaN."""


def check_tau(tau, name: str = "tau") -> float:
    """Return ``tau`` as a float, or raise ``ValueError`` unless it is a finite number >= :data:`TAU_MIN`."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(tau.shape)}")
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, Real):
        raise ValueError(f"{name} must be a finite number >= {TAU_MIN:g}, got {tau!r}")
    tau = float(tau)
    if not math.isfinite(tau) or tau < TAU_MIN:
        raise ValueError(f"{name} must be a finite number >= {TAU_MIN:g}, got {tau}")
    return tau


def _check_two_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 0 or logits.shape[-1] != 2:
        raise ValueError(
            f"logits must have a last dimension of size 2 ([drop, keep]), got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")


def sample_keep_mask(logits: torch.Tensor, tau: float, hard: bool = True) -> torch.Tensor:
    r"""Sample a keep mask from two-class logits ``[..., 2] = [drop, keep]`` with ``F.gumbel_softmax``.

    Returns the keep channel, shape ``logits.shape[:-1]``, in float32 whatever the input dtype (Gumbel
    noise :math:`-\log E,\ E \sim \text{Exp}(1)` overflows in fp16). With ``hard=True`` the values are
    exactly 0/1 and the gradient is that of the relaxed sample (straight-through);
    :math:`E[\text{mask}] = \operatorname{softmax}(l)_\text{keep}`.
    """
    _check_two_logits(logits)
    tau = check_tau(tau)
    # data-parallel training: noise drawn for the global batch, this rank's rows kept (vtp.distributed)
    y = rows_of_global_draw(F.gumbel_softmax, logits.float(), tau=tau, hard=hard, dim=-1)
    return y[..., 1]


def keep_probability(logits: torch.Tensor) -> torch.Tensor:
    r""":math:`p_\text{keep} = \operatorname{softmax}(l)_1 = \sigma(l_\text{keep} - l_\text{drop})`, in float32."""
    _check_two_logits(logits)
    return logits.float().softmax(dim=-1)[..., 1]


def logistic_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    r"""Standard Logistic noise :math:`\log u - \log(1-u)`, :math:`u \sim U(0,1)` clamped away from 0 and 1.

    It has the law of :math:`g_1 - g_0` for two independent standard Gumbels.
    """
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(shape, generator=generator, device=device).clamp(tiny, 1.0 - 2**-24)
    return torch.log(u) - torch.log1p(-u)


def relaxed_bernoulli(
    logit: torch.Tensor, tau: float, hard: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Binary Concrete sample :math:`y = \sigma((l + L)/\tau)` with Logistic noise :math:`L`.

    ``logit`` is the single keep logit :math:`l = l_\text{keep} - l_\text{drop}`; ``P(y_hard = 1) = σ(l)``.
    ``hard=True`` thresholds at 0.5 with a straight-through gradient. Same law as the keep channel of
    two-class :func:`sample_keep_mask` with logits ``[0, l]``.
    """
    tau = check_tau(tau)
    logit = logit.float()
    y = torch.sigmoid((logit + logistic_noise(logit.shape, generator, logit.device)) / tau)
    if hard:
        y = (y > 0.5).float() - y.detach() + y
    return y


def one_gumbel_sigmoid(
    logit: torch.Tensor, tau: float, hard: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""The classic BUG, kept for lessons: :math:`\sigma((l + g)/\tau)` with ONE Gumbel sample :math:`g`.

    Gumbel noise has mean :math:`\gamma \approx 0.577` and is skewed, so
    :math:`P(y > 0.5) = P(g > -l) = 1 - \exp(-e^{l}) \ne \sigma(l)` (0.632 at :math:`l = 0`).
    """
    tau = check_tau(tau)
    logit = logit.float()
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(logit.shape, generator=generator, device=logit.device).clamp(tiny, 1.0 - 2**-24)
    g = -torch.log(-torch.log(u))
    y = torch.sigmoid((logit + g) / tau)
    if hard:
        y = (y > 0.5).float() - y.detach() + y
    return y
