r"""easy-VQA data: images, questions, answers, question types, tokenizer, processor and batches.

easy-VQA (the ``easy_vqa`` package) has 4,000 train / 1,000 test images (64x64 PNG, one coloured shape on a
pale background) with 38,575 / 9,673 questions and 13 one-word answers. We carve a fixed validation split
from the train images (by image, seeded), so no validation image is ever seen in training.

A sample is a token sequence ``[<image>] * N + question + answer``: the ``N`` placeholders are replaced by
the projected visual tokens inside LLaVA, and only the answer position carries a label (``-100`` elsewhere),
so the loss is :math:`-\log p(\text{answer} \mid \text{image}, \text{question})`.

Images are decoded once per process into one ``uint8`` tensor ``[I, 3, 64, 64]`` (lazily, on first use);
batches are built by indexing pre-tokenized tensors, and normalised on the target device.
"""
from __future__ import annotations

import functools
import re
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPLITS", "QUESTION_TYPES", "IMAGE_TOKEN", "PAD_TOKEN", "UNK_TOKEN",
    "VQASplit", "load_split", "question_type", "load_images",
    "build_tokenizer", "VQAProcessor", "build_processor", "EncodedSplit", "encode_questions", "encode_split", "iterate_batches",
    "iterate_image_batches",
    "augment_images",
]

SPLITS = ("train", "val", "test")
QUESTION_TYPES = ("shape", "color", "yes/no shape", "yes/no color")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
PAD_TOKEN, UNK_TOKEN, IMAGE_TOKEN = "<pad>", "<unk>", "<image>"
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


def question_type(question: str, answer: str) -> str:
    """``"shape"`` / ``"color"`` (what-questions, by their answer) or ``"yes/no shape"`` / ``"yes/no color"``
    (yes/no questions about a shape or a colour, by whether the question names a colour)."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    words = set(re.findall(r"[a-z]+", question.lower()))
    return "yes/no color" if words & set(COLORS) else "yes/no shape"


@functools.lru_cache(maxsize=2)
def load_images(source: str) -> torch.Tensor:
    """All images of the package's ``"train"`` or ``"test"`` set as uint8 ``[I, 3, 64, 64]``, indexed by image
    id. Decoded once per process."""
    import easy_vqa
    from PIL import Image

    if source not in ("train", "test"):
        raise ValueError(f"source must be 'train' or 'test', got {source!r}")
    paths = easy_vqa.get_train_image_paths() if source == "train" else easy_vqa.get_test_image_paths()
    arrays = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in range(len(paths))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class VQASplit:
    """One split: parallel lists ``questions``, ``answers``, ``qtypes`` and ``image_ids`` [Q] indexing
    ``images`` (uint8 [I, 3, 64, 64], shared by train and val)."""

    name: str
    questions: list
    answers: list
    qtypes: list
    image_ids: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, n: int, seed: int = 0) -> "VQASplit":
        """A random subset of ``n`` questions (fixed ``seed``), e.g. for smoke runs."""
        if not (1 <= n <= len(self)):
            raise ValueError(f"n must be in [1, {len(self)}], got {n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        pick = idx.tolist()
        return VQASplit(self.name, [self.questions[i] for i in pick], [self.answers[i] for i in pick],
                        [self.qtypes[i] for i in pick], self.image_ids[idx], self.images)


def load_split(name: str, val_fraction: float = 0.1, seed: int = 0) -> VQASplit:
    """``"train"``, ``"val"`` (``val_fraction`` of the train IMAGES, chosen with ``seed``) or ``"test"``."""
    import easy_vqa

    if name not in SPLITS:
        raise ValueError(f"name must be one of {SPLITS}, got {name!r}")
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    source = "test" if name == "test" else "train"
    q, a, ids = easy_vqa.get_test_questions() if source == "test" else easy_vqa.get_train_questions()
    ids = torch.tensor(ids)
    if source == "train":
        n_img = int(ids.max()) + 1
        val_images = torch.randperm(n_img, generator=torch.Generator().manual_seed(seed))[: round(val_fraction * n_img)]
        in_val = torch.zeros(n_img, dtype=torch.bool)
        in_val[val_images] = True
        pick = in_val[ids] if name == "val" else ~in_val[ids]
        idx = pick.nonzero().squeeze(1).tolist()
        q, a, ids = [q[i] for i in idx], [a[i] for i in idx], ids[pick]
    return VQASplit(name, list(q), list(a), [question_type(x, y) for x, y in zip(q, a)], ids, load_images(source))


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of ``texts`` (lower-cased, punctuation split off), wrapped as a
    transformers tokenizer. Ids: ``<pad>`` 0, ``<unk>`` 1, ``<image>`` 2, then the words sorted."""
    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    vocab = {tok: i for i, tok in enumerate([PAD_TOKEN, UNK_TOKEN, IMAGE_TOKEN] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.add_special_tokens([PAD_TOKEN, UNK_TOKEN, IMAGE_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   padding_side="right")


class VQAProcessor:
    """Image preprocessing + tokenizer for the small LLaVA, saved and loaded next to the model.

    ``pixel = (uint8 / 255 - mean) / std``; text = ``num_image_tokens`` image placeholders + question
    (+ answer, the only labelled token(s)), right-padded. ``question_first=True`` writes the question before the
    image too (question + image + question + answer): in a causal language model the visual positions then see
    the question, so each visual token can be read in its light (which object is asked about) instead of only
    the last positions doing all the binding. Default ``False`` (LLaVA's image-first prompt).
    """

    config_name = "vqa_processor.json"

    def __init__(self, tokenizer, num_image_tokens: int, image_size: int = 64, image_mean=IMAGE_MEAN,
                 image_std=IMAGE_STD, image_token: str = IMAGE_TOKEN, question_first: bool = False):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.tokenizer, self.num_image_tokens, self.image_size = tokenizer, num_image_tokens, image_size
        self.image_mean, self.image_std, self.image_token = tuple(image_mean), tuple(image_std), image_token
        if not isinstance(question_first, bool):
            raise TypeError(f"question_first must be a bool, got {type(question_first).__name__}")
        self.question_first = question_first
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.pad_token_id = tokenizer.pad_token_id
        self._stats = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def preprocess_images(self, images, device=None) -> torch.Tensor:
        """uint8 tensor [B, 3, H, W] (or a list of PIL images / HxWx3 arrays) -> normalised float32 pixels."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                                                for im in images])).permute(0, 3, 1, 2)
        s = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must have shape (batch, 3, {s}, {s}), got {tuple(images.shape)}")
        x = images.to(device=device, dtype=torch.float32) / 255.0
        if x.device not in self._stats:  # cached per device: no host-to-device copy per batch
            self._stats[x.device] = (torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1),
                                     torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1))
        mean, std = self._stats[x.device]
        return (x - mean) / std

    def encode_text(self, questions, answers=None) -> dict:
        """``input_ids``, ``attention_mask`` [B, L] and, with ``answers``, ``labels`` (answer tokens only)."""
        if isinstance(questions, str):
            questions = [questions]
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(questions):
                raise ValueError(f"answers must match questions in length ({len(questions)}), got {len(answers)}")
        q_ids = self.tokenizer(list(questions), add_special_tokens=False)["input_ids"]
        a_ids = self.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else [[]] * len(q_ids)
        prefix = [self.image_token_id] * self.num_image_tokens
        seqs = [(q if self.question_first else []) + prefix + q + a for q, a in zip(q_ids, a_ids)]
        L = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        for i, (s, a) in enumerate(zip(seqs, a_ids)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
            if a:
                labels[i, len(s) - len(a): len(s)] = torch.tensor(a)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if answers is not None:
            out["labels"] = labels
        return out

    def __call__(self, images, questions, answers=None, device=None) -> dict:
        """Model inputs for a batch: ``pixel_values`` + the text tensors of :meth:`encode_text`."""
        out = {k: v.to(device) for k, v in self.encode_text(questions, answers).items()}
        out["pixel_values"] = self.preprocess_images(images, device)
        if out["pixel_values"].shape[0] != out["input_ids"].shape[0]:
            raise ValueError(f"got {out['pixel_values'].shape[0]} images for {out['input_ids'].shape[0]} questions")
        return out

    def decode(self, token_ids) -> list:
        """Token ids -> words (one per id)."""
        return self.tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        cfg = {k: getattr(self, k) for k in ("num_image_tokens", "image_size", "image_mean", "image_std", "image_token",
                                             "question_first")}
        (directory / self.config_name).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, directory) -> "VQAProcessor":
        directory = Path(directory)
        cfg = json.loads((directory / cls.config_name).read_text())
        return cls(PreTrainedTokenizerFast.from_pretrained(directory), **cfg)


def build_processor(num_image_tokens: int, image_size: int = 64) -> VQAProcessor:
    """The processor with a tokenizer built from all easy-VQA questions and answers of the train split."""
    import easy_vqa

    q, a, _ = easy_vqa.get_train_questions()
    tokenizer = build_tokenizer(list(q) + list(easy_vqa.get_answers()))
    return VQAProcessor(tokenizer, num_image_tokens, image_size)


@dataclass
class EncodedSplit:
    """A split pre-tokenized for fast batching: ``input_ids``/``attention_mask``/``labels`` [Q, L],
    ``image_ids`` [Q], ``answer_ids`` [Q], ``qtype_ids`` [Q] (index into ``QUESTION_TYPES``), ``images``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    answer_ids: torch.Tensor
    qtype_ids: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "EncodedSplit":
        return EncodedSplit(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode_questions(questions, answers, type_ids, image_ids, images, processor: VQAProcessor, device=None,
                     what: str = "easy-VQA") -> EncodedSplit:
    """Tokenize questions + one-token answers once into an :class:`EncodedSplit` (``type_ids`` [n] int:
    question type or family per question; ``image_ids`` [n] index ``images``)."""
    enc = processor.encode_text(questions, answers)
    answer_ids = processor.tokenizer(answers, add_special_tokens=False)["input_ids"]
    if any(len(a) != 1 for a in answer_ids):
        raise ValueError(f"every {what} answer is expected to be one token of the processor's vocabulary")
    return EncodedSplit(enc["input_ids"], enc["attention_mask"], enc["labels"], image_ids,
                        torch.tensor([a[0] for a in answer_ids]), torch.as_tensor(type_ids), images).to(device)


def encode_split(split: VQASplit, processor: VQAProcessor, device=None) -> EncodedSplit:
    """Tokenize every question + answer of ``split`` once."""
    qtype_ids = [QUESTION_TYPES.index(t) for t in split.qtypes]
    return encode_questions(split.questions, split.answers, qtype_ids, split.image_ids, split.images, processor, device)


def augment_images(images: torch.Tensor, generator: torch.Generator | None = None, hflip: float = 0.5,
                   max_shift: float = 0, vflip: float = 0.0, rot90: bool = False,
                   scale: tuple[float, float] | None = None) -> torch.Tensor:
    r"""Label-preserving augmentation of uint8 images [B, 3, H, W], each image drawn independently:

    * horizontal flips with probability ``hflip``, vertical flips with probability ``vflip``;
    * ``rot90``: a rotation by a uniformly drawn multiple of 90 degrees (square images);
    * translations by up to ``max_shift`` pixels: whole pixels with replicated edges when ``scale`` is None,
      otherwise one bilinear resampling :math:`x_{in} = x_{out} / s - t` (border padding) with a zoom
      :math:`s \sim U[\text{scale}]` and a shift :math:`t \sim U[-\text{max\_shift}, \text{max\_shift}]^2`.

    No colour changes: colours are answers. Every transform keeps the answer of every easy-VQA question
    (shape, colour, presence); vertical flips and rotations show triangles pointing down or sideways, which
    the test images never do.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 tensor [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    for name, p in (("hflip", hflip), ("vflip", vflip)):
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}")
    if scale is not None and not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must be None or (low, high) with 0 < low <= high, got {scale}")
    B, _, H, W = images.shape
    dev = images.device
    g_dev = generator.device if generator is not None else dev

    def draw(*shape):
        return torch.rand(*shape, generator=generator, device=g_dev).to(dev)

    out = torch.where((draw(B) < hflip).view(B, 1, 1, 1), images.flip(-1), images)
    if vflip > 0:
        out = torch.where((draw(B) < vflip).view(B, 1, 1, 1), out.flip(-2), out)
    if rot90:
        if H != W:
            raise ValueError(f"rot90 needs square images, got {H}x{W}")
        k = (draw(B) * 4).long().clamp(max=3).view(B, 1, 1, 1)
        for turns in (1, 2, 3):
            out = torch.where(k == turns, out.rot90(turns, (-2, -1)), out)
    if scale is not None:
        s = scale[0] + (scale[1] - scale[0]) * draw(B)
        t = (2 * draw(2, B) - 1) * max_shift
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = 1 / s, 1 / s
        theta[:, 0, 2], theta[:, 1, 2] = -2 * t[0] / W, -2 * t[1] / H
        grid = F.affine_grid(theta, (B, 3, H, W), align_corners=False)
        out = F.grid_sample(out.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.round().clamp(0, 255).to(torch.uint8)
    shift = int(max_shift)
    if shift > 0:
        dy, dx = torch.randint(-shift, shift + 1, (2, B), generator=generator, device=g_dev).to(dev)
        rows = (torch.arange(H, device=dev).view(1, H) - dy.view(B, 1)).clamp(0, H - 1)
        cols = (torch.arange(W, device=dev).view(1, W) - dx.view(B, 1)).clamp(0, W - 1)
        out = out.gather(2, rows.view(B, 1, H, 1).expand(B, 3, H, W))
        out = out.gather(3, cols.view(B, 1, 1, W).expand(B, 3, H, W))
    return out


def iterate_batches(data: EncodedSplit, processor: VQAProcessor, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, augment: dict | None = None, drop_last: bool = False,
                    indices: torch.Tensor | None = None):
    """Yield model-input dicts (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` and the
    bookkeeping ``answer_ids``, ``qtype_ids``, ``index``) on ``data``'s device. ``augment`` = keyword arguments of :func:`augment_images` (training only)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = data.input_ids.device
    n = len(data)
    if indices is None:
        if shuffle:
            g_dev = generator.device if generator is not None else device
            indices = torch.randperm(n, generator=generator, device=g_dev).to(device)
        else:
            indices = torch.arange(n, device=device)
    stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = indices[start: start + batch_size].to(device)
        images = data.images[data.image_ids[idx]]
        if augment:
            images = augment_images(images, generator, **augment)
        yield {
            "input_ids": data.input_ids[idx], "attention_mask": data.attention_mask[idx], "labels": data.labels[idx],
            "pixel_values": processor.preprocess_images(images, device),
            "answer_ids": data.answer_ids[idx], "qtype_ids": data.qtype_ids[idx], "index": idx,
        }


def iterate_image_batches(data: EncodedSplit, processor: VQAProcessor, images_per_batch: int,
                          questions_per_image: int, generator: torch.Generator | None = None,
                          augment: dict | None = None):
    """Endless training batches grouped by image: ``images_per_batch`` random images (each augmented once)
    and, for each, ``questions_per_image`` of its questions drawn at random (with replacement). Sample ``b``
    uses image ``image_index[b]`` of ``pixel_values``, so the vision tower runs once per image."""
    for name, v in (("images_per_batch", images_per_batch), ("questions_per_image", questions_per_image)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device = data.input_ids.device
    g_dev = generator.device if generator is not None else device
    # questions of each image: sorted by image, with per-image offsets and counts
    order = torch.argsort(data.image_ids, stable=True)
    images = data.image_ids[order].unique_consecutive()
    counts = torch.bincount(data.image_ids[order])[images]
    offsets = counts.cumsum(0) - counts
    while True:
        pick = torch.randint(len(images), (images_per_batch,), generator=generator, device=g_dev).to(device)
        u = torch.rand(images_per_batch, questions_per_image, generator=generator, device=g_dev).to(device)
        q = order[offsets[pick, None] + (u * counts[pick, None]).long().clamp(max=counts[pick, None] - 1)].flatten()
        pixels = data.images[images[pick]]
        if augment:
            pixels = augment_images(pixels, generator, **augment)
        yield {
            "input_ids": data.input_ids[q], "attention_mask": data.attention_mask[q], "labels": data.labels[q],
            "pixel_values": processor.preprocess_images(pixels, device),
            "image_index": torch.arange(images_per_batch, device=device).repeat_interleave(questions_per_image),
            "answer_ids": data.answer_ids[q], "qtype_ids": data.qtype_ids[q], "index": q,
        }
