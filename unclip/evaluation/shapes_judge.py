"""An independent judge of shapes-dataset images, from pixels alone: no network in the loop.

The demo's CLIP judge is lenient (the decoder is conditioned on that CLIP, so it learns what that
CLIP rewards). This judge reads the image the way the generator (unclip.data.shapes) draws it:

- background: the median colour of the border (the generator keeps objects off the border);
- objects: connected regions of pixels far from the background, ignoring specks under
  `min_area` of the image;
- colour: the nearest palette colour to an object's median pixel (its core, edges eroded);
- shape: the generator's own templates (circle, square, triangle, star at its fixed orientation)
  fitted to the object's centroid and area; the best intersection-over-union wins, and an object
  that fits no template by `min_iou` is a "blob" (wrong for every caption);
- relation: the sign of the centroids' difference along the named axis.

`judge_accuracy` measures the judge itself on fresh ground-truth renders, so every score it gives
can be printed beside the judge's own error rate.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import permutations
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from unclip.data import shapes as generator
from unclip.evaluation.colour import border_colour, foreground_mask, to_uint8_hwc

BLOB = "blob"  # an object no template fits
SINGLE, PAIR = "single", "pair"
# pixel area of the generator's shape at radius 1: the template radius that matches an area
_AREA_AT_UNIT_RADIUS = {
    "circle": math.pi,
    "square": (2 * 0.85) ** 2,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 10 * 0.5 * 0.45 * math.sin(math.radians(36)),
}
DATASET_SIZE = 64  # the demo's shapes images
_SCALES = (0.94, 1.0, 1.06)
_SHIFTS = (-0.5, 0.0, 0.5)


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str


@dataclass(frozen=True)
class CaptionTruth:
    """What a caption asks for: one or two objects and, for two, the relation of the first to
    the second ("left of" means the first object's centre lies left of the second's)."""

    caption: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    held_out: bool = False

    @property
    def kind(self) -> str:
        return SINGLE if len(self.objects) == 1 else PAIR


@dataclass(frozen=True)
class FoundObject:
    colour: str
    shape: str
    fit: float  # IoU of the best template
    area: int  # pixels
    x: float  # centroid, as a fraction of the width (0 = left)
    y: float  # centroid, as a fraction of the height (0 = top)


@dataclass(frozen=True)
class JudgeSettings:
    """Thresholds of the judge (calibrated on ground-truth renders; see `judge_accuracy`)."""

    threshold: float = 80.0  # RGB distance from the background that makes a pixel foreground
    min_area: float = 0.004  # fraction of the image: smaller regions are specks, not objects
    min_iou: float = 0.7  # an object fitting no shape template this well is a blob
    palette: Mapping[str, Sequence[float]] = field(default_factory=lambda: dict(generator.COLOURS))
    shapes: tuple[str, ...] = generator.SHAPES


# ---- captions --------------------------------------------------------------------------------------
def parse_caption(
    caption: str,
    colours: Iterable[str] = generator.COLOURS,
    shapes: Iterable[str] = generator.SHAPES,
    relations: Iterable[str] = generator.RELATIONS,
    holdout: Iterable[Sequence[str]] = generator.HOLDOUT,
) -> CaptionTruth | None:
    """The truth of a shapes caption ("a large red circle", "a red circle left of a blue
    square"), or None for a caption outside the generator's grammar."""
    colour = "|".join(map(re.escape, colours))
    shape = "|".join(map(re.escape, shapes))
    relation = "|".join(map(re.escape, relations))
    size = "|".join(map(re.escape, generator.SIZES))
    phrase = rf"an? (?:(?:{size}) )?({colour}) ({shape})"
    match = re.fullmatch(rf"{phrase}(?: ({relation}) {phrase})?", caption.strip().lower())
    if match is None:
        return None
    c1, s1, rel, c2, s2 = match.groups()
    objects = (ObjectSpec(c1, s1),) + ((ObjectSpec(c2, s2),) if rel else ())
    held = {tuple(pair) for pair in holdout}
    held_out = any((o.colour, o.shape) in held for o in objects)
    return CaptionTruth(caption, objects, rel, held_out)


# ---- objects -----------------------------------------------------------------------------------
def _template(shape: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("1", (size[1], size[0]), 0)
    generator.draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, 1)
    return np.asarray(canvas, dtype=bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fit_shape(mask: np.ndarray, shapes: Sequence[str], refine: int = 2) -> tuple[str, float]:
    """The template that best overlaps an object's mask (IoU), fitted to its centroid and area;
    the `refine` best shapes at that first fit are refined over scale and half-pixel shifts."""
    rows, cols = np.nonzero(mask)
    pad = 3
    top, left = max(rows.min() - pad, 0), max(cols.min() - pad, 0)
    crop = mask[top : rows.max() + pad + 1, left : cols.max() + pad + 1]
    cy, cx = rows.mean() - top + 0.5, cols.mean() - left + 0.5
    radius = {s: math.sqrt(float(mask.sum()) / _AREA_AT_UNIT_RADIUS[s]) for s in shapes}
    first = {s: _iou(_template(s, cx, cy, radius[s], crop.shape), crop) for s in shapes}
    best_shape, best_iou = BLOB, 0.0
    for shape in sorted(first, key=first.get, reverse=True)[:refine]:
        for scale in _SCALES:
            for dy in _SHIFTS:
                for dx in _SHIFTS:
                    template = _template(shape, cx + dx, cy + dy, radius[shape] * scale, crop.shape)
                    iou = _iou(template, crop)
                    if iou > best_iou:
                        best_shape, best_iou = shape, iou
    return best_shape, best_iou


def _object_colour(pixels: np.ndarray, mask: np.ndarray, palette: Mapping[str, Any]) -> str:
    core = ndimage.binary_erosion(mask)
    chosen = pixels[core] if core.sum() >= 4 else pixels[mask]
    median = np.median(chosen, axis=0)
    return min(palette, key=lambda name: math.dist(palette[name], median))


def find_objects(
    image: torch.Tensor | np.ndarray, settings: JudgeSettings | None = None
) -> tuple[list[FoundObject], np.ndarray]:
    """The objects of an image ([3, H, W] in [-1, 1] or [H, W, 3] uint8), largest first, and the
    background colour the judge read from its border."""
    settings = settings or JudgeSettings()
    pixels = to_uint8_hwc(image)
    height, width = pixels.shape[:2]
    background = border_colour(pixels)
    mask = foreground_mask(pixels, background, settings.threshold)
    labels, count = ndimage.label(mask)
    min_pixels = settings.min_area * height * width
    objects = []
    for index in range(1, count + 1):
        region = labels == index
        area = int(region.sum())
        if area < min_pixels:
            continue
        shape, fit = fit_shape(region, settings.shapes)
        if fit < settings.min_iou:
            shape = BLOB
        rows, cols = np.nonzero(region)
        objects.append(
            FoundObject(
                colour=_object_colour(pixels, region, settings.palette),
                shape=shape,
                fit=round(fit, 4),
                area=area,
                x=float((cols.mean() + 0.5) / width),
                y=float((rows.mean() + 0.5) / height),
            )
        )
    objects.sort(key=lambda o: -o.area)
    return objects, background


# ---- judging -------------------------------------------------------------------------------------
def _related(first: FoundObject, second: FoundObject, relation: str) -> bool:
    return {
        "left of": first.x < second.x,
        "right of": first.x > second.x,
        "above": first.y < second.y,
        "below": first.y > second.y,
    }[relation]


def background_error(background: np.ndarray) -> float:
    """RGB distance from the border colour to the nearest background the generator uses."""
    return float(min(math.dist(rgb, background) for rgb in generator.BACKGROUNDS.values()))


def judge(
    image: torch.Tensor | np.ndarray, truth: CaptionTruth, settings: JudgeSettings | None = None
) -> dict[str, Any]:
    """One record: what the caption asked for, what the pixels show and whether they agree.

    Single objects: `colour_ok` / `shape_ok` judge the largest object, `one_object` the count.
    Two objects: `both_ok` needs exactly two objects whose (colour, shape) pairs are the caption's;
    `relation_ok` also needs them placed as the relation says."""
    objects, background = find_objects(image, settings)
    record: dict[str, Any] = {
        "caption": truth.caption,
        "kind": truth.kind,
        "held_out": truth.held_out,
        "objects": [asdict(o) for o in objects],
        "count": len(objects),
        "background_error": round(background_error(background), 2),
    }
    if truth.kind == SINGLE:
        want, main = truth.objects[0], (objects[0] if objects else None)
        record.update(
            colour_ok=main is not None and main.colour == want.colour,
            shape_ok=main is not None and main.shape == want.shape,
            one_object=len(objects) == 1,
        )
        return record
    found = [ObjectSpec(o.colour, o.shape) for o in objects]
    both = len(objects) == 2 and Counter(found) == Counter(truth.objects)
    relation = both and any(
        (a.colour, a.shape) == (truth.objects[0].colour, truth.objects[0].shape)
        and (b.colour, b.shape) == (truth.objects[1].colour, truth.objects[1].shape)
        and _related(a, b, truth.relation or "")
        for a, b in permutations(objects, 2)
    )
    record.update(
        two_objects=len(objects) == 2,
        colours_ok=len(objects) == 2
        and Counter(o.colour for o in objects) == Counter(o.colour for o in truth.objects),
        both_ok=both,
        relation_ok=relation,
    )
    return record


# ---- does the layout follow the relation word? --------------------------------------------------
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def flipped_relation(caption: str) -> str:
    """ "a red circle left of a blue square" -> "a red circle right of a blue square": the same
    objects in the same order, the opposite relation."""
    truth = parse_caption(caption)
    if truth is None or truth.relation is None:
        raise ValueError(f"{caption!r}: not a two-object caption of the shapes grammar")
    before, after = caption.split(f" {truth.relation} ", 1)
    return f"{before} {OPPOSITE[truth.relation]} {after}"


def relation_follows_word(
    as_captioned: Sequence[Mapping[str, Any]], flipped: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Judge records of the same pairs sampled from the same noise under each caption and under
    `flipped_relation` of it. One layout can satisfy only one of the two, so `follows` (the
    relation right under both) counts the images whose layout moved with the word; a decoder
    that ignores the word scores 0 there however often its layouts happen to be right."""
    if len(as_captioned) != len(flipped):
        raise ValueError(f"{len(as_captioned)} records against {len(flipped)} flipped ones")
    pairs = list(zip(as_captioned, flipped, strict=True))
    if not pairs:
        raise ValueError("no records to compare")
    return {
        "relation": float(np.mean([a["relation_ok"] for a, _ in pairs])),
        "relation_flipped": float(np.mean([b["relation_ok"] for _, b in pairs])),
        "follows": float(np.mean([a["relation_ok"] and b["relation_ok"] for a, b in pairs])),
    }


METRICS = {
    SINGLE: ("colour_ok", "shape_ok", "one_object"),
    PAIR: ("two_objects", "colours_ok", "both_ok", "relation_ok"),
}


def group_of(record: Mapping[str, Any]) -> str:
    """held-in / held-out single objects, two-object scenes (held-in or with a held-out object)."""
    held = "held-out" if record["held_out"] else "held-in"
    return f"{held} single" if record["kind"] == SINGLE else f"{held} pairs"


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each group's image count, the fraction right on each of its metrics and the mean
    background error."""
    summary: dict[str, dict[str, float]] = {}
    for group in dict.fromkeys(group_of(r) for r in records):
        rows = [r for r in records if group_of(r) == group]
        stats = {"images": float(len(rows))}
        for metric in METRICS[rows[0]["kind"]]:
            stats[metric] = sum(bool(r[metric]) for r in rows) / len(rows)
        stats["background_error"] = float(np.mean([r["background_error"] for r in rows]))
        summary[group] = stats
    return dict(sorted(summary.items(), key=lambda item: _GROUP_ORDER.get(item[0], 9)))


_GROUP_ORDER = {"held-in single": 0, "held-out single": 1, "held-in pairs": 2, "held-out pairs": 3}


def pair_captions(count: int, seed: int = 0) -> list[str]:
    """A fixed list of two-object captions over held-in combinations in two different colours,
    cycling through the relations: the binding benchmark."""
    rng = random.Random(f"pair-captions/{seed}")
    combos = generator.combos("train")
    captions: list[str] = []
    while len(captions) < count:
        (c1, s1), (c2, s2) = rng.sample(combos, 2)
        if c1 == c2:
            continue
        relation = generator.RELATIONS[len(captions) % len(generator.RELATIONS)]
        first, second = (generator.with_article(f"{c} {s}") for c, s in ((c1, s1), (c2, s2)))
        caption = f"{first} {relation} {second}"
        if caption not in captions:
            captions.append(caption)
    return captions


def single_captions() -> list[str]:
    """ "a red circle" for every colour and shape the generator knows (held-out pairs included)."""
    return [generator.with_article(f"{c} {s}") for c in generator.COLOURS for s in generator.SHAPES]


# ---- the judge on ground truth --------------------------------------------------------------------
def render_truth(
    count: int, size: int, seed: int, split: str, pair_fraction: float
) -> list[tuple[np.ndarray, CaptionTruth]]:
    """Fresh ground-truth renders of the generator (a seed no dataset uses) with their truth."""
    out = []
    for index in range(count):
        record = generator.scene(split, index, seed, pair_fraction)
        # smaller sizes: rendered at the dataset's 64px and resized as the datamodule does
        image = generator.render(record, max(size, DATASET_SIZE))
        if image.size[0] != size:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        truth = parse_caption(record["caption"])
        if truth is None:
            raise ValueError(f"the generator's caption {record['caption']!r} does not parse")
        out.append((np.asarray(image), truth))
    return out


def judge_accuracy(
    size: int = 64,
    count: int = 200,
    seed: int = 987_654,
    settings: JudgeSettings | None = None,
) -> dict[str, float]:
    """The judge's own accuracy on fresh ground-truth renders at `size` pixels (held-in and
    held-out combinations): `shape` over single objects, `pairs` = both objects and the
    relation right over two-object scenes, `count` = the object count right over all."""
    cases = []
    for split in ("val", "holdout"):
        cases += render_truth(count, size, seed, split, 0.5)
    records = [judge(image, truth, settings) for image, truth in cases]
    singles = [r for r in records if r["kind"] == SINGLE]
    pairs = [r for r in records if r["kind"] == PAIR]
    counted = [r["count"] == (1 if r["kind"] == SINGLE else 2) for r in records]
    return {
        "size": float(size),
        "images": float(len(records)),
        "colour": float(np.mean([r["colour_ok"] for r in singles])),
        "shape": float(np.mean([r["shape_ok"] for r in singles])),
        "pairs": float(np.mean([r["relation_ok"] for r in pairs])),
        "count": float(np.mean(counted)),
    }


def describe_accuracy(accuracy: Mapping[str, float]) -> str:
    return (
        f"the pixel judge on {int(accuracy['images'])} fresh real renders at "
        f"{int(accuracy['size'])}px: colour {100 * accuracy['colour']:.1f}%, shape "
        f"{100 * accuracy['shape']:.1f}%, two-object scenes {100 * accuracy['pairs']:.1f}%, "
        f"object count {100 * accuracy['count']:.1f}%"
    )
