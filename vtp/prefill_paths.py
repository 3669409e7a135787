r"""The prefill paths that lesson 09 times (:mod:`vtp.benchmark` times them): full and pruned, eager, in CUDA
graphs, or through a compiled decoder layer.

* :class:`KVCache` and :func:`decoder_layer`: a Llama decoder layer written out in a few lines (RMSNorm, RoPE,
  SDPA, SwiGLU) on preallocated cache tensors, so that ``torch.compile`` sees one small function;
  :class:`DecoderStack` runs it for every layer of a transformers ``LlamaForCausalLM``;
  :func:`run_layers` / :func:`prefill` are the plain transformers forward.
* :class:`PrunedPrefill`: one batch's prefill, unpruned (``ratio=None``) or pruned with the pruner's own cost
  included (scoring, top-k, physical removal with the ORIGINAL position ids); the selection is the library's
  (:mod:`vtp.selection`); :func:`reference_removal` is the plain forward on the kept tokens, what every path must
  equal.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .attention import Removed, remove_tokens
from .pruner import check_ratio
from .selection import kept_tokens, select_visual, topk_index, visual_keep_prob  # kept_tokens: public here too

__all__ = ["KVCache", "kept_tokens", "decoder_layer", "DecoderStack", "run_layers", "prefill", "PrunedPrefill",
           "REMOVALS", "reference_removal", "CACHE_KWARG", "capture_graph"]

#: Keyword under which a decoder layer takes the cache: ``layer(h, ..., **{CACHE_KWARG: cache})`` ("cache" in newer
#: transformers, "past_key_values" before).
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


def _pos_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class KVCache:
    """Preallocated KV cache ``[B, kv_heads, capacity, head_dim]`` per layer (static addresses for graphs).

    A decoder layer calls ``update(k, v, layer_idx)``: the new keys land at ``[length, length + q)`` and the
    filled prefix is returned; :func:`run_layers` advances ``length`` once all layers have run.
    """

    def __init__(self, config: LlamaConfig, batch: int, capacity: int, device=None, dtype=torch.bfloat16):
        hd = config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, _pos_int(capacity, "capacity"), hd)
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({end} tokens)")
        self.keys[layer_idx][:, :, start:end].copy_(key_states)
        self.values[layer_idx][:, :, start:end].copy_(value_states)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def nbytes(self) -> int:
        """Bytes of the filled part (``length`` tokens)."""
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[0] * k.shape[1] * self.length * k.shape[3] * k.element_size()


def _rms_norm(x, weight, eps: float):
    """RMSNorm as ``LlamaRMSNorm`` computes it: in float32, rounded back before the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    """Rotary embedding of ``x`` [B, heads, L, hd]: ``x cos + rotate_half(x) sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)


def decoder_layer(h, cos, sin, weights, cache_k, cache_v, eps: float, heads: int):
    r"""One Llama decoder layer of a prefill from position 0, written as plain tensor operations (what
    ``LlamaDecoderLayer`` computes with SDPA attention and no biases):

    .. math::
        x = h + W_o\,\mathrm{attn}\big(R(W_q n_1(h)),\, R(W_k n_1(h)),\, W_v n_1(h)\big),\qquad
        \text{out} = x + W_\text{down}\big(\mathrm{silu}(W_\text{gate} n_2(x)) \odot W_\text{up} n_2(x)\big)

    with :math:`n_i` RMSNorm, :math:`R` the rotary embedding (``cos``, ``sin`` [B, L, head_dim]) and causal
    attention. The keys and values land in ``cache_k``, ``cache_v`` [B, kv_heads, capacity, head_dim] at
    ``[0, L)``. ``weights`` = (n_1, W_q, W_k, W_v, W_o, n_2, W_gate, W_up, W_down) are arguments, not module
    state, so one compiled graph serves every layer.
    """
    ln1, wq, wk, wv, wo, ln2, wg, wu, wd = weights
    B, L, d = h.shape
    x = _rms_norm(h, ln1, eps)
    q = F.linear(x, wq).view(B, L, heads, -1).transpose(1, 2)
    k = F.linear(x, wk).view(B, L, -1, q.shape[-1]).transpose(1, 2)
    v = F.linear(x, wv).view(B, L, -1, q.shape[-1]).transpose(1, 2)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    cache_k[:, :, :L] = k
    cache_v[:, :, :L] = v
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != heads)
    h = h + F.linear(a.transpose(1, 2).reshape(B, L, d), wo)
    x = _rms_norm(h, ln2, eps)
    return h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


class DecoderStack:
    """A Llama model's decoder layers as :func:`decoder_layer` applied with each layer's weights, optionally
    compiled (``compile=True``) by ``torch.compile(decoder_layer, dynamic=False)``.

    All layers have the same shapes, so Dynamo traces ONE graph per (batch, length) and every layer reuses
    it. Inductor fuses each run of elementwise kernels (RMSNorm, RoPE with the cache write, SiLU times up,
    the residual adds) into one kernel; the matrix products stay cuBLAS calls and attention SDPA's flash
    kernel. The result is ordinary kernel launches, which a CUDA graph captures like eager ones.
    ``autotune=True`` also lets Inductor benchmark matrix-product kernels (slow to compile).
    """

    def __init__(self, model, compile: bool = False, autotune: bool = False):
        c = model.config
        if c.hidden_act != "silu" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise ValueError("DecoderStack expects a Llama config with SiLU and no biases")
        self.eps, self.heads, self.fn = c.rms_norm_eps, c.num_attention_heads, decoder_layer
        self.weights = [tuple(w.detach() for w in (l.input_layernorm.weight, l.self_attn.q_proj.weight,
                                                   l.self_attn.k_proj.weight, l.self_attn.v_proj.weight,
                                                   l.self_attn.o_proj.weight, l.post_attention_layernorm.weight,
                                                   l.mlp.gate_proj.weight, l.mlp.up_proj.weight,
                                                   l.mlp.down_proj.weight))
                        for l in model.model.layers]
        self.compiled = compile
        if compile:
            dynamo = torch._dynamo.config  # one graph per (batch, length): allow more than the default 8
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            # round where the eager code rounds (RMSNorm's cast back), so the fused kernels match eager closely
            options = {"emulate_precision_casts": True, "max_autotune": autotune}
            self.fn = torch.compile(decoder_layer, dynamic=False, options=options)

    def __call__(self, h, position_embeddings, cache: KVCache):
        cos, sin = position_embeddings
        h = h.contiguous()  # a strided input would cost a graph of its own (Dynamo guards on strides)
        for weights, cache_k, cache_v in zip(self.weights, cache.keys, cache.values):
            h = self.fn(h, cos, sin, weights, cache_k, cache_v, self.eps, self.heads)
        return h


def run_layers(model, embeds: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None,
               layers: DecoderStack | None = None):
    """The decoder stack of a transformers Llama model on ``embeds`` [B, L, d] with ``position_ids`` [B, L].

    Same modules as ``model.model.forward``; the attention mask is left to SDPA's ``is_causal`` (no padding:
    the top-k budget gives every sample the same length), so the flash kernel runs, and nothing reads
    tensors back to the host, so the whole call can be captured in a CUDA graph. Returns the final-norm
    hidden states [B, L, d]; with a ``cache``, K/V are written into it and ``cache.length`` advances.
    ``layers`` (a :class:`DecoderStack`, prefill into an empty ``cache`` only) replaces the modules' forward.
    """
    if model.config._attn_implementation != "sdpa":  # eager attention would ignore causality without a mask
        raise ValueError(f"model must use attn_implementation='sdpa', got {model.config._attn_implementation!r}")
    base = model.model
    pos_emb = base.rotary_emb(embeds, position_ids)
    if layers is not None:
        if cache is None or cache.length != 0:
            raise ValueError("layers=DecoderStack runs a prefill: it needs an empty cache")
        h = layers(embeds, pos_emb, cache)
    else:
        h = embeds
        for layer in base.layers:
            h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos_emb,
                      **{CACHE_KWARG: cache})
    if cache is not None:
        cache.length += embeds.shape[1]
    return base.norm(h)


def prefill(model, embeds, position_ids, cache: KVCache | None = None, layers: DecoderStack | None = None):
    """Prefill: fill ``cache`` from position 0 and return (hidden [B, L, d], logits of the last token [B, V])."""
    if cache is not None:
        cache.length = 0
    hidden = run_layers(model, embeds, position_ids, cache, layers)
    return hidden, model.lm_head(hidden[:, -1])


REMOVALS = ("library", "static")


class PrunedPrefill:
    """Prefill of one batch, full or pruned, in eager mode or as CUDA graphs (``graphs=True``, CUDA only).

    ``embeds`` [B, n_text + n_visual, d] holds ``text_before`` text tokens, then the visual tokens, then the
    rest of the text (the pruner scores a contiguous copy of the visual tokens, as it scores the projector's
    output in a VLM); ``ratio=None`` is the unpruned baseline. Calling the object runs one prefill and
    returns ``(hidden, logits)``; :meth:`select_and_remove` is the pruner's share of the work. ``layers``
    (a :class:`DecoderStack`, compiled or not) replaces the decoder modules' forward.

    ``removal="library"`` selects with :func:`vtp.selection.select_visual` (what :func:`vtp.patch` and
    :class:`vtp.PrunedVLM` call), builds the keep mask over all L tokens and removes tokens with
    :func:`vtp.attention.remove_tokens`, which reads the kept count back to the host (it must size its
    output), so in graph mode it runs eagerly between two graphs. ``removal="static"`` uses the kept count
    known in advance (top-k budget): the same scores (:func:`vtp.selection.visual_keep_prob`) and the kept index
    gathered directly (:func:`vtp.selection.topk_index`), without a read-back, so pruner, removal and model form a
    single graph; its output is identical. The pruner must be in eval mode: its deployed top-k rule is timed.
    """

    def __init__(self, model, pruner, embeds, n_visual: int, text_before: int = 0, ratio=None,
                 graphs: bool = False, removal: str = "library", layers: DecoderStack | None = None):
        B, L, _ = embeds.shape
        if not 1 <= n_visual < L:
            raise ValueError(f"n_visual must be in [1, {L - 1}] (sequence length {L}), got {n_visual}")
        if not 0 <= text_before <= L - n_visual:
            raise ValueError(f"text_before must be in [0, {L - n_visual}], got {text_before}")
        if removal not in REMOVALS:
            raise ValueError(f"removal must be one of {REMOVALS}, got {removal!r}")
        if pruner.training:
            raise ValueError("pruner must be in eval mode (pruner.eval()): the prefill times its top-k rule")
        self.model, self.pruner, self.embeds, self.removal, self.layers = model, pruner, embeds, removal, layers
        self.ratio = None if ratio is None else check_ratio(ratio)
        self.vis = slice(text_before, text_before + n_visual)
        self.k = n_visual if ratio is None else kept_tokens(ratio, n_visual, pruner.min_keep)
        self.seq_len = L - n_visual + self.k
        positions = torch.arange(L, device=embeds.device)
        self.positions = positions.expand(B, L)
        # constant parts of the static removal: the text positions, and every sample keeps seq_len tokens
        self._text = (positions[:text_before].expand(B, -1), positions[self.vis.stop:].expand(B, -1))
        self._ones = torch.ones(B, self.seq_len, dtype=torch.long, device=embeds.device)
        self._lengths = torch.full((B,), self.seq_len, dtype=torch.long, device=embeds.device)
        self._tiebreak = n_visual - 1 - torch.arange(n_visual, device=embeds.device)  # earlier token first
        # the pruner scores the projector's output, a contiguous [B, N, d] tensor in a VLM; a strided slice of the
        # merged sequence would make every scoring pay a copy of all visual tokens (measured: 42 us at batch 8).
        # Likewise a question-aware pruner averages one contiguous copy of the text tokens (one reduction kernel)
        self._visual = embeds[:, self.vis].contiguous()
        self._text_tokens = None if getattr(pruner, "text_dim", None) is None else torch.cat(
            [embeds[:, :text_before], embeds[:, self.vis.stop:]], dim=1)
        self.graphs = graphs and embeds.is_cuda
        # the compiled selection is stored unbound (called with self): a bound method kept on self would make
        # a reference cycle, and only the garbage collector would then free this object's graphs and KV cache
        self._compiled = None
        if layers is not None and layers.compiled and removal == "static" and ratio is not None:
            self._compiled = self._compile_select()
        self.cache = KVCache(model.config, B, self.seq_len + 1, embeds.device, embeds.dtype)  # +1: a decode step
        if not self.graphs:
            return
        if ratio is None:
            self._graph, self._out = capture_graph(lambda: self._prefill(embeds, self.positions))
        elif removal == "static":  # everything in one graph, plus the selection alone to time its share
            self._select_graph, self._removed = capture_graph(self._select)
            self._graph, self._out = capture_graph(self._static_step)
        else:  # graph 1: scoring + top-k; eager remove_tokens; graph 2: the model on static inputs
            self._select_graph, self._keep = capture_graph(self._keep_mask)
            self._in = (embeds[:, :self.seq_len].clone(), self.positions[:, :self.seq_len].clone())
            self._graph, self._out = capture_graph(lambda: self._prefill(*self._in))

    def _prefill(self, embeds, position_ids):
        return prefill(self.model, embeds, position_ids, self.cache, self.layers)

    def _compile_select(self):
        """:meth:`_static_select` through ``torch.compile`` (with the compiled decoder layers): scoring, top-k
        and gather in a few fused kernels. Compiled here, before any capture; if that fails, ``None`` (the
        eager selection is used) and the error kept in ``select_compile_error``."""
        fn = torch.compile(type(self)._static_select, dynamic=False)
        try:
            ref, out = self._static_select(), fn(self)
            # fused kernels round the bf16 scores differently, so near-ties may swap: the kept tokens' eager
            # keep probabilities must match (sorted) within bf16 rounding, not the indices themselves
            p, vis = self._keep_prob().float(), slice(self.vis.start, self.vis.start + self.k)
            kept_p = [p.gather(1, r.index[:, vis] - self.vis.start).sort(dim=-1).values for r in (ref, out)]
            if not torch.allclose(*kept_p, rtol=0.0, atol=1e-2):
                raise RuntimeError("compiled selection kept tokens the eager one ranks lower beyond bf16 rounding")
            return fn
        except Exception as e:
            self.select_compile_error = f"{type(e).__name__}: {e}"
            return None

    def _select(self) -> Removed:
        return self._static_select() if self._compiled is None else self._compiled(self)

    def _question(self) -> torch.Tensor | None:
        """The pooled question a question-aware pruner reads: the mean of the text tokens' embeddings, as
        :meth:`vtp.PrunedVLM.question_embedding` (``None`` for a question-blind pruner)."""
        return None if self._text_tokens is None else self._text_tokens.mean(1)

    def _keep_prob(self) -> torch.Tensor:
        """The pruner's keep probabilities [B, n_visual]: :func:`vtp.selection.visual_keep_prob`."""
        return visual_keep_prob(self.pruner, self._visual, self._question())

    def _keep_mask(self) -> torch.Tensor:
        """Keep mask [B, L]: text always kept, visual tokens by :func:`vtp.selection.select_visual` at ``ratio``
        (the pruner's eval-mode top-k rule)."""
        keep = torch.ones(self.embeds.shape[:2], dtype=torch.bool, device=self.embeds.device)
        out = select_visual(self.pruner, self._visual, text=self._question(), ratio=self.ratio)
        keep[:, self.vis] = out.mask.bool()
        return keep

    def _static_select(self) -> Removed:
        """Top-k selection and removal for the kept count ``k`` known in advance, with one gather: kept index =
        [0, text_before) ++ (text_before + the k best visual tokens, ascending: :func:`vtp.selection.topk_index`)
        ++ the rest of the text. The same tokens, in the same order, as :meth:`_keep_mask` then ``remove_tokens``,
        with a handful of kernels instead of a mask over all L tokens and its sort."""
        best = topk_index(self._keep_prob(), self.k, self._tiebreak)
        index = torch.cat([self._text[0], best + self.vis.start, self._text[1]], dim=1)
        embeds = self.embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, self.embeds.shape[-1]))
        return Removed(embeds, index, self._ones, index, self._lengths)  # position ids = original positions

    def _static_step(self):
        removed = self._select()
        return self._prefill(removed.embeds, removed.position_ids)

    def select_and_remove(self) -> Removed:
        """Score, top-k and physically remove: the pruner's share of the pruned prefill."""
        if self.removal == "static":
            if self.graphs:
                self._select_graph.replay()
                return self._removed
            return self._select()
        if self.graphs:
            self._select_graph.replay()
        removed = remove_tokens(self.embeds, self._keep if self.graphs else self._keep_mask(), self.positions)
        if removed.embeds.shape[1] != self.seq_len:
            raise RuntimeError(f"expected {self.seq_len} tokens after removal, got {removed.embeds.shape[1]}")
        return removed

    def __call__(self):
        if self.graphs and (self.ratio is None or self.removal == "static"):
            self._graph.replay()
            return self._out
        if self.ratio is None:
            return self._prefill(self.embeds, self.positions)
        removed = self.select_and_remove()
        if not self.graphs:
            return self._prefill(removed.embeds, removed.position_ids)
        self._in[0].copy_(removed.embeds)
        self._in[1].copy_(removed.position_ids)
        self._graph.replay()
        return self._out


def capture_graph(fn, warmup: int = 2):
    """Warm ``fn`` up on a side stream, then capture one call in a CUDA graph; returns (graph, output).
    The warm-up runs also compile a ``torch.compile`` function, before the capture begins."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def reference_removal(model, embeds, kept_index):
    """Reference for the pruned path: plain ``model.model`` forward on ``embeds[:, kept_index]`` with the
    original positions ``kept_index`` [B, K] and an all-ones attention mask. Returns hidden [B, K, d]."""
    idx = kept_index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
    out = model.model(inputs_embeds=embeds.gather(1, idx), position_ids=kept_index,
                      attention_mask=torch.ones_like(kept_index), use_cache=False)
    return out.last_hidden_state
