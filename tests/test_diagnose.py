"""vtp.diagnose on synthetic histories: each symptom is flagged, and a healthy run is not."""
import pytest

from vtp.diagnose import diagnose, format_findings


def _history(n=50, keep=0.25, target=0.25, train_acc=0.95, val_acc=0.95, val_keep=0.25, saturated=0.1,
             binary=True, total=1.0):
    return {
        "step": list(range(n)), "target": [target] * n, "keep_ratio": [keep] * n, "keep_prob": [keep] * n,
        "saturated": [saturated] * n, "train_acc": [train_acc] * n, "mask_binary": [binary] * n,
        "total": [total] * n, "ce": [0.1] * n, "distill": [0.1] * n, "sparsity": [0.0] * n,
        "val": [{"step": n, "accuracy": val_acc, "keep_ratio": val_keep}],
    }


def _symptoms(h, **kw):
    return {f.symptom for f in diagnose(h, **kw)}


def test_healthy_run_has_no_findings():
    assert diagnose(_history()) == []
    assert format_findings([]) == "no symptom flagged"


def test_each_symptom_is_flagged():
    assert "NaN" in _symptoms(_history(total=float("nan")))
    assert "soft masks" in _symptoms(_history(binary=False))
    assert "keep-ratio collapse" in _symptoms(_history(keep=0.05, val_keep=0.05))
    assert "keep-ratio blow-up" in _symptoms(_history(keep=1.0, val_keep=1.0))
    assert "saturation" in _symptoms(_history(keep=1.0, val_keep=0.25, saturated=0.99))
    assert "train/inference keep gap" in _symptoms(_history(val_keep=0.6))
    assert "train/removal accuracy gap" in _symptoms(_history(train_acc=0.97, val_acc=0.70))


def test_only_the_tail_counts():
    h = _history()
    h["keep_ratio"][:40] = [1.0] * 40  # early curriculum at 1.0 is fine
    assert diagnose(h) == []


def test_findings_carry_cause_and_fix():
    f = diagnose(_history(keep=1.0, val_keep=1.0, saturated=0.99))
    assert all(x.cause and x.fix and x.evidence for x in f)
    assert "likely cause" in format_findings(f)


def test_bad_input():
    with pytest.raises(ValueError, match="history"):
        diagnose({})
    with pytest.raises(ValueError, match="ratio_tol"):
        diagnose(_history(), ratio_tol=0)
    h = _history()
    del h["target"]
    with pytest.raises(ValueError, match="target_ratio"):
        diagnose(h)
    assert diagnose(h, target_ratio=0.25) == []


# --- relative keep-ratio tolerance, the mask law, and fixes read against the run's own recipe ---------------
import dataclasses  # noqa: E402

from vtp.train import pruner_config, pruner_recipe  # noqa: E402

SMALL = 4 / 64


def _config(**overrides):
    return dataclasses.asdict(pruner_config("full", target_ratio=SMALL, **overrides))


def _val(step, rule, acc, keep=SMALL, phase="gumbel"):
    return {"step": step, "phase": phase, "rule": rule, "accuracy": acc, "keep_ratio": keep}


@pytest.mark.parametrize("keep", [0.016, 0.030])
def test_keep_ratio_tolerance_is_relative_to_the_target(keep):
    h = _history(keep=keep, target=SMALL, val_keep=SMALL)
    found = _symptoms(h)
    assert "keep-ratio collapse" in found  # 0.030 is within 0.05 of 0.0625 in absolute terms, but half of it
    assert "train/inference keep gap" in found
    assert "keep-ratio collapse" not in _symptoms(_history(keep=0.060, target=SMALL, val_keep=SMALL))
    assert "keep-ratio blow-up" in _symptoms(_history(keep=0.095, target=SMALL, val_keep=SMALL))


def test_mask_law_gap_names_phase_2_when_the_run_has_none():
    h = _history(keep=SMALL, target=SMALL, val_keep=SMALL, train_acc=0.97, val_acc=0.88)
    h["config"] = _config()  # full preset: hard Gumbel masks, attention masking, no phase 2
    h["val"] = [_val(100, "topk", 0.88), _val(100, "sample", 0.97)]
    found = {f.symptom: f for f in diagnose(h)}
    law = found["sampled-mask vs top-k gap"]
    assert "0.970" in law.evidence and "0.880" in law.evidence
    assert "phase 2" in law.fix and "adapt_steps" in law.fix
    # the same training-graph gap is explained once, by the mask law, not by zeroing or soft masks
    assert "train/removal accuracy gap" not in found


def test_phase_2_that_closed_the_gap_is_not_recommended_again():
    h = _history(keep=SMALL, target=SMALL, val_keep=SMALL, train_acc=0.97, val_acc=0.88)
    h["config"] = dataclasses.asdict(pruner_recipe(SMALL, mode="full"))  # phase 2 with adapt_pruner
    h["val"] = [_val(500, "topk", 0.88), _val(500, "sample", 0.97), _val(850, "topk", 0.995, phase="adapt")]
    h["adapt_best"] = {"step": 850, "accuracy": 0.995}
    assert diagnose(h) == []
    # phase 2 that stayed below the sampled-mask accuracy: flagged, but the fix is more of it, not "add phase 2"
    h["val"][-1]["accuracy"] = h["adapt_best"]["accuracy"] = 0.90
    law = next(f for f in diagnose(h) if f.symptom == "sampled-mask vs top-k gap")
    assert "0.900" in law.evidence and "more phase-2 steps" in law.fix
    assert "adapt_pruner" not in law.fix  # the run has it


def test_no_gap_without_a_sample_validation_or_when_top_k_matches():
    h = _history(keep=SMALL, target=SMALL, val_keep=SMALL)
    h["val"] = [_val(100, "topk", 0.95), _val(100, "sample", 0.96)]
    assert diagnose(h) == []
    h["val"] = [_val(100, "topk", 0.80), _val(200, "sample", 0.96)]  # not the same step: not comparable
    assert "sampled-mask vs top-k gap" not in _symptoms(h)


def test_removal_gap_fix_depends_on_the_recipe():
    h = _history(keep=SMALL, target=SMALL, val_keep=SMALL, train_acc=0.97, val_acc=0.80)
    h["config"] = _config(apply="zero")
    fix = next(f.fix for f in diagnose(h) if f.symptom == "train/removal accuracy gap")
    assert "apply='policy'" in fix and "hard=True" not in fix
    h["config"] = _config()  # attention masking and hard masks already: the remaining cause is the mask law
    fix = next(f.fix for f in diagnose(h) if f.symptom == "train/removal accuracy gap")
    assert "apply='policy'" not in fix and "hard=True" not in fix and "phase 2" in fix
    h["config"] = _config(sampler="soft")
    assert "hard=True" in next(f.fix for f in diagnose(h) if f.symptom == "train/removal accuracy gap")


def test_threshold_keep_gap_names_top_k_only_when_the_run_thresholds():
    h = _history(keep=SMALL, target=SMALL, val_keep=0.030)
    h["config"] = _config(eval_rule="threshold")
    f = next(f for f in diagnose(h) if f.symptom == "train/inference keep gap")
    assert "threshold 0.5" in f.cause and "eval_rule='topk'" in f.fix
    h["config"] = _config()
    f = next(f for f in diagnose(h) if f.symptom == "train/inference keep gap")
    assert "eval_rule='topk'" not in f.fix


def test_collapse_and_blow_up_fixes_skip_what_the_run_has():
    h = _history(keep=0.016, target=SMALL, val_keep=SMALL)
    h["config"] = _config(controller_lr=0.0)  # visual-only sparsity, warm-up, Gumbel noise: only the controller left
    fix = next(f.fix for f in diagnose(h) if f.symptom == "keep-ratio collapse")
    assert "controller" in fix and "visual tokens only" not in fix and "warm up" not in fix and "Gumbel" not in fix
    h["config"] = _config(sparsity_scope="all", controller_lr=1.0)
    fix = next(f.fix for f in diagnose(h) if f.symptom == "keep-ratio collapse")
    assert "visual tokens only" in fix and "controller" not in fix
    h = _history(keep=0.3, target=SMALL, val_keep=SMALL, saturated=0.99)
    h["config"] = _config(pruner_norm=False, ratio_start=1.0, keep_bias=8.0)
    found = {f.symptom: f.fix for f in diagnose(h)}
    assert "pruner_norm=True" in found["keep-ratio blow-up"] and "ratio_start" in found["keep-ratio blow-up"]
    assert "keep_bias 0" in found["saturation"]
    h["config"] = _config()  # LayerNorm, p = 0.5 at init, curriculum from 0.5, controller: none of those again
    for fix in (f.fix for f in diagnose(h)):
        assert not any(s in fix for s in ("pruner_norm=True", "keep_bias 0", "ratio_start", "controller"))


def test_config_must_be_a_dict():
    h = _history()
    h["config"] = "full"
    with pytest.raises(ValueError, match="config"):
        diagnose(h)
