r"""Lesson 04: a sequence in which only :math:`K` of :math:`N` tokens carry the signal; free keep logits learn
which tokens to keep, with Gumbel samples at a temperature (fixed or scheduled) or the deterministic
straight-through threshold."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..gumbel import check_tau, sample_keep_mask
from .estimators import _two_class


@dataclass
class SelectionTask:
    r"""``n_tokens`` tokens with values :math:`v \sim N(0, 1)`; the target is
    :math:`y = \sum_{i < K} c_i v_i + \text{noise}\cdot\varepsilon`: only the first ``K = len(signal)``
    tokens carry signal. Free keep logits start at :math:`N(0, \text{init\_std}^2)`, except the signal
    tokens listed in ``low_start``, which start at ``low_logit`` (important tokens that look unimportant).
    """

    n_tokens: int = 64
    signal: tuple = (1.0, 1.0, 0.5, 0.5)
    low_start: tuple = (2, 3)
    low_logit: float = -3.0
    init_std: float = 1.0
    noise: float = 1.0

    def __post_init__(self):
        k = len(self.signal)
        if not (1 <= k < self.n_tokens):
            raise ValueError(f"signal must have 1 to n_tokens - 1 = {self.n_tokens - 1} entries, got {k}")
        if any(not (0 <= i < k) for i in self.low_start):
            raise ValueError(f"low_start must index signal tokens in [0, {k}), got {self.low_start}")

    @property
    def k(self) -> int:
        return len(self.signal)

    def init_logits(self, runs: int, generator: torch.Generator) -> torch.Tensor:
        theta = self.init_std * torch.randn(runs, self.n_tokens, generator=generator)
        theta[:, list(self.low_start)] = self.low_logit
        return theta

    def batch(self, runs: int, size: int, generator: torch.Generator):
        """Values ``v [runs, size, N]`` and targets ``y [runs, size]``."""
        v = torch.randn(runs, size, self.n_tokens, generator=generator)
        c = torch.tensor(self.signal)
        y = (v[..., : self.k] * c).sum(-1) + self.noise * torch.randn(runs, size, generator=generator)
        return v, y


@dataclass
class SelectionRun:
    """History and final state of :func:`train_selection` (``runs`` independent runs in parallel)."""

    keep_prob: torch.Tensor  # [steps + 1, runs, N] keep probabilities after each step (row 0 = init)
    flip_rate: torch.Tensor  # [steps] fraction of sampled mask entries that changed since the last step
    tau: list  # temperature used at each step (nan for the deterministic STE)
    readout: torch.Tensor  # [runs, N] learned read-out weights
    metrics: dict = field(default_factory=dict)


def train_selection(task: SelectionTask, tau: float | Callable[[int], float] | None = 1.0, steps: int = 200,
                    runs: int = 32, batch: int = 16, lr: float = 0.05, sparsity_weight: float = 2.0,
                    seed: int = 0, readout_init: str = "zero") -> SelectionRun:
    r"""Learn keep logits :math:`\theta` and a read-out :math:`a` (init 0) with
    :math:`\hat y = \sum_i m_i a_i v_i`, loss :math:`(\hat y - y)^2 + w_s(\bar p - K/N)^2`, Adam.

    ``tau``: a number (fixed), a callable ``step -> tau`` (schedule) or ``None`` for the deterministic
    straight-through threshold :math:`m = 1[p > 0.5]` (no noise). A dropped token's read-out gets no
    gradient (:math:`m_i = 0`), so without sampling it never learns to use the token.
    ``readout_init="signal"`` starts the read-out at the true coefficients (a downstream model that already reads
    every token, like a language model fine-tuned from the full-token teacher) instead of 0.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    theta = task.init_logits(runs, gen).requires_grad_(True)
    if readout_init not in ("zero", "signal"):
        raise ValueError(f'readout_init must be "zero" or "signal", got {readout_init!r}')
    readout = torch.zeros(runs, task.n_tokens)
    if readout_init == "signal":
        readout[:, : task.k] = torch.tensor(task.signal)
    readout.requires_grad_(True)
    opt = torch.optim.Adam([theta, readout], lr=lr)
    rho = task.k / task.n_tokens
    probs, flips, taus, prev = [torch.sigmoid(theta.detach())], [], [], None
    for step in range(steps):
        v, y = task.batch(runs, batch, gen)
        if tau is None:
            p = torch.sigmoid(theta).unsqueeze(1).expand(-1, batch, -1)
            mask, t = (p > 0.5).float() - p.detach() + p, float("nan")
        else:
            t = check_tau(tau(step) if callable(tau) else tau)
            mask = sample_keep_mask(_two_class(theta).unsqueeze(1).expand(-1, batch, -1, -1), t)
        pred = (mask * readout.unsqueeze(1) * v).sum(-1)
        loss = ((pred - y) ** 2).mean() + sparsity_weight * ((torch.sigmoid(theta).mean(-1) - rho) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m = mask.detach()
        flips.append(float((m != prev).float().mean()) if prev is not None else float("nan"))
        prev, taus = m, taus + [t]
        probs.append(torch.sigmoid(theta.detach()))
    run = SelectionRun(torch.stack(probs), torch.tensor(flips), taus, readout.detach())
    run.metrics = selection_metrics(task, run, gen)
    return run


def selection_metrics(task: SelectionTask, run: SelectionRun, generator: torch.Generator) -> dict:
    """Final selection quality (means over runs): ``top_k_accuracy`` = share of the K signal tokens in the
    top-K, ``recovered`` = share of ``low_start`` tokens in the top-K, ``threshold_exact`` = share of runs
    whose ``p > 0.5`` set is exactly the signal set, ``flip_rate``, ``keep_prob`` (mean), ``test_mse`` of the
    top-K mask with the learned read-out (the noise floor is ``noise**2``)."""
    p = run.keep_prob[-1]
    k = task.k
    top = torch.zeros_like(p).scatter_(-1, p.topk(k, -1).indices, 1.0)
    signal = torch.zeros(task.n_tokens)
    signal[:k] = 1.0
    low = list(task.low_start)
    v, y = task.batch(p.shape[0], 1024, generator)
    mse = ((top.unsqueeze(1) * run.readout.unsqueeze(1) * v).sum(-1) - y).pow(2).mean()
    return dict(top_k_accuracy=float((top * signal).sum(-1).mean() / k),
                recovered=float(top[:, low].mean()) if low else float("nan"),
                threshold_exact=float(((p > 0.5).float() == signal).all(-1).float().mean()),
                flip_rate=float(run.flip_rate[1:].mean()) if len(run.flip_rate) > 1 else float("nan"),
                keep_prob=float(p.mean()), test_mse=float(mse))

