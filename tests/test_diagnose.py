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
