r"""Training data for :func:`vtp.train.train_pruner`: any iterable of batches, and the dataset adapters that make
them.

A **batch** is a dict as a LLaVA-style ``transformers`` processor produces it, plus labels:

* ``input_ids`` [B, L]: each prompt with as many image-token ids as the vision tower gives visual tokens;
* ``pixel_values`` [I, C, H, W]: one image per sample (I = B) or, with ``image_index``, shared images;
* ``attention_mask`` [B, L]: 1 on real tokens, 0 on padding;
* ``labels`` [B, L]: the target token ids on the answer, -100 everywhere else (image tokens, question,
  padding), so that the cross-entropy and the distillation read the answer only;
* optionally ``image_index`` [B]: sample ``b`` uses image ``image_index[b]`` (several questions per image).

Other keys are carried along and ignored. :func:`training_batches` turns an iterable of such batches into the
endless, checked stream the loop draws from: a re-iterable (a list, a ``DataLoader``) is iterated again for
every epoch, a one-shot iterator (a generator) must last the whole run.

The adapters: :func:`encoded_batches` (endless shuffled batches of any :class:`vtp.data.EncodedSplit`, with
label-preserving augmentation), :func:`easy_vqa_batches` (easy-VQA's training questions, the default of
:func:`vtp.train.train_pruner`) and :func:`scene_batches` (the 2-D scenes of :mod:`vtp.scenes`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from ..data import EncodedSplit, VQAProcessor, encode_split, iterate_batches, load_split

__all__ = ["REQUIRED_KEYS", "check_batch", "training_batches", "encoded_batches", "easy_vqa_batches",
           "scene_batches"]

REQUIRED_KEYS = ("input_ids", "pixel_values", "attention_mask", "labels")


def check_batch(batch, index: int = 0) -> None:
    """``ValueError`` unless ``batch`` is a dict holding every key of :data:`REQUIRED_KEYS` as a tensor."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch {index} must be a dict with keys {REQUIRED_KEYS}, got {type(batch).__name__}")
    for key in REQUIRED_KEYS:
        if key not in batch:
            raise ValueError(f"batch {index} has no {key!r} (a batch needs {', '.join(REQUIRED_KEYS)})")
        if not isinstance(batch[key], torch.Tensor):
            raise ValueError(f"batch {index}: {key!r} must be a tensor, got {type(batch[key]).__name__}")


def training_batches(batches, device) -> Iterator[dict]:
    """The endless stream of checked batches (:func:`check_batch`) from ``batches``, tensors moved to ``device``
    (no copy when they are there already). Re-iterables are cycled; an iterator that runs out raises a
    ``ValueError`` (give a list or a ``DataLoader`` to train for several epochs)."""
    if isinstance(batches, (Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(f"batches must be an iterable of batch dicts (a list, a DataLoader, a generator), "
                         f"got {type(batches).__name__}")
    device = torch.device(device)

    def stream():
        drawn, one_shot = 0, iter(batches) is batches
        while True:
            epoch = 0
            for batch in batches:
                check_batch(batch, drawn)
                drawn, epoch = drawn + 1, epoch + 1
                yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if one_shot or not epoch:
                raise ValueError(f"batches ran out after {drawn} batches; the run needs one per step "
                                 "(pass a list or a DataLoader to cycle through epochs)")

    return stream()


def encoded_batches(data: EncodedSplit, processor: VQAProcessor, batch_size: int, augment: dict | None = None,
                    seed: int = 0) -> Iterator[dict]:
    """Endless shuffled batches of ``batch_size`` questions of ``data`` (a new permutation per epoch, the last
    incomplete batch dropped), images augmented with ``augment`` (:func:`vtp.data.augment_images` arguments),
    on ``data``'s device. ``seed`` seeds the shuffling and augmentation generator."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from iterate_batches(data, processor, batch_size, shuffle=True, generator=generator, augment=augment,
                                   drop_last=True)


def easy_vqa_batches(processor: VQAProcessor, cfg, device=None) -> Iterator[dict]:
    """easy-VQA's training questions (the first ``cfg.train_questions`` of a seeded shuffle when set) as
    :func:`encoded_batches` of ``cfg.batch_size`` with ``cfg.augment``, seeded with ``cfg.seed``."""
    train = load_split("train")
    if cfg.train_questions is not None and cfg.train_questions < len(train):
        train = train.subset(cfg.train_questions, seed=cfg.seed)
    return encoded_batches(encode_split(train, processor, device), processor, cfg.batch_size, cfg.augment, cfg.seed)


def scene_batches(split, processor: VQAProcessor, cfg, device=None) -> Iterator[dict]:
    """The questions of a :mod:`vtp.scenes` split (:func:`vtp.scenes.scene_split`, its processor from
    :func:`vtp.scenes.scene_processor`) as :func:`encoded_batches` of ``cfg.batch_size`` with ``cfg.augment``."""
    from ..scenes import encode_scenes

    data = encode_scenes(split, processor, device)
    return encoded_batches(data, processor, cfg.batch_size, cfg.augment, cfg.seed)
