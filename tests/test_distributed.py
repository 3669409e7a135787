"""Data-parallel training (vtp.distributed): two gloo ranks on the CPU train exactly what one process trains on
the concatenated batch; bad world sizes fail before training; a resumed two-rank run ends where the
uninterrupted one does."""
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_post_hook

from vtp import distributed
from vtp.data import build_processor
from vtp.train import pruner_config, teacher_config, train_pruner, train_teacher
from vtp.vlm import build_llava

WORLD = 2


def _cfg(**kw):
    # phase 1 with Gumbel masks, a dual-ascent controller on from step 1 and validations; a short phase 2 (top-k)
    base = dict(steps=6, batch_size=8, warmup_steps=1, train_questions=64, eval_every=3, eval_questions=16,
                log_every=1, target_ratio=0.25, controller_lr=1.0, sparsity_warmup=0.1, adapt_steps=3,
                adapt_pruner=True)
    return pruner_config("smoke", **{**base, **kw})


def _teacher():
    proc = build_processor(16)
    model = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id,
                        pad_token_id=proc.pad_token_id).eval()
    return model, proc


class _Interrupted(Exception):
    pass


def _train(teacher, proc, stop_after=None, **kw):
    """train_pruner with every optimizer step recorded: the flat trainable parameters after the step and, on
    two ranks, the largest difference between the ranks' copies. ``stop_after`` = interrupt after that step."""
    steps, gaps = [], []

    def after_step(opt, args, kwargs):
        flat = torch.cat([p.detach().flatten() for g in opt.param_groups for p in g["params"] if p.requires_grad])
        steps.append(flat.clone())
        if distributed.is_distributed():
            copies = [torch.empty_like(flat) for _ in range(distributed.world_size())]
            dist.all_gather(copies, flat)
            gaps.append(max((c - copies[0]).abs().max().item() for c in copies))
        if stop_after is not None and len(steps) == stop_after:
            raise _Interrupted

    handle = register_optimizer_step_post_hook(after_step)
    try:
        student, history = train_pruner(teacher, proc, _cfg(), **kw)
    finally:
        handle.remove()
    return dict(steps=steps, gaps=gaps, history=history, state=student.state_dict())


def _train_teacher():
    """A few steps of the teacher (questions grouped by image: 4 images x 2 questions per global batch)."""
    cfg = teacher_config("smoke", steps=4, batch_size=8, questions_per_image=2, warmup_steps=1, train_questions=64,
                         log_every=1, eval_every=2, eval_questions=16)
    model, _, history = train_teacher(cfg, device="cpu")
    return dict(state=model.state_dict(), loss=history["loss"], val=history["val"])


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    teacher, proc = _teacher()
    try:
        run = _train(teacher, proc)  # initialises the process group (gloo on the CPU)
        assert distributed.is_distributed() and distributed.world_size() == WORLD
        with pytest.raises(ValueError, match="divisible by the world size 2"):
            train_pruner(teacher, proc, _cfg(batch_size=7))
        ckpt = os.path.join(out_dir, "run.pt")
        with pytest.raises(_Interrupted):
            _train(teacher, proc, stop_after=5, checkpoint=ckpt, checkpoint_every=4)
        dist.barrier()  # rank 0 has written the checkpoint of step 4
        if rank == 0:  # kept for a one-process resume
            shutil.copy(ckpt, os.path.join(out_dir, "step4.pt"))
        dist.barrier()
        resumed = _train(teacher, proc, checkpoint=ckpt, checkpoint_every=4)
        run["resumed_state"] = resumed["state"]
        run["resumed_from"] = len(run["steps"]) - len(resumed["steps"])
        run["teacher"] = _train_teacher()
        torch.save(run, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    teacher, proc = _teacher()
    single = _train(teacher, proc)
    single["teacher"] = _train_teacher()
    single["resumed_state"] = _train(teacher, proc, checkpoint=str(out / "step4.pt"))["state"]
    return ranks, single


def test_ranks_agree_after_every_step(runs):
    ranks, _ = runs
    n = 6 + 3  # phase 1 + phase 2
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == n
    assert ranks[0]["gaps"] == [0.0] * n  # identical parameters on both ranks after every optimizer step
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert h0["multiplier"] == h1["multiplier"] and any(m != 0 for m in h0["multiplier"])
    assert h0["val"] == h1["val"] and h0["adapt_best"] == h1["adapt_best"]  # rank 0's validations, sent to all
    assert all(torch.equal(v, ranks[1]["state"][k]) for k, v in ranks[0]["state"].items())


def test_two_ranks_equal_one_process_on_the_whole_batch(runs):
    ranks, single = runs
    for step, (a, b) in enumerate(zip(ranks[0]["steps"], single["steps"])):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (step, (a - b).abs().max().item())
    h, s = ranks[0]["history"], single["history"]
    assert h["step"] == s["step"] and h["mask_binary"] == s["mask_binary"]
    for key in ("multiplier", "keep_ratio", "total", "ce", "distill", "sparsity", "saturated", "train_acc"):
        assert h[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), key
    assert h["adapt"]["total"] == pytest.approx(s["adapt"]["total"], rel=1e-4, abs=1e-6)
    assert [v["step"] for v in h["val"]] == [v["step"] for v in s["val"]] == [3, 6, 6, 9]
    assert [v["accuracy"] for v in h["val"]] == [v["accuracy"] for v in s["val"]]


def test_resumed_two_rank_run_ends_as_the_uninterrupted_one(runs):
    ranks, _ = runs
    assert ranks[0]["resumed_from"] == 4  # the checkpoint of step 4, written by rank 0, read by both
    for r in ranks:
        assert all(torch.equal(v, r["state"][k]) for k, v in r["resumed_state"].items())
    # the global batches do not depend on the number of processes: one process resumes the two ranks' run
    single = runs[1]
    for k, v in single["resumed_state"].items():
        assert torch.allclose(v, single["state"][k], rtol=1e-4, atol=1e-6), k


def test_batch_checks():
    assert distributed.check_batch(8, world=2) == 4
    assert distributed.check_batch(64, world=4, group=2) == 16
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        distributed.check_batch(8, world=3)
    with pytest.raises(ValueError, match="16 processes .* more than the batch allows"):
        distributed.check_batch(8, world=16)
    with pytest.raises(ValueError, match="at most 4 processes"):
        distributed.check_batch(8, world=8, group=2)


def test_launch_detection(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.setup()  # a plain process: nothing to set up
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()  # torchrun --nproc-per-node 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        distributed.launched()


def test_shard_keeps_questions_with_their_images():
    g = torch.Generator().manual_seed(0)
    images, per_image = 4, 3
    batch = {"input_ids": torch.randint(0, 9, (images * per_image, 5), generator=g),
             "pixel_values": torch.randn(images, 3, 2, 2, generator=g),
             "image_index": torch.arange(images).repeat_interleave(per_image), "index": torch.arange(12)}
    shards = [distributed.shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    seen = torch.cat([s["pixel_values"][s["image_index"]] for s in shards])
    assert torch.equal(seen, batch["pixel_values"][batch["image_index"]])  # every question keeps its image
    with pytest.raises(ValueError, match="more than the batch allows"):
        distributed.shard(batch, 0, 6)  # 12 questions split 6 ways, but only 4 images


def test_teacher_two_ranks_equal_one_process(runs):
    ranks, single = runs
    t0, t1, t = ranks[0]["teacher"], ranks[1]["teacher"], single["teacher"]
    assert all(torch.equal(v, t1["state"][k]) for k, v in t0["state"].items())  # the ranks agree
    assert t0["loss"] == t1["loss"] == pytest.approx(t["loss"], rel=1e-5)  # the global batch's loss, logged
    assert t0["val"] == t1["val"] and [s for s, _ in t0["val"]] == [2, 4]
    for k, v in t["state"].items():
        # a key's bias has zero gradient in exact arithmetic (softmax ignores a constant added to a row of
        # scores); AdamW turns its rounding-noise gradient into small updates that differ with the order of sums
        tol = dict(rtol=0.0, atol=1e-5) if k.endswith("k_proj.bias") else dict(rtol=1e-4, atol=1e-6)
        assert torch.allclose(t0["state"][k], v, **tol), (k, (t0["state"][k] - v).abs().max().item())
