r"""``diagnose``: read a pruner-training history and flag the symptoms of the usual mistakes.

Each check compares quantities the training loop logs (see :func:`vtp.train.train_pruner`) and returns a
:class:`Finding` with the evidence, the likely cause and the fix. The fixes are read against the run's own
recipe (``history["config"]``, the :class:`vtp.PrunerConfig` as a dict): a fix the run already has is never
proposed (without a config every candidate fix is listed). The symptoms, with :math:`\bar k` the final
training keep ratio (mean of the last 10% of logged steps) and :math:`\rho` the target:

* **NaN / inf** in any logged loss component.
* **Masks that are not 0/1** in training (soft masks): the model learns to read information from
  fractional weights that real removal cannot reproduce.
* **Keep-ratio collapse / blow-up**: :math:`|\bar k - \rho| > \epsilon\,\rho` (``ratio_tol`` = :math:`\epsilon`,
  RELATIVE to the target: at :math:`\rho = 4/64` a training keep ratio of 0.030 or 0.016 is a symptom).
* **Saturation**: most keep probabilities sit outside [0.01, 0.99] while :math:`\bar k` misses the target:
  the sparsity gradient carries :math:`p(1-p)` and has vanished.
* **Train-vs-inference keep gap**: the inference rule keeps a different fraction than training did
  (threshold 0.5 after a mean-probability sparsity loss), same relative tolerance.
* **Sampled-mask vs top-k gap** (the mask law): phase 1 trains on Bernoulli(:math:`p`) masks; a validation
  with ``rule="sample"`` (that law) beats the deterministic deployment rule at the same step by more than
  ``acc_gap_tol``. The language model never trained on top-k masks; phase 2 (``adapt_steps``) trains it
  through them. With phase 2 in the run, its best validation (``history["adapt_best"]``) must close the gap.
* **Training-graph vs real-removal accuracy gap**: the accuracy the training logs show exceeds the
  validation accuracy with the tokens physically removed (soft masks, zeroed tokens, or the mask law).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Finding", "diagnose", "format_findings"]

DEPLOYMENT_RULES = ("topk", "threshold")


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


def _fixes(config: dict | None, candidates) -> str:
    """Join the fixes whose condition the run's ``config`` does not already satisfy. ``candidates`` =
    ``[(text, has_it)]`` with ``has_it(config) -> bool``; without a config every fix is listed."""
    todo = [text for text, has_it in candidates if config is None or not has_it(config)]
    return "; ".join(todo) if todo else "the run already has every listed fix: train longer or check the data"


def _get(config: dict, key, default=None):
    return config.get(key, default)


def _phase2_accuracy(history: dict) -> float | None:
    """Accuracy of the state phase 2 ended in (its best validation), or None without phase 2 validations."""
    best = history.get("adapt_best")
    if isinstance(best, dict) and best.get("accuracy") is not None:
        return float(best["accuracy"])
    accs = [float(v["accuracy"]) for v in history.get("val") or [] if v.get("phase") == "adapt"]
    return max(accs) if accs else None


def _mask_law_gap(history, config, acc_gap_tol) -> Finding | None:
    """Sampled masks (``rule="sample"``) vs the deployment rule at the same phase-1 step."""
    val = [v for v in history.get("val") or [] if v.get("phase", "gumbel") == "gumbel"]
    samples = [v for v in val if v.get("rule") == "sample"]
    if not samples:
        return None
    s = samples[-1]
    same_step = [v for v in val if v.get("rule") in DEPLOYMENT_RULES and v.get("step") == s.get("step")]
    if not same_step:
        return None
    d = same_step[-1]
    gap = float(s["accuracy"]) - float(d["accuracy"])
    if gap <= acc_gap_tol:
        return None
    evidence = (f"at step {s.get('step')}, Bernoulli(p) masks (the training law) give {s['accuracy']:.3f}, "
                f"{d['rule']} gives {d['accuracy']:.3f}")
    cause = ("phase 1 trains the language model on sampled masks, which mix a few low-p tokens into every "
             "sample; the deterministic rule never keeps those, so inference meets a mask law training never showed")
    adapted = _phase2_accuracy(history)
    if config is not None and _get(config, "adapt_steps", 0) > 0:
        if adapted is not None and float(s["accuracy"]) - adapted <= acc_gap_tol:
            return None  # the run has phase 2 and it closed the gap
        evidence += f"; phase 2 reached {adapted:.3f}" if adapted is not None else "; phase 2 was not validated"
        fix = _fixes(config, [
            ("train the pruner through the rule in phase 2 as well (adapt_pruner=True)",
             lambda c: _get(c, "adapt_pruner", False)),
            ("validate phase 2 (eval_every > 0) so it ends in its best state", lambda c: _get(c, "eval_every", 0) > 0),
            (f"more phase-2 steps (adapt_steps > {_get(config, 'adapt_steps')})", lambda c: False)])
        return Finding("sampled-mask vs top-k gap", evidence, cause + "; phase 2 has not closed it yet", fix)
    fix = ("phase 2: train the language model (and the pruner, adapt_pruner=True) through the deployment rule "
           "itself (adapt_steps > 0, as vtp.pruner_recipe does)")
    return Finding("sampled-mask vs top-k gap", evidence, cause, fix)


def _removal_gap(history, config, last, acc_gap_tol) -> Finding | None:
    """What the training graph shows vs the phase-1 validation with real removal."""
    if not history.get("train_acc"):
        return None
    train_acc = _tail_mean(history["train_acc"])
    if train_acc - float(last["accuracy"]) <= acc_gap_tol:
        return None
    adapted = _phase2_accuracy(history)
    if adapted is not None and train_acc - adapted <= acc_gap_tol:
        return None  # phase 2 closed it
    evidence = f"training graph shows {train_acc:.3f}, real removal gives {last['accuracy']:.3f}"
    if adapted is not None:
        evidence += f" ({adapted:.3f} after phase 2)"
    fix = _fixes(config, [
        ("sample hard 0/1 masks (F.gumbel_softmax(..., hard=True))", lambda c: _get(c, "sampler") != "soft"),
        ("mask keys in every attention layer instead of zeroing tokens (apply='policy')",
         lambda c: _get(c, "apply") == "policy"),
        ("phase 2: train through the deployment rule (adapt_steps > 0, adapt_pruner=True)",
         lambda c: _get(c, "adapt_steps", 0) > 0 and _get(c, "adapt_pruner", False))])
    return Finding("train/removal accuracy gap", evidence,
                   "the training forward is not the inference forward: soft masks, zeroed tokens (still attended "
                   "to, positions still counted), or sampled masks where inference applies a deterministic rule",
                   fix)


def _check_arguments(history, target_ratio, tolerances: dict) -> tuple[float, dict | None]:
    """Validated ``(target_ratio, config)`` of :func:`diagnose`'s arguments."""
    if target_ratio is not None:
        from .pruner import check_ratio

        target_ratio = check_ratio(target_ratio, "target_ratio")
    if not isinstance(history, dict) or not history.get("keep_ratio"):
        raise ValueError("history must be a dict with a non-empty 'keep_ratio' list (see vtp.train.train_pruner)")
    for name, tol in tolerances.items():
        if not (isinstance(tol, (int, float)) and 0 < tol <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {tol}")
    if target_ratio is None:
        if not history.get("target"):
            raise ValueError("target_ratio is required when history has no 'target' list")
        target_ratio = float(history["target"][-1])
    config = history.get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"history['config'] must be a dict (dataclasses.asdict of a PrunerConfig), got {config!r}")
    return target_ratio, config


def _nonfinite(history, config) -> Finding | None:
    bad = sorted({k for k in ("total", "ce", "distill", "sparsity", "keep_ratio", "keep_prob")
                  for v in history.get(k, []) if not math.isfinite(float(v))})
    if not bad:
        return None
    return Finding(
        "NaN", f"non-finite values logged in {', '.join(bad)}",
        "tau too close to 0, fp16 Gumbel sampling, or a learning rate too high for the pruner",
        _fixes(config, [("keep tau >= 0.1", lambda c: _get(c, "min_temp", 0) >= 0.1),
                        ("sample the mask in float32 (vtp.sample_keep_mask does)", lambda c: False),
                        ("clip gradients", lambda c: _get(c, "grad_clip", 0) > 0),
                        ("lower the learning rates", lambda c: False)]))


def _soft_masks(history) -> Finding | None:
    if "mask_binary" not in history or all(history["mask_binary"]):
        return None
    share = 1 - sum(map(bool, history["mask_binary"])) / len(history["mask_binary"])
    return Finding(
        "soft masks", f"the training mask was not exactly 0/1 in {share:.0%} of logged steps",
        "hard=False (or a sigmoid mask): the model reads information from fractional weights that real "
        "removal throws away", "sample with F.gumbel_softmax(..., hard=True) (straight-through)")


_CONTROLLER = ("a dual-ascent controller on the keep ratio (controller_lr > 0)", lambda c: _get(c, "controller_lr", 0) > 0)


def _keep_ratio_off(k: float, target_ratio: float, tol: float, config) -> Finding | None:
    """Training keep ratio ``k`` below (collapse) or above (blow-up) the target by more than ``tol``."""
    if k < target_ratio - tol:
        return Finding(
            "keep-ratio collapse", f"final training keep ratio {k:.3f} vs target {target_ratio:.3f}",
            "the sparsity term counts more than the visual tokens (text tokens averaged in), its weight is "
            "too high, or a deterministic threshold (no Gumbel noise) let every probability fall below 0.5",
            _fixes(config, [
                ("average the sparsity term over visual tokens only, per sample",
                 lambda c: _get(c, "sparsity_scope") == "visual" and _get(c, "loss_form", "vtp") == "vtp"),
                ("warm up the sparsity weight", lambda c: _get(c, "sparsity_warmup", 0) > 0),
                ("sample with Gumbel noise", lambda c: _get(c, "sampler") == "gumbel"),
                _CONTROLLER]))
    if k > target_ratio + tol:
        return Finding(
            "keep-ratio blow-up", f"final training keep ratio {k:.3f} vs target {target_ratio:.3f}",
            "the sparsity gradient vanished (saturated keep probabilities) or its weight is too low",
            _fixes(config, [
                ("start keep probabilities near 0.5 (keep_bias 0)", lambda c: _get(c, "keep_bias", 0) <= 0),
                ("LayerNorm the scorer's input (pruner_norm=True)", lambda c: _get(c, "pruner_norm", False)),
                ("no curriculum from keep 1.0 (ratio_start near the target)", lambda c: _get(c, "ratio_start", 1) < 1),
                _CONTROLLER]))
    return None


def _saturation(history, k: float, target_ratio: float, tol: float, saturation_tol: float, config) -> Finding | None:
    if not history.get("saturated"):
        return None
    sat = _tail_mean(history["saturated"])
    if sat < saturation_tol or abs(k - target_ratio) <= tol:
        return None
    return Finding(
        "saturation", f"{sat:.0%} of keep probabilities outside [0.01, 0.99]; keep ratio {k:.3f} "
        f"vs target {target_ratio:.3f}",
        "d(p - rho)^2/dl carries p(1-p): saturated probabilities get no sparsity gradient; top-k "
        "then chooses among ties",
        _fixes(config, [("LayerNorm the scorer's input (pruner_norm=True)", lambda c: _get(c, "pruner_norm", False)),
                        ("re-initialise the pruner's last layer (keep_bias 0)", lambda c: _get(c, "keep_bias", 0) <= 0),
                        _CONTROLLER]))


def _keep_gap(last: dict, k: float, tol: float, config) -> Finding | None:
    """The inference keep ratio of the last deployment-rule validation ``last`` far from the training one."""
    if abs(float(last["keep_ratio"]) - k) <= tol:
        return None
    causes = {"threshold": "threshold 0.5 after a mean-probability sparsity loss (mean(p) = target does "
                           "not make the fraction with p > 0.5 equal the target)",
              "topk": "the training keep ratio missed the target, so top-k imposes a budget the model "
                      "never trained with"}
    rule = (config or {}).get("eval_rule", last.get("rule"))
    return Finding(
        "train/inference keep gap", f"inference keeps {last['keep_ratio']:.3f}, training kept {k:.3f}",
        causes.get(rule, f"{causes['threshold']}, or {causes['topk']}"),
        _fixes(config, [("use the top-k budget rule at inference (eval_rule='topk')",
                         lambda c: _get(c, "eval_rule") == "topk"),
                        ("make the training keep ratio reach the target (see the other findings)",
                         lambda c: False)]))


def diagnose(history: dict, target_ratio: float | None = None, ratio_tol: float = 0.25, acc_gap_tol: float = 0.03,
             saturation_tol: float = 0.9) -> list[Finding]:
    """Flag the symptoms in ``history`` (a dict of lists as logged by :func:`vtp.train.train_pruner`; the keys
    it uses are ``keep_ratio``, ``keep_prob``, ``target``, ``saturated``, ``train_acc``, ``mask_binary``, the
    loss components, ``val`` = list of ``{"step", "phase", "rule", "accuracy", "keep_ratio"}`` measured with
    real removal (``rule="sample"``: the training masks' law), ``adapt_best`` and ``config``).

    ``target_ratio`` defaults to the last logged ``target``. ``ratio_tol`` is relative to the target (a keep
    ratio is off when :math:`|k - \\rho| > \\epsilon\\rho`); ``acc_gap_tol`` is in accuracy points (absolute).
    Returns an empty list when nothing is flagged.
    """
    target_ratio, config = _check_arguments(history, target_ratio, dict(
        ratio_tol=ratio_tol, acc_gap_tol=acc_gap_tol, saturation_tol=saturation_tol))
    tol = ratio_tol * target_ratio
    k = _tail_mean(history["keep_ratio"])
    findings = [_nonfinite(history, config), _soft_masks(history), _keep_ratio_off(k, target_ratio, tol, config),
                _saturation(history, k, target_ratio, tol, saturation_tol, config)]
    law = _mask_law_gap(history, config, acc_gap_tol)
    # phase 1's validations with the deployment rule (phase 2, if any, trains on that rule directly)
    val = [v for v in history.get("val") or [] if v.get("phase", "gumbel") == "gumbel" and v.get("rule") != "sample"]
    if val:
        findings.append(_keep_gap(val[-1], k, tol, config))
        if law is None:  # the mask-law finding already explains a training-graph gap
            findings.append(_removal_gap(history, config, val[-1], acc_gap_tol))
    findings.append(law)
    return [f for f in findings if f is not None]


def format_findings(findings: list[Finding]) -> str:
    """Human-readable report; ``"no symptom flagged"`` when the list is empty."""
    return "\n".join(str(f) for f in findings) if findings else "no symptom flagged"
