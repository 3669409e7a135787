"""Dense patch labels of the scenes (vtp.scene_pretrain) and the vision-tower pretraining that reads them."""
import dataclasses

import pytest
import torch

from vtp.scene_pretrain import CENTRE_XY, LABELS, _contents, patch_labels, pretrain_vision
from vtp.scenes import SceneConfig, SceneObject, generate_split, render_scene, scene_processor
from vtp.vlm import build_llava

CFG = SceneConfig()


class _Split:  # the two fields patch_labels reads
    def __init__(self, objects, cfg=CFG):
        self.objects, self.cfg = objects, cfg


def test_one_object_labels_its_patches_and_its_centre():
    obj = SceneObject("large", "blue", "square", x=100.0, y=52.0)  # centre in patch (6, 12) of 8 px
    lab = patch_labels(_Split([[obj]]))[0]
    _, covered = render_scene([obj], CFG)
    owned = lab[:, 0] > 0
    assert owned.any() and bool((owned <= covered[0]).all())  # labels only where the object has pixels
    expect = (CFG.colors.index("blue") + 1, CFG.shapes.index("square") + 1, [n for n, _ in CFG.sizes].index("large") + 1)
    assert all(tuple(row[:3].tolist()) == expect for row in lab[owned])
    assert lab[~owned, :3].abs().sum() == 0  # background: class 0
    assert lab[:, 3].nonzero().flatten().tolist() == [6 * CFG.grid + 12]
    assert lab[owned, len(LABELS):].tolist() == [[100, 52]] * int(owned.sum())  # the owner's centre, px
    assert (lab[~owned, len(LABELS):] == -1).all()


def test_contents_are_the_pairs_present():
    a = SceneObject("large", "blue", "square", x=40.0, y=40.0)
    b = SceneObject("small", "red", "circle", x=140.0, y=120.0)
    c = SceneObject("small", "blue", "square", x=150.0, y=30.0)  # a pair already present counts once
    lab = patch_labels(_Split([[a, b, c], [b]]))
    got = _contents(lab, len(CFG.shapes), len(CFG.colors) * len(CFG.shapes))
    pair = lambda o: CFG.colors.index(o.color) * len(CFG.shapes) + CFG.shapes.index(o.shape)  # noqa: E731
    assert got[0].nonzero().flatten().tolist() == sorted({pair(a), pair(b)})
    assert got[1].nonzero().flatten().tolist() == [pair(b)]


def test_every_object_has_one_centre_patch():
    split = generate_split("train", 120, CFG, seed=(5, 0))
    lab = patch_labels(split)
    assert lab.shape == (len(split.objects), CFG.num_tokens, len(LABELS) + len(CENTRE_XY))
    assert lab[..., 3].sum(1).tolist() == [len(objs) for objs in split.objects]
    assert bool((lab[..., 3].bool() <= (lab[..., 0] > 0)).all())  # a centre patch belongs to an object


def _pretrain_tiny(steps: int, log_every: int, **kw) -> dict:
    """``pretrain_vision`` of a fresh smoke tower on 200 scenes of 16 tokens (one or two objects)."""
    cfg = SceneConfig(image_size=32, patch_size=8, sizes=(("small", 3), ("large", 5)), min_objects=1, max_objects=2,
                      max_count=1, jitter=2)
    split = generate_split("train", 200, cfg, seed=(1, 0), questions_per_image=1)
    proc = scene_processor(cfg)
    torch.manual_seed(0)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id, image_size=32, patch_size=8)
    return pretrain_vision(model, split.images, patch_labels(split), proc, cfg, steps=steps, batch_size=32, lr=3e-3,
                           log_every=log_every, **kw)


def test_pretraining_learns_the_labels_of_small_scenes():
    hist = _pretrain_tiny(150, 149)
    assert hist["steps_done"] == 150 and hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["acc"][-1]["color"] > 0.6  # colours on object patches: chance is 1/7
    assert "xy" not in hist["acc"][-1] and "contents" not in hist["acc"][-1]  # their terms are off by default


def test_pretraining_learns_centres_and_contents():
    hist = _pretrain_tiny(450, 25, position_weight=1.0, contents_weight=1.0)
    first, last = hist["acc"][0], hist["acc"][-3:]
    # centres within half a patch, and every (colour, shape) pair of a scene right: both start far lower
    assert min(a["xy"] for a in last) > first["xy"] + 0.5, (first, last)
    assert min(a["contents"] for a in last) > first["contents"] + 0.5, (first, last)


def test_labels_must_match_the_images():
    proc = scene_processor(CFG)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id, image_size=192, patch_size=8)
    with pytest.raises(ValueError, match="labels must be"):
        pretrain_vision(model, torch.zeros(2, 3, 192, 192, dtype=torch.uint8), torch.zeros(3, 576, 4).long(), proc, CFG)
    with pytest.raises(ValueError, match="position_weight must be"):
        pretrain_vision(model, torch.zeros(2, 3, 192, 192, dtype=torch.uint8), torch.zeros(2, 576, 8).long(), proc, CFG,
                        position_weight=float("nan"))


def test_train_teacher_continues_from_a_given_model():
    from vtp.train import TrainConfig, train_teacher
    from vtp.scenes import encode_scenes

    cfg = SceneConfig(image_size=32, patch_size=8, sizes=(("small", 3), ("large", 5)), min_objects=1, max_objects=2,
                      max_count=1, jitter=2)
    proc = scene_processor(cfg)
    split = generate_split("train", 60, cfg, seed=(2, 0), questions_per_image=2)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id, image_size=32, patch_size=8)
    weight = lambda: next(model.model.vision_tower.parameters()).detach().clone()  # noqa: E731
    before = weight()
    tc = TrainConfig(model="smoke", model_overrides={"image_size": 32, "patch_size": 8}, steps=2, batch_size=4,
                     questions_per_image=2, eval_every=0, augment={}, train_questions=None, warmup_steps=1)
    out, _, _ = train_teacher(tc, "cpu", proc, train_data=encode_scenes(split, proc), model=model)
    assert out is model  # trained in place, from its own weights
    assert not torch.equal(before, weight())
    wrong = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id, image_size=32, patch_size=8)  # 16 visual tokens, not 64
    with pytest.raises(ValueError, match="visual tokens"):
        train_teacher(dataclasses.replace(tc, model_overrides={"image_size": 64, "patch_size": 8}), "cpu",
                      scene_processor(dataclasses.replace(cfg, image_size=64)), train_data=None, model=wrong)


def test_question_first_prompt_layout_and_round_trip(tmp_path):
    cfg = SceneConfig(image_size=32, patch_size=8, sizes=(("small", 3), ("large", 5)), min_objects=1, max_objects=2,
                      max_count=1, jitter=2)
    plain, first = scene_processor(cfg), scene_processor(cfg, question_first=True)
    q, a = ["is there a red circle ?"], ["yes"]
    e0, e1 = plain.encode_text(q, a), first.encode_text(q, a)
    q_ids = plain.tokenizer(q, add_special_tokens=False)["input_ids"][0]
    n, img = cfg.num_tokens, plain.image_token_id
    assert e0["input_ids"][0].tolist() == [img] * n + q_ids + [plain.tokenizer.convert_tokens_to_ids("yes")]
    assert e1["input_ids"][0].tolist() == q_ids + [img] * n + q_ids + e0["input_ids"][0, -1:].tolist()
    assert (e1["labels"] != -100).sum() == 1 and e1["labels"][0, -1] == e0["labels"][0, -1]  # the answer only
    first.save_pretrained(tmp_path)
    assert type(first).from_pretrained(tmp_path).question_first is True
    with pytest.raises(TypeError, match="question_first must be a bool"):
        scene_processor(cfg, question_first="yes")


def test_a_question_first_model_trains_and_evaluates():
    from vtp.scenes import encode_scenes, scene_accuracy
    from vtp.train import TrainConfig, train_teacher

    cfg = SceneConfig(image_size=32, patch_size=8, sizes=(("small", 3), ("large", 5)), min_objects=1, max_objects=2,
                      max_count=1, jitter=2)
    proc = scene_processor(cfg, question_first=True)
    split = generate_split("train", 40, cfg, seed=(3, 0), questions_per_image=2)
    tc = TrainConfig(model="smoke", model_overrides={"image_size": 32, "patch_size": 8}, steps=3, batch_size=4,
                     questions_per_image=2, eval_every=0, augment={}, train_questions=None, warmup_steps=1)
    model, _, hist = train_teacher(tc, "cpu", proc, train_data=encode_scenes(split, proc))
    assert hist["steps_done"] == 3
    assert 0 <= scene_accuracy(model, split, proc).accuracy <= 1
