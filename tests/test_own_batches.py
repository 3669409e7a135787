"""Bring your own data: vtp.train_pruner on batches built by hand for a tiny LLaVA (not easy-VQA), the README's
"Train a pruner on your own batches" snippet run as written, the scenes adapter, and clear errors for bad
batches."""

import pytest
from conftest import run_readme_snippet
import torch

import vtp
from vtp.scenes import SceneConfig, generate_split, scene_processor
from vtp.train import REQUIRED_KEYS, pruner_config, scene_batches, train_pruner, training_batches
from vtp.vlm import PrunedVLM, build_llava

N_TOKENS = 16  # the smoke model's visual tokens (64 px, patch 16)


def _batch(B: int, g: torch.Generator, image_token_id: int = 2, share_images: bool = False) -> dict:
    """A hand-made batch: <s> <image> x 16, a 3-token question, a 1-token answer and one pad; labels -100
    outside the answer. With ``share_images``, pairs of questions share one image (``image_index``)."""
    question = torch.randint(3, 32, (B, 3), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, N_TOKENS), image_token_id), question,
                     question[:, :1], torch.zeros(B, 1, dtype=torch.long)], 1)
    mask = torch.ones_like(ids)
    mask[:, -1] = 0  # right padding
    labels = torch.full_like(ids, -100)
    labels[:, -2] = question[:, 0]
    images = B // 2 if share_images else B
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pixel_values": torch.randn(images, 3, 64, 64, generator=g)}
    if share_images:
        batch["image_index"] = torch.arange(images).repeat_interleave(2)
    return batch


@pytest.fixture(scope="module")
def teacher():
    return build_llava("smoke").eval()


def _cfg(**kw):
    return pruner_config("smoke", **{**dict(steps=4, batch_size=8, warmup_steps=1, log_every=1, target_ratio=0.25,
                                            eval_every=0), **kw})


@pytest.mark.parametrize("share_images", [False, True])
def test_train_pruner_on_hand_made_batches(teacher, share_images):
    g = torch.Generator().manual_seed(0)
    batches = [_batch(8, g, share_images=share_images) for _ in range(3)]  # cycled: 4 + 2 steps from 3 batches
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, h = train_pruner(teacher, cfg=_cfg(adapt_steps=2, adapt_pruner=True), batches=batches)
    assert isinstance(student, PrunedVLM) and not student.training
    assert h["step"] == [0, 1, 2, 3] and h["adapt"]["step"] == [4, 5] and h["val"] == []
    assert all(h["mask_binary"]) and all(0 <= k <= 1 for k in h["keep_ratio"])
    assert all(torch.isfinite(torch.tensor(h["total"])))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched
    moved = any(not torch.equal(before[k.removeprefix("llava.")], v) for k, v in student.state_dict().items()
                if k.startswith("llava.model.language_model."))
    assert moved
    with torch.no_grad():
        out = student(**{k: v for k, v in batches[0].items()}, ratio=0.25)
    assert out.n_visual.tolist() == [4] * 8  # real removal: round(0.25 * 16) tokens per sample


def test_same_batches_same_run(teacher):
    """A list and a generator of the same batches train the same model, bit for bit."""
    g = torch.Generator().manual_seed(1)
    batches = [_batch(8, g) for _ in range(4)]
    a, ha = train_pruner(teacher, cfg=_cfg(), batches=batches)
    b, hb = train_pruner(teacher, cfg=_cfg(), batches=(b for b in batches))
    assert ha["total"] == hb["total"]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_readme_snippet_runs():
    """The README's "Train a pruner on your own batches" snippet, run as written."""
    scope = run_readme_snippet("## Train a pruner on your own batches")
    student, history = scope["student"], scope["history"]
    assert isinstance(student, vtp.PrunedVLM) and history["step"] == list(range(6))
    assert student.llava.vtp_ratio == 0.25  # patched for deployment


def test_scene_adapter_makes_training_batches(teacher):
    tiny = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2,
                       max_objects=4, max_count=2)
    proc = scene_processor(tiny)
    cfg = _cfg(steps=2)
    batch = next(scene_batches(generate_split("train", 40, tiny), proc, cfg))
    assert set(REQUIRED_KEYS) <= set(batch) and batch["input_ids"].shape[0] == 8
    assert ((batch["labels"] != -100).sum(-1) == 1).all()
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    _, h = train_pruner(model, cfg=cfg, batches=scene_batches(generate_split("train", 40, tiny), proc, cfg))
    assert h["step"] == [0, 1]


def test_bad_batches_raise_clear_errors(teacher):
    g = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="iterable"):
        train_pruner(teacher, cfg=_cfg(), batches=42)
    with pytest.raises(ValueError, match="iterable"):
        train_pruner(teacher, cfg=_cfg(), batches=_batch(8, g))  # one batch, not an iterable of batches
    for key in REQUIRED_KEYS:
        bad = {k: v for k, v in _batch(8, g).items() if k != key}
        with pytest.raises(ValueError, match=repr(key)):
            train_pruner(teacher, cfg=_cfg(), batches=[bad])
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        train_pruner(teacher, cfg=_cfg(), batches=iter([_batch(8, g), _batch(8, g)]))
    with pytest.raises(ValueError, match="ran out after 0"):
        list(zip(range(1), training_batches([], "cpu")))
    with pytest.raises(ValueError, match="processor"):  # easy-VQA needs its processor
        train_pruner(teacher, cfg=_cfg())
