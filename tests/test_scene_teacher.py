"""The scenes teacher's recipe (vtp.scene_teacher): evidence roles, the evidence loss, position labels, one call."""
import pytest
import torch

from vtp.scene_pretrain import DESCRIBED, LABELS, evidence_centres, evidence_roles, patch_labels
from vtp.scene_teacher import EvidenceLoss, scene_config, train_scene_teacher, training_pool
from vtp.scenes import SceneConfig, generate_split, render_scene

TINY = {"image_size": 32, "patch_size": 8, "sizes": [["small", 3], ["large", 5]], "min_objects": 2, "max_objects": 3,
        "max_count": 2, "jitter": 2, "relation_margin": 4}


def test_position_labels_are_the_patch_grid():
    cfg = SceneConfig()
    split = generate_split("train", 12, cfg, seed=(3, 0))
    lab = patch_labels(split)
    assert LABELS[4:] == ("row", "col")
    j = torch.arange(cfg.num_tokens)
    assert torch.equal(lab[0, :, 4], j // cfg.grid) and torch.equal(lab[0, :, 5], j % cfg.grid)


def test_evidence_roles_mark_the_described_objects():
    cfg = SceneConfig()
    split = generate_split("train", 600, cfg, seed=(4, 0))
    roles = evidence_roles(split)
    assert roles.shape == (len(split), cfg.num_tokens)
    for q, (fam, ans) in enumerate(zip(split.families, split.answers)):
        if (fam, ans) in (("exist", "no"), ("count", "zero")):
            assert roles[q].sum() == 0  # absence: no object is described
        else:  # evidence patches, and only they, carry a role
            assert torch.equal(roles[q] > 0, split.evidence[q])
        assert (roles[q] == 2).any() == (fam == "relation")
    rel = split.families.index("relation")
    first, second = split.evidence_objects[rel]
    objs = split.objects[int(split.image_ids[rel])]
    _, patches = render_scene(objs, cfg)
    assert bool((roles[rel][torch.as_tensor(patches[second])] == 2).all())  # the second object wins overlaps
    only_first = torch.as_tensor(patches[first]) & ~torch.as_tensor(patches[second])
    assert bool((roles[rel][only_first] == 1).all())


def _fit(loss_fn, batch, out, hidden, lr, steps) -> float:
    """SGD on the head and the hidden states together; the loss after ``steps`` steps."""
    opt = torch.optim.SGD(list(loss_fn.parameters()) + [hidden], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(batch, out)
        loss.backward()
        opt.step()
    return loss_fn(batch, out).item()


def test_evidence_loss_reads_visual_positions_and_learns():
    torch.manual_seed(0)
    B, N, D = 4, 16, 8
    roles = torch.zeros(10, N, dtype=torch.long)
    roles[:, :3] = 1
    roles[:, 3:5] = 2
    loss_fn = EvidenceLoss(D, roles, weight=0.5)
    visual = torch.zeros(B, N + 4, dtype=torch.bool)
    visual[:, 2:2 + N] = True
    hidden = torch.randn(B, N + 4, D, requires_grad=True)
    out = type("Out", (), {"hidden": hidden, "visual_mask": visual})()
    batch = {"index": torch.tensor([0, 3, 5, 9])}
    loss = loss_fn(batch, out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert hidden.grad[:, 2:2 + N].abs().sum() > 0 and hidden.grad[:, :2].abs().sum() == 0  # visual positions only
    assert _fit(loss_fn, batch, out, hidden, lr=1.0, steps=50) < 0.5 * loss.item()
    with pytest.raises(ValueError, match="visual positions"):
        loss_fn(batch, type("Out", (), {"hidden": hidden[:, :10], "visual_mask": visual[:, :10]})())
    with pytest.raises(ValueError, match="weight"):
        EvidenceLoss(D, roles, weight=0.0)


def test_evidence_centres_are_the_described_objects():
    cfg = SceneConfig()
    split = generate_split("train", 300, cfg, seed=(7, 0))
    c = evidence_centres(split)
    assert c.shape == (len(split), 2, 2)
    for q, fam in enumerate(split.families):
        known = ~c[q].isnan().any(-1)
        assert known.tolist() == [fam in DESCRIBED, fam == "relation"], (fam, c[q])
        objs = split.objects[int(split.image_ids[q])]
        for k in range(int(known.sum())):
            o = objs[split.evidence_objects[q][k]]
            assert torch.allclose(c[q, k], torch.tensor([o.x, o.y], dtype=torch.float32) / cfg.image_size)
    assert bool(((c[~c.isnan()] >= 0) & (c[~c.isnan()] <= 1)).all())  # on the canvas


def _where_case(B=4, L=12, D=8):
    centres = torch.full((10, 2, 2), float("nan"))
    centres[0, 0] = torch.tensor([0.2, 0.7])  # a query: one object
    centres[3] = torch.tensor([[0.1, 0.5], [0.9, 0.4]])  # a relation: two
    labels = torch.full((B, L), -100)
    answer_at = torch.tensor([9, 10, 7, 11])  # labels[:, t + 1] is the answer: t = 8, 9, 6, 10
    labels[torch.arange(B), answer_at] = 5
    batch = {"index": torch.tensor([0, 3, 5, 9]), "labels": labels}
    hidden = torch.randn(B, L, D, requires_grad=True)
    return centres, batch, type("Out", (), {"hidden": hidden, "visual_mask": torch.zeros(B, L, dtype=torch.bool)})()


def test_where_loss_reads_the_answer_position_and_learns():
    torch.manual_seed(0)
    centres, batch, out = _where_case()
    loss_fn = EvidenceLoss(8, torch.zeros(10, 4, dtype=torch.long), weight=0.0, centres=centres, where_weight=1.0)
    loss = loss_fn(batch, out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grad = out.hidden.grad.abs().sum(-1)  # [B, L]
    expect = torch.zeros_like(grad, dtype=torch.bool)
    expect[0, 8] = expect[1, 9] = True  # only questions 0 and 3 describe objects: their answer positions
    assert torch.equal(grad > 0, expect)
    assert _fit(loss_fn, batch, out, out.hidden, lr=0.02, steps=300) < 0.05 * loss.item()
    assert torch.allclose(loss_fn.where(out.hidden[1, 9]), centres[3].flatten(), atol=0.05)
    none = {"index": torch.tensor([5, 9]), "labels": batch["labels"][2:]}  # no described object: a zero, not NaN
    assert loss_fn(none, type("Out", (), {"hidden": out.hidden[2:]})()).item() == 0.0


def test_where_loss_rejects_bad_weights():
    centres, _, _ = _where_case()
    roles = torch.zeros(10, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="where_weight > 0 needs centres"):
        EvidenceLoss(8, roles, where_weight=1.0)
    with pytest.raises(ValueError, match="where_weight > 0 needs centres"):
        EvidenceLoss(8, roles, where_weight=1.0, centres=centres[:5])
    with pytest.raises(ValueError, match="where_weight must be a finite number"):
        EvidenceLoss(8, roles, where_weight=float("nan"), centres=centres)
    with pytest.raises(ValueError, match="weight or where_weight"):
        EvidenceLoss(8, roles, weight=0.0, where_weight=0.0, centres=centres)


def test_training_pool_is_deterministic_and_indexes_its_images():
    cfg = scene_config({"scene": TINY})
    a, b = training_pool(cfg, 30, 2, shard=20), training_pool(cfg, 30, 2, processes=2, shard=20)
    assert len(a) == 60 and a.questions == b.questions and torch.equal(a.images, b.images)  # processes change nothing
    assert int(a.image_ids.max()) == a.images.shape[0] - 1 and len(a.objects) == a.images.shape[0]


def test_train_scene_teacher_in_one_call_with_the_evidence_loss():
    recipe = {"scene": TINY, "batch_size": 8, "questions_per_image": 2, "warmup_steps": 2, "pool_images": 40,
              "dense_pretrain_s": 1, "compile": False, "evidence_weight": 1.0, "lr": 2e-3}
    logs = []
    model, proc, info = train_scene_teacher(recipe, 12, "cpu", preset="smoke", val_questions=30, eval_every=0,
                                            log=logs.append)
    assert info["steps"] > 5 and info["dense"]["steps_done"] > 0 and len(logs) == 3
    assert info["recipe"]["evidence_weight"] == 1.0 and info["total_s"] < 40
    assert model.config.vision_config.image_size == 32 and proc.num_image_tokens == 16
    assert not model.training
    with pytest.raises(ValueError, match="unknown keys"):
        train_scene_teacher({"lr_typo": 1}, 5, "cpu", preset="smoke")
    with pytest.raises(ValueError, match="image_size"):
        train_scene_teacher({"scene": TINY, "model": {"image_size": 64}}, 5, "cpu", preset="smoke")


def test_train_teacher_trains_the_extra_loss_head():
    from vtp.scenes import encode_scenes, scene_processor
    from vtp.train import TrainConfig, train_teacher

    cfg = scene_config({"scene": TINY})
    split = generate_split("train", 40, cfg, seed=(6, 0), questions_per_image=2)
    proc = scene_processor(cfg, question_first=True)
    extra = EvidenceLoss(64, evidence_roles(split))
    before = extra.head.weight.detach().clone()
    tc = TrainConfig(model="smoke", model_overrides={"image_size": 32, "patch_size": 8}, steps=3, batch_size=4,
                     questions_per_image=2, eval_every=0, augment={}, train_questions=None, warmup_steps=1)
    train_teacher(tc, "cpu", proc, train_data=encode_scenes(split, proc), extra_loss=extra)
    assert not torch.equal(before, extra.head.weight)


def test_load_or_train_scene_teacher_trains_once_then_loads(tmp_path, monkeypatch):
    import vtp.scene_teacher as st

    monkeypatch.setattr(st, "scene_teacher_dir", lambda mode=None: tmp_path / f"scenes_teacher_{mode}")
    monkeypatch.setitem(st.TIME_BUDGET_S, "smoke", 12.0)  # data + 4 s dense + some answering, on a loaded CPU
    model, proc, info = st.load_or_train_scene_teacher("smoke", "cpu", log=lambda m: None)
    assert (tmp_path / "scenes_teacher_smoke" / "config.json").exists() and len(info["sha256"]) == 64
    again, proc2, info2 = st.load_or_train_scene_teacher("smoke", "cpu", log=lambda m: None)
    assert info2["sha256"] == info["sha256"] and info2["recipe"] == info["recipe"]
    assert proc2.question_first == proc.question_first and proc2.num_image_tokens == 16
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b.float())  # saved in bf16
