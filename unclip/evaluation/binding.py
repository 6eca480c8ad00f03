"""Does a generated image show what its caption asked for? Colour judged from pixels, shape judged
zero-shot by the trained CLIP, split by whether the colour-shape combination was held out of
training (attribute binding: the weakness the paper reports)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from unclip.clip import ClipBundle, encode_images
from unclip.data.shapes import with_article
from unclip.evaluation.colour import RGB, dominant_colour
from unclip.evaluation.zero_shot import predict_attributes

HELD_IN, HELD_OUT = "held-in", "held-out"


@dataclass(frozen=True)
class CaptionSpec:
    """A single-object caption and the attributes an image of it must show."""

    caption: str
    colour: str
    shape: str
    held_out: bool


def single_object_captions(
    colours: Iterable[str], shapes: Iterable[str], holdout: Iterable[Sequence[str]]
) -> list[CaptionSpec]:
    """ "a red circle" for every colour and shape, marked held out when the pair is in `holdout`."""
    held = {tuple(pair) for pair in holdout}
    shapes = list(shapes)
    return [
        CaptionSpec(with_article(f"{c} {s}"), c, s, (c, s) in held) for c in colours for s in shapes
    ]


@torch.no_grad()
def judge_images(
    images: torch.Tensor,
    specs: Sequence[CaptionSpec],
    palette: Mapping[str, RGB],
    clip: ClipBundle,
    template: str,
    shapes: Sequence[str],
    colour_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One record per image [N, 3, H, W] in [-1, 1]: the caption's truth and what was judged.
    The shape is CLIP's zero-shot choice over `template` filled with every colour and shape."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} caption specs")
    embeddings = encode_images(clip.model, clip.preprocess, images)
    attributes = {"colour": list(palette), "shape": list(shapes)}
    predicted = predict_attributes(embeddings, clip.model, clip.tokenizer, template, attributes)
    records = []
    for image, spec, guess in zip(images, specs, predicted, strict=True):
        colour = dominant_colour(image, palette, **dict(colour_options or {}))
        records.append(
            {
                **asdict(spec),
                "judged_colour": colour,
                "clip_shape": guess["shape"],
                "clip_colour": guess["colour"],
                "colour_ok": colour == spec.colour,
                "shape_ok": guess["shape"] == spec.shape,
            }
        )
    return records


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Colour and shape accuracy and the image count for held-in and held-out captions."""
    summary: dict[str, dict[str, float]] = {}
    for group, held_out in ((HELD_IN, False), (HELD_OUT, True)):
        rows = [r for r in records if bool(r["held_out"]) == held_out]
        if rows:
            summary[group] = {
                "colour": sum(r["colour_ok"] for r in rows) / len(rows),
                "shape": sum(r["shape_ok"] for r in rows) / len(rows),
                "images": float(len(rows)),
            }
    return summary


def per_caption(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Colour and shape accuracy per caption (which combinations fail)."""
    table: dict[str, dict[str, float]] = {}
    for caption in dict.fromkeys(r["caption"] for r in records):
        rows = [r for r in records if r["caption"] == caption]
        table[caption] = {
            "colour": sum(r["colour_ok"] for r in rows) / len(rows),
            "shape": sum(r["shape_ok"] for r in rows) / len(rows),
            "held_out": float(rows[0]["held_out"]),
        }
    return table
