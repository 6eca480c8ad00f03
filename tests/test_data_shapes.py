"""The shapes dataset: deterministic from its seed, held-out combinations only in `holdout`, colours
that can be read back from the pixels, captions that match the scene."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip.data.shapes import BACKGROUNDS, COLOURS, HOLDOUT, SHAPES, generate, main, nearest_colour

SMALL = {"seed": 3, "size": 32, "train": 40, "val": 8, "holdout": 12, "shard_size": 16}


def read_split(folder: Path, split: str) -> list[dict]:
    """Every sample of a split as {"key", "txt", "json", "png"} straight from the tars."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"key": key})[ext] = tar.extractfile(member).read()
    return [
        {**s, "txt": s["txt"].decode(), "json": json.loads(s["json"])} for s in samples.values()
    ]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=0, size=48, train=300, val=30, holdout=60, shard_size=100, workers=2)
    return out


def test_same_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", **SMALL, workers=2)
    generate(tmp_path / "b", **SMALL, workers=1)
    generate(tmp_path / "c", **{**SMALL, "seed": 4}, workers=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "dataset.json",
        "holdout-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (
        tmp_path / "c" / "train-000000.tar"
    ).read_bytes()


def test_holdout_combinations_appear_only_in_the_holdout_split(shapes: Path) -> None:
    held = {tuple(pair) for pair in HOLDOUT}
    seen = set()
    for split in ("train", "val"):
        for sample in read_split(shapes, split):
            combos = {(o["colour"], o["shape"]) for o in sample["json"]["objects"]}
            assert not combos & held, (split, sample["key"], combos)
            seen |= combos
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    holdout = read_split(shapes, "holdout")
    assert all({(o["colour"], o["shape"]) for o in s["json"]["objects"]} & held for s in holdout)
    assert {len(s["json"]["objects"]) for s in holdout} == {1, 2}
    description = json.loads((shapes / "dataset.json").read_text())
    assert {tuple(p) for p in description["holdout"]} == held
    assert description["splits"]["train"]["samples"] == 300


def test_colours_can_be_read_back_from_the_pixels(shapes: Path) -> None:
    singles = [s for s in read_split(shapes, "val") if len(s["json"]["objects"]) == 1]
    assert len(singles) >= 5
    for sample in singles:
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).reshape(-1, 3)
        background = np.array(sample["json"]["background_rgb"])
        obj = pixels[np.abs(pixels.astype(int) - background).sum(axis=1) > 60]
        assert len(obj) > 10
        assert (
            nearest_colour(tuple(np.median(obj, axis=0))) == sample["json"]["objects"][0]["colour"]
        )
    for rgb in BACKGROUNDS.values():  # no background could be mistaken for an object colour
        assert min(np.linalg.norm(np.subtract(rgb, c)) for c in COLOURS.values()) > 100


def test_captions_describe_the_scene(shapes: Path) -> None:
    for sample in read_split(shapes, "train"):
        record, caption = sample["json"], sample["txt"]
        for obj in record["objects"]:
            assert f"{obj['colour']} {obj['shape']}" in caption
        if record["relation"] is None:
            continue
        first, second = record["objects"]
        assert caption.split(f"{first['shape']} ", 1)[1].startswith(record["relation"])
        axis, sign = {
            "left of": ("x", -1),
            "right of": ("x", 1),
            "above": ("y", -1),
            "below": ("y", 1),
        }[record["relation"]]
        assert sign * (first[axis] - second[axis]) > first["radius"] + second["radius"] - 1e-6


def test_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    main(["--out", str(out), "--train", "20", "--val", "4", "--holdout", "4", "--size", "16"])
    shard = out / "train-000000.tar"
    stamp = shard.stat().st_mtime_ns
    main(["--out", str(out), "--train", "20", "--val", "4", "--holdout", "4", "--size", "16"])
    assert shard.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="--force"):
        main(["--out", str(out), "--train", "30", "--val", "4", "--holdout", "4", "--size", "16"])
    main(
        [
            "--out",
            str(out),
            "--train",
            "30",
            "--val",
            "4",
            "--holdout",
            "4",
            "--size",
            "16",
            "--shard-size",
            "10",
            "--force",
        ]
    )
    assert sorted(p.name for p in out.glob("train-*.tar")) == [
        f"train-00000{i}.tar" for i in range(3)
    ]
    assert len(read_split(out, "train")) == 30
