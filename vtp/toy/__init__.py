r"""Toy problems for the theory lessons: small enough to enumerate or to train in seconds on a CPU.

One module per lesson; every name is importable from ``vtp.toy``.

* ``estimators`` (lesson 01): :class:`MaskObjective`, :math:`N` independent keep decisions
  :math:`m_i \sim \text{Bernoulli}(\sigma(\theta_i))` and a loss :math:`f(m)` whose expected value
  :math:`\mathbb{E}_{m}[f(m)] = \sum_{m \in \{0,1\}^N} \prod_i p_i^{m_i}(1-p_i)^{1-m_i} f(m)` is computed
  exactly by enumerating the :math:`2^N` masks, so every gradient estimator can be compared with the truth;
  :func:`gumbel_max_sample`, :func:`chi_square_test`, the Gumbel-max trick and a goodness-of-fit test written
  with ``torch.special.gammaincc`` (no SciPy).
* ``importance`` (lesson 03): :func:`importance_batch`, :func:`train_importance_pruner`, a
  :class:`vtp.GumbelVisionPruner` trained on random tokens whose "importance" is partly predictable from their
  features, with the sparsity terms of :class:`vtp.PruningLoss`.
* ``selection`` (lesson 04): :class:`SelectionTask`, :func:`train_selection`, a sequence in which only :math:`K`
  of :math:`N` tokens carry the signal; free keep logits learn which tokens to keep.
* ``two_phase`` (lesson 04, section 5): :class:`RedundantTask`, :func:`train_two_phase`, evidence repeated across
  tokens; a read-out trained on Bernoulli masks meets top-k at deployment, and a phase through top-k closes the
  gap. :func:`train_question_scorer`: the same with two questions, a question-blind or question-aware scorer.
"""
from .estimators import ESTIMATORS, MaskObjective, bias_variance, chi_square_test, gumbel_max_sample
from .importance import importance_batch, importance_report, train_importance_pruner
from .selection import SelectionRun, SelectionTask, selection_metrics, train_selection  # noqa: F401
from .two_phase import RedundantTask, train_question_scorer, train_two_phase

__all__ = [
    "ESTIMATORS", "MaskObjective", "bias_variance", "gumbel_max_sample", "chi_square_test",
    "importance_batch", "train_importance_pruner", "importance_report", "SelectionTask", "train_selection",
    "RedundantTask", "train_two_phase", "train_question_scorer",
]
