r"""Evaluation: answer accuracy of a (pruned) VLM on an easy-VQA split, overall and per question type.

A prediction is the arg-max over the whole vocabulary of the logits at the position before the answer
(greedy decoding of one token); accuracy = fraction of questions whose prediction equals the answer.
With a pruner (or external keep masks / scores) the model runs through :class:`vtp.PrunedVLM`, by default
with physical removal, and the result reports how many visual tokens the language model actually saw.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .data import QUESTION_TYPES, EncodedSplit, VQAProcessor, VQASplit, encode_split, iterate_batches, load_split
from .runtime import default_device
from .vlm import PrunedVLM, answer_logits, num_visual_tokens

__all__ = ["EvalResult", "accuracy", "accuracy_at_ratios", "encoded_test_split", "autocast"]


@dataclass
class EvalResult:
    """``accuracy`` in [0, 1]; ``per_type`` accuracy by question type; ``n`` questions; ``visual_tokens`` the
    mean number of visual tokens the LLM saw per sample and ``keep_ratio`` that over all visual tokens;
    ``predictions`` [n] predicted token ids (CPU), in split order."""

    accuracy: float
    per_type: dict
    n: int
    visual_tokens: float
    keep_ratio: float
    predictions: torch.Tensor = field(repr=False)

    def as_dict(self) -> dict:
        """JSON-ready summary (without predictions)."""
        d = asdict(self)
        d.pop("predictions")
        return d


def autocast(device, enabled: bool = True):
    """bf16 autocast on CUDA (a no-op context elsewhere or when disabled)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def accuracy(model, data, processor: VQAProcessor, pruner=None, ratio: float | None = None, mode: str | None = None,
             rule: str | None = None, keep_fn: Callable | None = None, batch_size: int = 512, device=None,
             bf16: bool = True, max_questions: int | None = None) -> EvalResult:
    """Accuracy of ``model`` (a ``LlavaForConditionalGeneration`` or a :class:`PrunedVLM`) on ``data`` (a
    :class:`VQASplit` or :class:`EncodedSplit`).

    Pruning: ``pruner`` wraps ``model`` in a :class:`PrunedVLM`; ``ratio`` selects the top-k rule with that keep
    ratio, otherwise the pruner's own rule (or ``rule``) applies; ``mode`` defaults to ``"remove"``.
    ``keep_fn(batch, vlm) -> keep [B, N]`` supplies external keep masks (baselines such as random pruning).
    Without any of these the model runs unpruned. ``max_questions`` evaluates the first questions only.
    """
    if ratio is not None and not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    vlm = model if isinstance(model, PrunedVLM) else PrunedVLM(model, pruner)
    if pruner is not None and isinstance(model, PrunedVLM):
        raise ValueError("pass either a PrunedVLM or a model plus pruner, not both")
    device = torch.device(device) if device is not None else next(vlm.parameters()).device
    if isinstance(data, VQASplit):
        data = encode_split(data, processor, device)
    elif not isinstance(data, EncodedSplit):
        raise ValueError(f"data must be a VQASplit or EncodedSplit, got {type(data).__name__}")
    data = data.to(device)
    pruning = vlm.pruner is not None or keep_fn is not None
    if ratio is not None and rule is None:
        rule = "topk"
    mode = mode or ("remove" if pruning else "none")
    n = len(data) if max_questions is None else min(int(max_questions), len(data))
    n_tokens = num_visual_tokens(vlm.llava)
    was_training = vlm.training
    vlm.eval()
    preds, seen = [], []
    try:
        for batch in iterate_batches(data, processor, batch_size, indices=torch.arange(n, device=device)):
            keep = keep_fn(batch, vlm) if keep_fn is not None else None
            with autocast(device, bf16):
                out = vlm(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"],
                          mode=mode, keep=keep, ratio=ratio, rule=rule)
            logits, _ = answer_logits(out.logits, out.labels)
            preds.append(logits.float().argmax(-1))
            seen.append(out.n_visual.float())
    finally:
        vlm.train(was_training)
    pred = torch.cat(preds)
    correct = (pred == data.answer_ids[:n]).float()
    qt = data.qtype_ids[:n]
    per_type = {t: correct[qt == i].mean().item() for i, t in enumerate(QUESTION_TYPES) if (qt == i).any()}
    vis = torch.cat(seen).mean().item()
    return EvalResult(correct.mean().item(), per_type, n, vis, vis / n_tokens, pred.cpu())


def encoded_test_split(processor: VQAProcessor, device=None, questions: int | None = None) -> EncodedSplit:
    """The easy-VQA test split encoded for ``processor``: whole, or a fixed random subset of ``questions``
    (seed 0, the same questions for every caller) when that is smaller."""
    test = load_split("test")
    if questions is not None and questions < len(test):
        test = test.subset(questions, seed=0)
    return encode_split(test, processor, device)


def accuracy_at_ratios(model, data, processor: VQAProcessor, ratios, bf16: bool = True) -> dict:
    """:func:`accuracy` with real removal, top-k at each keep ratio of ``ratios``: ``{"accuracy", "per_type",
    "visual_tokens", "keep_ratio"}``, each a dict keyed by ``f"{ratio:.4f}"``."""
    out = {"accuracy": {}, "per_type": {}, "visual_tokens": {}, "keep_ratio": {}}
    for r in ratios:
        res = accuracy(model, data, processor, ratio=r, bf16=bf16)
        key = f"{r:.4f}"
        out["accuracy"][key], out["per_type"][key] = res.accuracy, res.per_type
        out["visual_tokens"][key], out["keep_ratio"][key] = res.visual_tokens, res.keep_ratio
    return out
