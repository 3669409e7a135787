"""vtp.scenes: determinism, answers checked by an independent reader of the question text, evidence patches equal
the cells the objects' pixels fall in, balanced splits, the compositional hold-out, model inputs, bad input."""
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from vtp.scenes import (COLORS, COUNT_WORDS, FAMILIES, SPLIT_SIZES, SceneConfig, SceneObject, ask, encode_scenes,
                        family_answers, generate_split, render_scene, scene_accuracy, scene_processor, train_stream)

CFG = SceneConfig()


def _match(objs, phrase):
    """Objects a description phrase ("small red things", "circle") matches: the test's own reader."""
    *adjs, noun = phrase.split()
    noun = noun[:-1] if noun.endswith("s") else noun
    return [o for o in objs if (noun == "thing" or o.shape == noun)
            and all(a in (o.size, o.color) for a in adjs)]


def _answer(question, objs, margin=CFG.relation_margin):
    """Answer ``question`` from the objects, independently of vtp.scenes."""
    if m := re.fullmatch(r"is there a (.+)\?", question):
        return "yes" if _match(objs, m[1]) else "no"
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        return COUNT_WORDS[len(_match(objs, m[1]))]
    if m := re.fullmatch(r"what (color|shape) is the (.+)\?", question):
        (o,) = _match(objs, m[2])  # the description must be unique
        return getattr(o, m[1])
    if m := re.fullmatch(r"is the (.+?) (left of|right of|above|below) the (.+)\?", question):
        (a,), (b,) = _match(objs, m[1]), _match(objs, m[3])
        d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[m[2]]
        assert abs(d) >= margin, "relation questions must be clear-cut"
        return "yes" if d > 0 else "no"
    if m := re.fullmatch(r"are there more (.+) than (.+)\?", question):
        n1, n2 = len(_match(objs, m[1])), len(_match(objs, m[2]))
        assert n1 != n2
        return "yes" if n1 > n2 else "no"
    raise AssertionError(f"unknown question form: {question}")


HAND = [SceneObject("large", "red", "circle", 30, 30), SceneObject("small", "blue", "square", 100, 40),
        SceneObject("small", "red", "square", 160, 150), SceneObject("large", "green", "triangle", 40, 160),
        SceneObject("small", "yellow", "circle", 120, 110)]


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_on_a_hand_built_scene(family):
    rng = np.random.default_rng(0)
    asked = 0
    for answer in family_answers(family, CFG):
        for _ in range(20):
            out = ask(family, HAND, answer, CFG, rng)
            if out is None:
                continue
            q, a, ev = out
            assert a == answer and _answer(q, HAND) == answer, q
            assert len(ev) >= 1 and all(0 <= i < len(HAND) for i in ev)
            asked += 1
    assert asked >= 10  # every family finds questions on this scene


def test_hand_built_answers_by_hand():
    # the reader itself, on facts one can see in HAND
    assert _answer("how many red things are there?", HAND) == "two"
    assert _answer("what color is the large circle?", HAND) == "red"
    assert _answer("is the red circle left of the blue square?", HAND) == "yes"
    assert _answer("is the green thing above the yellow thing?", HAND) == "no"
    assert _answer("are there more squares than triangles?", HAND) == "yes"
    rng = np.random.default_rng(1)
    assert ask("query_color", HAND, "purple", CFG, rng) is None  # no purple object: no such question


def test_evidence_patches_are_the_cells_the_object_pixels_fall_in():
    img, patches = render_scene(HAND, CFG)
    assert img.shape == (3, 192, 192) and img.dtype == torch.uint8 and patches.shape == (len(HAND), 576)
    hwc = img.permute(1, 2, 0).numpy()
    for o, row in zip(HAND, patches):
        ys, xs = np.nonzero((hwc == COLORS[o.color]).all(-1))
        near = (np.abs(ys + 0.5 - o.y) <= 12) & (np.abs(xs + 0.5 - o.x) <= 12)
        cells = set(((ys[near] // 8) * 24 + xs[near] // 8).tolist())
        assert cells == set(row.nonzero().squeeze(1).tolist())
    assert not (patches[0] & patches[1]).any()  # disjoint objects here


def test_objects_stay_gap_apart_and_inside_the_canvas():
    from vtp.scenes import _object_mask, _sample_objects

    rng = np.random.default_rng(0)
    radius = dict(CFG.sizes)
    for _ in range(20):
        objs = _sample_objects(CFG, rng, held_out=False)
        canvas = torch.zeros(len(objs), 1, 192, 192)
        for i, o in enumerate(objs):
            assert radius[o.size] <= o.x <= 192 - radius[o.size] and radius[o.size] <= o.y <= 192 - radius[o.size]
            y0, x0, m = _object_mask(o.shape, radius[o.size], o.x, o.y, 192)
            canvas[i, 0, y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = torch.from_numpy(m).float()
        grown = torch.nn.functional.max_pool2d(canvas, 2 * CFG.gap - 1, 1, CFG.gap - 1) > 0  # within gap - 1 px
        others = canvas.sum(0, keepdim=True) - canvas > 0  # [n, 1, H, W]: pixels of the other objects
        assert not (grown & others).any()


def test_clutter_changes_pixels_but_not_evidence():
    clean, patches = render_scene(HAND, CFG)
    specks = [(70.0, 70.0), (180.0, 20.0)]
    cluttered, patches_c = render_scene(HAND, CFG, specks)
    assert torch.equal(patches, patches_c) and not torch.equal(clean, cluttered)
    s = generate_split("val", 30, SceneConfig(clutter=12))
    assert (s.images == 100).all(1).any()  # grey specks drawn


def test_split_evidence_is_the_union_of_its_objects_patches():
    s = generate_split("val", 120, seed=5)
    for q in range(0, 120, 7):
        i = int(s.image_ids[q])
        _, patches = render_scene(s.objects[i], s.cfg)
        assert torch.equal(s.evidence[q], patches[list(s.evidence_objects[q])].any(0))
        assert _answer(s.questions[q], s.objects[i]) == s.answers[q]


def test_determinism_per_seed():
    a, b = generate_split("val", 90, seed=3), generate_split("val", 90, seed=3)
    assert a.questions == b.questions and a.answers == b.answers
    assert torch.equal(a.images, b.images) and torch.equal(a.evidence, b.evidence)
    c = generate_split("val", 90, seed=4)
    assert c.questions != a.questions
    s1, s2 = next(train_stream(seed=7, chunk_questions=30)), next(train_stream(seed=7, chunk_questions=30))
    assert s1.questions == s2.questions and torch.equal(s1.images, s2.images)


def test_splits_are_large_and_balanced():
    # exact balance whenever the size is a multiple of (families x lcm of the answer counts): the fixed splits are
    period = len(FAMILIES) * math.lcm(*(len(family_answers(f, CFG)) for f in FAMILIES))
    assert SPLIT_SIZES["test"] >= 10_000 and all(n % period == 0 for n in SPLIT_SIZES.values())
    n = 2 * period
    s = generate_split("test", n, seed=0)
    fam = Counter(s.families)
    assert len(s) == n and set(fam) == set(FAMILIES) and len(set(fam.values())) == 1
    for f in FAMILIES:
        per = Counter(a for a, g in zip(s.answers, s.families) if g == f)
        assert set(per) == set(family_answers(f, CFG)) and len(set(per.values())) == 1
    assert s.images.shape[0] <= n and (s.evidence.sum(-1) > 0).all()
    odd = generate_split("val", 100, seed=0)  # not a multiple: counts differ by at most one
    assert max(Counter(odd.families).values()) - min(Counter(odd.families).values()) <= 1


def test_compositional_split_holds_out_its_combinations():
    held = set(CFG.held_out)
    for s in (next(train_stream(seed=1, chunk_questions=300)), generate_split("test", 300)):
        assert not any((o.color, o.shape) in held for objs in s.objects for o in objs)
    comp = generate_split("compositional", 120)
    for q in range(len(comp)):
        objs = comp.objects[int(comp.image_ids[q])]
        assert any((objs[i].color, objs[i].shape) in held for i in comp.evidence_objects[q])


def test_model_inputs_and_the_token_count_check():
    from vtp.vlm import build_llava

    tiny = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2,
                       max_objects=4, max_count=2)
    s = generate_split("val", 24, tiny)
    proc = scene_processor(tiny)
    enc = encode_scenes(s, proc)
    assert enc.input_ids.shape[0] == 24 and (enc.input_ids[:, :16] == proc.image_token_id).all()
    assert ((enc.labels != -100).sum(-1) == 1).all()
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id)
    res = scene_accuracy(model, s, proc, batch_size=8)
    assert res.n == 24 and set(res.per_type) <= set(FAMILIES) and 0.0 <= res.accuracy <= 1.0
    with pytest.raises(ValueError, match="576"):
        scene_accuracy(model, generate_split("val", 12), scene_processor())
    with pytest.raises(ValueError, match="processor"):
        encode_scenes(generate_split("val", 12), proc)


def test_teacher_trains_on_scenes_through_train_teacher():
    from vtp.train import TrainConfig, train_teacher

    tiny = SceneConfig(image_size=64, patch_size=16, sizes=(("small", 4), ("large", 6)), min_objects=2,
                       max_objects=4, max_count=2)
    proc = scene_processor(tiny)
    data = encode_scenes(generate_split("train", 60, tiny), proc)
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1, augment={}, questions_per_image=2, log_every=1)
    model, _, hist = train_teacher(cfg, "cpu", proc, train_data=data)
    assert hist["steps_done"] == 3 and all(np.isfinite(hist["loss"]))
    with pytest.raises(ValueError, match="processor"):
        train_teacher(cfg, "cpu", None, train_data=data)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_objects": 65}, "max_objects"), ({"image_size": (192, 160)}, "image_size"), ({"image_size": 0}, "image_size"),
    ({"families": ()}, "families"),
    ({"patch_size": 7}, "patch_size"), ({"families": ("exist", "colour")}, "families"),
    ({"min_objects": 0}, "min_objects"), ({"min_objects": 1, "max_objects": 1}, "max_objects"),
    ({"colors": ("red",)}, "colors"), ({"max_count": 12}, "max_count"),
    ({"held_out": (("red", "hexagon"),)}, "held_out"), ({"sizes": (("huge", 6),)}, "sizes")])
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SceneConfig(**kwargs)


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="held_out"):
        generate_split("compositional", 10, SceneConfig(held_out=()))
    with pytest.raises(ValueError, match="name"):
        generate_split("holdout", 10)
    with pytest.raises(ValueError, match="n_questions"):
        generate_split("val", 0)
    with pytest.raises(ValueError, match="questions_per_image"):
        generate_split("val", 10, questions_per_image=0)
