r"""Lesson 04, section 5: evidence repeated across tokens (:class:`RedundantTask`). A read-out trained on
Bernoulli masks meets top-k at deployment (:func:`train_two_phase`), and a phase through top-k closes the gap;
:func:`train_question_scorer` adds a question that decides which evidence matters."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gumbel import sample_keep_mask
from ..pruner import check_ratio, topk_keep_mask, topk_straight_through
from ..schedules import get_temperature
from .estimators import _two_class


@dataclass
class RedundantTask:
    r"""Evidence repeated across tokens, as neighbouring patches of one object repeat it.

    ``n_latent`` latent values :math:`z_j \sim N(0, 1)`, target :math:`y = \sum_j z_j + \text{noise}\cdot\varepsilon`.
    Each latent is seen by ``copies`` tokens :math:`v = z_j + \text{token\_noise}\cdot\varepsilon'` (tokens
    ``j * copies ... (j + 1) * copies - 1``); the other tokens are pure noise. A budget of ``n_latent`` tokens
    suffices when it keeps one copy of each latent.
    """

    n_tokens: int = 16
    n_latent: int = 4
    copies: int = 2
    token_noise: float = 0.5
    noise: float = 0.5

    def __post_init__(self):
        if self.n_latent < 1 or self.copies < 1 or self.n_latent * self.copies > self.n_tokens:
            raise ValueError(f"need 1 <= n_latent * copies <= n_tokens, got {self.n_latent} x {self.copies} "
                             f"and {self.n_tokens}")

    @property
    def ratio(self) -> float:
        """The budget that keeps one copy of each latent: ``n_latent / n_tokens``."""
        return self.n_latent / self.n_tokens

    def batch(self, runs: int, size: int, generator: torch.Generator):
        """Values ``v [runs, size, N]`` and targets ``y [runs, size]``."""
        n_ev = self.n_latent * self.copies
        z = torch.randn(runs, size, self.n_latent, generator=generator)
        v = torch.randn(runs, size, self.n_tokens, generator=generator)
        v[..., :n_ev] = z.repeat_interleave(self.copies, -1) + self.token_noise * torch.randn(
            runs, size, n_ev, generator=generator)
        y = z.sum(-1) + self.noise * torch.randn(runs, size, generator=generator)
        return v, y

    def coverage(self, mask: torch.Tensor) -> torch.Tensor:
        """Per run, the share of latents of which ``mask [runs, N]`` keeps at least one copy."""
        n_ev = self.n_latent * self.copies
        return (mask[..., :n_ev].unflatten(-1, (self.n_latent, self.copies)).sum(-1) > 0).float().mean(-1)


def train_two_phase(task: RedundantTask, phase1_steps: int = 200, phase2_steps: int = 100, phase2: str = "topk",
                    runs: int = 32, batch: int = 16, lr: float = 0.05, phase2_pruner_lr: float = 0.005,
                    sparsity_weight: float = 2.0, binarize_weight: float = 0.0, eval_every: int = 10,
                    seed: int = 0, phase2_ratios: tuple | None = None, eval_ratios: tuple = ()) -> dict:
    r"""Free keep logits :math:`\theta` and a read-out :math:`a` (init 0), :math:`\hat y = \sum_i m_i a_i v_i`,
    trained with Adam in two phases (``runs`` independent runs in parallel).

    Phase 1 (``phase1_steps``): the method's training law, hard Gumbel samples :math:`m \sim
    \text{Bernoulli}(\sigma(\theta))` with :math:`\tau` annealed 5 -> 0.1, loss :math:`(\hat y - y)^2 +
    w_s(\bar p - \rho)^2` at :math:`\rho` = ``task.ratio``. Phase 2 (``phase2_steps``): ``"topk"`` trains through
    the deployment rule, the top-k mask with the straight-through surrogate of
    :func:`vtp.pruner.topk_straight_through` (the keep logits at ``phase2_pruner_lr``, no sparsity term: top-k
    fixes the count); ``"sample"`` continues phase 1 at :math:`\tau = 0.1` (same number of steps, the control).
    ``binarize_weight`` :math:`w_b` adds :math:`w_b(t)\,\overline{p(1-p)}` to the sampled steps, ramped linearly
    from 0 at the middle of phase 1 to :math:`w_b` at its end (the binarization ramp of lesson 07's recipe).

    ``phase2_ratios`` makes the top-k phase cycle through several budgets, one per step (budget cycling: one
    model for every budget); the phase-1 target stays ``task.ratio``.

    Returns ``dict(step, deployed_mse, sampled_mse, coverage, keep_ratio)``, lists evaluated every ``eval_every``
    steps on a fixed batch: the error with the deterministic top-k mask (deployment) and with Bernoulli samples of
    the keep probabilities (the training law), the share of latents top-k covers and the mean keep probability;
    plus ``final_mse``, ``{ratio: deployed error at the end}`` for each of ``eval_ratios``.
    """
    _check_phases(phase2, phase1_steps, phase2_steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    theta = torch.randn(runs, task.n_tokens, generator=gen).requires_grad_(True)
    readout = torch.zeros(runs, task.n_tokens, requires_grad=True)
    opt = torch.optim.Adam([{"params": [theta]}, {"params": [readout]}], lr=lr)
    rho = task.ratio
    cycle = tuple(check_ratio(r, "phase2_ratios") for r in phase2_ratios) if phase2_ratios else (rho,)
    hist = dict(step=[], deployed_mse=[], sampled_mse=[], coverage=[], keep_ratio=[])
    _record(hist, 0, task, theta, readout, seed)
    for step in range(phase1_steps + phase2_steps):
        v, y = task.batch(runs, batch, gen)
        if step < phase1_steps or phase2 == "sample":
            mask, extra = _sampled_mask(theta, batch, step, phase1_steps, rho, sparsity_weight, binarize_weight)
        else:
            opt.param_groups[0]["lr"] = phase2_pruner_lr
            ratio = cycle[(step - phase1_steps) % len(cycle)]
            mask, extra = topk_straight_through(_two_class(theta), ratio).unsqueeze(1), 0.0
        loss = ((mask * readout.unsqueeze(1) * v).sum(-1) - y).pow(2).mean() + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0:
            _record(hist, step + 1, task, theta, readout, seed)
    v, y = task.batch(runs, 256, torch.Generator().manual_seed(seed + 20_000))
    hist["final_mse"] = {float(r): _error(_deployed(theta, check_ratio(r, "eval_ratios")), readout, v, y)
                         for r in eval_ratios}
    return hist


def _check_phases(phase2: str, phase1_steps: int, phase2_steps: int):
    """``ValueError`` unless ``phase2`` is ``"topk"`` or ``"sample"``, ``phase1_steps`` an int >= 1 and
    ``phase2_steps`` an int >= 0."""
    if phase2 not in ("topk", "sample"):
        raise ValueError(f'phase2 must be "topk" or "sample", got {phase2!r}')
    for name, value in (("phase1_steps", phase1_steps), ("phase2_steps", phase2_steps)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if phase1_steps < 1:
        raise ValueError(f"phase1_steps must be >= 1, got {phase1_steps}")


def _sampled_mask(theta, batch: int, step: int, phase1_steps: int, rho: float, sparsity_weight: float,
                  binarize_weight: float):
    r"""The training law of phase 1 at ``step``: hard Gumbel masks ``[runs, batch, N]`` of the keep logits at
    :math:`\tau` annealed 5 -> 0.1 over phase 1 (held at 0.1 after it), and the penalty
    :math:`w_s(\bar p - \rho)^2 + w_b\,r(t)\,\overline{p(1-p)}` with the ramp :math:`r(t)` going from 0 at the
    middle of phase 1 to 1 at its end. Returns ``(mask, penalty)``."""
    tau = get_temperature(min(step, phase1_steps - 1), phase1_steps, 5.0, 0.1)
    mask = sample_keep_mask(_two_class(theta).unsqueeze(1).expand(-1, batch, -1, -1), tau)
    p = torch.sigmoid(theta)
    ramp = min(1.0, max(0.0, 2.0 * (step + 1) / phase1_steps - 1.0))
    return mask, sparsity_weight * ((p.mean(-1) - rho) ** 2).mean() + binarize_weight * ramp * (p * (1 - p)).mean()


def _deployed(theta, ratio: float) -> torch.Tensor:
    r"""The deployment rule's mask ``[runs, 1, N]``: top-k of the keep probabilities :math:`\sigma(\theta)` at
    ``ratio``."""
    return topk_keep_mask(torch.sigmoid(theta.detach()), ratio).unsqueeze(1)


def _error(mask, readout, v, y) -> float:
    r"""Mean squared error :math:`\overline{(\sum_i m_i a_i v_i - y)^2}` of the read-out ``readout`` [runs, N] on the
    kept tokens (``mask`` broadcast against ``v`` [runs, size, N])."""
    return float(((mask * readout.detach().unsqueeze(1) * v).sum(-1) - y).pow(2).mean())


def _record(hist: dict, step: int, task: RedundantTask, theta, readout, seed: int):
    """Append ``step``'s evaluation to ``hist``, on a fixed batch (seed ``seed + 10_000``): the error with the top-k
    mask at ``task.ratio`` (deployment) and with Bernoulli samples of the keep probabilities (the training law), the
    share of latents top-k covers and the mean keep probability."""
    eval_gen = torch.Generator().manual_seed(seed + 10_000)
    p = torch.sigmoid(theta.detach())
    v, y = task.batch(theta.shape[0], 256, eval_gen)
    top = _deployed(theta, task.ratio)
    sampled = torch.bernoulli(p.unsqueeze(1).expand_as(v), generator=eval_gen)
    for key, value in (("step", step), ("deployed_mse", _error(top, readout, v, y)),
                       ("sampled_mse", _error(sampled, readout, v, y)),
                       ("coverage", float(task.coverage(top.squeeze(1)).mean())), ("keep_ratio", float(p.mean()))):
        hist[key].append(value)


def train_question_scorer(task: RedundantTask, question_aware: bool, phase1_steps: int = 200, phase2_steps: int = 100,
                          runs: int = 32, batch: int = 16, lr: float = 0.05, phase2_pruner_lr: float = 0.005,
                          sparsity_weight: float = 2.0, seed: int = 0) -> dict:
    r"""Two question types over :class:`RedundantTask` tokens: question 0 asks for the sum of the first half of the
    latents, question 1 for the second half, and the budget keeps one copy of each latent *one* question needs
    (``n_latent / 2`` tokens). The read-out is per question (the downstream model reads the question); the keep
    logits are per question when ``question_aware`` (a scorer that reads the question), shared otherwise.

    Same two phases as :func:`train_two_phase` (hard Gumbel masks with :math:`\tau` 5 -> 0.1, then top-k with the
    straight-through surrogate). Returns ``dict(mse=[per question], coverage=[per question])`` with the
    deployed top-k mask on a fixed batch: the error and the share of the latents each question needs that the
    kept tokens cover.
    """
    if task.n_latent % 2:
        raise ValueError(f"n_latent must be even (two questions), got {task.n_latent}")
    half, n_ev = task.n_latent // 2, task.n_latent * task.copies
    rho = half / task.n_tokens
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    theta = torch.randn(runs, 2 if question_aware else 1, task.n_tokens, generator=gen).requires_grad_(True)
    readout = torch.zeros(runs, 2, task.n_tokens, requires_grad=True)
    opt = torch.optim.Adam([{"params": [theta]}, {"params": [readout]}], lr=lr)
    rows = torch.arange(runs).unsqueeze(1)

    def draw(size, generator):
        v, _ = task.batch(runs, size, generator)  # tokens; the latents are recovered from a fresh draw below
        z = torch.randn(runs, size, task.n_latent, generator=generator)
        v[..., :n_ev] = z.repeat_interleave(task.copies, -1) + task.token_noise * torch.randn(
            runs, size, n_ev, generator=generator)
        q = torch.randint(0, 2, (runs, size), generator=generator)
        y = torch.where(q == 0, z[..., :half].sum(-1), z[..., half:].sum(-1)) + task.noise * torch.randn(
            runs, size, generator=generator)
        return v, y, q

    def pick(q):  # keep logits [runs, size, N] and read-out [runs, size, N] of each sample's question
        return theta[rows, q if question_aware else torch.zeros_like(q)], readout[rows, q]

    for step in range(phase1_steps + phase2_steps):
        v, y, q = draw(batch, gen)
        logits, a = pick(q)
        if step < phase1_steps:
            mask = sample_keep_mask(_two_class(logits), get_temperature(step, phase1_steps, 5.0, 0.1))
            extra = sparsity_weight * ((torch.sigmoid(theta).mean(-1) - rho) ** 2).mean()
        else:
            opt.param_groups[0]["lr"] = phase2_pruner_lr
            mask, extra = topk_straight_through(_two_class(logits), rho), 0.0
        loss = ((mask * a * v).sum(-1) - y).pow(2).mean() + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        v, y, q = draw(512, torch.Generator().manual_seed(seed + 10_000))
        logits, a = pick(q)
        top = topk_keep_mask(torch.sigmoid(logits), rho)
        err = ((top * a * v).sum(-1) - y).pow(2)
        kept = top[..., :n_ev].unflatten(-1, (task.n_latent, task.copies)).sum(-1) > 0  # [runs, size, latents]
        need = torch.where(q.unsqueeze(-1) == 0, kept[..., :half], kept[..., half:]).float().mean(-1)
        return dict(mse=[float(err[q == k].mean()) for k in (0, 1)], coverage=[float(need[q == k].mean()) for k in (0, 1)])
