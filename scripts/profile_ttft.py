"""Where does the pruned time to first token go? A diagnostic beside ``python -m vtp.generate_bench``.

At one batch and one budget it times, on the LLaVA-1.5-7B shape of :mod:`vtp.generate_bench` (random weights):
the whole ``generate(max_new_tokens=1)`` unpatched and patched, the vision tower and projector alone, the language
model's prefill alone on the kept length and on the full length (eager, and replayed as one CUDA graph: the
difference is host and launch overhead), and one GEMM of the MLP's shape at both lengths (what the GPU's matrix
units give at that many rows). Then it profiles the patched call and lists the kernels by GPU time, with the share
of the call the GPU was busy.

    python scripts/profile_ttft.py              # batch 8, 64 of 576 visual tokens (needs a CUDA GPU)
    python scripts/profile_ttft.py --graphs     # the same, the pruned prefill replayed as CUDA graphs
    python scripts/profile_ttft.py --smoke      # tiny shapes on a CPU: the code path only
"""
import argparse
import statistics
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from vtp.generate_bench import build_llava_model, generate, image_features, llava_config, make_inputs, make_pruner
from vtp.patch import patch, unpatch
from vtp.prefill_paths import capture_graph
from vtp.timing import time_ms


def _ms(fn, repeats):
    return statistics.median(time_ms(fn, warmup=10, repeats=repeats))


def _graphed(fn):
    """``fn`` captured once in a CUDA graph; the returned function replays it."""
    return capture_graph(fn)[0].replay


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kept", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel profile")
    ap.add_argument("--graphs", action="store_true", help="patch with graphs=True (vtp.patch_graphs)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    config = llava_config("tiny", "tiny") if a.smoke else llava_config()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_llava_model(config, device, dtype)
    pruner = make_pruner(config, device, dtype)
    inputs = make_inputs(config, a.batch, device=device, dtype=dtype)
    n_visual = int((inputs["input_ids"] == config.image_token_id).sum(1)[0])
    n_text = inputs["input_ids"].shape[1] - n_visual
    kept = min(a.kept, n_visual)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; batch {a.batch}, {kept} of {n_visual} visual "
          f"tokens, {n_text} text tokens")

    full_ms = _ms(lambda: generate(model, inputs, 1), a.repeats)
    patch(model, pruner, ratio=kept / n_visual, rule="topk", graphs=a.graphs)
    pruned_ms = _ms(lambda: generate(model, inputs, 1), a.repeats)
    vision_ms = _ms(lambda: image_features(model, inputs["pixel_values"]), a.repeats)
    print(f"generate(max_new_tokens=1): unpatched {full_ms:.2f} ms, patched {pruned_ms:.2f} ms "
          f"({full_ms / pruned_ms:.2f}x); vision tower + projector {vision_ms:.2f} ms")

    lm, d = model.model.language_model, config.text_config.hidden_size
    inter = config.text_config.intermediate_size
    for length in (kept + n_text, n_visual + n_text):
        embeds = torch.randn(a.batch, length, d, device=device, dtype=dtype)
        step = lambda: lm(inputs_embeds=embeds, use_cache=False)  # noqa: E731
        with torch.no_grad():
            eager = _ms(step, a.repeats)
            graph = _ms(_graphed(step), a.repeats) if cuda else float("nan")
        x = torch.randn(a.batch * length, d, device=device, dtype=dtype)
        w = torch.randn(d, inter, device=device, dtype=dtype)
        gemm = _ms(lambda: x @ w, a.repeats)
        tflops = 2 * x.shape[0] * d * inter / gemm / 1e9
        print(f"language model prefill, {length} tokens per row: eager {eager:.2f} ms, one CUDA graph {graph:.2f} ms; "
              f"GEMM [{x.shape[0]}x{d}] @ [{d}x{inter}] {gemm:.3f} ms = {tflops:.0f} TFLOP/s")

    # the whole forward (vision tower, selection, prefill, last logits), eager and as one CUDA graph, both models
    step = lambda: model(**inputs, use_cache=False, logits_to_keep=1)  # noqa: E731
    forward = {}
    for name in ("patched", "unpatched"):
        if name == "unpatched":
            unpatch(model)
        with torch.no_grad():
            forward[name] = [_ms(step, a.repeats)]
            try:
                forward[name].append(_ms(_graphed(step), a.repeats) if cuda else float("nan"))
            except Exception as e:  # a host synchronisation inside the forward cannot be captured
                print(f"{name} forward: no CUDA graph ({str(e).splitlines()[0]})")
                forward[name].append(float("nan"))
        eager, graph = forward[name]
        print(f"{name} forward, use_cache=False: eager {eager:.2f} ms, one CUDA graph {graph:.2f} ms")
    (pe, pg), (ue, ug) = forward["patched"], forward["unpatched"]
    print(f"forward speedup: eager {ue / pe:.2f}x, CUDA graphs {ug / pg:.2f}x")
    if a.no_profile:
        return
    patch(model, pruner, ratio=kept / n_visual, rule="topk", graphs=a.graphs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
    with profile(activities=activities) as prof:
        for _ in range(3):
            generate(model, inputs, 1)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    kernels = [e for e in events if cuda and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(getattr(e, key) for e in kernels) / 3 / 1e3
    print(f"patched call: GPU kernels {busy:.2f} ms of {pruned_ms:.2f} ms ({busy / pruned_ms:.0%} busy), "
          f"{sum(e.count for e in kernels) / 3:.0f} kernels per call")
    print(events.table(sort_by=key, row_limit=25, max_name_column_width=70))
    unpatch(model)


if __name__ == "__main__":
    main()
