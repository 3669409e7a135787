r"""Data-parallel training with ``torch.distributed``: one process per device, launched by ``torchrun``.

``torchrun --standalone --nproc-per-node N -m vtp.cli pruner ...`` starts N processes and tells each one who it
is through the environment (``WORLD_SIZE`` = N, ``RANK``, ``LOCAL_RANK``). Each process (rank :math:`r`) holds a
full copy of the trained model, draws the SAME global batch of :math:`B` samples from the same seeded generator,
keeps its contiguous slice :math:`S_r` of :math:`B/N` samples, and runs forward and backward on it;
:class:`torch.nn.parallel.DistributedDataParallel` (DDP) then averages the gradients over the ranks
(an all-reduce) before the optimizer step:

.. math::  g = \frac{1}{N}\sum_{r=1}^{N} \nabla_\theta \mathcal{L}_{S_r}(\theta)
             = \nabla_\theta \frac{1}{B}\sum_{b=1}^{B} \ell_b(\theta)
             \qquad\text{when } \mathcal{L}_{S_r} = \tfrac{N}{B}\textstyle\sum_{b \in S_r} \ell_b,

so every rank takes the same step from the same parameters, and N ranks on their shards train the model one
process would train on the whole batch (to floating-point reassociation). The equality needs every loss term
to be a mean over samples of equal weight (true here: one answer token per question, per-sample keep ratios)
and the random draws of the whole batch to agree with the single process: the data generator draws the global
batch on every rank, and the Gumbel noise of the pruner is drawn for the global batch and sliced
(:func:`global_noise` around the forward pass, read by :func:`vtp.gumbel.sample_keep_mask`; the lesson
variants that draw their own noise, such as the one-Gumbel sigmoid, draw it per rank: still a valid
data-parallel run, but not the single process's).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) the training hooks here change nothing: :func:`shard_batches`
returns its input, :func:`mean_over_ranks` its argument, :func:`wrap` the module, :func:`on_main` calls its
function, so single-process training is unchanged, bit for bit.
NCCL runs the collectives on GPUs, gloo on the CPU.
"""
from __future__ import annotations

import atexit
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["launched", "setup", "teardown", "is_distributed", "world_size", "rank", "is_main", "local_device",
           "check_batch", "shard", "shard_batches", "mean_over_ranks", "on_main", "broadcast_float", "wrap",
           "global_noise", "rows_of_global_draw"]

_NOISE_ROWS: tuple[int, int, int] | None = None  # (start, stop, global rows) while global_noise is active


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} must be set by the launcher (torchrun) when WORLD_SIZE > 1")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def launched() -> bool:
    """True when started by ``torchrun`` (or any launcher setting ``WORLD_SIZE``) with more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_distributed() -> bool:
    """True once the process group of a multi-process launch is initialised (:func:`setup`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes :math:`N` (1 without a launch)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank :math:`r` in ``[0, N)`` (0 without a launch)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, the rank that logs, validates and saves (always true without a launch)."""
    return rank() == 0


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device("cpu")


def setup() -> bool:
    """Initialise the process group of a ``torchrun`` launch (NCCL on CUDA, gloo on the CPU) if not done yet,
    select this rank's GPU, and register :func:`teardown` at exit. Returns :func:`is_distributed`. Idempotent;
    without a launch it does nothing and returns False."""
    if not launched() or is_distributed():
        return is_distributed()
    world, r, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if not (0 <= r < world):
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {r}")
    backend = "gloo"
    if torch.cuda.is_available():
        if not (0 <= local < torch.cuda.device_count()):
            raise ValueError(f"LOCAL_RANK must be in [0, {torch.cuda.device_count()}) (the GPUs of this node), "
                             f"got {local}: lower --nproc-per-node")
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, rank=r, world_size=world)
    atexit.register(teardown)
    return True


def teardown() -> None:
    """Destroy the process group (no barrier: a rank that failed must still be able to exit, so that the
    launcher stops the others)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, world: int | None = None, group: int = 1, name: str = "batch_size") -> int:
    """Check that a global batch of ``batch_size`` samples, made of groups of ``group`` samples that must stay
    together (questions sharing one image), splits evenly over ``world`` ranks (default :func:`world_size`);
    returns the per-rank batch size, else ``ValueError`` naming the allowed range."""
    world = world_size() if world is None else world
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    groups = batch_size // group
    if world > groups:
        raise ValueError(f"{world} processes (--nproc-per-node) is more than the batch allows: {name}={batch_size} "
                         f"holds {groups} group(s) of {group}, so at most {groups} processes")
    if batch_size % (world * group):
        raise ValueError(f"{name}={batch_size} must be divisible by the world size {world}"
                         + (f" times {group} (samples per image)" if group > 1 else "")
                         + f": use a multiple of {world * group}")
    return batch_size // world


def shard(batch: dict, r: int | None = None, world: int | None = None) -> dict:
    """Rank ``r``'s contiguous slice of a global batch: rows ``[r B/N, (r+1) B/N)`` of every per-sample tensor.
    With ``image_index`` (questions grouped by image, :func:`vtp.data.iterate_image_batches`), the images are
    split the same way and ``image_index`` re-based onto the rank's images."""
    r, world = rank() if r is None else r, world_size() if world is None else world
    B = batch["input_ids"].shape[0]
    check_batch(B, world)
    lo, hi = r * B // world, (r + 1) * B // world
    out = {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == B else v
           for k, v in batch.items() if k not in ("pixel_values", "image_index")}
    pixels = batch["pixel_values"]
    if "image_index" in batch:  # contiguous groups of B / I questions per image
        images = pixels.shape[0]
        check_batch(B, world, B // images, "batch")
        i_lo = r * images // world
        out["pixel_values"] = pixels[i_lo:(r + 1) * images // world]
        out["image_index"] = batch["image_index"][lo:hi] - i_lo
    else:
        out["pixel_values"] = pixels[lo:hi]
    return out


def shard_batches(batches):
    """Each global batch of the iterator ``batches`` (drawn identically on every rank) reduced to this rank's
    :func:`shard`; the iterator itself without a launch."""
    if not is_distributed():
        return batches
    return (shard(batch) for batch in batches)


def mean_over_ranks(value):
    """Average over the ranks (an all-reduce). A tensor gives the 0-d mean of its values over all ranks' samples
    (equal shard sizes); a dict of floats and bools gives the floats averaged and the bools and-ed. Without a
    launch, ``value`` itself."""
    if not is_distributed():
        return value
    device = local_device()
    if isinstance(value, torch.Tensor):
        total = value.detach().float().mean().to(device)
        dist.all_reduce(total)
        return total / world_size()
    keys = list(value)
    t = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t = (t / world_size()).tolist()
    return {k: (x == 1.0) if isinstance(value[k], bool) else x for k, x in zip(keys, t)}


def on_main(fn):
    """``fn()`` computed on rank 0 only and its (picklable) result sent to every rank, so that decisions that
    depend on it (best validated state, early stop) agree. Rank 0 runs ``fn`` under
    :func:`torch.random.fork_rng`: its random streams stay equal to the other ranks'. Without a launch, ``fn()``."""
    if not is_distributed():
        return fn()
    result = [None]
    if is_main():
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            result[0] = fn()
    dist.broadcast_object_list(result, src=0)
    return result[0]


def broadcast_float(x: float) -> float:
    """Rank 0's value of ``x`` on every rank (e.g. the elapsed time of a time-budgeted run: one clock decides
    when all ranks stop). ``x`` itself without a launch."""
    if not is_distributed():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=local_device())
    dist.broadcast(t, src=0)
    return t.item()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` when launched, else ``module``. DDP
    registers the parameters that require gradients at this call. ``find_unused_parameters=True``: parameters
    that no loss term reaches (a vision tower's last norm, or parameters frozen later, as in phase 2 of
    :func:`vtp.train.train_pruner`) keep ``grad = None`` (AdamW then skips them, as in a single process) instead
    of stalling the all-reduce; the price is one traversal of the autograd graph per step."""
    if not is_distributed():
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


@contextlib.contextmanager
def global_noise(global_rows: int):
    """Inside this context, :func:`rows_of_global_draw` (the Gumbel sampler) draws its noise for all
    ``global_rows`` samples of the global batch and keeps this rank's rows, so that N ranks see the noise one
    process sees on the whole batch. Without a launch it changes nothing."""
    global _NOISE_ROWS
    previous = _NOISE_ROWS
    if is_distributed():
        check_batch(global_rows, name="global_rows")
        r, world = rank(), world_size()
        _NOISE_ROWS = (r * global_rows // world, (r + 1) * global_rows // world, global_rows)
    try:
        yield
    finally:
        _NOISE_ROWS = previous


def rows_of_global_draw(sample, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``sample(x, **kwargs)`` for a row-wise random function ``sample`` (each row's output depends on its own
    row and noise only, e.g. ``F.gumbel_softmax``). Inside :func:`global_noise`: ``x`` (this rank's rows) is placed
    at its rows of a zero tensor of the global batch's shape, ``sample`` runs on that (drawing the global batch's
    noise from the random stream all ranks share) and this rank's rows come back; gradients flow to ``x``."""
    if _NOISE_ROWS is None:
        return sample(x, **kwargs)
    lo, hi, total = _NOISE_ROWS
    if x.shape[0] != hi - lo:
        raise ValueError(f"x must have this rank's {hi - lo} rows of the global batch ({total}), got {x.shape[0]}")
    pad = lambda n: x.new_zeros((n,) + tuple(x.shape[1:]))  # noqa: E731
    return sample(torch.cat([pad(lo), x, pad(total - hi)]), **kwargs)[lo:hi]
