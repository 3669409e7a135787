r"""The FLOPs and bytes models of lesson 09: what the arithmetic allows, before any clock is read.

A multiply-add = 2 FLOPs; matrix products only, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (norms,
activations, softmax and residual adds are left out).

**Language model prefill** (:func:`prefill_flops`; batch :math:`B`, length :math:`L`, width :math:`d`, MLP width
:math:`f`, key/value width :math:`d_{kv}`), per decoder layer

.. math::
    F_\text{proj} = 2BL(2d^2 + 2d\,d_{kv}),\quad F_\text{attn} = 4Bd\,P,\ P = \tfrac{L(L+1)}{2}
    \text{ (causal) or } L^2,\quad F_\text{mlp} = 2BL\cdot 3df,

plus :math:`2BdV` for the last token's logits; the pruner (:func:`pruner_flops`) adds :math:`2BN(d^2/r + 2d/r)`,
plus :math:`2Bd^2/r` for its question projection. The **bound** on the prefill speedup (:func:`speedup_bound`) is
:math:`F(L_\text{full}) / (F(L_\text{kept}) + F_\text{pruner})`.

**Vision tower** (:func:`vision_flops`, CLIP), :math:`P = (\text{image}/p)^2` patches, :math:`T = P + 1` tokens
([CLS]), width :math:`d_v`, MLP width :math:`f_v`, :math:`C` channels:

.. math::
    F_\text{patch} = 2BP\,(Cp^2)\,d_v,\qquad \text{per layer: } F_\text{proj} = 2BT\cdot 4d_v^2,\quad
    F_\text{attn} = 4B\,d_v\,T^2 \text{ (bidirectional)},\quad F_\text{mlp} = 2BT\cdot 2d_v f_v,

over **all** :math:`n_v` layers (LLaVA reads layer -2, but transformers runs the whole tower), and the projector
on the :math:`P` patch tokens ([CLS] dropped), :math:`F_\text{mm} = 2BP(d_v d + d^2)`. For LLaVA-1.5-7B:
:math:`F_\text{vision} \approx 0.41` TFLOPs per image (the language model's prefill of 640 tokens is
:math:`\approx 8.4` TFLOPs). The **pipeline** (:func:`pipeline_flops`, :func:`pipeline_bound`):

.. math::
    F_\text{pipe}(k) = F_\text{vision} + [k < N]\,F_\text{pruner} + F_\text{prefill}(k + n_\text{text}),\qquad
    \text{bound} = F_\text{pipe}(N) / F_\text{pipe}(k).

The vision tower is a fixed cost that pruning cannot touch, so the bound at 64 of 576 tokens is about 4.2x, not
the language model's 5x.

**Bytes.** The KV cache holds :math:`2 \cdot \text{layers} \cdot B L d_{kv}` values (:func:`kv_cache_bytes`). A decode
step reads every weight and the KV cache once; at these lengths the weights dominate (13 GB against 0.3-2.7 GB of
cache at batch 1-8), so the bound on the decode speedup is the byte ratio
:math:`(W + \text{KV}(N + n_\text{text})) / (W + \text{KV}(k + n_\text{text}))` (:func:`decode_bound`; about 1.15
at batch 8).
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlavaConfig

from .prefill_paths import _pos_int, kept_tokens

__all__ = ["prefill_flops", "pruner_flops", "speedup_bound", "kv_cache_bytes", "vision_flops",
           "pipeline_flops", "pipeline_bound", "decode_bound"]


def prefill_flops(config: LlamaConfig, seq_len: int, batch: int = 1, causal: bool = True,
                  logits_tokens: int = 1) -> dict:
    """Prefill FLOPs by term (see the module docstring); ``per_layer`` and ``total`` included."""
    L, B = _pos_int(seq_len, "seq_len"), _pos_int(batch, "batch")
    d, f, V = config.hidden_size, config.intermediate_size, config.vocab_size
    d_kv = config.num_key_value_heads * (d // config.num_attention_heads)
    pairs = L * (L + 1) // 2 if causal else L * L
    proj = 2 * B * L * (2 * d * d + 2 * d * d_kv)
    attn = 4 * B * d * pairs  # Q K^T and A V: 2 FLOPs per multiply-add, d = heads x head_dim
    mlp = 2 * B * L * 3 * d * f
    per_layer = proj + attn + mlp
    n = config.num_hidden_layers
    out = dict(proj=n * proj, attention=n * attn, mlp=n * mlp, lm_head=2 * B * logits_tokens * d * V)
    out.update(per_layer=per_layer, total=n * per_layer + out["lm_head"])
    return out


def pruner_flops(hidden: int, n_visual: int, batch: int = 1, reduction: int = 4, question: bool = True) -> int:
    """FLOPs of the pruner's scorer ``Linear(d, d/r) -> ReLU -> Linear(d/r, 2)`` on ``n_visual`` tokens, plus
    (``question``) the projection ``Linear(d, d/r)`` of one pooled question embedding per sample."""
    inner = hidden // reduction
    return 2 * batch * (n_visual * (hidden * inner + inner * 2) + (hidden * inner if question else 0))


def speedup_bound(config: LlamaConfig, ratio, n_visual: int = 576, n_text: int = 64, batch: int = 1,
                  causal: bool = True, with_pruner: bool = True) -> float:
    """FLOPs(full prefill) / (FLOPs(pruned prefill) + FLOPs(pruner)): the speedup FLOPs allow."""
    k = kept_tokens(ratio, n_visual)
    full = prefill_flops(config, n_visual + n_text, batch, causal)["total"]
    pruned = prefill_flops(config, k + n_text, batch, causal)["total"]
    extra = pruner_flops(config.hidden_size, n_visual, batch) if with_pruner else 0
    return full / (pruned + extra)


def kv_cache_bytes(config: LlamaConfig, seq_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of the KV cache: keys and values, every layer: ``2 * layers * B * L * d_kv * itemsize``."""
    d_kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch * seq_len * d_kv * itemsize


def vision_flops(config: LlavaConfig, batch: int = 1) -> dict:
    """FLOPs of the vision tower and projector for ``batch`` images, by term (see the module docstring):
    ``patch_embed``, ``proj``, ``attention``, ``mlp`` (all layers), ``projector``, ``per_layer``, ``total``."""
    B, v, d = _pos_int(batch, "batch"), config.vision_config, config.text_config.hidden_size
    dv, fv, p = v.hidden_size, v.intermediate_size, v.patch_size
    P = (v.image_size // p) ** 2
    T = P + 1  # + [CLS]
    layer = config.vision_feature_layer
    n_features = 1 if isinstance(layer, int) else len(layer)  # several layers are concatenated
    proj = 2 * B * T * 4 * dv * dv  # q, k, v, out
    attn = 4 * B * dv * T * T  # Q K^T and A V, no causal mask
    mlp = 2 * B * T * 2 * dv * fv  # fc1, fc2
    n = v.num_hidden_layers
    P_out = P if config.vision_feature_select_strategy == "default" else T
    out = dict(patch_embed=2 * B * P * v.num_channels * p * p * dv, proj=n * proj, attention=n * attn, mlp=n * mlp,
               projector=2 * B * P_out * (n_features * dv * d + d * d))
    out.update(per_layer=proj + attn + mlp, total=out["patch_embed"] + n * (proj + attn + mlp) + out["projector"])
    return out


def _n_visual(config: LlavaConfig) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def pipeline_flops(config: LlavaConfig, kept: int | None = None, n_text: int = 64, batch: int = 1,
                   causal: bool = True, with_pruner: bool | None = None) -> dict:
    """FLOPs of vision tower + pruner + prefill when the language model sees ``kept`` of the N visual tokens
    (``None``: N, the unpatched model). The pruner (question-aware) is counted when ``with_pruner`` (default:
    ``kept`` given, i.e. a patched model, which scores the tokens even at ratio 1). ``causal=False`` counts the
    full :math:`L \times L` attention scores, as ``FlopCounterMode`` does. Keys ``vision``, ``pruner``,
    ``prefill``, ``total``."""
    N = _n_visual(config)
    k = N if kept is None else _pos_int(kept, "kept")
    if k > N:
        raise ValueError(f"kept must be <= the {N} visual tokens per image, got {k}")
    with_pruner = kept is not None if with_pruner is None else with_pruner
    text = config.text_config
    out = dict(vision=vision_flops(config, batch)["total"],
               pruner=pruner_flops(text.hidden_size, N, batch) if with_pruner else 0,
               prefill=prefill_flops(text, k + n_text, batch, causal)["total"])
    out["total"] = out["vision"] + out["pruner"] + out["prefill"]
    return out


def pipeline_bound(config: LlavaConfig, kept: int, n_text: int = 64, batch: int = 1) -> float:
    """The TTFT speedup FLOPs allow: the unpatched pipeline's FLOPs over the patched one's at ``kept`` visual
    tokens, pruner included: :math:`F_\\text{pipe}(N) / F_\\text{pipe}(k)`."""
    return pipeline_flops(config, None, n_text, batch)["total"] / pipeline_flops(config, kept, n_text, batch)["total"]


def decode_bound(config: LlavaConfig, weight_bytes: int, kept: int, n_text: int = 64, batch: int = 1,
                 dtype=torch.bfloat16) -> float:
    """The decode-step speedup bytes allow (a memory-bound step reads every weight and the whole KV cache):
    :math:`(W + KV(N + n_\\text{text})) / (W + KV(k + n_\\text{text}))`."""
    text, N = config.text_config, _n_visual(config)
    full = weight_bytes + kv_cache_bytes(text, N + n_text, batch, dtype)
    return full / (weight_bytes + kv_cache_bytes(text, kept + n_text, batch, dtype))
