r"""``vtp.patch(model, pruner)``: prune the visual tokens of a Hugging Face VLM in place, ``generate()`` included.

In the spirit of ToMe's ``tome.patch.timm(model)``: one call, the model keeps its class, its output types and its
``generate``; one knob, ``model.vtp_ratio`` (the keep ratio), can be changed at any time. Supported:
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` (image-newline tokens are never pruned)
and ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (M-RoPE).

What happens inside. Three public methods are wrapped, no transformers code is copied:

* the inner multimodal model's ``forward`` reads ``input_ids``: where the image placeholders are, and whether
  this call is a prefill (images in the prompt, empty cache) or a decode step;
* its ``get_image_features`` reports how many visual tokens each image has (one image at a time is scored);
* the language model's ``forward`` receives the merged sequence (text embeddings with the projected visual
  tokens in place of the placeholders). There the pruner scores each image's visual tokens
  (:func:`vtp.selection.select_visual`, the one scoring/selection path that :class:`vtp.PrunedVLM` uses too) and

  - in **eval mode** the dropped tokens are physically removed (:func:`kept_index`): the kept tokens keep their
    ORIGINAL position ids, 1-D (RoPE) or 3-D (M-RoPE), and the 2-D attention mask follows them. The KV cache then
    holds :math:`K < L` prompt tokens, so at every decode step the mask that ``generate`` grows to :math:`L + t`
    columns is compacted to the :math:`K` kept prompt columns plus the :math:`t` new ones, and the decode position
    ids stay the original ones (``generate`` derives them from the full mask; without them the wrapper supplies
    :math:`\max(\text{prompt positions}) + 1 + t`).
  - in **train mode** nothing is removed: the sampled mask becomes the keep policy of the policy-weighted
    attention (:mod:`vtp.attention`; masking = removal), and the keep probabilities for the loss are in
    ``model.vtp_last`` (:class:`PatchState`).

Selection per image: top-k keeps exactly :math:`\max(\text{min\_keep}, \operatorname{round}(\rho N))` of the
:math:`N` scorable tokens of each image. Only image tokens are pruned (a Qwen2-VL video's tokens are kept). A
question-aware pruner gets the mean input embedding of its sample's question
(:func:`vtp.selection.question_embedding`).
With the top-k rule an eval-mode prefill never waits for the GPU: every size it needs is a host number
(:mod:`vtp.patch_layout`), provided the pruner's top-k keeps exactly that many per image, as
:class:`vtp.GumbelVisionPruner` does. It waits with the threshold rule (the kept counts), for images of several
sizes (the pruner's check of its validity mask) and for LLaVA-NeXT (the images' sizes); a decode step never waits.
``vtp.unpatch(model)`` restores the original methods. Tested: greedy decoding with the default dynamic cache; a
static cache (4-D masks) raises; gradient checkpointing is not supported in train mode.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)

from .attention import policy_attention
from .patch_graphs import PrefillGraphs, graphable
from .patch_layout import find_images, kept_lengths, read_layout
from .pruner import check_ratio
from .selection import question_embedding, select_visual  # re-exported: public names of vtp.patch

__all__ = ["patch", "unpatch", "PatchState", "select_visual", "question_embedding", "kept_index",
           "SUPPORTED", "PATCH_RULES"]

PATCH_RULES = ("topk", "threshold")
SUPPORTED = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration,
             Qwen2_5_VLForConditionalGeneration)


def kept_index(keep: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Original positions ``index`` [B, K] of the kept positions (``keep`` [B, L] bool), in order, and ``valid``
    [B, K]. Samples that keep fewer than K are padded on the left (``left``, for left-padded prompts: the last
    column stays each sample's last token, which ``generate`` reads) or on the right."""
    lengths = keep.sum(-1)
    return _kept_index(keep, left, lengths, int(lengths.max()))


def _kept_index(keep, left, lengths, K):
    """:func:`kept_index` with the per-sample kept counts ``lengths`` [B] and their maximum ``K`` (a host int)
    already known: no read-back to the host."""
    cols = torch.arange(K, device=keep.device)
    if left:  # stable ascending sort: dropped first, then the kept ones in order; the last K columns
        index = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[:, keep.shape[1] - K:]
        return index, cols >= (K - lengths).unsqueeze(1)
    index = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :K]
    return index, cols < lengths.unsqueeze(1)


@dataclass
class PatchState:
    """What the last prefill of a patched model did (``model.vtp_last``). Per image ``i`` (images in prompt order):
    ``keep_prob``, ``mask`` [I, N] and ``logits`` [I, N, 2] from the pruner, ``valid`` [I, N] (real tokens; images
    differ in size), ``image_sample`` [I] the sample each image belongs to. ``n_visual`` [B] visual tokens the
    language model saw per sample (image-newline tokens included). Eval mode: ``index`` [B, K] original position of
    each kept position and ``attention_mask`` [B, K] (0 = padding); both ``None`` when nothing was removed."""

    keep_prob: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    valid: torch.Tensor
    image_sample: torch.Tensor
    n_visual: torch.Tensor
    index: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    prompt_length: int = 0  # L, the uncompacted prompt length (decode steps)
    next_position: torch.Tensor | None = None  # [B], max prompt position + 1 (decode steps without position ids)


class _Patch:
    """Per-model state: the originals to restore, and what one forward call passes between the wrappers."""

    def __init__(self, model):
        self.model, self.inner, self.lm = model, model.model, model.model.language_model
        cfg = model.config
        token = getattr(cfg, "image_token_id", None)
        self.image_token_id = token if token is not None else cfg.image_token_index
        self.newline = getattr(self.inner, "image_newline", None)  # LLaVA-NeXT
        self.saved = []  # (object, name, value in its __dict__ or None)
        self.call = None  # dict for the forward call under way
        self.forward_signature = None  # the model's forward signature, read once (labels are found by binding)

    def wrap(self, obj, name, wrapper):
        self.saved.append((obj, name, obj.__dict__.get(name)))
        original = getattr(obj, name)
        setattr(obj, name, functools.wraps(original)(functools.partial(wrapper, original)))

    def restore(self):
        for obj, name, value in reversed(self.saved):
            if value is None:
                del obj.__dict__[name]
            else:
                setattr(obj, name, value)


def _check_kwargs(fn, kwargs):
    if kwargs:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {sorted(kwargs)}")


def patch(model, pruner: nn.Module, ratio: float = 0.25, rule: str = "topk", min_keep: int = 1, graphs: bool = False,
          **kwargs):
    """Prune ``model``'s visual tokens with ``pruner`` (a :class:`vtp.GumbelVisionPruner` of width = the language
    model's hidden size), in place. Eval mode removes tokens (``rule`` ``"topk"`` keeps ``max(min_keep,
    round(ratio * N))`` per image; ``"threshold"`` keeps keep-prob > the pruner's threshold); train mode masks
    them in attention. ``model.vtp_ratio`` / ``model.vtp_rule`` can be changed later; ``model.vtp_pruner`` is
    the pruner (a submodule: it follows ``.to()``, ``.train()``, ``.eval()``). ``graphs=True``: the pruned
    prefill of an unpadded batch replays a CUDA graph per shape (:mod:`vtp.patch_graphs`; move the model to its
    device before the first call, a graph keeps the addresses it captured). Returns ``model``."""
    _check_kwargs("patch", kwargs)
    if not isinstance(graphs, bool):
        raise ValueError(f"graphs must be True or False, got {graphs!r}")
    ratio = check_ratio(ratio)
    if rule not in PATCH_RULES:
        raise ValueError(f"rule must be one of {PATCH_RULES}, got {rule!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an int >= 1, got {min_keep!r}")
    if not isinstance(model, SUPPORTED):
        raise TypeError(f"vtp.patch supports {', '.join(c.__name__ for c in SUPPORTED)} (and their subclasses); got "
                        f"{type(model).__name__}")
    if not isinstance(pruner, nn.Module):
        raise TypeError(f"pruner must be an nn.Module (e.g. vtp.GumbelVisionPruner), got {type(pruner).__name__}")
    width = model.config.text_config.hidden_size
    if getattr(pruner, "hidden_dim", width) != width:
        raise ValueError(f"pruner.hidden_dim={pruner.hidden_dim} does not match the model's language-model hidden "
                         f"size {width}")
    text_dim = getattr(pruner, "text_dim", None)
    if text_dim not in (None, width):
        raise ValueError(f"pruner.text_dim={text_dim} does not match the width {width} of the model's input embeddings "
                         f"(the pooled question a question-aware pruner reads)")
    if getattr(model, "_vtp", None) is not None:
        unpatch(model)
    p = _Patch(model)
    model._vtp, model.vtp_ratio, model.vtp_rule, model.vtp_min_keep, model.vtp_last = p, ratio, rule, min_keep, None
    model.vtp_graphs, p.graphs = graphs, PrefillGraphs()
    model.vtp_pruner = pruner.train(model.training)  # a submodule from now on: one mode for both
    p.wrap(model, "forward", functools.partial(_model_forward, p))
    p.wrap(p.inner, "forward", functools.partial(_inner_forward, p))
    p.wrap(p.inner, "get_image_features", functools.partial(_image_features, p))
    p.wrap(p.lm, "forward", functools.partial(_lm_forward, p))
    return model


def unpatch(model):
    """Undo :func:`patch`: the original methods, no pruner, no ``vtp_*`` attributes. Returns ``model``."""
    p = getattr(model, "_vtp", None)
    if p is None:
        raise ValueError("unpatch: the model is not patched (call vtp.patch first)")
    p.restore()
    del model.vtp_pruner
    for name in ("_vtp", "vtp_ratio", "vtp_rule", "vtp_min_keep", "vtp_last", "vtp_graphs"):
        delattr(model, name)
    return model



# --- the four wrappers -------------------------------------------------------------------------------------------

def _model_forward(p, original, *args, **kwargs):
    """The model's ``forward``: in eval mode with ``labels``, the loss is computed on the kept positions (labels
    gathered like the tokens), with the model's own ``loss_function``."""
    if p.forward_signature is None:
        p.forward_signature = inspect.signature(original)
    bound = p.forward_signature.bind(*args, **kwargs)
    labels = bound.arguments.get("labels")
    p.call = {"labels": labels}
    try:
        if labels is None or p.model.training:
            return original(*args, **kwargs)
        bound.arguments["labels"] = None
        out = original(*bound.args, **bound.kwargs)
        state = p.call.get("state")
    finally:
        p.call = None
    if state is not None and state.index is not None:
        labels = labels.gather(1, state.index).masked_fill(state.attention_mask == 0, -100)
    loss = p.model.loss_function(logits=out.logits, labels=labels, vocab_size=p.model.config.text_config.vocab_size)
    return type(out)(**{"loss": loss, **{k: v for k, v in out.items() if k != "loss"}})


def _inner_forward(p, original, *args, **kwargs):
    """The inner model's ``forward``: a prefill (images in ``input_ids``, empty cache) or a decode step after a
    pruned prefill, where missing position ids become the original ones: ``max(prompt positions) + 1 + t``."""
    own = p.call is None
    if own:
        p.call = {}
    ids = kwargs.get("input_ids", args[0] if args else None)
    cache = _cache(kwargs)
    past = 0 if cache is None else cache.get_seq_length()
    state = p.model.vtp_last
    if past == 0:
        p.model.vtp_last = None  # a new sequence: forget the last prefill
        p.call["visual"] = None if ids is None else ids == p.image_token_id
        if ids is not None:  # queued for the host now, read by the prefill without a wait
            p.call["layout"] = read_layout(p.call["visual"], kwargs.get("attention_mask"))
        image = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if image is not None:  # images encoded before the forward (as generate() does)
            p.call["counts"] = _feature_counts(image)
    elif state is not None and state.index is not None and not p.model.training:
        p.call["decode"] = state
        if kwargs.get("position_ids") is None:
            q = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
            t = past - state.index.shape[1]  # tokens decoded so far
            steps = torch.arange(t, t + q, device=state.next_position.device)
            kwargs["position_ids"] = state.next_position.unsqueeze(1) + steps
    try:
        return original(*args, **kwargs)
    finally:
        if own:
            p.call = None


def _image_features(p, original, *args, **kwargs):
    """The inner model's ``get_image_features``: records each image's number of visual tokens."""
    out = original(*args, **kwargs)
    if p.call is not None:
        p.call["counts"] = _feature_counts(out)
    return out


def _feature_counts(out) -> list:
    """Each image's number of visual tokens in the output of ``get_image_features`` (shapes: host numbers)."""
    return [int(f.shape[0]) for f in getattr(out, "pooler_output", out)]


def _lm_forward(p, original, *args, **kwargs):
    """The language model's ``forward``: prune at a prefill, compact the attention mask at a decode step."""
    call = p.call or {}
    if args:  # the inner models pass keywords; a direct positional call is not ours to prune
        return original(*args, **kwargs)
    if call.get("visual") is not None:
        return _prefill(p, original, call, kwargs)
    if call.get("decode") is not None:
        kwargs["attention_mask"] = _decode_mask(call["decode"], kwargs)
    return original(**kwargs)


# --- prefill and decode ------------------------------------------------------------------------------------------

def _cache_key(kwargs):
    return "cache" if "cache" in kwargs else "past_key_values"  # transformers >= 5.2x renamed past_key_values


def _cache(kwargs):
    return kwargs.get(_cache_key(kwargs))


def _score(p, call, embeds, attention_mask, b, l):
    """Score every image's visual tokens (at ``b, l``) once; keep policy ``[B, L]`` (1 = text / kept), the
    :class:`PatchState` and the images' sizes where the host knows them (:func:`~vtp.patch_layout.find_images`)."""
    m = p.model
    B, L, d = embeds.shape
    visual = call["visual"]
    scorable = None
    if p.newline is not None:  # LLaVA-NeXT's image-newline embeddings: layout, never pruned
        scorable = visual & ~(embeds == p.newline.to(embeds.dtype)).all(-1)
    b, l, img, slot, n_images, n_max, sizes = find_images(visual, scorable, call.get("counts"), b, l)
    tokens = embeds.new_zeros(n_images, n_max, d).index_put((img, slot), embeds[b, l])
    valid = torch.zeros(n_images, n_max, dtype=torch.bool, device=embeds.device).index_put(
        (img, slot), torch.ones((), dtype=torch.bool, device=embeds.device))  # a CPU value would be copied: a wait
    image_sample = torch.zeros(n_images, dtype=torch.long, device=embeds.device).index_put((img,), b)
    text = question_embedding(embeds, visual, attention_mask, call.get("labels"))[image_sample]
    padded = n_images * n_max != b.numel()  # images of one size need no validity mask (the pruner reads one back)
    out = select_visual(m.vtp_pruner, tokens, valid if padded else None, text,
                        ratio=check_ratio(m.vtp_ratio, "model.vtp_ratio"), rule=m.vtp_rule, min_keep=m.vtp_min_keep)
    keep = torch.ones(B, L, dtype=out.mask.dtype, device=embeds.device).index_put((b, l), out.mask[img, slot])
    n_visual = (keep.detach() * visual).sum(-1).long()
    state = PatchState(out.keep_prob, out.mask, out.logits, valid, image_sample, n_visual, prompt_length=L)
    return keep, state, sizes


def _mask_flags(attn, layout, B):
    """``(left, dense)`` of the prefill's 2-D mask ``attn``: its last column is all ones (left padding or none), all
    of it is (no padding). From the copy :func:`~vtp.patch_layout.read_layout` queued at the prefill's start; a mask
    that the inner model did not receive is read back."""
    if attn is None:
        return True, True
    flags = layout[B:] or torch.stack([attn[:, -1].all(), attn.all()]).tolist()
    return bool(flags[0]), bool(flags[1])


def _prefill(p, original, call, kwargs):
    """A prefill with image tokens in ``input_ids``. With the top-k rule nothing waits for the GPU: every output size
    is a host number (:mod:`vtp.patch_layout`). Reads that wait: with the threshold rule the kept counts; for images
    of several sizes the pruner's check of its validity mask; for LLaVA-NeXT the images' sizes."""
    m, (embeds, attn) = p.model, (kwargs["inputs_embeds"], kwargs.get("attention_mask"))
    B, L, d = embeds.shape
    layout = call["layout"].get()  # image tokens per sample [B], then the mask's flags
    per_sample = layout[:B]
    if sum(per_sample) == 0:  # no image in the prompt: nothing to prune
        return original(**kwargs)
    if attn is not None and attn.dim() != 2:
        raise ValueError(f"vtp.patch needs a 2-D attention mask (batch, seq), got shape {tuple(attn.shape)}")
    b, l = torch.nonzero_static(call["visual"], size=sum(per_sample)).unbind(1)  # row-major, as masked_scatter
    keep, state, sizes = _score(p, call, embeds, attn, b, l)
    m.vtp_last = call["state"] = state
    if m.training:  # masking = removal: the policy-weighted attention, gradients to every decision
        with policy_attention(p.lm):
            return original(**kwargs, keep_policy=keep)
    keep = keep.bool()
    lengths = keep.sum(-1)
    topk = m.vtp_rule == "topk" and not m.vtp_pruner.training
    kept = kept_lengths(sizes, per_sample, L, m.vtp_ratio, m.vtp_min_keep) if topk else None
    if kept is None:  # the threshold rule, or sizes that only the device knows: one read-back
        kept = torch.stack([lengths.min(), lengths.max()]).tolist()
    fewest, K = min(kept), max(kept)
    if fewest == L:  # every token kept
        return original(**kwargs)
    left, dense = _mask_flags(attn, layout, B)
    full = torch.ones(B, L, dtype=torch.long, device=embeds.device) if attn is None else attn
    index, valid = _kept_index(keep, left, lengths, K)
    pos = kwargs.get("position_ids")
    pos = torch.arange(L, device=embeds.device) if pos is None else pos
    pos = pos.expand(*pos.shape[:-2], B, L)  # [B, L], or [3 or 4, B, L] with M-RoPE
    state.index, state.attention_mask = index, full.gather(1, index) * valid
    real = pos if pos.dim() == 2 else pos[-3:].amax(0)  # M-RoPE: decode positions continue after the largest
    state.next_position = real.masked_fill(full == 0, -1).amax(-1) + 1
    # no padding, every sample keeps K, and a cache: no mask, as for an unpadded prompt (the model would read an
    # all-ones mask back to check it; without a cache it would take the gaps in the positions for packed sequences)
    dense = dense and fewest == K and (_cache(kwargs) is not None or bool(kwargs.get("use_cache")))
    kwargs.update(inputs_embeds=embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, d)),
                  attention_mask=None if dense else state.attention_mask,
                  position_ids=pos.gather(-1, index.expand(*pos.shape[:-2], -1, -1)))
    if m.vtp_graphs and graphable(kwargs, _cache_key(kwargs)):
        return p.graphs(original, kwargs, _cache_key(kwargs))
    return original(**kwargs)


def _decode_mask(state, kwargs):
    """The 2-D mask of a decode step, ``[B, L + t]`` -> ``[B, K + t]``: the kept prompt columns, then the new ones."""
    attn, embeds = kwargs.get("attention_mask"), kwargs["inputs_embeds"]
    past, K = _cache(kwargs).get_seq_length(), state.index.shape[1]
    new = past - K + embeds.shape[1]  # columns after the prompt, this step's included
    if attn is None:
        attn = torch.ones(embeds.shape[0], state.prompt_length + new, dtype=torch.long, device=embeds.device)
    if attn.dim() != 2 or attn.shape != (state.index.shape[0], state.prompt_length + new):
        raise ValueError(f"vtp.patch: a decode step after a pruned prefill needs a 2-D attention mask of shape "
                         f"{(state.index.shape[0], state.prompt_length + new)} (prompt + generated tokens), got "
                         f"{tuple(attn.shape)}")
    return torch.cat([state.attention_mask.to(attn.dtype), attn[:, state.prompt_length:]], dim=1)
