"""easy-VQA splits, tokenizer, processor and batches."""
import collections

import pytest
import torch

from vtp.data import (IMAGE_TOKEN, QUESTION_TYPES, VQAProcessor, augment_images, build_processor, build_tokenizer,
                      encode_split, iterate_batches, load_split, question_type)


@pytest.fixture(scope="module")
def processor():
    return build_processor(num_image_tokens=4)


def test_split_sizes_and_disjoint_images():
    train, val, test = load_split("train"), load_split("val"), load_split("test")
    assert len(train) + len(val) == 38575 and len(test) == 9673
    assert not set(train.image_ids.tolist()) & set(val.image_ids.tolist())
    n_val_images = len(set(val.image_ids.tolist()))
    assert n_val_images == 400  # 10% of the 4,000 train images
    assert load_split("val").image_ids.equal(val.image_ids)  # fixed by the seed
    assert train.images.shape == (4000, 3, 64, 64) and train.images.dtype == torch.uint8
    assert test.images.shape == (1000, 3, 64, 64)
    assert len(set(test.answers)) == 13
    counts = collections.Counter(test.qtypes)
    assert set(counts) == set(QUESTION_TYPES)


def test_question_types():
    assert question_type("what color is the shape?", "blue") == "color"
    assert question_type("what is the red shape?", "circle") == "shape"
    assert question_type("is there a red shape?", "no") == "yes/no color"
    assert question_type("does the image not contain a circle?", "yes") == "yes/no shape"


def test_tokenizer_is_word_level():
    tok = build_tokenizer(["What color is the shape?", "is there a circle?"])
    ids = tok("what color is the shape?", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["what", "color", "is", "the", "shape", "?"]
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"]) == ["<unk>"]
    assert tok.convert_ids_to_tokens(tok(IMAGE_TOKEN * 3)["input_ids"]) == [IMAGE_TOKEN] * 3


def test_labels_only_on_answer(processor):
    enc = processor.encode_text(["what color is the shape?", "is there a circle?"], ["blue", "yes"])
    ids, labels, mask = enc["input_ids"], enc["labels"], enc["attention_mask"]
    assert (ids[:, :4] == processor.image_token_id).all()
    sup = labels != -100
    assert sup.sum(-1).tolist() == [1, 1]
    last = mask.sum(-1) - 1  # the answer is the last real token
    assert labels[torch.arange(2), last].tolist() == ids[torch.arange(2), last].tolist()
    assert processor.decode(labels[sup]) == ["blue", "yes"]
    assert mask[1].tolist() == [1] * 10 + [0]  # right padding


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = VQAProcessor.from_pretrained(tmp_path)
    a = processor.encode_text(["is there a red shape in the image?"], ["no"])
    b = loaded.encode_text(["is there a red shape in the image?"], ["no"])
    assert all(a[k].equal(b[k]) for k in a) and loaded.num_image_tokens == 4


def test_processor_rejects_bad_images(processor):
    with pytest.raises(ValueError, match="images must have shape"):
        processor.preprocess_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_batches_match_processor(processor):
    split = load_split("val").subset(20)
    data = encode_split(split, processor)
    batch = next(iterate_batches(data, processor, batch_size=8))
    direct = processor(split.images[split.image_ids[:8]], split.questions[:8], split.answers[:8])
    L = direct["input_ids"].shape[1]
    assert batch["input_ids"][:, :L].equal(direct["input_ids"])
    assert batch["labels"][:, :L].equal(direct["labels"])
    assert torch.allclose(batch["pixel_values"], direct["pixel_values"])
    assert processor.decode(batch["answer_ids"]) == split.answers[:8]


def test_augment_preserves_content():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    flipped = augment_images(img, g, hflip=1.0)
    assert flipped.equal(img.flip(-1))
    shifted = augment_images(img, g, hflip=0.0, max_shift=2)
    # colour histogram barely changes under a 2-pixel shift with edge replication
    diff = (shifted.float().mean((1, 2, 3)) - img.float().mean((1, 2, 3))).abs().max()
    assert diff < 10 and not shifted.equal(img)


def test_augment_geometry():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    # identity affine (zoom 1, no shift) resamples pixel centres exactly
    assert augment_images(img, g, hflip=0.0, scale=(1.0, 1.0)).equal(img)
    # dihedral transforms permute pixels: every image keeps its sorted pixel values, and some images move
    out = augment_images(img, g, hflip=0.5, vflip=0.5, rot90=True)
    assert out.flatten(1).sort(1).values.equal(img.flatten(1).sort(1).values)
    assert (out != img).flatten(1).any(1).float().mean() > 0.5
    # a zoom of 2 about the centre: the output's centre 8x8 comes from the input's centre 4x4 (upsampled)
    z = augment_images(img, g, hflip=0.0, scale=(2.0, 2.0)).float()
    centre = torch.nn.functional.interpolate(img[:, :, 4:12, 4:12].float(), scale_factor=2, mode="bilinear")
    assert (z[:, :, 6:10, 6:10] - centre[:, :, 6:10, 6:10]).abs().max() < 1.0
    for bad in ({"vflip": 1.5}, {"max_shift": -1}, {"scale": (1.2, 0.8)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            augment_images(img, g, **bad)
