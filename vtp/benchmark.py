r"""Inference speed of pruned prefill, measured against a FLOPs model (accuracy lives in :mod:`vtp.evaluate`;
speed is kept here so that each module stays small; the prefill paths it times live in :mod:`vtp.prefill_paths`).

The language model is a transformers ``LlamaForCausalLM`` built from a config (random weights), shaped like
LLaVA-1.5-7B's by default, fed ``n_visual`` visual tokens inside ``n_text`` text tokens. The **pruned** path
is the real inference path, its cost included: :class:`~vtp.GumbelVisionPruner` scores the visual tokens
(eval, top-k), :func:`vtp.attention.remove_tokens` removes the dropped ones keeping the ORIGINAL position
ids, and the shorter sequence goes through the model.

**FLOPs model** (a multiply-add = 2 FLOPs), batch :math:`B`, length :math:`L`, width :math:`d`, MLP width
:math:`f`, key/value width :math:`d_{kv}`, per decoder layer

.. math::
    F_\text{proj} = 2BL(2d^2 + 2d\,d_{kv}),\quad F_\text{attn} = 4Bd\,P,\ P = \tfrac{L(L+1)}{2}
    \text{ (causal) or } L^2,\quad F_\text{mlp} = 2BL\cdot 3df,

plus :math:`2BdV` for the last token's logits; the pruner adds :math:`2BN(d^2/r + 2d/r)`, plus :math:`2Bd^2/r` for its question projection. The **bound** on
the speedup is :math:`F(L_\text{full}) / (F(L_\text{kept}) + F_\text{pruner})`.

**Timing**: CUDA events after warm-up, median of ``repeats`` runs, each starting on an idle GPU. Methods:
``eager`` (one launch per kernel), ``graph`` (CUDA graphs, static shapes) and ``compiled`` (the decoder layer
compiled by ``torch.compile`` as one function shared by all layers, see :class:`DecoderStack`, then captured
in CUDA graphs like ``graph``); full and pruned prefill are always timed with the same method. With
``removal="library"``, ``remove_tokens`` runs eagerly between the pruner's graph and the model's, because it
reads the kept count back to size its output; ``removal="static"`` needs no read-back (one graph).
``python -m vtp.benchmark`` (GPU: LLaVA-7B shape, writes JSON), ``python -m vtp.benchmark --smoke`` (CPU).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median, quantiles

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

# re-exported: lesson 09 and the tests reach the prefill paths (and CACHE_KWARG) through this module
from .prefill_paths import (CACHE_KWARG, REMOVALS, DecoderStack, KVCache, PrunedPrefill, _capture, _pos_int, decoder_layer,
                           kept_tokens, prefill, reference_removal, run_layers)  # noqa: F401
from .pruner import GumbelVisionPruner, check_ratio
from .runtime import default_device, device_name, run_mode

__all__ = ["LLAVA_7B", "TINY", "BenchConfig", "KVCache", "CACHE_KWARG", "lm_config", "build_lm", "prefill_flops",
           "pruner_flops", "kept_tokens", "speedup_bound", "kv_cache_bytes", "decoder_layer", "DecoderStack",
           "run_layers", "prefill", "PrunedPrefill", "reference_removal", "time_ms", "run_benchmark", "check_goals",
           "format_table", "write_results", "main"]

LLAVA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=256)
SHAPES = {"llava-7b": LLAVA_7B, "tiny": TINY}


def lm_config(shape="llava-7b") -> LlamaConfig:
    """A ``LlamaConfig`` (SDPA attention) from a shape name in ``SHAPES`` or a dict of config fields."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)} or a dict, got {shape!r}")
        shape = SHAPES[shape]
    return LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")


def build_lm(config: LlamaConfig, device=None, dtype=torch.bfloat16, seed: int = 0):
    """Random-weight ``LlamaForCausalLM`` built directly on ``device`` in ``dtype`` (eval mode)."""
    torch.manual_seed(seed)
    with torch.device(device or default_device()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# ----------------------------------------------------------------------------------------------- FLOPs model
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


# ------------------------------------------------------------------------------------------------- timing
def time_ms(fn, warmup: int = 3, repeats: int = 20, device=None) -> list[float]:
    """Times of ``repeats`` calls in ms (CUDA events on CUDA, else the host clock), after ``warmup`` calls.
    The device is synchronized before each call, so every call starts on an idle GPU."""
    cuda = torch.device(device or default_device()).type == "cuda"
    for _ in range(_pos_int(warmup, "warmup", 0)):
        fn()
    times = []
    for _ in range(_pos_int(repeats, "repeats")):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _iqr(times):
    q = quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return q[2] - q[0]


def _rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def measure_roofline(device, size: int = 8192) -> dict:
    """This GPU's two ceilings, measured: bf16 matrix product TFLOP/s and device copy GB/s (read + write)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    t = median(time_ms(lambda: a @ b, 3, 10, device))
    x = torch.randn(2**28, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    tc = median(time_ms(lambda: y.copy_(x), 3, 10, device))
    return dict(matmul_tflops=2 * size**3 / t / 1e9, copy_gbps=2 * x.nbytes / tc / 1e6)


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchConfig:
    """What :func:`run_benchmark` measures: the lesson's GPU setting by default, ``smoke()`` a CPU minute."""

    shape: str = "llava-7b"
    batches: tuple = (1, 8, 32)
    ratios: tuple = (1.0, 0.5, 0.25, 0.11)
    n_visual: int = 576
    n_text: int = 64
    text_before: int = 16  # text tokens before the image (system prompt); the rest follow it
    warmup: int = 3
    repeats: int = 25
    graphs: bool = True  # CUDA graphs on CUDA (ignored on the CPU)
    eager_batches: tuple = (1, 8)  # batches also timed without graphs, to show the launch overhead
    compile_batches: tuple = (1, 8)  # batches also timed with the compiled decoder layer (CUDA graphs, CUDA only)
    compile_autotune: bool = False  # let torch.compile benchmark matrix-product kernels too (minutes more)
    decode: bool = True
    dtype: str = "bfloat16"
    device: str | None = None
    seed: int = 0

    @classmethod
    def smoke(cls, **kw):
        base = dict(shape="tiny", batches=(1, 2), warmup=1, repeats=5, eager_batches=(), dtype="float32")
        return cls(**{**base, **kw})

    def validate(self):
        lm_config(self.shape)
        if not self.batches or not self.ratios:
            raise ValueError(f"batches and ratios must not be empty, got {self.batches}, {self.ratios}")
        for b in (*self.batches, *self.eager_batches, *self.compile_batches):
            _pos_int(b, "batches")
        for r in self.ratios:
            check_ratio(r, "ratios")
        _pos_int(self.n_visual, "n_visual")
        _pos_int(self.n_text, "n_text")
        if not 0 <= self.text_before < self.n_text:
            raise ValueError(f"text_before must be in [0, n_text={self.n_text}), got {self.text_before}")
        _pos_int(self.repeats, "repeats")
        _pos_int(self.warmup, "warmup", 0)
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        return self


def _decode(run: PrunedPrefill, cfg, device) -> dict:
    """Decode tokens/s on top of ``run``'s freshly filled cache (one greedy step, replayed)."""
    ids = run()[1].argmax(-1, keepdim=True).clone()
    run.cache.length = run.seq_len
    pos = torch.full_like(ids, cfg.n_visual + cfg.n_text)  # the next ORIGINAL position, pruned or not
    model, cache = run.model, run.cache

    def step():  # one greedy step; it writes the same cache slot each time, so every step costs the same
        hidden = run_layers(model, model.model.embed_tokens(ids), pos, cache)
        cache.length -= 1
        ids.copy_(model.lm_head(hidden).argmax(-1))

    if run.graphs:
        graph, _ = _capture(step)
        step = graph.replay
    t = median(time_ms(step, cfg.warmup, cfg.repeats, device))
    B = ids.shape[0]
    mb = kv_cache_bytes(run.model.config, run.seq_len, B, run.embeds.dtype) / 2**20
    return dict(batch=B, cache_len=run.seq_len, kv_cache_mb=mb, step_ms=t, tokens_per_s=1e3 * B / t)


def _ulp_sensitivity(model, embeds, kept_index, ref=None, seed: int = 0) -> float:
    """Relative change of the reference removal's output (``ref``, computed if not given) when every input
    value moves by one bf16 unit in the last place (2^-8 of it, random sign): how far two equally valid
    roundings of the same computation drift apart in this model. The yardstick for the compiled layers, whose
    fused kernels round differently."""
    g = torch.Generator(embeds.device).manual_seed(seed)
    sign = torch.randint(0, 2, embeds.shape, generator=g, device=embeds.device) * 2 - 1
    nudged = (embeds.float() * (1 + sign * 2.0 ** -8)).to(embeds.dtype)
    ref = reference_removal(model, embeds, kept_index) if ref is None else ref
    return _rel_err(reference_removal(model, nudged, kept_index), ref)


def _verify(model, pruner, embeds, cfg, layers=None, tag="") -> dict:
    """Before timing (keep 0.25): graphed (with ``layers``, if given) vs eager pruned prefill, for both
    removals, and vs the reference; keys ``{tag}{removal}_graph_vs_eager`` and ``..._vs_reference``; without
    a tag also ``reference_ulp_sensitivity`` (:func:`_ulp_sensitivity`)."""
    args = (model, pruner, embeds, cfg.n_visual, cfg.text_before, 0.25)
    h_eager = PrunedPrefill(*args, graphs=False)()[0].clone()
    out = {}
    for removal in REMOVALS:
        graphed = PrunedPrefill(*args, graphs=True, removal=removal, layers=layers)
        graphed._out[0].fill_(float("nan"))  # poison: the replay must write every element
        h = graphed()[0].clone()
        if not bool(torch.isfinite(h).all()):
            raise RuntimeError(f"graphed prefill ({tag}{removal} removal) left non-finite outputs")
        index = graphed.select_and_remove().index
        ref = reference_removal(model, embeds, index)
        out[f"{tag}{removal}_graph_vs_eager"] = _rel_err(h, h_eager)
        out[f"{tag}{removal}_graph_vs_reference"] = _rel_err(h, ref)
        if not tag and removal == "static":
            out["reference_ulp_sensitivity"] = _ulp_sensitivity(model, embeds, index, ref)
        del graphed
    return out


def _measure(res, model, pruner, embeds, cfg, method: str, main: str, layers, device, log):
    """Full prefill, then pruned prefill at every ratio and removal, all timed with ``method``; appends the
    rows (and, for the main method, the decode rows) to ``res``."""
    graphs, args = method != "eager", (model, pruner, embeds, cfg.n_visual, cfg.text_before)
    full = PrunedPrefill(*args, None, graphs, layers=layers)
    full_t = time_ms(full, cfg.warmup, cfg.repeats, device)
    if cfg.decode and method == main:
        res["decode"].append(_decode(full, cfg, device))
    del full
    removals = REMOVALS[:1] if method == "eager" and method != main else REMOVALS
    for r, removal in [(r, m) for r in cfg.ratios for m in removals]:
        run = PrunedPrefill(*args, r, graphs, removal, layers)
        t = time_ms(run, cfg.warmup, cfg.repeats, device)
        over = time_ms(run.select_and_remove, cfg.warmup, cfg.repeats, device)
        if hasattr(run, "select_compile_error"):
            _skip(res, log, embeds.shape[0], f"{method} selection", run.select_compile_error)
        res["prefill"].append(_row(model.config, cfg, res, method, removal, embeds.shape[0], r, full_t, t, over))
        log(_fmt_row(res["prefill"][-1]))
        if cfg.decode and method == main and r < 1 and removal == "library":
            res["decode"].append(_decode(run, cfg, device))
        del run
        if embeds.is_cuda:
            torch.cuda.empty_cache()


def _skip(res, log, batch, method, reason):
    res["skipped"].append(dict(batch=batch, method=method, reason=reason))
    log(f"batch {batch} ({method}): skipped, {reason}")


@torch.no_grad()
def run_benchmark(cfg: BenchConfig | None = None, log=print) -> dict:
    """Measure full vs pruned prefill (and decode) for every batch and keep ratio of ``cfg``; JSON-ready dict.

    Methods per batch: the main one (``graph`` on CUDA, else ``eager``), ``compiled`` for ``compile_batches``
    (CUDA graphs only; a compile error is recorded in ``skipped``, not raised) and ``eager`` for
    ``eager_batches``."""
    cfg = (cfg or (BenchConfig() if run_mode() == "full" else BenchConfig.smoke())).validate()
    device = torch.device(cfg.device) if cfg.device else default_device()
    cuda, dtype = device.type == "cuda", getattr(torch, cfg.dtype)
    config, t0 = lm_config(cfg.shape), time.perf_counter()
    model = build_lm(config, device, dtype, cfg.seed)
    # lesson 07's pruner reads the question; its projection starts at zero, so give it random weights here
    pruner = GumbelVisionPruner(config.hidden_size, rule="topk", text_dim=config.hidden_size)
    torch.nn.init.normal_(pruner.text_proj.weight, std=config.hidden_size ** -0.5)
    pruner = pruner.to(device, dtype).eval()
    L = cfg.n_visual + cfg.n_text
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    res = dict(device=device_name(device), torch=torch.__version__, mode=run_mode(), config=asdict(cfg),
               model={k: getattr(config, k) for k in LLAVA_7B}, weight_bytes=weights,
               roofline=measure_roofline(device) if cuda else None, checks={}, prefill=[], decode=[], skipped=[])
    log(f"{res['device']}: model built in {time.perf_counter() - t0:.1f} s")
    main = "graph" if cuda and cfg.graphs else "eager"
    stack = None  # the compiled DecoderStack, built once: its graphs are shared by every batch
    for B in cfg.batches:
        embeds = torch.randn(B, L, config.hidden_size, device=device, dtype=dtype,
                             generator=torch.Generator(device).manual_seed(cfg.seed + B))
        methods = [main]
        if B in cfg.compile_batches:
            if main == "graph":
                methods.append("compiled")
            else:
                _skip(res, log, B, "compiled", "torch.compile lever: CUDA with CUDA graphs only")
        if main == "graph" and B in cfg.eager_batches:
            methods.append("eager")
        for method in methods:
            try:
                if method == "compiled":
                    stack = stack or DecoderStack(model, compile=True, autotune=cfg.compile_autotune)
                layers, tag = (stack, "compiled_") if method == "compiled" else (None, "")
                if method != "eager" and f"{tag}static_graph_vs_reference" not in res["checks"]:
                    res["checks"].update(_verify(model, pruner, embeds, cfg, layers, tag))
                    log(f"checks: {res['checks']}")
                _measure(res, model, pruner, embeds, cfg, method, main, layers, device, log)
            except torch.cuda.OutOfMemoryError:
                _skip(res, log, B, method, "out of memory")
                torch.cuda.empty_cache()
            except Exception as e:  # the compiled lever is optional: record why it failed and go on
                if method != "compiled":
                    raise
                _skip(res, log, B, method, f"torch.compile failed: {type(e).__name__}: {e}")
                stack = None  # compile afresh for the next batch
                torch.cuda.empty_cache()
    res["goals"], res["seconds"] = check_goals(res), time.perf_counter() - t0
    return res


def _row(config, cfg, res, method, removal, B, r, full_t, t, over) -> dict:
    L, k, dtype = cfg.n_visual + cfg.n_text, kept_tokens(r, cfg.n_visual), getattr(torch, cfg.dtype)
    f_full = prefill_flops(config, L, B)["total"]
    f_pruned = prefill_flops(config, k + cfg.n_text, B)["total"] + pruner_flops(config.hidden_size, cfg.n_visual, B)
    full_ms, pruned_ms, over_ms = median(full_t), median(t), median(over)
    bound = speedup_bound(config, r, cfg.n_visual, cfg.n_text, B)
    row = dict(method=method, removal=removal, batch=B, keep_ratio=r, visual_kept=k, seq_len=k + cfg.n_text, full_ms=full_ms,
               pruned_ms=pruned_ms, full_iqr_ms=_iqr(full_t), pruned_iqr_ms=_iqr(t), speedup=full_ms / pruned_ms,
               bound=bound, fraction_of_bound=full_ms / pruned_ms / bound, overhead_ms=over_ms,
               overhead_frac=over_ms / pruned_ms, samples_per_s=1e3 * B / pruned_ms,
               tflops_full=f_full / full_ms / 1e9, tflops_pruned=f_pruned / pruned_ms / 1e9,
               kv_cache_mb_full=kv_cache_bytes(config, L, B, dtype) / 2**20,
               kv_cache_mb_pruned=kv_cache_bytes(config, k + cfg.n_text, B, dtype) / 2**20)
    if res["roofline"]:  # roofline floor: max(FLOPs / peak rate, weight bytes / bandwidth)
        peak, bw = res["roofline"]["matmul_tflops"] * 1e9, res["roofline"]["copy_gbps"] * 1e6
        row["floor_full_ms"] = max(f_full / peak, res["weight_bytes"] / bw)
        row["floor_pruned_ms"] = max(f_pruned / peak, res["weight_bytes"] / bw)
    return row


def _fmt_row(r) -> str:
    return (f"{r['method']:>8} {r['removal']:>7} B={r['batch']:<3d} keep={r['keep_ratio']:<5g}({r['visual_kept']:>3d} vis) "
            f"full {r['full_ms']:8.2f} ms  pruned {r['pruned_ms']:8.2f} ms  speedup {r['speedup']:5.2f}x  "
            f"bound {r['bound']:5.2f}x ({r['fraction_of_bound']:4.0%})  pruner {r['overhead_frac']:6.2%}")


def check_goals(res: dict) -> list[dict]:
    """The lesson's speed goals: target, measured value, met or not.

    First on the main method's rows (graphs on CUDA), for each removal; the ``library`` rows are the ones
    the goals are about. Then the batch-1 and batch-8 goals once more for the fastest method and removal at
    keep 0.25 (``compiled`` where it ran), labelled ``[best: method, removal]``, with ``method`` and
    ``removal`` "best".
    """
    rows, goals = res["prefill"], []
    main = rows[0]["method"] if rows else None

    def add(name, label, target, value, met, method, removal):
        goals.append(dict(goal=f"{name} [{label}]", method=method, removal=removal, target=target,
                          measured=value, met=bool(met)))

    def worst_overhead(B, method, removal):
        return max(r["overhead_frac"] for r in rows
                   if r["batch"] == B and r["method"] == method and r["removal"] == removal)

    for removal in REMOVALS:
        at = {(r["batch"], r["keep_ratio"]): r for r in rows if r["method"] == main and r["removal"] == removal}
        label = f"{removal} removal"
        for B in (8, 32):
            if (B, 0.25) in at:
                frac = at[B, 0.25]["fraction_of_bound"]
                add(f"speedup / FLOPs bound, keep 0.25, batch {B}", label, ">= 0.90", frac, frac >= 0.90, main, removal)
        if (1, 0.25) in at:
            s = at[1, 0.25]["speedup"]
            add("speedup, keep 0.25, batch 1", label, ">= 2.0", s, s >= 2.0, main, removal)
        for B in sorted({b for b, _ in at}):
            worst = worst_overhead(B, main, removal)
            add(f"pruner overhead / pruned prefill, batch {B} (worst ratio)", label, "<= 0.01", worst, worst <= 0.01,
                main, removal)
    for B in (1, 8):  # the fastest method and removal at keep 0.25 (compiled, where it ran)
        at_025 = [r for r in rows if r["batch"] == B and r["keep_ratio"] == 0.25]
        if not at_025:
            continue
        best = max(at_025, key=lambda r: r["speedup"])
        label = f"best: {best['method']}, {best['removal']} removal"
        if B == 1:
            add("speedup, keep 0.25, batch 1", label, ">= 2.0", best["speedup"], best["speedup"] >= 2.0, "best", "best")
        else:
            frac = best["fraction_of_bound"]
            add(f"speedup / FLOPs bound, keep 0.25, batch {B}", label, ">= 0.90", frac, frac >= 0.90, "best", "best")
        worst = worst_overhead(B, best["method"], best["removal"])
        add(f"pruner overhead / pruned prefill, batch {B} (worst ratio)", label, "<= 0.01", worst, worst <= 0.01,
            "best", "best")
    return goals


CPU_CAVEAT = ("NOTE: timed on a CPU. These timings are not meaningful for GPU inference (no CUDA graphs, other "
              "kernels, other bottlenecks): the speedups, bounds and goals describe this CPU run only. Lesson 09's "
              "numbers come from a CUDA GPU.")


def format_table(res: dict, prefill: bool = True) -> str:
    """Plain-text tables of the prefill rows (unless ``prefill=False``: the command line has printed them as
    they were measured), the decode rows, what was skipped and the goals; on a CPU, :data:`CPU_CAVEAT` first."""
    lines = [f"device: {res['device']}"] + ([CPU_CAVEAT] if str(res["device"]).startswith("CPU") else [])
    lines += [_fmt_row(r) for r in res["prefill"]] if prefill else []
    lines += [f"decode B={d['batch']:<3d} cache {d['cache_len']:>4d} tokens ({d['kv_cache_mb']:8.1f} MiB): "
              f"{d['step_ms']:7.2f} ms/step, {d['tokens_per_s']:9.1f} tokens/s" for d in res["decode"]]
    lines += [f"skipped B={s['batch']} {s['method']}: {s['reason']}" for s in res.get("skipped", [])] if prefill else []
    lines += [f"goal {g['goal']}: {g['target']}, measured {g['measured']:.3f} -> {'met' if g['met'] else 'MISSED'}"
              for g in res.get("goals", [])]
    return "\n".join(lines)


def _arg(kind, low: int = 1):
    """argparse type: an int >= ``low`` (``kind="int"``) or a keep ratio in (0, 1] (``kind="ratio"``)."""
    def parse(text):
        try:
            return check_ratio(float(text)) if kind == "ratio" else _pos_int(int(text), "value", low)
        except ValueError:
            want = "a keep ratio in (0, 1]" if kind == "ratio" else f"an int >= {low}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
    return parse


def _device(text):
    try:
        return str(torch.device(text))
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device (cpu, cuda, cuda:1, ...): {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtp.benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Prefill speed, full vs pruned, against the FLOPs bound (lesson 09). "
                                            "Meaningful on a CUDA GPU only.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny shape, float32 (the default without a GPU)")
    size.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shape (the default with a GPU)")
    p.add_argument("--batches", type=_arg("int"), nargs="+", help="batch sizes (default: 1 8 32; smoke 1 2)")
    p.add_argument("--ratios", type=_arg("ratio"), nargs="+", help="keep ratios (default: 1 0.5 0.25 0.11)")
    p.add_argument("--repeats", type=_arg("int"), help="timed runs per measurement (default: 25; smoke 5)")
    p.add_argument("--warmup", type=_arg("int", 0), help="untimed runs first (default: 3; smoke 1)")
    p.add_argument("--device", type=_device, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager kernels only")
    p.add_argument("--eager-batches", type=_arg("int"), nargs="*", help="batches also timed eagerly (default: 1 8)")
    p.add_argument("--compile-batches", type=_arg("int"), nargs="*",
                   help="batches also timed with the torch.compile'd decoder layer in CUDA graphs (default: 1 8; "
                        "none: no compile)")
    p.add_argument("--compile-autotune", action="store_true", default=None,
                   help="let torch.compile benchmark matrix-product kernels as well (longer compile)")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decode-step timing")
    p.add_argument("--out", help="JSON path (default: results/09_inference_speed.json in full mode, none in smoke)")
    return p


def main(argv=None) -> dict:
    """Command line: ``python -m vtp.benchmark [--smoke|--full] [--batches 1 8 32] [--ratios ...] [--out PATH]``.

    Arguments are checked before any work (argparse error, exit status 2); ``--device cuda`` without a visible
    CUDA GPU is one such error. Each row is printed once, as it is measured, then the decode rows and the goals;
    on a CPU a note says that the timings are not meaningful."""
    p = _parser()
    a = p.parse_args(argv)
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                "leave --device out to run on the CPU")
    smoke = a.smoke or (not a.full and run_mode() == "smoke")
    tuples = {k: tuple(getattr(a, k)) for k in ("batches", "ratios", "eager_batches", "compile_batches")
              if getattr(a, k) is not None}
    kw = dict(repeats=a.repeats, warmup=a.warmup, device=a.device, graphs=a.graphs, decode=a.decode,
              compile_autotune=a.compile_autotune, **tuples)
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = BenchConfig.smoke(**kw) if smoke else BenchConfig(**kw)
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    device = torch.device(cfg.device) if cfg.device else default_device()
    if device.type == "cpu":
        print(CPU_CAVEAT, flush=True)
    res = run_benchmark(cfg, log=lambda s: print(s, flush=True))
    print(format_table(res, prefill=False))
    write_results(res, a.out or (None if smoke else "results/09_inference_speed.json"))
    return res


def write_results(res: dict, out: str | None):
    """Write ``res`` as indented JSON to ``out`` (its folder created) and say so; nothing when ``out`` is None."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
