"""accuracy(): overall and per type, unpruned and pruned, external keep masks."""
import pytest
import torch

from vtp.data import build_processor, encode_split, load_split
from vtp.evaluate import accuracy
from vtp.pruner import GumbelVisionPruner
from vtp.train import TrainConfig, lr_factor
from vtp.vlm import PrunedVLM, answer_logits, build_llava, num_visual_tokens


@pytest.fixture(scope="module")
def setup():
    proc = build_processor(16)
    llava = build_llava("smoke", vocab_size=proc.vocab_size, image_token_id=proc.image_token_id).eval()
    data = encode_split(load_split("val").subset(96, seed=1), proc)
    return proc, llava, data


def test_accuracy_matches_manual_count(setup):
    proc, llava, data = setup
    res = accuracy(llava, data, proc, batch_size=32)
    with torch.no_grad():
        logits = llava(input_ids=data.input_ids, pixel_values=proc.preprocess_images(data.images[data.image_ids]),
                       attention_mask=data.attention_mask).logits
    pred, target = answer_logits(logits, data.labels)
    assert target.equal(data.answer_ids)
    manual = (pred.argmax(-1) == target).float()
    assert res.accuracy == pytest.approx(manual.mean().item(), abs=1e-6)
    assert res.predictions.equal(pred.argmax(-1))
    for i, t in enumerate(("shape", "color", "yes/no shape", "yes/no color")):
        sel = data.qtype_ids == i
        if sel.any():
            assert res.per_type[t] == pytest.approx(manual[sel].mean().item(), abs=1e-6)
    assert res.visual_tokens == 16 and res.keep_ratio == 1.0 and res.n == 96


def test_pruned_accuracy_reports_visual_tokens(setup):
    proc, llava, data = setup
    pruner = GumbelVisionPruner(llava.config.text_config.hidden_size, rule="topk")
    res = accuracy(llava, data, proc, pruner=pruner, ratio=0.25, batch_size=48)
    assert res.visual_tokens == pytest.approx(4.0) and res.keep_ratio == pytest.approx(0.25)
    # an external keep mask (e.g. a random baseline) through keep_fn
    def keep_first_half(batch, vlm):
        keep = torch.zeros(batch["input_ids"].shape[0], num_visual_tokens(vlm.llava))
        keep[:, :8] = 1
        return keep
    res2 = accuracy(llava, data, proc, keep_fn=keep_first_half, max_questions=50)
    assert res2.n == 50 and res2.visual_tokens == pytest.approx(8.0)
    # ratio 1 with top-k keeps everything: same predictions as the unpruned model
    full = accuracy(llava, data, proc)
    res3 = accuracy(PrunedVLM(llava, pruner), data, proc, ratio=1.0)
    assert res3.predictions.equal(full.predictions)


def test_bad_arguments(setup):
    proc, llava, data = setup
    with pytest.raises(ValueError, match="ratio"):
        accuracy(llava, data, proc, ratio=1.5)
    with pytest.raises(ValueError, match="data"):
        accuracy(llava, [1, 2], proc)


def test_lr_schedule_and_config_validation():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)  # warm-up starts at 1/warmup_steps
    assert lr_factor(cfg, 50, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 99, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="questions_per_image"):
        TrainConfig(batch_size=10, questions_per_image=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
