r"""CUDA graphs for the pruned prefill of a patched model (``vtp.patch(..., graphs=True)``).

After pruning, the language model's prefill is short (at 64 of 576 visual tokens and batch 8, about 1,000 rows for a
7B model), and eager PyTorch issues its kernels one by one from Python (for each of the 32 decoder layers, dozens
of them): the GPU can idle between kernels (``scripts/profile_ttft.py`` measures how long). A CUDA graph records
the kernels of one call once and replays them with one launch. The prefill's shapes are fixed by the budget (top-k
keeps a known count), so one graph per input signature (the tensors' shapes, dtypes and devices, the other
arguments' values) serves every call of that signature.

How one graph is made (:class:`PrefillGraph`): the call's tensor arguments are copied into static buffers; the KV
cache of the capture is a copy of the caller's empty cache whose layers one eager call initialised (so the captured
call only appends); :func:`vtp.prefill_paths.capture_graph` warms the call up on a side stream, then captures it. A
replay copies the new inputs into the buffers, replays, and appends the captured keys and values to the CALLER's
cache (``cache.update`` copies them, so a later replay cannot overwrite a cache that ``generate`` still uses); the
returned output holds copies of the captured tensors.

Used only where it is valid: eval mode, a removal prefill with no attention mask (no padding, every sample keeps
the same count), an empty :class:`transformers.DynamicCache`. A signature whose capture fails (an operation that
waits for the GPU inside the language model) is remembered and runs eagerly, with one warning. On a CPU the same
buffers and cache hand-over run without a graph (the outputs are the same; nothing is faster): that is what the
unit tests check.
"""
from __future__ import annotations

import copy
import warnings

import torch
from transformers import DynamicCache

from .prefill_paths import capture_graph

__all__ = ["PrefillGraphs", "PrefillGraph", "graphable"]


def graphable(kwargs: dict, cache_key: str) -> bool:
    """Whether the language-model call ``kwargs`` can use a prefill graph: no attention mask, an empty dynamic
    cache under ``cache_key``."""
    cache = kwargs.get(cache_key)
    return (kwargs.get("attention_mask") is None and type(cache) is DynamicCache and cache.get_seq_length() == 0
            and torch.is_tensor(kwargs.get("inputs_embeds")))


def _signature(kwargs: dict, cache_key: str) -> tuple:
    return tuple((k, (tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else repr(v))
                 for k, v in sorted(kwargs.items()) if k != cache_key)


class PrefillGraph:
    """One captured prefill (``forward(**kwargs)`` with the cache under ``cache_key``); call it with new tensors of
    the same signature and the caller's empty cache."""

    def __init__(self, forward, kwargs: dict, cache_key: str):
        self.cache_key = cache_key
        self.static = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}
        self.other = {k: v for k, v in kwargs.items() if not torch.is_tensor(v) and k != cache_key}
        self.forward = forward
        self.cache = copy.deepcopy(kwargs[cache_key])  # empty: a cheap copy
        self._run()  # one eager call: the cache's layers take their dtypes and devices, then are emptied
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :0, :].clone(), layer.values[..., :0, :].clone()
        if self.static["inputs_embeds"].is_cuda:
            self.graph, self.out = capture_graph(self._run)
        else:
            self.graph = None

    def _run(self):
        """The call a graph captures: the cache emptied (views: no kernel), then the language model appends to it."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]
        return self.forward(**self.other, **self.static, **{self.cache_key: self.cache})

    def __call__(self, kwargs: dict):
        for k, buf in self.static.items():
            buf.copy_(kwargs[k])
        if self.graph is not None:
            self.graph.replay()
        else:  # a CPU: the same buffers and hand-over, no graph
            self.out = self._run()
        cache = kwargs[self.cache_key]
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys, layer.values, i)
        copied = lambda v: cache if v is self.cache else v.clone() if torch.is_tensor(v) else (  # noqa: E731
            tuple(copied(x) for x in v) if isinstance(v, tuple) else v)
        return type(self.out)(**{k: copied(v) for k, v in self.out.items()})


class PrefillGraphs:
    """The prefill graphs of one patched model, by input signature (:func:`_signature`)."""

    def __init__(self):
        self.graphs, self.failed = {}, set()

    def __call__(self, forward, kwargs: dict, cache_key: str):
        key = _signature(kwargs, cache_key)
        if key in self.failed:
            return forward(**kwargs)
        if key not in self.graphs:
            try:
                self.graphs[key] = PrefillGraph(forward, kwargs, cache_key)
            except Exception as e:  # e.g. an operation that waits for the GPU during the capture
                if not kwargs["inputs_embeds"].is_cuda:  # no capture on a CPU: an error is an error
                    raise
                self.failed.add(key)
                why = str(e).splitlines()[0] if str(e) else ""
                warnings.warn(f"vtp.patch(graphs=True): this prefill runs eagerly, its capture failed: "
                              f"{type(e).__name__}: {why}", RuntimeWarning, stacklevel=3)
                return forward(**kwargs)
        return self.graphs[key](kwargs)
