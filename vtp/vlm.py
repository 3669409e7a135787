r"""A small LLaVA built from transformers config classes, and ``PrunedVLM``: a token pruner between the
multimodal projector and the language model of ANY ``LlavaForConditionalGeneration``.

LLaVA in three pieces: vision tower (ViT) -> projector (MLP) -> language model. The :math:`N` projected
visual tokens replace the ``<image>`` placeholders of the prompt. ``PrunedVLM`` scores them with a pruner
and applies the keep mask :math:`k \in \{0,1\}^N` in one of four ways (``mode``):

* ``"policy"`` (training default): the mask becomes the keep policy of the policy-weighted attention in
  every LLM layer (:mod:`vtp.attention`): exact removal in the forward pass, gradients to every decision.
* ``"remove"`` (eval default): dropped tokens are physically removed, original position ids kept.
* ``"zero"``: ``tokens * mask`` (the seed's first suggestion): zero vectors stay in the sequence and are
  still attended to, with their positions. Not pruning; kept for the lessons.
* ``"none"``: no pruning (the unpruned model, e.g. the teacher).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig,
                          Qwen2Config, SiglipVisionConfig)

from .attention import policy_attention, remove_tokens
from .pruner import threshold_keep_mask, topk_keep_mask
from .selection import question_embedding, select_visual

__all__ = ["VLMConfig", "PRESETS", "vlm_config", "build_llava", "num_visual_tokens", "count_parameters",
           "PrunedVLM", "PrunedVLMOutput", "MODES", "answer_logits"]

MODES = ("policy", "remove", "zero", "none")
VISION_FAMILIES = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
TEXT_FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


@dataclass
class VLMConfig:
    """Shape of a small LLaVA. ``(image_size / patch_size)^2`` visual tokens per image."""

    image_size: int = 64
    patch_size: int = 8
    vision: str = "clip"
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    text: str = "llama"
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    mlp_ratio: int = 4
    max_positions: int = 256


PRESETS = {
    # CPU: trains in seconds; 16 visual tokens.
    "smoke": VLMConfig(patch_size=16, vision_width=64, vision_layers=2, vision_heads=2, text_width=64,
                       text_layers=2, text_heads=2, text_kv_heads=2, mlp_ratio=2),
    # GPU: 64 visual tokens (8x8 patches).
    "full": VLMConfig(),
    # GPU, scenes (vtp.scenes): 576 visual tokens (24x24 patches of 8 px at 192 px, as LLaVA-1.5); the CLIP
    # tower keeps its [CLS] token internally (VisionZip-style scoring reads its attention).
    "scenes": VLMConfig(image_size=192, patch_size=8, max_positions=1024),
}


def vlm_config(preset="smoke", **overrides) -> VLMConfig:
    """A :class:`VLMConfig` from a preset name (``"smoke"``/``"full"``) or a config, with field overrides."""
    if isinstance(preset, VLMConfig):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"preset must be one of {tuple(PRESETS)} or a VLMConfig, got {preset!r}")
    return dataclasses.replace(base, **overrides)


def build_llava(preset="smoke", vocab_size: int = 32, image_token_id: int = 2, pad_token_id: int = 0,
                seed: int | None = 0, **overrides) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` (float32, SDPA attention) from a preset.

    CLIP towers drop their [CLS] token (``vision_feature_select_strategy="default"``), SigLIP towers have none
    (``"full"``), so both give ``(image_size / patch_size)^2`` visual tokens.
    """
    c = vlm_config(preset, **overrides)
    if c.vision not in VISION_FAMILIES:
        raise ValueError(f"vision must be one of {tuple(VISION_FAMILIES)}, got {c.vision!r}")
    if c.text not in TEXT_FAMILIES:
        raise ValueError(f"text must be one of {tuple(TEXT_FAMILIES)}, got {c.text!r}")
    if c.image_size % c.patch_size:
        raise ValueError(f"patch_size must divide image_size={c.image_size}, got {c.patch_size}")
    if not (0 <= image_token_id < vocab_size and 0 <= pad_token_id < vocab_size):
        raise ValueError(f"image_token_id and pad_token_id must be in [0, vocab_size={vocab_size})")
    vision = VISION_FAMILIES[c.vision](
        hidden_size=c.vision_width, intermediate_size=c.mlp_ratio * c.vision_width, num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads, image_size=c.image_size, patch_size=c.patch_size, num_channels=3)
    text = TEXT_FAMILIES[c.text](
        vocab_size=vocab_size, hidden_size=c.text_width, intermediate_size=c.mlp_ratio * c.text_width,
        num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads, num_key_value_heads=c.text_kv_heads,
        max_position_embeddings=c.max_positions, pad_token_id=pad_token_id, tie_word_embeddings=False)
    n_tokens = (c.image_size // c.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if c.vision == "clip" else "full", vision_feature_layer=-1,
        image_seq_length=n_tokens, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    if seed is not None:
        torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).float()


def num_visual_tokens(llava: LlavaForConditionalGeneration) -> int:
    """Visual tokens per image of a (single-resolution) LLaVA: patches, minus [CLS] for ``"default"``."""
    cfg = llava.config
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    has_cls = getattr(v, "model_type", "") == "clip_vision_model"
    return n + (1 if has_cls and cfg.vision_feature_select_strategy == "full" else 0)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, V]`` that predict each sample's FIRST supervised token, and that token ``[B]``.

    Causal-LM convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    sup = labels[:, 1:] != -100
    if not sup.any(-1).all():
        raise ValueError("labels: every sample needs a supervised token")
    t = sup.int().argmax(-1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    return logits[rows, t], labels[rows, t + 1]


@dataclass
class PrunedVLMOutput:
    """``logits`` [B, L', V] over the positions the LLM saw (L' = L except in ``"remove"`` mode); ``labels``,
    ``attention_mask``, ``index`` (original position of each output) aligned with them; ``visual_keep`` [B, N]
    the mask applied; ``keep_prob``/``pruner_logits`` from the pruner (or ``None``); ``n_visual`` [B] the
    visual tokens each sample's LLM actually attended to; ``visual_mask`` [B, L] image positions; ``hidden``
    [B, L', D] the language model's last hidden states (the inputs of ``lm_head``)."""

    logits: torch.Tensor
    labels: torch.Tensor | None
    attention_mask: torch.Tensor
    index: torch.Tensor
    visual_keep: torch.Tensor
    keep_prob: torch.Tensor | None
    pruner_logits: torch.Tensor | None
    n_visual: torch.Tensor
    visual_mask: torch.Tensor
    hidden: torch.Tensor | None = None


def _check_text(input_ids, attention_mask, labels) -> torch.Tensor:
    """``ValueError`` unless ``input_ids`` is [B, L] and ``attention_mask`` / ``labels`` (if given) have its shape;
    returns the attention mask (all ones when not given)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    return attention_mask


class PrunedVLM(nn.Module):
    """``llava`` (any ``LlavaForConditionalGeneration``) with ``pruner`` (e.g. :class:`vtp.GumbelVisionPruner`,
    or ``None``) between its projector and its language model. ``mode`` default: ``"policy"`` in training,
    ``"remove"`` in eval (see the module docstring)."""

    def __init__(self, llava: LlavaForConditionalGeneration, pruner: nn.Module | None = None):
        super().__init__()
        self.llava, self.pruner = llava, pruner
        cfg = llava.config
        token_id = getattr(cfg, "image_token_id", None)
        self.image_token_id = token_id if token_id is not None else cfg.image_token_index

    @property
    def language_model(self) -> nn.Module:
        return self.llava.model.language_model

    def visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens ``[B, N, d]`` (vision tower -> feature selection -> projector)."""
        cfg = self.llava.config
        size = cfg.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.vision_config.num_channels, size, size):
            raise ValueError(f"pixel_values must have shape (batch, {cfg.vision_config.num_channels}, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        out = self.llava.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = getattr(out, "pooler_output", out)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def question_embedding(self, embeds, visual_mask, attention_mask, labels=None) -> torch.Tensor:
        """Mean input embedding ``[B, d]`` of each prompt's text tokens (:func:`vtp.selection.question_embedding`,
        the one that :func:`vtp.patch` uses): not image placeholders, not padding and, when ``labels`` are given,
        not the supervised (answer) tokens, so a pruner never reads the answer. Detached."""
        return question_embedding(embeds, visual_mask, attention_mask, labels)

    def _keep_mask(self, tokens, keep, scores, ratio, rule, tau, mode, text=None, prompt=None):
        """Visual keep mask [B, N] from (in order of precedence) ``keep``, ``scores`` or the pruner. A pruner
        with ``reads_prompt`` (e.g. :class:`vtp.controls.FrozenSelector`'s FastV-style selection) also gets
        ``prompt()``: the sample's ``input_ids``, ``attention_mask``, ``labels`` and ``visual_tokens``, and the
        batch's ``pixel_values`` and ``image_index`` (a VisionZip-style selection reads the images)."""
        B, N = tokens.shape[:2]
        for name, t in (("keep", keep), ("scores", scores)):
            if t is not None and tuple(t.shape) != (B, N):
                raise ValueError(f"{name} must have shape {(B, N)} (batch, visual tokens), got {tuple(t.shape)}")
        if keep is not None:
            return keep.float(), None, None
        if scores is not None:
            rule = rule or ("topk" if ratio is not None else "threshold")
            if rule == "topk":
                return topk_keep_mask(scores, 1.0 if ratio is None else ratio), None, None
            return threshold_keep_mask(scores), None, None
        if self.pruner is None or mode == "none":
            return torch.ones(B, N, device=tokens.device), None, None
        text = None if getattr(self.pruner, "text_dim", None) is None else text()
        kwargs = {"prompt": prompt()} if getattr(self.pruner, "reads_prompt", False) else {}
        out = select_visual(self.pruner, tokens, text=text, ratio=ratio, rule=rule, tau=tau, **kwargs)  # as vtp.patch
        return out.mask, out.keep_prob, out.logits

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, mode: str | None = None, keep: torch.Tensor | None = None,
                scores: torch.Tensor | None = None, ratio: float | None = None, rule: str | None = None,
                tau: float | None = None, image_index: torch.Tensor | None = None) -> PrunedVLMOutput:
        """Run the pruned model. A ``ratio`` without a ``rule`` means top-k (the pruner's own rule applies only
        when neither is given). ``keep`` [B, N] (0/1) or ``scores`` [B, N] (top-k with ``ratio``, else
        threshold 0.5) replace the pruner, e.g. for random or attention-based baselines. ``image_index`` [B]
        lets several questions share one image: sample ``b`` uses ``pixel_values[image_index[b]]`` (the vision
        tower runs once per image)."""
        mode = mode or ("policy" if self.training else "remove")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        attention_mask = _check_text(input_ids, attention_mask, labels)
        B, L = input_ids.shape
        tokens = self._image_tokens(pixel_values, image_index, B)
        visual_mask = input_ids == self.image_token_id
        counts = self._check_image_tokens(visual_mask, tokens.shape[1])
        embeds = self.llava.get_input_embeddings()(input_ids)
        vkeep, keep_prob, pruner_logits = self._keep_mask(
            tokens, keep, scores, ratio, rule, tau, mode,
            text=lambda: self.question_embedding(embeds, visual_mask, attention_mask, labels),
            prompt=lambda: dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, visual_tokens=tokens,
                                pixel_values=pixel_values, image_index=image_index))
        if mode == "zero":
            tokens = tokens * vkeep.unsqueeze(-1).to(tokens.dtype)
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), tokens.to(embeds.dtype))
        keep_seq = torch.ones(B, L, device=embeds.device, dtype=vkeep.dtype).masked_scatter(visual_mask, vkeep)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        index = torch.arange(L, device=embeds.device).expand(B, L)
        if mode == "remove":
            removed = remove_tokens(embeds, keep_seq, position_ids, attention_mask)
            embeds, position_ids, attention_mask, index = removed.embeds, removed.position_ids, \
                removed.attention_mask, removed.index
            n_visual = (visual_mask.gather(1, index) & attention_mask.bool()).sum(-1)
        else:
            n_visual = vkeep.detach().sum(-1) if mode == "policy" else counts
        hidden = self._lm(embeds, attention_mask, position_ids, keep_policy=keep_seq if mode == "policy" else None)
        logits = self.llava.lm_head(hidden)
        if labels is not None:
            labels = labels.gather(1, index).masked_fill(attention_mask == 0, -100)
        return PrunedVLMOutput(logits, labels, attention_mask, index, vkeep, keep_prob, pruner_logits, n_visual,
                               visual_mask, hidden)

    def _image_tokens(self, pixel_values, image_index, batch: int) -> torch.Tensor:
        """The projected visual tokens [B, N, d] of each sample: one image per sample, or for sample ``b`` the image
        ``pixel_values[image_index[b]]`` (the vision tower runs once per image)."""
        tokens = self.visual_features(pixel_values)
        if image_index is not None:
            if image_index.shape != (batch,):
                raise ValueError(f"image_index must have shape {(batch,)}, got {tuple(image_index.shape)}")
            return tokens[image_index]
        if tokens.shape[0] != batch:
            raise ValueError(f"got {tokens.shape[0]} images for {batch} sequences (pass image_index to share images)")
        return tokens

    def _check_image_tokens(self, visual_mask, n_tokens: int) -> torch.Tensor:
        """Image placeholders per sample [B]; each sample must have ``n_tokens``. On a GPU the check runs there
        (``torch._assert_async``: no host synchronisation per step), on the CPU it raises ``ValueError``."""
        counts = visual_mask.sum(-1)
        ok = (counts == n_tokens).all()
        msg = f"every sample needs {n_tokens} image tokens (id {self.image_token_id}) in input_ids"
        if ok.is_cuda:
            torch._assert_async(ok, msg)
        elif not bool(ok):
            raise ValueError(f"{msg}, got counts {counts.tolist()}")
        return counts

    def _lm(self, embeds, attention_mask, position_ids, keep_policy=None):
        """Final hidden states of the language model; with a ``keep_policy`` [B, L], through the policy-weighted
        attention (:func:`vtp.attention.policy_attention`)."""
        if keep_policy is None:
            return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False)[0]
        with policy_attention(self.language_model):
            return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False, keep_policy=keep_policy)[0]
