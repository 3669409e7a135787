r"""What the shapes of a :func:`vtp.patch`'ed prefill depend on, known on the host without making the GPU wait.

Removing tokens changes tensor sizes, and a size is a host number: reading it from a GPU tensor (``.item()``,
``.tolist()``, ``nonzero``, a boolean mask) stops the host until the GPU has finished everything queued before, and
the GPU then idles while the host queues the next kernels. For the top-k rule every size is known beforehand:

* each image's number of visual tokens :math:`N_i` is a shape (the vision features, one tensor per image);
* the image tokens of each sample, :math:`n_b` (``input_ids == image_token_id`` summed per row), and the padding of
  the attention mask are copied to the host at the start of the prefill's forward and read when the language model
  needs them (:func:`read_layout`, :class:`HostCopy`). Queued before the vision tower, the copy has long arrived by
  then. ``generate()`` encodes the images before the forward, so there the copy queues behind the tower; but
  transformers' own check of the image-token count (a read) has already waited for the tower at that point;
* the visual positions are ``torch.nonzero_static`` with :math:`\sum_b n_b` rows;
* top-k keeps :math:`k(N) = \max(\text{min\_keep}, \operatorname{round}(\rho N))` of an image
  (:func:`vtp.selection.kept_tokens`), so sample :math:`b` keeps :math:`L - \sum_{i \in b} (N_i - k(N_i))`
  tokens (:func:`kept_lengths`).

Where the counts depend on the GPU's data they are read back: the threshold rule's kept counts, LLaVA-NeXT's image
sizes (its image-newline tokens are found by value, :func:`count_images`), and the validity mask that the pruner
checks when the images differ in size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .selection import kept_tokens

__all__ = ["HostCopy", "read_layout", "on_device", "Images", "find_images", "count_images", "kept_lengths"]


class HostCopy:
    """A small device tensor's values on the host, without making the GPU wait: on CUDA the copy is queued (into
    pinned memory, ``non_blocking``) behind the work already queued and read on first use (:meth:`get`), when the host
    waits for this copy alone, not for the work queued after it. On other devices the values are read at once."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.is_cuda:
            self.values, self.event = tensor.to("cpu", non_blocking=True), torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tensor.device))
        else:
            self.values = tensor.tolist()

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
            self.values, self.event = self.values.tolist(), None
        return self.values


def read_layout(visual: torch.Tensor, attention_mask: torch.Tensor | None) -> HostCopy:
    """Queue for the host what a prefill's shapes depend on: the image tokens of each sample (``visual`` [B, L]
    summed per row), then, for a 2-D ``attention_mask``, whether its last column is all ones (left padding or none)
    and whether all of it is (no padding)."""
    parts = [visual.sum(-1)]
    if attention_mask is not None and attention_mask.dim() == 2:
        m = attention_mask.to(visual.device)
        parts.append(torch.stack([m[:, -1].all(), m.all()]).long())
    return HostCopy(torch.cat(parts))


def on_device(values: list, device) -> torch.Tensor:
    """Host ints as a tensor on ``device`` without a wait: a copy from pageable memory makes the host wait for the
    GPU, one from pinned memory (``non_blocking``) does not."""
    t = torch.tensor(values)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


class Images(NamedTuple):
    """Scorable visual positions ``b, l`` [S], the image ``img`` and the ``slot`` within it of each; ``n_images``,
    ``n_max`` (the largest image); ``sizes``, each image's number of scorable tokens where the host knows them."""

    b: torch.Tensor
    l: torch.Tensor
    img: torch.Tensor
    slot: torch.Tensor
    n_images: int
    n_max: int
    sizes: list | None


def find_images(visual, scorable, counts, b, l) -> Images:
    r"""The images of the visual positions ``b, l`` (``visual``'s nonzeros, row-major: the order of masked_scatter).
    Images come in prompt order; their sizes are ``counts`` when known, else each run of consecutive image tokens is
    one image. ``scorable`` ``None``: every visual position is scored. With ``counts`` and nothing unscorable, image
    :math:`i` covers positions :math:`[c_0 + \dots + c_{i-1},\ c_0 + \dots + c_i)` and nothing is read back;
    otherwise :func:`count_images` reads the sizes."""
    size = b.numel()
    if counts is not None and sum(counts) == size:
        if scorable is None and min(counts) == max(counts):  # one size N: position j is slot j % N of image j // N
            j, n = torch.arange(size, device=b.device), counts[0]
            return Images(b, l, j // n, j % n, len(counts), n, list(counts))
        sizes = on_device(counts, b.device)
        img = torch.repeat_interleave(sizes, output_size=size)  # i, counts[i] times
        if scorable is None:
            slot = torch.arange(size, device=b.device) - (sizes.cumsum(0) - sizes)[img]
            return Images(b, l, img, slot, len(counts), max(counts), list(counts))
    else:
        start = visual & ~F.pad(visual, (1, 0))[:, :-1]
        img = start[b, l].long().cumsum(0) - 1
    return count_images(b, l, img, scorable)


def count_images(b, l, img, scorable) -> Images:
    """:func:`find_images` where only the device knows the sizes: one read-back (the number of images and the
    largest). The per-image counts are summed into a buffer of static size (at most as many images as visual
    positions), not by ``bincount``, whose output size is read back."""
    size = b.numel()
    last = img.max() + 1
    if scorable is not None:  # one index for the three (a boolean mask would read its size back three times)
        kept = scorable[b, l].nonzero(as_tuple=True)[0]
        b, l, img = b[kept], l[kept], img[kept]
    n = torch.zeros(size, dtype=torch.long, device=img.device).index_add_(0, img, torch.ones_like(img))
    n_images, n_max = torch.stack([last, n.max()]).tolist()
    n = n[:n_images]
    slot = torch.arange(img.numel(), device=img.device) - (n.cumsum(0) - n)[img]
    return Images(b, l, img, slot, n_images, n_max, None)


def kept_lengths(sizes, per_sample, L: int, ratio: float, min_keep: int) -> list | None:
    r"""Tokens each sample of length ``L`` keeps under the top-k rule, from host numbers alone (``None`` if the
    images' ``sizes`` are unknown): :math:`L - \sum_i (N_i - k(N_i))` over its images, the next ones in prompt order
    (``sizes``) that cover its ``per_sample[b]`` image tokens, with :math:`k(N)` = :func:`vtp.selection.kept_tokens`."""
    if sizes is None:
        return None
    budget = {n: kept_tokens(ratio, n, min_keep) for n in set(sizes)}
    kept, images = [], iter(sizes)
    for n in per_sample:
        dropped = 0
        while n > 0:
            size = next(images)
            n, dropped = n - size, dropped + size - budget[size]
        if n < 0:  # an image across two samples: not a prompt that transformers builds
            return None
        kept.append(L - dropped)
    return kept
