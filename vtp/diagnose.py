r"""``diagnose``: read a pruner-training history and flag the symptoms of the usual mistakes.

Each check compares quantities the training loop logs (see :func:`vtp.train.train_pruner`) and returns a
:class:`Finding` with the evidence, the likely cause and the fix. The symptoms:

* **NaN / inf** in any logged loss component.
* **Masks that are not 0/1** in training (soft masks): the model learns to read information from
  fractional weights that real removal cannot reproduce.
* **Keep-ratio collapse / blow-up**: the final training keep ratio :math:`\bar k` is far below / above the
  target :math:`\rho` (:math:`|\bar k - \rho| >` ``ratio_tol``).
* **Saturation**: most keep probabilities sit outside [0.01, 0.99] while :math:`\bar k` misses the target:
  the sparsity gradient carries :math:`p(1-p)` and has vanished.
* **Train-vs-inference keep gap**: the inference rule keeps a different fraction than training did
  (threshold 0.5 after a mean-probability sparsity loss).
* **Training-graph vs real-removal accuracy gap**: the accuracy the training logs show is higher than
  the validation accuracy with the tokens physically removed (soft masks, zeroed tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Finding", "diagnose", "format_findings"]


@dataclass
class Finding:
    """One flagged symptom: ``symptom`` (short name), ``evidence`` (measured numbers), ``cause``, ``fix``."""

    symptom: str
    evidence: str
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.symptom}] {self.evidence}\n    likely cause: {self.cause}\n    fix: {self.fix}"


def _tail_mean(values, frac: float = 0.1) -> float:
    n = max(1, int(len(values) * frac))
    tail = [float(v) for v in values[-n:]]
    return sum(tail) / len(tail)


def diagnose(history: dict, target_ratio: float | None = None, ratio_tol: float = 0.05, acc_gap_tol: float = 0.03,
             saturation_tol: float = 0.9) -> list[Finding]:
    """Flag the symptoms in ``history`` (a dict of lists as logged by :func:`vtp.train.train_pruner`; the keys
    it uses are ``keep_ratio``, ``keep_prob``, ``target``, ``saturated``, ``train_acc``, ``mask_binary``, the
    loss components, and ``val`` = list of ``{"accuracy", "keep_ratio"}`` measured with real removal).

    ``target_ratio`` defaults to the last logged ``target``. Returns an empty list when nothing is flagged.
    """
    if target_ratio is not None:
        from .pruner import check_ratio

        target_ratio = check_ratio(target_ratio, "target_ratio")
    if not isinstance(history, dict) or not history.get("keep_ratio"):
        raise ValueError("history must be a dict with a non-empty 'keep_ratio' list (see vtp.train.train_pruner)")
    for name, tol in (("ratio_tol", ratio_tol), ("acc_gap_tol", acc_gap_tol), ("saturation_tol", saturation_tol)):
        if not (0 < tol <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {tol}")
    if target_ratio is None:
        if not history.get("target"):
            raise ValueError("target_ratio is required when history has no 'target' list")
        target_ratio = float(history["target"][-1])
    findings = []

    bad = sorted({k for k in ("total", "ce", "distill", "sparsity", "keep_ratio", "keep_prob")
                  for v in history.get(k, []) if not math.isfinite(float(v))})
    if bad:
        findings.append(Finding(
            "NaN", f"non-finite values logged in {', '.join(bad)}",
            "tau too close to 0, fp16 Gumbel sampling, or a learning rate too high for the pruner",
            "keep tau >= 0.1, sample the mask in float32 (vtp.sample_keep_mask does), clip gradients, lower lr"))

    if "mask_binary" in history and not all(history["mask_binary"]):
        share = 1 - sum(map(bool, history["mask_binary"])) / len(history["mask_binary"])
        findings.append(Finding(
            "soft masks", f"the training mask was not exactly 0/1 in {share:.0%} of logged steps",
            "hard=False (or a sigmoid mask): the model reads information from fractional weights that real "
            "removal throws away", "sample with F.gumbel_softmax(..., hard=True) (straight-through)"))

    k = _tail_mean(history["keep_ratio"])
    if k < target_ratio - ratio_tol:
        findings.append(Finding(
            "keep-ratio collapse", f"final training keep ratio {k:.3f} vs target {target_ratio:.3f}",
            "the sparsity term counts more than the visual tokens (text tokens averaged in), its weight is "
            "too high, or a deterministic threshold (no Gumbel noise) let every probability fall below 0.5",
            "average the sparsity term over visual tokens only, per sample; warm up w_s; sample with Gumbel noise"))
    elif k > target_ratio + ratio_tol:
        findings.append(Finding(
            "keep-ratio blow-up", f"final training keep ratio {k:.3f} vs target {target_ratio:.3f}",
            "the sparsity gradient vanished (saturated keep probabilities) or its weight is too low",
            "start keep probabilities near 0.5 (no keep-biased init), avoid a curriculum from 1.0, use the "
            "hard-mask sparsity or a dual-ascent weight"))

    if history.get("saturated"):
        sat = _tail_mean(history["saturated"])
        if sat >= saturation_tol and abs(k - target_ratio) > ratio_tol:
            findings.append(Finding(
                "saturation", f"{sat:.0%} of keep probabilities outside [0.01, 0.99]; keep ratio {k:.3f} "
                f"vs target {target_ratio:.3f}",
                "d(p - rho)^2/dl carries p(1-p): saturated probabilities get no sparsity gradient; top-k "
                "then chooses among ties", "see keep-ratio blow-up; re-initialise the pruner's last layer"))

    # phase 1's validations with the deployment rule (phase 2, if any, trains on that rule directly)
    val = [v for v in history.get("val") or [] if v.get("phase", "gumbel") == "gumbel" and v.get("rule") != "sample"]
    if val:
        last = val[-1]
        gap = abs(float(last["keep_ratio"]) - k)
        if gap > ratio_tol:
            findings.append(Finding(
                "train/inference keep gap", f"inference keeps {last['keep_ratio']:.3f}, training kept {k:.3f}",
                "the inference rule keeps a different number of tokens than training did: threshold 0.5 after "
                "a mean-probability sparsity loss (mean(p) = target does not make the fraction with p > 0.5 "
                "equal the target), or a training keep ratio that missed the target, so that top-k imposes a "
                "budget the model never trained with", "use the top-k budget rule at inference and make the "
                "training keep ratio reach the target (see the other findings)"))
        if history.get("train_acc"):
            train_acc = _tail_mean(history["train_acc"])
            if train_acc - float(last["accuracy"]) > acc_gap_tol:
                findings.append(Finding(
                    "train/removal accuracy gap", f"training graph shows {train_acc:.3f}, real removal gives "
                    f"{last['accuracy']:.3f}", "the training forward is not equivalent to removal: soft masks, "
                    "zeroed tokens (still attended to, positions still counted) or a different keep count",
                    "mask keys in every attention layer with a hard 0/1 policy (vtp.PrunedVLM, mode='policy')"))
    return findings


def format_findings(findings: list[Finding]) -> str:
    """Human-readable report; ``"no symptom flagged"`` when the list is empty."""
    return "\n".join(str(f) for f in findings) if findings else "no symptom flagged"
