r"""End-to-end speed of a patched LLaVA through ``generate()``: time to first token and decode tokens/s.

:mod:`vtp.benchmark` times the language model's prefill alone. Here the whole path a user runs is timed: a
``LlavaForConditionalGeneration`` shaped like LLaVA-1.5-7B, *vision tower included*, with random weights
(CLIP ViT-L/14-336 shape: 24 layers, width 1024, 16 heads, patch 14, 336 px -> 576 visual tokens; a two-layer
GELU MLP projector 1024 -> 4096 -> 4096; a Llama-7B-shaped language model: 32 layers, width 4096, 32 heads, MLP
11008; bfloat16, SDPA attention), pruned in place by :func:`vtp.patch` with a **question-aware**
:class:`~vtp.GumbelVisionPruner` (``text_dim`` = 4096, top-k rule; its question projection gets random weights,
as in :mod:`vtp.benchmark`, so it really reads the question).

* **TTFT** (time to first token) = ``model.generate(max_new_tokens=1)``: vision tower, projector, pruner, token
  removal, prefill of the kept tokens, the last token's logits and the greedy pick, generate's own bookkeeping
  included. The baseline is the same model *unpatched*.
* **Decode**: ``generate(max_new_tokens=1 + n)`` minus TTFT is the time of ``n`` decode steps;
  tokens/s = :math:`B n / (t_{1+n} - t_1)`. Eager transformers decoding with the dynamic KV cache.

**FLOPs model of the pipeline** (:mod:`vtp.flops`, where the formulas are): vision tower, pruner and prefill,

.. math::
    F_\text{pipe}(k) = F_\text{vision} + [k < N]\,F_\text{pruner} + F_\text{prefill}(k + n_\text{text}),\qquad
    \text{bound} = F_\text{pipe}(N) / F_\text{pipe}(k).

The vision tower is a fixed cost that pruning cannot touch, so the bound at 64 of 576 tokens is about 4.2x, not
the language model's 5x. **Decode** reads every weight and the KV cache once per step: its bound is a byte ratio
(:func:`vtp.flops.decode_bound`, about 1.15 at batch 8), and eager transformers decoding is limited by Python and
kernel launches before either.

**Timing** (:func:`vtp.timing.time_interleaved`; the protocol is written into the results as ``timing``): a
*configuration* is a batch with the unpatched model or the patched one at one keep ratio (the vision tower alone,
per batch, is one too). Every configuration is first called untimed (``warmup`` times; ``decode_warmup`` times
for the long generations), so no configuration pays for the GPU's clock ramp, the allocator's growth or the
first choice of kernels; then ``repeats`` rounds each time every configuration once, in a seeded random order,
so that a drift of the clock or the temperature hits all alike (the long generations in ``decode_repeats`` of
the rounds, spread evenly). Each call: :func:`vtp.timing.time_ms` (CUDA events, the GPU synchronised before it).
Reported: median and interquartile range. Switching configuration (:func:`vtp.patch` / :func:`vtp.unpatch` /
``model.vtp_ratio``) happens between calls, untimed. On a CPU the timings are not meaningful (a note says so, as
in :mod:`vtp.benchmark`). Goal: TTFT speedup :math:`\ge 0.85\times` the bound at batch 8 and 64 visual tokens.

**Run time**: minutes on one H200 (the results file records it as ``seconds``). Memory: 14 GB of weights plus
a few GB of cache and activations. ``--graphs`` patches with ``graphs=True`` (:mod:`vtp.patch_graphs`).
"""
from __future__ import annotations

import argparse
import functools
import time
import weakref
from dataclasses import asdict, dataclass
from statistics import median

import torch
import transformers
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlavaConfig

from .benchmark import lm_config
from .flops import (_n_visual, decode_bound, kv_cache_bytes, pipeline_bound, pipeline_flops, prefill_flops,
                    pruner_flops, vision_flops)
from .patch import patch, unpatch
from .prefill_paths import _pos_int, kept_tokens
from .pruner import GumbelVisionPruner, check_ratio
from .runtime import default_device, device_name, run_mode
from .timing import CPU_CAVEAT, iqr, time_interleaved, write_results

__all__ = ["VISION_SHAPES", "GenerateBenchConfig", "timing_protocol", "llava_config", "build_llava_model",
           "make_pruner", "make_inputs", "image_features", "GOAL_FRACTION", "GOAL_BATCH", "GOAL_KEPT",
           "vision_flops", "pipeline_flops", "pipeline_bound", "decode_bound", "generate", "cache_of",
           "run_generate_bench", "check_goals", "format_table", "main"]

CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, num_channels=3)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, num_channels=3)
VISION_SHAPES = {"clip-l14-336": CLIP_L14_336, "tiny": CLIP_TINY}
EXTRA_VOCAB = 64  # llava-hf's LLaVA-1.5: 32000 Llama tokens + 64 (the image token is 32000, the first extra one)
GOAL_FRACTION, GOAL_BATCH, GOAL_KEPT = 0.85, 8, 64


def llava_config(shape="llava-7b", vision="clip-l14-336") -> LlavaConfig:
    """A ``LlavaConfig`` in LLaVA-1.5's layout: CLIP tower (``vision``, a name in :data:`VISION_SHAPES` or a dict
    of ``CLIPVisionConfig`` fields), features of layer -2 without [CLS], GELU MLP projector, Llama language model
    (``shape``, see :func:`vtp.benchmark.lm_config`) with ``EXTRA_VOCAB`` more tokens, the first of them the image
    token; SDPA attention everywhere."""
    if isinstance(vision, str):
        if vision not in VISION_SHAPES:
            raise ValueError(f"vision must be one of {sorted(VISION_SHAPES)} or a dict, got {vision!r}")
        vision = VISION_SHAPES[vision]
    text = lm_config(shape)
    image_token = text.vocab_size
    text.vocab_size += EXTRA_VOCAB
    text.pad_token_id = 0
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_id=image_token,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, image_seq_length=n_patches, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def build_llava_model(config: LlavaConfig, device=None, dtype=torch.bfloat16, seed: int = 0,
                      attn_implementation: str = "sdpa"):
    """Random-weight ``LlavaForConditionalGeneration`` built directly on ``device`` in ``dtype`` (eval mode),
    greedy generation without an end-of-sequence token (every call generates exactly ``max_new_tokens``)."""
    torch.manual_seed(seed)
    with torch.device(device or default_device()):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id, gc.do_sample = None, 0, None, False
    return model.eval()


def make_pruner(config: LlavaConfig, device=None, dtype=torch.bfloat16, seed: int = 0) -> GumbelVisionPruner:
    """The question-aware top-k pruner of lesson 07 (``text_dim`` = the language model's width), eval mode; its
    question projection (zero at initialisation) gets random weights, so scoring reads the question."""
    d = config.text_config.hidden_size
    torch.manual_seed(seed)
    pruner = GumbelVisionPruner(d, rule="topk", text_dim=d)
    torch.nn.init.normal_(pruner.text_proj.weight, std=d ** -0.5)
    return pruner.to(device or default_device(), dtype).eval()


def make_inputs(config: LlavaConfig, batch: int, n_text: int = 64, text_before: int = 16, seed: int = 0,
                device=None, dtype=torch.bfloat16) -> dict:
    """A batch of prompts ``text_before`` text tokens, the image's placeholders, the rest of the ``n_text`` text
    tokens (random ids, never the image token), no padding; random pixels. Keys: input_ids, attention_mask,
    pixel_values."""
    B, n_text = _pos_int(batch, "batch"), _pos_int(n_text, "n_text")
    if not 0 <= text_before <= n_text:
        raise ValueError(f"text_before must be in [0, n_text={n_text}], got {text_before}")
    v = config.vision_config
    n_visual = (v.image_size // v.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.image_token_id, (B, n_text), generator=g)
    image = torch.full((B, n_visual), config.image_token_id)
    ids = torch.cat([text[:, :text_before], image, text[:, text_before:]], dim=1)
    pixels = torch.randn(B, v.num_channels, v.image_size, v.image_size, generator=g)
    device = device or default_device()
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                pixel_values=pixels.to(device, dtype))


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class GenerateBenchConfig:
    """What :func:`run_generate_bench` measures: LLaVA-1.5-7B on a GPU by default, ``smoke()`` tiny on a CPU."""

    shape: str = "llava-7b"  # language model, a name in vtp.benchmark.SHAPES
    vision: str = "clip-l14-336"  # vision tower, a name in VISION_SHAPES
    batches: tuple = (1, 8)
    ratios: tuple = (1.0, 192 / 576, 128 / 576, 64 / 576)  # keep ratios: 576 -> 576 / 192 / 128 / 64 tokens
    n_text: int = 64
    text_before: int = 16  # text tokens before the image (system prompt); the rest follow it
    warmup: int = 2  # untimed TTFT calls of every configuration before any is timed
    repeats: int = 15  # interleaved rounds: timed TTFT calls per configuration
    decode_tokens: int = 32  # decode steps timed per generation
    decode_warmup: int = 1
    decode_repeats: int = 5  # timed long generations per configuration, spread over the rounds
    dtype: str = "bfloat16"
    device: str | None = None
    seed: int = 0
    graphs: bool = False  # vtp.patch(graphs=True): the pruned prefill replays CUDA graphs (vtp.patch_graphs)

    @classmethod
    def smoke(cls, **kw):
        """Tiny shapes (16 visual tokens), float32, few runs: the code path on a CPU in seconds."""
        base = dict(shape="tiny", vision="tiny", batches=(1, 2), ratios=(1.0, 0.5, 0.25), n_text=8, text_before=3,
                    warmup=1, repeats=2, decode_tokens=3, decode_warmup=0, decode_repeats=1, dtype="float32")
        return cls(**{**base, **kw})

    def validate(self):
        config = llava_config(self.shape, self.vision)
        if not self.batches or not self.ratios:
            raise ValueError(f"batches and ratios must not be empty, got {self.batches}, {self.ratios}")
        for b in self.batches:
            _pos_int(b, "batch")
        for r in self.ratios:
            check_ratio(r, "ratio")
        _pos_int(self.n_text, "n_text")
        if not 0 <= self.text_before <= self.n_text:
            raise ValueError(f"text_before must be in [0, n_text={self.n_text}], got {self.text_before}")
        for name in ("repeats", "decode_tokens", "decode_repeats"):
            _pos_int(getattr(self, name), name)
        for name in ("warmup", "decode_warmup"):
            _pos_int(getattr(self, name), name, 0)
        if not isinstance(self.graphs, bool):
            raise ValueError(f"graphs must be True or False, got {self.graphs!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        return config


def generate(model, inputs: dict, new_tokens: int, **kwargs):
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens (the model has no end-of-sequence token)."""
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def timing_protocol(cfg: GenerateBenchConfig, device=None) -> str:
    """The timing protocol of :func:`run_generate_bench` in words (written into the results as ``timing``)."""
    cuda = torch.device(device or default_device()).type == "cuda"
    clock = "CUDA events, the GPU synchronised before every call" if cuda else "the host clock"
    return (f"global warm-up of every configuration, then {max(cfg.repeats, cfg.decode_repeats)} interleaved rounds "
            f"(warm-up: {cfg.warmup} untimed TTFT call(s) and {cfg.decode_warmup} untimed {1 + cfg.decode_tokens}-"
            f"token generation(s) per configuration; each round times every configuration once, in a seeded random "
            f"order: {cfg.repeats} TTFT calls and {cfg.decode_repeats} long generations per configuration in all, "
            f"the latter in rounds spread evenly); {clock}; median and interquartile range")


def _cache_length(model, inputs) -> int:
    """Tokens in the KV cache after generate's prefill (one new token: the cache holds the prompt only)."""
    return int(cache_of(generate(model, inputs, 1, return_dict_in_generate=True)).get_seq_length())


def cache_of(output):
    """The KV cache of a ``generate(..., return_dict_in_generate=True)`` output: ``cache`` in newer transformers,
    ``past_key_values`` before (read only where ``cache`` is missing: newer versions warn on it)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


_GRAPHS = weakref.WeakKeyDictionary()  # model -> its prefill graphs while the benchmark has it unpatched


def _configure(model, pruner, ratio, graphs=False):
    """Put ``model`` in a configuration: unpatched (``ratio`` None) or patched with ``pruner`` at keep ratio
    ``ratio`` (top-k, ``graphs``), whatever it was before. Prefill graphs outlive an unpatch (``_GRAPHS``)."""
    patched = getattr(model, "_vtp", None) is not None
    if ratio is None:
        if patched:
            _GRAPHS[model] = model._vtp.graphs
            unpatch(model)
    elif patched:
        model.vtp_ratio = ratio
    else:
        patch(model, pruner, ratio=ratio, rule="topk", graphs=graphs)
        model._vtp.graphs = _GRAPHS.get(model, model._vtp.graphs)


def image_features(model, pixel_values):
    """The vision tower and projector alone (the part of TTFT that pruning cannot shorten)."""
    c = model.config
    return model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=c.vision_feature_layer,
                                          vision_feature_select_strategy=c.vision_feature_select_strategy)


def _row(cfg, config, B, kept, ttft, long, cache, weight_bytes, dtype, pruned: bool) -> dict:
    """One row: TTFT and decode times (ms) of one configuration, the FLOPs bound beside them."""
    if cache != kept + cfg.n_text:
        raise RuntimeError(f"the KV cache holds {cache} prompt tokens after prefill, expected {kept} visual + "
                           f"{cfg.n_text} text")
    t1, tn = median(ttft), median(long)
    flops = pipeline_flops(config, kept if pruned else None, cfg.n_text, B)
    decode_ms = max(tn - t1, 1e-9) / cfg.decode_tokens
    return dict(pruned=pruned, batch=B, visual_kept=kept, seq_len=kept + cfg.n_text, ttft_ms=t1,
                ttft_iqr_ms=iqr(ttft), ttft_times_ms=ttft, generate_ms=tn, generate_iqr_ms=iqr(long),
                decode_step_ms=decode_ms,
                decode_tokens_per_s=1e3 * B / decode_ms, end_to_end_tokens_per_s=1e3 * B * (1 + cfg.decode_tokens) / tn,
                flops=flops, tflops_ttft=flops["total"] / t1 / 1e9,
                kv_cache_mb=kv_cache_bytes(config.text_config, cache, B, dtype) / 2**20,
                pipeline_bound=pipeline_bound(config, kept, cfg.n_text, B) if pruned else 1.0,
                decode_bound=decode_bound(config, weight_bytes, kept, cfg.n_text, B, dtype))


def _timed_calls(cfg, model, pruner, inputs, configs):
    """What :func:`vtp.timing.time_interleaved` times: ``(calls, repeats, warmup)``, keyed ``("vision", B)`` (the
    tower alone), ``("ttft", B, r)`` and ``("long", B, r)`` (``r`` None: unpatched), each call with its setup."""
    calls, repeats, warmup = {}, {}, {}
    for B in cfg.batches:
        unpatched = functools.partial(_configure, model, pruner, None)
        calls["vision", B] = (unpatched, functools.partial(image_features, model, inputs[B]["pixel_values"]))
        repeats["vision", B], warmup["vision", B] = cfg.repeats, cfg.warmup
    for B, r in configs:
        setup = functools.partial(_configure, model, pruner, r, cfg.graphs)
        calls["ttft", B, r] = (setup, functools.partial(generate, model, inputs[B], 1))
        calls["long", B, r] = (setup, functools.partial(generate, model, inputs[B], 1 + cfg.decode_tokens))
        repeats["ttft", B, r], warmup["ttft", B, r] = cfg.repeats, cfg.warmup
        repeats["long", B, r], warmup["long", B, r] = cfg.decode_repeats, cfg.decode_warmup
    return calls, repeats, warmup


@torch.no_grad()
def run_generate_bench(cfg: GenerateBenchConfig | None = None, log=print) -> dict:
    """TTFT and decode tokens/s of the unpatched model and of the patched one at every keep ratio, for every
    batch of ``cfg``, timed by the interleaved protocol of the module docstring (``timing`` in the result);
    JSON-ready dict (``rows``: ``pruned`` False for the unpatched baseline; ``goals``)."""
    cfg = cfg or (GenerateBenchConfig() if run_mode() == "full" else GenerateBenchConfig.smoke())
    config = cfg.validate()
    device = torch.device(cfg.device) if cfg.device else default_device()
    dtype, t0 = getattr(torch, cfg.dtype), time.perf_counter()
    model = build_llava_model(config, device, dtype, cfg.seed)
    pruner = make_pruner(config, device, dtype, cfg.seed + 1)
    N = _n_visual(config)
    weights = [p for n, p in model.model.language_model.named_parameters() if "embed" not in n]
    weight_bytes = sum(p.numel() * p.element_size() for p in [*weights, model.lm_head.weight])
    res = dict(device=device_name(device), torch=torch.__version__, transformers=transformers.__version__,
               mode=run_mode(), config=asdict(cfg), timing=timing_protocol(cfg, device),
               pruner="question-aware GumbelVisionPruner (text_dim = hidden size), top-k rule, random weights"
                      + (", pruned prefill as CUDA graphs (vtp.patch(graphs=True))" if cfg.graphs else ""),
               n_visual=N, lm_weight_bytes=weight_bytes,
               flops_per_image=dict(vision=vision_flops(config)["total"], pruner=pruner_flops(
                   config.text_config.hidden_size, N), prefill_full=prefill_flops(config.text_config,
                                                                                  N + cfg.n_text)["total"]),
               rows=[])
    log(f"{res['device']}: model built in {time.perf_counter() - t0:.1f} s")
    inputs = {B: make_inputs(config, B, cfg.n_text, cfg.text_before, cfg.seed + B, device, dtype) for B in cfg.batches}
    configs = [(B, r) for B in cfg.batches for r in (None, *cfg.ratios)]  # r None: the unpatched model
    kept = {(B, r): N if r is None else kept_tokens(r, N, pruner.min_keep) for B, r in configs}
    calls, repeats, warmup = _timed_calls(cfg, model, pruner, inputs, configs)
    try:
        cache = {}
        for B, r in configs:  # untimed: the prompt tokens in the KV cache after prefill
            _configure(model, pruner, r, cfg.graphs)
            cache[B, r] = _cache_length(model, inputs[B])
        times = time_interleaved(calls, repeats, warmup, device, seed=cfg.seed, log=log)
    finally:
        _configure(model, pruner, None)
    for B in cfg.batches:
        vision_ms = median(times["vision", B])
        base = None
        for r in (None, *cfg.ratios):
            row = _row(cfg, config, B, kept[B, r], times["ttft", B, r], times["long", B, r], cache[B, r],
                       weight_bytes, dtype, pruned=r is not None)
            base = base or row
            row.update(keep_ratio=1.0 if r is None else r, vision_ms=vision_ms,
                       ttft_speedup=base["ttft_ms"] / row["ttft_ms"],
                       decode_speedup=row["decode_tokens_per_s"] / base["decode_tokens_per_s"])
            row["fraction_of_bound"] = row["ttft_speedup"] / row["pipeline_bound"]
            res["rows"].append(row)
            log(_fmt_row(row))
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["goals"], res["seconds"] = check_goals(res), time.perf_counter() - t0
    return res


def _fmt_row(r) -> str:
    name = f"pruned {r['keep_ratio']:.3f}" if r["pruned"] else "unpatched   "
    return (f"{name} B={r['batch']:<2d} {r['visual_kept']:>4d} vis  TTFT {r['ttft_ms']:8.2f} ms "
            f"(x{r['ttft_speedup']:4.2f}, bound x{r['pipeline_bound']:4.2f}, {r['fraction_of_bound']:4.0%}; vision "
            f"{r['vision_ms']:.1f} ms)  decode {r['decode_tokens_per_s']:8.1f} tok/s (x{r['decode_speedup']:4.2f}, "
            f"bound x{r['decode_bound']:4.2f})  cache {r['kv_cache_mb']:7.1f} MiB")


def check_goals(res: dict) -> list[dict]:
    """The goal (TTFT speedup >= 0.85 of the pipeline's FLOPs bound, batch 8, 64 visual tokens) and, reported
    without a target, the decode speedup there. Rows that were not measured give no entry."""
    goals = []
    for r in res["rows"]:
        if r["pruned"] and r["batch"] == GOAL_BATCH and r["visual_kept"] == GOAL_KEPT:
            goals.append(dict(goal=f"TTFT speedup / pipeline FLOPs bound, batch {GOAL_BATCH}, {GOAL_KEPT} visual "
                                   f"tokens", target=f">= {GOAL_FRACTION}", measured=r["fraction_of_bound"],
                              met=bool(r["fraction_of_bound"] >= GOAL_FRACTION)))
            goals.append(dict(goal=f"decode speedup, batch {GOAL_BATCH}, {GOAL_KEPT} visual tokens (bytes bound "
                                   f"x{r['decode_bound']:.2f}; reported, no target)", target=None,
                              measured=r["decode_speedup"], met=None))
    return goals


def format_table(res: dict, rows: bool = True) -> str:
    """The rows (unless ``rows=False``) and the goals, printed as met / not met; on a CPU :data:`CPU_CAVEAT`."""
    lines = [f"device: {res['device']}"] + ([CPU_CAVEAT] if str(res["device"]).startswith("CPU") else [])
    lines += [_fmt_row(r) for r in res["rows"]] if rows else []
    for g in res["goals"]:
        verdict = "reported" if g["met"] is None else ("met" if g["met"] else "not met")
        target = "" if g["target"] is None else f"{g['target']}, "
        lines.append(f"goal {g['goal']}: {target}measured {g['measured']:.3f} -> {verdict}")
    if not any(g["met"] is not None for g in res["goals"]):
        lines.append(f"goal: no row at batch {GOAL_BATCH} with {GOAL_KEPT} visual tokens, not evaluated")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Command line: ``python -m vtp.generate_bench [--smoke|--full] [--out FILE]``; writes the results as JSON
    (default ``results/09_generate_speed.json`` in full mode, none in smoke mode). ``--full`` without a CUDA GPU is
    an argparse error (exit status 2) before any work."""
    p = argparse.ArgumentParser(prog="python -m vtp.generate_bench",
                                description="TTFT and decode speed of a vtp.patch'ed LLaVA-1.5-7B shape through "
                                            "generate(), against the pipeline's FLOPs bound. Meaningful on a GPU.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny shapes, float32 (the default without a GPU)")
    size.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shape, bfloat16 (the default with a GPU)")
    p.add_argument("--out", help="JSON path")
    p.add_argument("--graphs", action="store_true", help="vtp.patch(graphs=True): the pruned prefill as CUDA graphs")
    a = p.parse_args(argv)
    if a.full and not torch.cuda.is_available():
        p.error("--full builds a 7B model in bfloat16 (14 GB) and times it: it needs a CUDA GPU, and torch sees none "
                "(torch.cuda.is_available() is False); use --smoke on a CPU")
    smoke = a.smoke or (not a.full and run_mode() == "smoke")
    cfg = GenerateBenchConfig.smoke(graphs=a.graphs) if smoke else GenerateBenchConfig(graphs=a.graphs)
    if default_device().type == "cpu":
        print(CPU_CAVEAT, flush=True)
    res = run_generate_bench(cfg, log=lambda s: print(s, flush=True))
    print(format_table(res, rows=False))
    write_results(res, a.out or (None if smoke else "results/09_generate_speed.json"))
    return res


if __name__ == "__main__":
    main()
