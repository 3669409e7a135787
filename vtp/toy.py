r"""Toy problems for the theory lessons: small enough to enumerate or to train in seconds on a CPU.

* :class:`MaskObjective` (lesson 01): :math:`N` independent keep decisions
  :math:`m_i \sim \text{Bernoulli}(\sigma(\theta_i))` and a loss :math:`f(m)` whose expected value
  :math:`\mathbb{E}_{m}[f(m)] = \sum_{m \in \{0,1\}^N} \prod_i p_i^{m_i}(1-p_i)^{1-m_i} f(m)` is computed
  exactly by enumerating the :math:`2^N` masks, so every gradient estimator can be compared with the truth.
* :func:`gumbel_max_sample`, :func:`chi_square_test` (lesson 01): the Gumbel-max trick and a
  goodness-of-fit test written with ``torch.special.gammaincc`` (no SciPy).
* :func:`importance_batch`, :func:`train_importance_pruner` (lesson 03): a :class:`vtp.GumbelVisionPruner`
  trained on random tokens whose "importance" is partly predictable from their features, with the
  sparsity terms of :class:`vtp.PruningLoss`.
* :class:`SelectionTask`, :func:`train_selection` (lesson 04): a sequence in which only :math:`K` of
  :math:`N` tokens carry the signal; free keep logits learn which tokens to keep.
* :class:`RedundantTask`, :func:`train_two_phase` (lesson 04, section 5): evidence repeated across tokens; a
  read-out trained on Bernoulli masks meets top-k at deployment, and a phase through top-k closes the gap.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .gumbel import check_tau, sample_keep_mask
from .losses import DualAscentController, PruningLoss, visual_keep_ratio
from .pruner import GumbelVisionPruner, check_ratio, threshold_keep_mask, topk_keep_mask, topk_straight_through
from .schedules import get_temperature

__all__ = [
    "ESTIMATORS", "MaskObjective", "bias_variance", "gumbel_max_sample", "chi_square_test",
    "importance_batch", "train_importance_pruner", "importance_report", "SelectionTask", "train_selection",
    "RedundantTask", "train_two_phase", "train_question_scorer",
]

ESTIMATORS = ("reinforce", "ste", "gumbel_soft", "gumbel_hard")


def _two_class(theta: torch.Tensor) -> torch.Tensor:
    """``[drop, keep]`` logits ``[..., 2] = [0, θ]`` for keep logits θ (so ``p_keep = σ(θ)``)."""
    return torch.stack([torch.zeros_like(theta), theta], dim=-1)


# --------------------------------------------------------------------------------------------- lesson 01
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


# --------------------------------------------------------------------------------------------- lesson 03
def importance_batch(direction: torch.Tensor, batch: int, tokens: int, noise: float = 1.0,
                     generator: torch.Generator | None = None):
    r"""Random tokens ``x [B, N, d] ~ N(0, 1)`` and their importance
    :math:`u = \operatorname{relu}(x \cdot w^* / \sqrt d + \text{noise}\cdot\varepsilon)`, ``[B, N]``.

    ``noise`` is the part of the importance a scorer cannot see in the features (0 = fully predictable).
    """
    d = direction.numel()
    x = torch.randn(batch, tokens, d, generator=generator)
    u = torch.relu(x @ direction / math.sqrt(d) + noise * torch.randn(batch, tokens, generator=generator))
    return x, u


def train_importance_pruner(direction: torch.Tensor, target_ratio: float = 0.25, sparsity: str = "ratio",
                            sparsity_weight: float = 20.0, binarize_weight: float = 0.0, text_tokens: int = 0,
                            visual_only: bool = True, dual_lr: float | None = None, noise: float = 1.0,
                            steps: int = 300, batch: int = 32, tokens: int = 64, lr: float = 1e-2,
                            tau: float = 1.0, seed: int = 0, optimizer: str = "adam",
                            target_schedule: Callable[[int], float] | None = None, penalty_with_dual: bool = False):
    r"""Train a :class:`vtp.GumbelVisionPruner` on :func:`importance_batch` tokens; return ``(pruner, ratios)``.

    Task surrogate: the importance lost by dropping, :math:`\frac1{BN}\sum u\,(1 - m)` with the hard Gumbel
    mask :math:`m`. Sparsity: the ``sparsity`` / ``binarize`` terms of :class:`vtp.PruningLoss` (its CE is
    a constant here: the toy has no language model). ``text_tokens`` always-kept tokens are appended to the
    keep probabilities; ``visual_only=False`` forgets the ``visual_mask`` (the pitfall). ``dual_lr`` replaces
    the fixed weight by a :class:`vtp.DualAscentController` (``penalty_with_dual=True`` keeps the fixed-weight
    term next to it, as lesson 07's recipe does). ``target_schedule(step)`` overrides the target
    per step (a ratio curriculum); ``optimizer`` is ``"adam"`` or ``"sgd"``. ``ratios`` = per-step visual keep
    ratio (mean keep probability).
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f'optimizer must be "adam" or "sgd", got {optimizer!r}')
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pruner = GumbelVisionPruner(direction.numel(), reduction=1, norm=False).train()  # unit-scale toy tokens: the seed scorer
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(pruner.parameters(), lr=lr)
    loss_fn = PruningLoss(target_ratio, distill_weight=0.0, sparsity_weight=0.0 if dual_lr and not penalty_with_dual else sparsity_weight,
                          sparsity=sparsity, binarize_weight=binarize_weight, shift_labels=False)
    controller = DualAscentController(target_ratio, lr=dual_lr) if dual_lr else None
    const_logits, const_labels = torch.zeros(batch, 1, 2), torch.zeros(batch, 1, dtype=torch.long)  # CE = log 2
    visual = torch.cat([torch.ones(batch, tokens), torch.zeros(batch, text_tokens)], 1).bool()
    ratios = []
    for step in range(steps):
        x, u = importance_batch(direction, batch, tokens, noise, gen)
        out = pruner(x, tau=tau)
        task = (u * (1 - out.mask)).mean()
        keep_prob = torch.cat([out.keep_prob, torch.ones(batch, text_tokens)], 1)
        target = None if target_schedule is None else target_schedule(step)
        extra, _ = loss_fn(const_logits, const_labels, keep_prob, visual_mask=visual if visual_only else None,
                           target_ratio=target)
        loss = task + extra
        visual_ratio = visual_keep_ratio(out.keep_prob)
        if controller is not None:
            loss = loss + controller.penalty(visual_ratio)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if controller is not None:
            controller.update(visual_ratio.detach())
        ratios.append(float(visual_ratio.detach().mean()))
    return pruner.eval(), ratios


@torch.no_grad()
def importance_report(pruner: GumbelVisionPruner, direction: torch.Tensor, target_ratio: float, noise: float = 1.0,
                      batch: int = 64, tokens: int = 64, seed: int = 123) -> dict:
    r"""Deterministic (eval-mode) behaviour of a trained pruner on a fresh batch.

    ``mean_p`` = mean keep probability, ``above_half`` = fraction with :math:`p > 0.5`, ``binarity`` = mean
    :math:`p(1-p)` (0 = all decisions certain), ``kept_threshold`` / ``kept_topk`` = fraction kept by the
    threshold rule / by top-k at ``target_ratio``, ``recall_*`` = share of the total importance they keep.
    """
    target_ratio = check_ratio(target_ratio, "target_ratio")
    x, u = importance_batch(direction, batch, tokens, noise, torch.Generator().manual_seed(seed))
    p = pruner.eval()(x).keep_prob
    thr = threshold_keep_mask(p, 0.5)
    top = topk_keep_mask(p, target_ratio)
    recall = lambda m: float((u * m).sum() / u.sum())
    return dict(mean_p=float(p.mean()), above_half=float((p > 0.5).float().mean()), binarity=float((p * (1 - p)).mean()),
                kept_threshold=float(thr.mean()), kept_topk=float(top.mean()),
                recall_threshold=recall(thr), recall_topk=recall(top))


# --------------------------------------------------------------------------------------------- lesson 04
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


# --------------------------------------------------------------------------------------------- lesson 04, section 5
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
    if phase2 not in ("topk", "sample"):
        raise ValueError(f'phase2 must be "topk" or "sample", got {phase2!r}')
    for name, value in (("phase1_steps", phase1_steps), ("phase2_steps", phase2_steps)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if phase1_steps < 1:
        raise ValueError(f"phase1_steps must be >= 1, got {phase1_steps}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    theta = torch.randn(runs, task.n_tokens, generator=gen).requires_grad_(True)
    readout = torch.zeros(runs, task.n_tokens, requires_grad=True)
    opt = torch.optim.Adam([{"params": [theta]}, {"params": [readout]}], lr=lr)
    rho = task.ratio
    cycle = tuple(check_ratio(r, "phase2_ratios") for r in phase2_ratios) if phase2_ratios else (rho,)
    hist = dict(step=[], deployed_mse=[], sampled_mse=[], coverage=[], keep_ratio=[])

    def deployed(ratio, v, y):
        top = topk_keep_mask(torch.sigmoid(theta.detach()), ratio).unsqueeze(1)
        return top, float(((top * readout.detach().unsqueeze(1) * v).sum(-1) - y).pow(2).mean())

    def evaluate(step):
        eval_gen = torch.Generator().manual_seed(seed + 10_000)
        p = torch.sigmoid(theta.detach())
        v, y = task.batch(runs, 256, eval_gen)
        top = topk_keep_mask(p, rho).unsqueeze(1)
        sampled = torch.bernoulli(p.unsqueeze(1).expand_as(v), generator=eval_gen)
        err = lambda m: float(((m * readout.detach().unsqueeze(1) * v).sum(-1) - y).pow(2).mean())
        for key, value in (("step", step), ("deployed_mse", err(top)), ("sampled_mse", err(sampled)),
                           ("coverage", float(task.coverage(top.squeeze(1)).mean())), ("keep_ratio", float(p.mean()))):
            hist[key].append(value)

    evaluate(0)
    for step in range(phase1_steps + phase2_steps):
        v, y = task.batch(runs, batch, gen)
        if step < phase1_steps or phase2 == "sample":
            tau = get_temperature(min(step, phase1_steps - 1), phase1_steps, 5.0, 0.1)
            mask = sample_keep_mask(_two_class(theta).unsqueeze(1).expand(-1, batch, -1, -1), tau)
            p = torch.sigmoid(theta)
            ramp = min(1.0, max(0.0, 2.0 * (step + 1) / phase1_steps - 1.0))
            extra = sparsity_weight * ((p.mean(-1) - rho) ** 2).mean() + binarize_weight * ramp * (p * (1 - p)).mean()
        else:
            opt.param_groups[0]["lr"] = phase2_pruner_lr
            ratio = cycle[(step - phase1_steps) % len(cycle)]
            mask, extra = topk_straight_through(_two_class(theta), ratio).unsqueeze(1), 0.0
        loss = ((mask * readout.unsqueeze(1) * v).sum(-1) - y).pow(2).mean() + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0:
            evaluate(step + 1)
    v, y = task.batch(runs, 256, torch.Generator().manual_seed(seed + 20_000))
    hist["final_mse"] = {float(r): deployed(check_ratio(r, "eval_ratios"), v, y)[1] for r in eval_ratios}
    return hist


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
