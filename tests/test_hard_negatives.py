"""NegCLIP hard negatives: captions that keep the words and change what binds to what."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from unclip.models.hard_negatives import hard_negative

GROUPS = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange"],
    "shape": ["circle", "square", "triangle", "star"],
}


def test_a_two_object_caption_gets_its_attributes_swapped_with_the_articles_fixed() -> None:
    rng = random.Random(0)
    caption = "a red circle left of an orange square"
    seen = {hard_negative(caption, GROUPS, rng) for _ in range(60)}
    assert seen == {
        "an orange circle left of a red square",  # colours swapped
        "a red square left of an orange circle",  # shapes swapped
        "an orange square left of a red circle",  # objects swapped: the relation reversed
    }


def test_captions_with_one_object_or_no_vocabulary() -> None:
    rng = random.Random(1)
    for _ in range(30):
        negative = hard_negative("an orange star", GROUPS, rng)
        words = negative.split(" ")
        assert negative != "an orange star" and len(words) == 3
        # one attribute replaced, the article agreeing with it
        assert (words[1] != "orange") != (words[2] != "star")
        assert words[0] == ("an" if words[1][0] in "aeiou" else "a")
    # same colour on both objects: only the shapes can be swapped
    assert hard_negative("a red circle above a red square", GROUPS, rng) == (
        "a red square above a red circle"
    )
    assert hard_negative("a photo of a dog", GROUPS, rng) is None


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip

    from unclip.models.clip import ClipModule

    base = open_clip.get_model_config("unclip-tiny")
    arch = {**base, "text_cfg": {**base["text_cfg"], "layers": 1, "width": 32, "heads": 2}}
    module = ClipModule(model_name="unclip-test-negatives", arch=arch, hard_negative_groups=GROUPS)
    module.loss_fn = open_clip.ClipLoss()
    return module


def test_the_negclip_loss_rises_when_the_negative_is_the_image_s_own_match(tiny_clip) -> None:
    """With the negatives far from every image the loss is CLIP's; a negative as close to its
    image as the caption (a bag-of-words embedding) costs more, and invalid ones are ignored."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(8, 64), dim=-1)
    text = F.normalize(image + 0.03 * torch.randn(8, 64), dim=-1)
    far = -image
    valid = torch.ones(8, dtype=torch.bool)
    invalid = torch.zeros(8, dtype=torch.bool)
    with torch.no_grad():
        clip_loss = tiny_clip.loss_fn(image, text, tiny_clip.net.logit_scale.exp())
        loss_far = tiny_clip._loss_with_negatives(image, text, far, valid)
        loss_close = tiny_clip._loss_with_negatives(image, text, text, valid)
        none_valid = tiny_clip._loss_with_negatives(image, text, text, invalid)
    assert float(loss_far) == pytest.approx(float(clip_loss), abs=1e-3)
    assert loss_close > clip_loss + 0.1
    torch.testing.assert_close(none_valid, clip_loss)


def test_training_with_hard_negatives_teaches_a_text_tower_word_order(tiny_clip) -> None:
    """Fixed image features for "X left of Y" scenes (which object is where); only the text tower
    learns, through the NegCLIP loss, and then ranks each caption above its swapped negative: a
    bag-of-words text tower (chance, 0.5 at the start) cannot."""
    from unclip.models.clip import _prefers_caption

    rng = random.Random(0)
    torch.manual_seed(0)
    colours, shapes = GROUPS["colour"][:3], GROUPS["shape"][:3]
    objects = [(c, s) for c in colours for s in shapes]
    codes = {obj: torch.randn(32) for obj in objects}

    def scenes(n: int) -> tuple[torch.Tensor, list[str]]:
        picks = [rng.sample(objects, 2) for _ in range(n)]
        images = torch.stack([torch.cat([codes[a], codes[b]]) for a, b in picks])
        captions = [f"a {a[0]} {a[1]} left of a {b[0]} {b[1]}" for a, b in picks]
        return F.normalize(images, dim=-1), captions

    net = tiny_clip.net
    opt = torch.optim.Adam(net.transformer.parameters(), 3e-3)
    opt.add_param_group({"params": [net.token_embedding.weight, net.text_projection]})
    for step in range(150):
        image, captions = scenes(32)
        text = tiny_clip._text(net, captions)
        negative, valid = tiny_clip._negatives(net, captions, f"{step}")
        loss = tiny_clip._loss_with_negatives(image, text, negative, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        image, captions = scenes(256)
        negative, valid = tiny_clip._negatives(net, captions, "test")
        accuracy = _prefers_caption(image, tiny_clip._text(net, captions), negative, valid)
    assert accuracy > 0.8
