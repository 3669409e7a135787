r"""Inference speed of pruned prefill, measured against a FLOPs model (accuracy lives in :mod:`vtp.evaluate`).

The language model is a transformers ``LlamaForCausalLM`` built from a config (random weights), shaped like
LLaVA-1.5-7B's by default, fed ``n_visual`` visual tokens inside ``n_text`` text tokens. The **pruned** path
is the real inference path, its cost included: :class:`~vtp.GumbelVisionPruner` scores the visual tokens
(eval, top-k), :func:`vtp.attention.remove_tokens` removes the dropped ones keeping the ORIGINAL position
ids, and the shorter sequence goes through the model.

What it is made of, one module each: the prefill paths it times (:mod:`vtp.prefill_paths`), the FLOPs model and
the bound on the speedup, :math:`F(L_\text{full}) / (F(L_\text{kept}) + F_\text{pruner})` (:mod:`vtp.flops`),
the clock (:mod:`vtp.timing`) and the rows, goals and table of the results (:mod:`vtp.benchmark_report`). Their
public names are importable from here too.

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
import time
from dataclasses import asdict, dataclass
from statistics import median

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

# re-exported: lesson 09 and the tests reach the prefill paths, the FLOPs model, the clock and the report here
from .benchmark_report import check_goals, format_row, format_table, prefill_row
from .flops import kv_cache_bytes, prefill_flops, pruner_flops, speedup_bound
from .prefill_paths import (CACHE_KWARG, REMOVALS, DecoderStack, KVCache, PrunedPrefill, capture_graph, _pos_int,
                            decoder_layer, kept_tokens, prefill, reference_removal, run_layers)
from .pruner import GumbelVisionPruner, check_ratio
from .runtime import default_device, device_name, run_mode
from .timing import CPU_CAVEAT, measure_roofline, rel_err, time_ms, write_results

__all__ = ["LLAVA_7B", "TINY", "BenchConfig", "KVCache", "CACHE_KWARG", "lm_config", "build_lm", "prefill_flops",
           "pruner_flops", "kept_tokens", "speedup_bound", "kv_cache_bytes", "decoder_layer", "DecoderStack",
           "run_layers", "prefill", "PrunedPrefill", "reference_removal", "REMOVALS", "time_ms", "run_benchmark",
           "check_goals", "format_table", "CPU_CAVEAT", "write_results", "main"]

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
        graph, _ = capture_graph(step)
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
    return rel_err(reference_removal(model, nudged, kept_index), ref)


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
        out[f"{tag}{removal}_graph_vs_eager"] = rel_err(h, h_eager)
        out[f"{tag}{removal}_graph_vs_reference"] = rel_err(h, ref)
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
        res["prefill"].append(prefill_row(model.config, cfg, res, method, removal, embeds.shape[0], r, full_t, t, over))
        log(format_row(res["prefill"][-1]))
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
    dtype = getattr(torch, cfg.dtype)
    config, t0 = lm_config(cfg.shape), time.perf_counter()
    model = build_lm(config, device, dtype, cfg.seed)
    pruner = _question_aware_pruner(config.hidden_size, device, dtype)
    res = _new_results(cfg, config, model, device)
    log(f"{res['device']}: model built in {time.perf_counter() - t0:.1f} s")
    main = "graph" if device.type == "cuda" and cfg.graphs else "eager"
    stack = None  # the compiled DecoderStack, built once: its graphs are shared by every batch
    for B in cfg.batches:
        embeds = torch.randn(B, cfg.n_visual + cfg.n_text, config.hidden_size, device=device, dtype=dtype,
                             generator=torch.Generator(device).manual_seed(cfg.seed + B))
        for method in _methods(res, log, cfg, B, main):
            stack = _run_method(res, model, pruner, embeds, cfg, method, main, stack, device, log)
    res["goals"], res["seconds"] = check_goals(res), time.perf_counter() - t0
    return res


def _question_aware_pruner(width: int, device, dtype) -> GumbelVisionPruner:
    r"""Lesson 07's pruner reads the question; its projection starts at zero, so it gets random weights here
    (std :math:`1/\sqrt{d}`). Top-k rule, eval mode."""
    pruner = GumbelVisionPruner(width, rule="topk", text_dim=width)
    torch.nn.init.normal_(pruner.text_proj.weight, std=width ** -0.5)
    return pruner.to(device, dtype).eval()


def _new_results(cfg: BenchConfig, config, model, device) -> dict:
    """The results dict before any measurement: device, versions, the configs, the model's weight bytes (the
    embedding table left out: a prefill reads only its rows) and, on CUDA, the measured roofline."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    return dict(device=device_name(device), torch=torch.__version__, mode=run_mode(), config=asdict(cfg),
                model={k: getattr(config, k) for k in LLAVA_7B}, weight_bytes=weights,
                roofline=measure_roofline(device) if device.type == "cuda" else None, checks={}, prefill=[],
                decode=[], skipped=[])


def _methods(res, log, cfg: BenchConfig, B: int, main: str) -> list[str]:
    """The methods timed at batch ``B``: ``main``, then ``compiled`` (``compile_batches``; recorded as skipped
    without CUDA graphs) and ``eager`` (``eager_batches``, when the main method is not eager already)."""
    methods = [main]
    if B in cfg.compile_batches:
        if main == "graph":
            methods.append("compiled")
        else:
            _skip(res, log, B, "compiled", "torch.compile lever: CUDA with CUDA graphs only")
    if main == "graph" and B in cfg.eager_batches:
        methods.append("eager")
    return methods


def _run_method(res, model, pruner, embeds, cfg, method: str, main: str, stack, device, log):
    """One batch timed with ``method``: the checks first (:func:`_verify`, once per method), then
    :func:`_measure`. Out of memory, and any error of the optional ``compiled`` method, is recorded in
    ``skipped`` instead of raised. Returns the compiled :class:`DecoderStack` (built here on first use; ``None``
    after a compile failure, to compile afresh for the next batch)."""
    try:
        if method == "compiled":
            stack = stack or DecoderStack(model, compile=True, autotune=cfg.compile_autotune)
        layers, tag = (stack, "compiled_") if method == "compiled" else (None, "")
        if method != "eager" and f"{tag}static_graph_vs_reference" not in res["checks"]:
            res["checks"].update(_verify(model, pruner, embeds, cfg, layers, tag))
            log(f"checks: {res['checks']}")
        _measure(res, model, pruner, embeds, cfg, method, main, layers, device, log)
    except torch.cuda.OutOfMemoryError:
        _skip(res, log, embeds.shape[0], method, "out of memory")
        torch.cuda.empty_cache()
    except Exception as e:  # the compiled lever is optional: record why it failed and go on
        if method != "compiled":
            raise
        _skip(res, log, embeds.shape[0], method, f"torch.compile failed: {type(e).__name__}: {e}")
        stack = None
        torch.cuda.empty_cache()
    return stack


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


if __name__ == "__main__":
    main()
