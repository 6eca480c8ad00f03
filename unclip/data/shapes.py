"""The embedded default dataset: captioned renders of coloured shapes, generated from a seed.

    python -m unclip.data.shapes --out data/shapes --seed 0 --size 64

Single objects ("a large red circle") and two-object scenes ("a red circle left of a blue square")
on light, neutral backgrounds that no object colour resembles, so colours can be judged from pixels.
The colour-shape combinations in HOLDOUT never appear in train or val, only in the `holdout` split
(alone or beside another object): a test of compositional generalisation. Every sample records its
objects in `json`; `dataset.json` records the vocabulary, the holdout and the generation arguments.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from unclip.data.format import read_meta, write_json_atomic
from unclip.data.writer import ShardSetWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (205, 205, 205),
    "cream": (245, 235, 205),
}
# (colour, shape) pairs seen only in the holdout split; every colour and shape still occurs in train.
HOLDOUT = (("red", "triangle"), ("green", "circle"), ("blue", "star"))
RELATIONS = ("left of", "right of", "above", "below")
SIZES = {"small": (0.12, 0.16), "large": (0.21, 0.27)}  # radius as a fraction of the image side
PAIR_SCALE = 0.62  # objects of a two-object scene are smaller so both fit in their half
MARGIN = 0.03  # fraction of the side kept free at the border
COLOUR_JITTER = 12  # +- per RGB channel, so colour is a region of RGB space and not one point
BACKGROUND_JITTER = 4
SPLITS = ("train", "val", "holdout")
DATASET_FILE = "dataset.json"
# fork is fast (no re-import of torch via webdataset) and safe: the workers only draw with PIL
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def combos(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws its objects from."""
    if split == "holdout":
        return list(HOLDOUT)
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HOLDOUT]


def nearest_colour(rgb: tuple[float, float, float]) -> str:
    """The vocabulary colour closest to an RGB triple (for judging generated pixels)."""
    return min(COLOURS, key=lambda name: math.dist(COLOURS[name], rgb))


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> list[int]:
    return [min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb]


def _object(colour: str, shape: str, scale: float, rng: random.Random) -> dict[str, Any]:
    size = rng.choice(list(SIZES))
    low, high = SIZES[size]
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "radius": round(rng.uniform(low, high) * scale, 4),
        "rgb": _jitter(COLOURS[colour], COLOUR_JITTER, rng),
    }


def _place(lo: float, hi: float, rng: random.Random) -> float:
    return round(rng.uniform(lo, max(lo, hi)), 4)


def scene(split: str, index: int, seed: int, pair_fraction: float) -> dict[str, Any]:
    """The description of sample `index` of `split`: a pure function of its arguments."""
    rng = random.Random(f"{seed}/{split}/{index}")
    background = rng.choice(list(BACKGROUNDS))
    record: dict[str, Any] = {
        "split": split,
        "background": background,
        "background_rgb": _jitter(BACKGROUNDS[background], BACKGROUND_JITTER, rng),
    }
    if rng.random() >= pair_fraction:
        obj = _object(*rng.choice(combos(split)), 1.0, rng)
        r = obj["radius"]
        obj["x"], obj["y"] = (
            _place(r + MARGIN, 1 - r - MARGIN, rng),
            _place(r + MARGIN, 1 - r - MARGIN, rng),
        )
        words = [obj["colour"], obj["shape"]]
        if rng.random() < 0.5:
            words.insert(0, obj["size"])
        record.update(objects=[obj], relation=None, caption=with_article(" ".join(words)))
        return record
    first = _object(*rng.choice(combos(split)), PAIR_SCALE, rng)
    # beside a held-out object, anything goes; elsewhere no object is a held-out combination
    partners = combos("train") + (list(HOLDOUT) if split == "holdout" else [])
    second = _object(*rng.choice(partners), PAIR_SCALE, rng)
    if split == "holdout" and rng.random() < 0.5:  # the held-out object comes first or second
        first, second = second, first
    relation = rng.choice(RELATIONS)
    before, after = (first, second) if relation in ("left of", "above") else (second, first)
    along, across = ("x", "y") if relation in ("left of", "right of") else ("y", "x")
    before[along] = _place(before["radius"] + MARGIN, 0.5 - before["radius"], rng)
    after[along] = _place(0.5 + after["radius"], 1 - after["radius"] - MARGIN, rng)
    for obj in (first, second):
        obj[across] = _place(obj["radius"] + MARGIN, 1 - obj["radius"] - MARGIN, rng)
    phrases = [with_article(f"{obj['colour']} {obj['shape']}") for obj in (first, second)]
    caption = f"{phrases[0]} {relation} {phrases[1]}"
    record.update(objects=[first, second], relation=relation, caption=caption)
    return record


def fix_article(text: str) -> str:
    """ "a orange circle" -> "an orange circle": the one a/an rule of every caption and prompt."""
    words = text.split(" ")
    for i, word in enumerate(words[:-1]):
        if word.lower() == "a" and words[i + 1][:1].lower() in "aeiou":
            words[i] = word + "n"
    return " ".join(words)


def with_article(phrase: str) -> str:
    """ "orange circle" -> "an orange circle"."""
    return fix_article(f"a {phrase}")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85  # about the area of the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles, radii = [-90, 30, 150], [r, r, r]
    elif shape == "star":
        angles = [-90 + 36 * i for i in range(10)]
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (cx + rad * math.cos(math.radians(a)), cy + rad * math.sin(math.radians(a)))
        for a, rad in zip(angles, radii, strict=True)
    ]


def render(record: dict[str, Any], size: int) -> Image.Image:
    """Draw a scene description at `size` x `size` pixels."""
    image = Image.new("RGB", (size, size), tuple(record["background_rgb"]))
    draw = ImageDraw.Draw(image)
    for obj in record["objects"]:
        cx, cy, r = obj["x"] * size, obj["y"] * size, obj["radius"] * size
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r), fill=fill)
    return image


def _write_shard(task: tuple[str, int, int, int, dict[str, Any]]) -> int:
    split, shard, start, count, args = task
    with ShardSetWriter(args["out"], split, max_count=count, start_shard=shard) as writer:
        for index in range(start, start + count):
            record = scene(split, index, args["seed"], args["pair_fraction"])
            writer.write(
                {
                    "__key__": f"{split}_{index:07d}",
                    "image": render(record, args["size"]),
                    "txt": record["caption"],
                    "json": record,
                }
            )
    return count


def _shard_pattern(split: str, num_shards: int) -> str:
    return f"{split}-{{000000..{num_shards - 1:06d}}}.tar"


def generate(
    out: str | Path = "data/shapes",
    seed: int = 0,
    size: int = 64,
    train: int = 20_000,
    val: int = 1_000,
    holdout: int = 1_000,
    shard_size: int = 1_250,
    pair_fraction: float = 0.5,
    force: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write train/val/holdout shards and `dataset.json` to `out`; returns the dataset description.
    An existing dataset made with the same arguments is kept; other arguments need `force`."""
    out = Path(out)
    args = {
        "seed": seed,
        "size": size,
        "train": train,
        "val": val,
        "holdout": holdout,
        "shard_size": shard_size,
        "pair_fraction": pair_fraction,
    }
    existing = read_meta(out / DATASET_FILE)
    if existing is not None and not force:
        if existing.get("args") == args:
            print(
                f"{out / DATASET_FILE} exists with these arguments: keeping it (--force remakes it)"
            )
            return existing
        raise SystemExit(
            f"{out} holds a shapes dataset made with {existing.get('args')}, not {args}: "
            f"pass --force to replace it or choose another --out"
        )
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_FILE).unlink(missing_ok=True)  # the completion marker goes last
    tasks, splits = [], {}
    for split, count in zip(SPLITS, (train, val, holdout), strict=True):
        for stale in out.glob(f"{split}-*.tar"):
            stale.unlink()
        num_shards = math.ceil(count / shard_size)
        for shard in range(num_shards):
            start = shard * shard_size
            tasks.append(
                (split, shard, start, min(shard_size, count - start), {**args, "out": str(out)})
            )
        if num_shards:
            splits[split] = {
                "samples": count,
                "shards": num_shards,
                "pattern": _shard_pattern(split, num_shards),
            }
    workers = workers or min(len(tasks), os.cpu_count() or 1) or 1
    started = time.perf_counter()
    if workers > 1:
        with multiprocessing.get_context(START_METHOD).Pool(workers) as pool:
            written = sum(pool.imap_unordered(_write_shard, tasks))
    else:
        written = sum(map(_write_shard, tasks))
    description = {
        "name": "shapes",
        "args": args,
        "image_size": size,
        "splits": splits,
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
        "relations": list(RELATIONS),
        "sizes": {name: list(bounds) for name, bounds in SIZES.items()},
        "holdout": [list(pair) for pair in HOLDOUT],
    }
    write_json_atomic(out / DATASET_FILE, description)
    print(f"wrote {written} images in {time.perf_counter() - started:.1f}s to {out}")
    return description


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/shapes", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (e.g. 64, 256)")
    parser.add_argument("--train", type=int, default=20_000, help="training images")
    parser.add_argument("--val", type=int, default=1_000, help="validation images")
    parser.add_argument(
        "--holdout", type=int, default=1_000, help="images of held-out combinations"
    )
    parser.add_argument("--shard-size", type=int, default=1_250, help="images per shard")
    parser.add_argument(
        "--pair-fraction", type=float, default=0.5, help="share of two-object scenes"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset")
    a = parser.parse_args(argv)
    generate(
        a.out,
        a.seed,
        a.size,
        a.train,
        a.val,
        a.holdout,
        a.shard_size,
        a.pair_fraction,
        a.force,
        a.workers,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
