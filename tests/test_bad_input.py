"""Bad input to the Python API: each case gives a clear exception naming the argument and the allowed values, or
a documented behaviour checked here. One table of (case, callable, exception, message pattern); then the
documented behaviours (NaN scores rank last, float16/bfloat16 tokens accepted); then a bad value for EVERY field
of the two training configs, which must fail when the config is built."""
import dataclasses
import math

import pytest
import torch

import vtp
from vtp.attention import remove_tokens
from vtp.losses import DualAscentController, PruningLoss
from vtp.pruner import GumbelVisionPruner, topk_keep_mask
from vtp.train import PrunerConfig, TrainConfig

NAN = float("nan")


def _pruner(train=False, **kw):
    torch.manual_seed(0)
    return GumbelVisionPruner(8, rule="topk", **kw).train(train)


def _tokens(nan_at=None, dtype=torch.float32):
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    if nan_at is not None:
        x[:, nan_at] = NAN
    return x


def _loss_inputs(batch=2, n=4):
    logits = torch.randn(batch, 5, 10)
    labels = torch.full((batch, 5), -100)
    labels[:, 3] = 1
    return logits, labels, torch.rand(batch, n)


def _loss(keep_prob=None, keep_mask=None):
    logits, labels, p = _loss_inputs()
    return PruningLoss()(logits, labels, p if keep_prob is None else keep_prob, keep_mask=keep_mask)


def _train_step_with_nan_token():
    out = _pruner(train=True)(_tokens(nan_at=2), tau=1.0)
    logits, labels, _ = _loss_inputs(n=6)
    return PruningLoss()(logits, labels, out.keep_prob, keep_mask=out.mask)


def _update(value):
    return DualAscentController(0.25).update(value)


CASES = [
    # (case, callable, exception, message pattern)
    ("tau 1e-40, sample_keep_mask", lambda: vtp.sample_keep_mask(torch.randn(3, 2), 1e-40), ValueError,
     r"tau must be a finite number >= 1e-06, got 1e-40"),
    ("tau 1e-40, pruner in training", lambda: _pruner(train=True)(_tokens(), tau=1e-40), ValueError, r"tau must be"),
    ("tau 0 as a pruner default", lambda: GumbelVisionPruner(8, tau=0.0), ValueError, r"tau must be"),
    ("NaN token in training: the loss raises", _train_step_with_nan_token, FloatingPointError,
     r"PruningLoss is not finite"),
    ("controller update NaN", lambda: _update(NAN), ValueError, r"keep_ratio must be a finite number, got nan"),
    ("controller update inf tensor", lambda: _update(torch.tensor([0.2, math.inf])), ValueError, r"keep_ratio"),
    ("controller init NaN", lambda: DualAscentController(0.25, init=NAN), ValueError, r"init must be a finite"),
    ("loss: keep_prob batch != logits batch", lambda: _loss(keep_prob=torch.rand(3, 4)), ValueError,
     r"keep_prob must have shape \(2, visual tokens\) \(the batch of logits\), got \(3, 4\)"),
    ("loss: keep_prob 1-D", lambda: _loss(keep_prob=torch.rand(2)), ValueError, r"keep_prob must have shape"),
    ("loss: keep_prob above 1", lambda: _loss(keep_prob=torch.full((2, 4), 5.0)), ValueError,
     r"keep_prob must be probabilities in \[0, 1\], got values in \[5, 5\]"),
    ("loss: keep_prob below 0", lambda: _loss(keep_prob=torch.full((2, 4), -0.5)), ValueError,
     r"keep_prob must be probabilities in \[0, 1\]"),
    ("loss: integer keep_prob", lambda: _loss(keep_prob=torch.ones(2, 4, dtype=torch.long)), TypeError,
     r"keep_prob must be a floating-point tensor"),
    ("loss: keep_mask batch", lambda: _loss(keep_mask=torch.ones(3, 4)), ValueError, r"keep_mask must have shape"),
    ("pruner: int tokens", lambda: _pruner()(torch.ones(2, 6, 8, dtype=torch.long)), TypeError,
     r"tokens must be a floating-point tensor .*got torch.int64"),
    ("pruner: bool tokens", lambda: _pruner()(torch.ones(2, 6, 8, dtype=torch.bool)), TypeError, r"tokens must be"),
    ("pruner: list tokens", lambda: _pruner()([[[0.0] * 8] * 6] * 2), TypeError,
     r"tokens must be a floating-point torch.Tensor, got list"),
    ("pruner: int text", lambda: _pruner(text_dim=4)(_tokens(), text=torch.ones(2, 4, dtype=torch.long)), TypeError,
     r"text must be a floating-point tensor"),
    ("pruner: text for a question-blind pruner", lambda: _pruner()(_tokens(), text=torch.randn(2, 8)), ValueError,
     r"text is read only by a question-aware pruner .*text_dim=None"),
    ("pruner: no text for a question-aware pruner", lambda: _pruner(text_dim=4)(_tokens()), ValueError,
     r"text must have shape \(2, 4\)"),
    ("PrunerConfig min_temp=0", lambda: PrunerConfig(min_temp=0), ValueError, r"min_temp must be a finite number"),
    ("PrunerConfig min_temp > max_temp", lambda: PrunerConfig(min_temp=2.0, max_temp=1.0), ValueError,
     r"min_temp must be <= max_temp"),
    ("PrunerConfig temp_schedule='foo'", lambda: PrunerConfig(temp_schedule="foo"), ValueError,
     r"temp_schedule must be one of \('exponential', 'linear', 'cosine'\), got 'foo'"),
    ("TrainConfig model='huge'", lambda: TrainConfig(model="huge"), ValueError,
     r"model must be one of \(.*'smoke'.*'full'.*\) or a vtp.vlm.VLMConfig, got 'huge'"),
    ("TrainConfig unknown model override", lambda: TrainConfig(model_overrides={"layers": 3}), ValueError,
     r"model_overrides"),
    ("diagnose target_ratio=2", lambda: vtp.diagnose({"keep_ratio": [0.3]}, target_ratio=2), ValueError,
     r"target_ratio must be in \(0, 1\], got 2"),
    ("remove_tokens, a sample keeps nothing",
     lambda: remove_tokens(torch.randn(2, 4, 3), torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])), ValueError,
     r"keep: every sample must keep at least one position .*sample 1 keeps none"),
    ("remove_tokens, attention_mask leaves nothing",
     lambda: remove_tokens(torch.randn(1, 3, 2), torch.ones(1, 3), attention_mask=torch.zeros(1, 3)), ValueError,
     r"keep: every sample must keep at least one position"),
    ("topk ratio 0", lambda: topk_keep_mask(torch.rand(1, 4), 0.0), ValueError, r"ratio must be in \(0, 1\]"),
]


@pytest.mark.parametrize("case, call, exc, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(case, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ------------------------------------------------------------------------------------ documented behaviours
@pytest.mark.parametrize("ratio, kept_nan", [(0.5, False), (5 / 6, False), (1.0, True)])
def test_nan_scores_rank_last_in_topk(ratio, kept_nan):
    """A NaN token is kept only when the budget exceeds the non-NaN tokens (5 of 6 here)."""
    out = _pruner()(_tokens(nan_at=0), ratio=ratio)
    assert torch.isnan(out.keep_prob[:, 0]).all()
    assert torch.isfinite(out.mask).all() and set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert (out.mask.sum(-1) == round(ratio * 6)).all()
    assert bool((out.mask[:, 0] == 1).all()) == kept_nan


def test_nan_scores_rank_after_numbers_and_before_invalid_tokens():
    scores = torch.tensor([[NAN, 0.1, NAN, 0.3, 0.9, 0.2]])
    valid = torch.tensor([[True, True, True, True, False, True]])
    assert topk_keep_mask(scores, 3 / 5, valid).tolist() == [[0, 1, 0, 1, 0, 1]]
    assert topk_keep_mask(scores, 4 / 5, valid).tolist() == [[1, 1, 0, 1, 0, 1]]  # NaNs by position, then
    assert topk_keep_mask(scores, 1.0, valid).tolist() == [[1, 1, 1, 1, 0, 1]]  # never the invalid token


def test_threshold_rule_never_keeps_a_nan_token():
    pruner = _pruner(min_keep=2)
    out = pruner(_tokens(nan_at=[0, 1, 2, 3, 4]), rule="threshold")  # one real token, min_keep 2
    assert torch.isfinite(out.mask).all()
    assert (out.mask[:, 5] == 1).all() and (out.mask.sum(-1) == 2).all()  # topped up by position among NaNs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_cast_to_the_pruners(dtype):
    pruner, x = _pruner(), _tokens(dtype=dtype)
    out = pruner(x, ratio=0.5)
    ref = pruner(x.float(), ratio=0.5)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.mask, ref.mask)


# ---------------------------------------------------------------------- every config field, checked when built
def _bad_value(f: dataclasses.Field):
    """A value of the wrong kind or out of range for field ``f`` (by its annotation)."""
    t = str(f.type)
    if t.startswith("bool"):
        return "yes"
    if t.startswith("str"):
        return "no-such-value"
    if t.startswith("dict"):
        return "not a dict"
    if t.startswith("tuple"):
        return (2.0,)
    if t.startswith("int"):
        return 1.5
    return NAN  # float, float | None


@pytest.mark.parametrize("cls", [TrainConfig, PrunerConfig])
def test_every_config_field_is_checked_when_built(cls):
    unchecked = []
    for f in dataclasses.fields(cls):
        try:
            cls(**{f.name: _bad_value(f)})
        except (ValueError, TypeError) as e:
            assert f.name.split("_")[0] in str(e) or f.name in str(e), (f.name, str(e))
        else:
            unchecked.append(f.name)
    assert not unchecked, f"{cls.__name__} accepts bad values for {unchecked}"


@pytest.mark.parametrize("kw", [dict(augment={"blur": 1}), dict(augment={"hflip": 2.0}), dict(grad_clip=0.0),
                                dict(log_every=0), dict(eval_questions=0), dict(train_questions=0),
                                dict(min_lr_ratio=1.5), dict(weight_decay=-1.0)])
@pytest.mark.parametrize("cls", [TrainConfig, PrunerConfig])
def test_config_ranges(cls, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        cls(**kw)
