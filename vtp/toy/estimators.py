r"""Lesson 01: gradient estimators of :math:`\nabla_\theta \mathbb{E}_{m \sim \text{Bernoulli}(\sigma(\theta))}[f(m)]`
against the exact gradient (:class:`MaskObjective` enumerates the :math:`2^N` masks), the Gumbel-max trick and a
goodness-of-fit test."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..gumbel import check_tau, sample_keep_mask

ESTIMATORS = ("reinforce", "ste", "gumbel_soft", "gumbel_hard")


def _two_class(theta: torch.Tensor) -> torch.Tensor:
    """``[drop, keep]`` logits ``[..., 2] = [0, θ]`` for keep logits θ (so ``p_keep = σ(θ)``)."""
    return torch.stack([torch.zeros_like(theta), theta], dim=-1)



class MaskObjective:
    r"""Loss of a linear read-out of the kept tokens: :math:`f(m) = -\log\sigma(w \cdot m - b)`.

    A stand-in for "the model's loss given which tokens survived": smooth and non-linear in :math:`m`,
    so relaxed estimators (which evaluate :math:`f` or its gradient away from :math:`\{0,1\}^N`) are
    biased. ``N = len(weights) <= 16`` so that the :math:`2^N` masks can be enumerated.
    """

    def __init__(self, weights, bias: float = 1.5):
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.dim() != 1 or not (1 <= w.numel() <= 16):
            raise ValueError(f"weights must be a 1-D tensor of 1 to 16 values, got shape {tuple(w.shape)}")
        self.w, self.b = w, float(bias)

    @property
    def n(self) -> int:
        return self.w.numel()

    def loss(self, mask: torch.Tensor) -> torch.Tensor:
        """:math:`f(m)` for masks ``[..., N]`` (0/1 or relaxed); shape ``[...]``."""
        return F.softplus(self.b - (mask * self.w).sum(-1))

    def all_masks(self) -> torch.Tensor:
        """The :math:`2^N` binary masks, ``[2^N, N]``."""
        return torch.tensor(list(itertools.product([0.0, 1.0], repeat=self.n)))

    def _check_theta(self, theta):
        if theta.shape != (self.n,):
            raise ValueError(f"theta must have shape ({self.n},), got {tuple(theta.shape)}")

    def expected_loss(self, theta: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`\mathbb{E}[f(m)]` with :math:`p = \sigma(\theta)`, by enumeration (differentiable)."""
        self._check_theta(theta)
        masks, p = self.all_masks(), torch.sigmoid(theta)
        prob = (masks * p + (1 - masks) * (1 - p)).prod(-1)
        return (prob * self.loss(masks)).sum()

    def exact_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_\theta \mathbb{E}[f(m)]` by autograd through the enumeration."""
        theta = theta.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.expected_loss(theta), theta)
        return grad

    def sample_gradients(self, theta: torch.Tensor, estimator: str, n_samples: int, tau: float = 1.0):
        r"""``n_samples`` independent single-sample gradient estimates, ``[n_samples, N]``.

        * ``"reinforce"`` (score function): :math:`f(m)\,\nabla_\theta \log p(m) = f(m)\,(m - p)`.
        * ``"ste"`` (deterministic straight-through threshold, Bengio et al. 2013): forward
          :math:`m = 1[p > 0.5]`, backward as if :math:`m = p`: :math:`\nabla_m f\,\sigma'(\theta)`.
        * ``"gumbel_soft"``: :math:`\nabla_\theta f(y)` at the relaxed sample ``sample_keep_mask(hard=False)``.
        * ``"gumbel_hard"``: :math:`f` at the hard sample, gradient of the relaxed one (straight-through).

        Draws from the global RNG (``F.gumbel_softmax`` takes no generator): seed with ``torch.manual_seed``.
        """
        self._check_theta(theta)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        tau = check_tau(tau)
        t = theta.detach().expand(n_samples, self.n).clone().requires_grad_(True)
        p = torch.sigmoid(t)
        if estimator == "reinforce":
            m = torch.bernoulli(p.detach())
            return (self.loss(m).unsqueeze(-1) * (m - p)).detach()
        if estimator == "ste":
            m = (p > 0.5).float() - p.detach() + p
        else:
            m = sample_keep_mask(_two_class(t), tau, hard=estimator == "gumbel_hard")
        (grad,) = torch.autograd.grad(self.loss(m).sum(), t)  # samples are independent rows
        return grad


def bias_variance(grads: torch.Tensor, exact: torch.Tensor) -> dict:
    r"""Bias and variance of a gradient estimator from samples ``grads [S, N]``, relative to ``exact [N]``.

    * ``bias`` :math:`= \|\bar g - \nabla\| / \|\nabla\|` (includes Monte-Carlo noise ``bias_se``);
    * ``bias_se`` :math:`= \sqrt{\operatorname{tr}\hat\Sigma / S} / \|\nabla\|` (noise floor of ``bias``);
    * ``variance`` :math:`= \operatorname{tr}\hat\Sigma / \|\nabla\|^2` (one sample; an average of B samples
      divides it by B);
    * ``max_z`` = largest per-coordinate :math:`|\bar g_i - \nabla_i| / \text{SE}_i` (unbiased: small);
    * ``cosine`` = :math:`\cos(\bar g, \nabla)` (1 = the mean estimate points the right way).
    """
    if grads.dim() != 2 or grads.shape[1:] != exact.shape or grads.shape[0] < 2:
        raise ValueError(f"grads must have shape (samples >= 2, {exact.numel()}), got {tuple(grads.shape)}")
    s, scale = grads.shape[0], exact.norm()
    mean, var = grads.mean(0), grads.var(0)
    se = (var / s).sqrt()
    z = ((mean - exact).abs() / se.clamp_min(1e-12)).where(se > 0, torch.zeros_like(se))
    return dict(bias=float((mean - exact).norm() / scale), bias_se=float((var.sum() / s).sqrt() / scale),
                variance=float(var.sum() / scale**2), max_z=float(z.max()),
                cosine=float(F.cosine_similarity(mean, exact, dim=0)))


def gumbel_max_sample(logits: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""``n`` categorical samples :math:`\arg\max_k (l_k + g_k)`, :math:`g_k = -\log(-\log u_k)`.

    ``u`` is kept inside :math:`[\text{tiny}, 1)` so that :math:`g` is finite. Law: softmax(l).
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (categories), got shape {tuple(logits.shape)}")
    u = torch.rand(n, logits.numel(), generator=generator).clamp_min(torch.finfo(torch.float32).tiny)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    r"""Pearson goodness of fit :math:`X^2 = \sum_k (O_k - E_k)^2 / E_k`, :math:`E_k = n\,p_k`.

    Returns ``(X^2, dof, p_value)`` with ``dof = K - 1`` and the :math:`\chi^2` survival function
    :math:`P(\chi^2_{k} > x) = Q(k/2, x/2)` = ``torch.special.gammaincc``.
    """
    counts, probs = counts.double(), probs.double()
    if counts.shape != probs.shape or counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"counts and probs must be 1-D of the same length >= 2, got {tuple(counts.shape)}, "
                         f"{tuple(probs.shape)}")
    if not torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64)) or (probs <= 0).any():
        raise ValueError("probs must be positive and sum to 1")
    expected = counts.sum() * probs
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, dof, p_value

