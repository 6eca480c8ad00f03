"""Zero-shot attribute classification with a CLIP: which colour, which shape.

Every combination of attribute values becomes one prompt ("a red circle", ...); an image's
prediction for each attribute is read off its best-matching prompt. The shapes dataset records each
image's objects in its `json` field, so the truth is known for single-object images.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unclip.data.shapes import fix_article


def attribute_prompts(
    template: str, attributes: dict[str, list[str]]
) -> tuple[list[str], list[dict]]:
    """All prompts of `template` over the product of attribute values, with the values of each."""
    names = list(attributes)
    combos = [
        dict(zip(names, values, strict=True)) for values in itertools.product(*attributes.values())
    ]
    return [fix_article(template.format(**combo)) for combo in combos], combos


@torch.no_grad()
def predict_attributes(
    image_embeddings: torch.Tensor,
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    template: str,
    attributes: dict[str, list[str]],
) -> list[dict]:
    """For each image embedding, the attribute values of its nearest prompt."""
    prompts, combos = attribute_prompts(template, attributes)
    device = image_embeddings.device
    text = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    best = (F.normalize(image_embeddings.float(), dim=-1) @ text.T).argmax(dim=-1)
    return [combos[i] for i in best.tolist()]


def single_object_truth(metadata: list[dict], attributes: list[str]) -> list[dict | None]:
    """The attribute values of single-object images (None for scenes with several objects)."""
    truth = []
    for record in metadata:
        objects = (record or {}).get("objects", [])
        truth.append({a: objects[0][a] for a in attributes} if len(objects) == 1 else None)
    return truth


def attribute_accuracy(
    predicted: list[dict], truth: list[dict | None]
) -> dict[str, tuple[int, int]]:
    """(correct, counted) per attribute over the images whose truth is known."""
    scores: dict[str, tuple[int, int]] = {}
    for pred, true in zip(predicted, truth, strict=True):
        if true is None:
            continue
        for name, value in true.items():
            correct, counted = scores.get(name, (0, 0))
            scores[name] = (correct + int(pred[name] == value), counted + 1)
    return scores
