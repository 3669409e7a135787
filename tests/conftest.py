"""Fixtures and helpers shared by the test files."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vtp.data import build_processor
from vtp.vlm import build_llava


@pytest.fixture(scope="module")
def smoke_teacher():
    """An untrained smoke-sized LLaVA (16 visual tokens) in eval mode and its easy-VQA processor."""
    proc = build_processor(16)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    return model, proc


def run_readme_snippet(heading: str) -> dict:
    """Execute the first ```python block after the README heading ``heading`` as written; return its names."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    scope = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "README.md", "exec"), scope)
    return scope


HOST_READS = {"_local_scalar_dense", "nonzero", "bincount", "lift_fresh"}  # lift_fresh: a tensor from host data


class HostReads(TorchDispatchMode):
    """While on, records the ops that on a GPU read a device tensor back to the host or copy host data to it (and so
    wait for the GPU), as ``(file, function, op)`` of the code in ``vtp/`` that made them: ``.item()``, ``bool()``,
    ``int()`` of a tensor (``_local_scalar_dense``), ``nonzero``, ``bincount``, indexing with a boolean mask,
    ``torch.tensor`` of host data (``lift_fresh``) and ``.tolist()`` (which dispatches nothing on a CPU, so
    ``torch.Tensor.tolist`` is wrapped while the mode is on). On a CPU every tensor is a host tensor: a recorded op
    is one that would wait on a GPU unless its tensor is meant to be on the host."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __enter__(self):
        self._tolist = tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda t: (self.record("tolist"), tolist(t))[1]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def record(self, op):
        """Record ``op`` when the code that made it (the innermost frame outside torch and this file) is vtp's."""
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename.replace("\\", "/")
                  and f.filename != __file__]
        where = frames[-1].filename.replace("\\", "/")
        if "/vtp/" in where:
            self.sites.append((where.rsplit("/", 1)[-1], frames[-1].name, op))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        boolean_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in HOST_READS or boolean_index:
            self.record(name if not boolean_index else "index with a boolean mask")
        return func(*args, **(kwargs or {}))
