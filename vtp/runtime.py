"""Run-time switches shared by the library and the notebooks.

* ``VTP_MODE`` = ``smoke`` (CPU-sized runs, seconds) or ``full`` (GPU-sized runs). Default: ``full`` when
  a CUDA GPU is present, ``smoke`` otherwise.
* ``VTP_PROGRESS`` = ``0`` turns the ``tqdm.auto`` progress bars off (the test suite does this).
"""
from __future__ import annotations

import os
import warnings

import torch
from tqdm.auto import tqdm

__all__ = ["run_mode", "is_full", "default_device", "progress", "device_name"]

MODES = ("smoke", "full")

# Two notices the compiler prints while it compiles the library's functions (lessons 09 and 10): advice about its
# own kernel choices, not about the user's code, and printed with the compiler's install location.
for _notice in (r"\s*Online softmax is disabled", r"TensorFloat32 tensor cores for float32 matrix multiplication"):
    warnings.filterwarnings("ignore", message=_notice, category=UserWarning)


def run_mode() -> str:
    """``"smoke"`` or ``"full"``, from ``VTP_MODE`` or the presence of a GPU."""
    mode = os.environ.get("VTP_MODE", "").strip().lower()
    if not mode:
        return "full" if torch.cuda.is_available() else "smoke"
    if mode not in MODES:
        raise ValueError(f"VTP_MODE must be one of {MODES}, got {mode!r}")
    return mode


def is_full() -> bool:
    """True in the full (GPU) mode."""
    return run_mode() == "full"


def default_device() -> torch.device:
    """The first CUDA device if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device=None) -> str:
    """Human-readable name of ``device`` (GPU model or CPU) for results and notebook outputs."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def progress(iterable=None, **kwargs):
    """``tqdm.auto`` progress bar, disabled when ``VTP_PROGRESS=0``."""
    disable = os.environ.get("VTP_PROGRESS", "1").strip() in ("0", "false", "no", "off")
    off = kwargs.pop("disable", False)  # popped first: `disable or kwargs.pop(...)` may skip the pop
    return tqdm(iterable, disable=disable or off, **kwargs)
