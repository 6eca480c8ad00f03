"""The pixel judge: right on ground-truth renders, wrong on corrupted ones, and the CLI on a folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from unclip.data import shapes
from unclip.evaluation import shapes_score
from unclip.evaluation.shapes_judge import (
    BLOB,
    flipped_relation,
    judge,
    judge_accuracy,
    pair_captions,
    parse_caption,
    relation_follows_word,
    single_captions,
)

SIZE = 64


def _scene(index: int, pair: bool, split: str = "val") -> dict:
    return shapes.scene(split, index, seed=4321, pair_fraction=1.0 if pair else 0.0)


def _judge(record: dict, caption: str | None = None) -> dict:
    truth = parse_caption(caption or record["caption"])
    assert truth is not None
    return judge(np.asarray(shapes.render(record, SIZE)), truth)


def test_captions_parse_into_objects_relation_and_holdout() -> None:
    single = parse_caption("a large orange star")
    assert single is not None and single.kind == "single" and not single.held_out
    assert (single.objects[0].colour, single.objects[0].shape) == ("orange", "star")
    pair = parse_caption("a blue square below a red triangle")
    assert pair is not None and pair.relation == "below" and pair.held_out  # red triangle
    assert [o.shape for o in pair.objects] == ["square", "triangle"]
    assert parse_caption("a photo of a dog") is None
    assert len(single_captions()) == len(shapes.COLOURS) * len(shapes.SHAPES)
    pairs = pair_captions(12)
    assert len(set(pairs)) == 12 and all(parse_caption(c).kind == "pair" for c in pairs)


@pytest.mark.parametrize("split", ["val", "holdout"])
def test_judge_is_right_on_ground_truth_renders(split: str) -> None:
    for index in range(15):
        single = _judge(_scene(index, pair=False, split=split))
        assert single["colour_ok"] and single["shape_ok"] and single["one_object"], single
        pair = _judge(_scene(index, pair=True, split=split))
        assert pair["both_ok"] and pair["relation_ok"], pair
        assert pair["background_error"] < 10


def test_judge_own_accuracy_on_fresh_renders_clears_the_issue_bars() -> None:
    accuracy = judge_accuracy(size=SIZE, count=30)
    assert accuracy["images"] == 60
    assert accuracy["shape"] >= 0.98 and accuracy["colour"] >= 0.98
    assert accuracy["pairs"] >= 0.95 and accuracy["count"] >= 0.95


def test_wrong_colour_shape_or_a_blank_frame_fail_a_single_object() -> None:
    record = _scene(0, pair=False)
    obj = record["objects"][0]
    other_colour = next(c for c in shapes.COLOURS if c != obj["colour"])
    recoloured = copy.deepcopy(record)
    recoloured["objects"][0]["rgb"] = list(shapes.COLOURS[other_colour])
    judged = _judge(recoloured, record["caption"])
    assert not judged["colour_ok"] and judged["shape_ok"]
    other_shape = next(s for s in shapes.SHAPES if s != obj["shape"])
    reshaped = copy.deepcopy(record)
    reshaped["objects"][0]["shape"] = other_shape
    judged = _judge(reshaped, record["caption"])
    assert judged["colour_ok"] and not judged["shape_ok"]
    blank = copy.deepcopy(record)
    blank["objects"] = []
    judged = _judge(blank, record["caption"])
    assert judged["count"] == 0 and not (judged["colour_ok"] or judged["shape_ok"])
    assert not judged["one_object"]


def test_a_second_object_fails_exactly_one_object() -> None:
    record = _scene(1, pair=False)
    crowded = copy.deepcopy(record)
    extra = copy.deepcopy(record["objects"][0])
    extra.update(radius=0.06, x=0.08 if record["objects"][0]["x"] > 0.5 else 0.92, y=0.08)
    crowded["objects"].append(extra)
    judged = _judge(crowded, record["caption"])
    assert judged["colour_ok"] and judged["shape_ok"] and not judged["one_object"]


def test_swapped_colours_missing_object_and_swapped_places_fail_a_pair() -> None:
    record = next(
        r
        for r in (_scene(i, pair=True) for i in range(2, 50))
        if len({o["colour"] for o in r["objects"]}) == len({o["shape"] for o in r["objects"]}) == 2
    )
    first, second = record["objects"]
    swapped = copy.deepcopy(record)
    swapped["objects"][0]["rgb"], swapped["objects"][1]["rgb"] = second["rgb"], first["rgb"]
    judged = _judge(swapped, record["caption"])
    assert judged["two_objects"] and judged["colours_ok"] and not judged["both_ok"]
    missing = copy.deepcopy(record)
    missing["objects"] = missing["objects"][:1]
    judged = _judge(missing, record["caption"])
    assert not judged["two_objects"] and not judged["both_ok"] and not judged["relation_ok"]
    moved = copy.deepcopy(record)
    for key in ("x", "y"):
        moved["objects"][0][key], moved["objects"][1][key] = second[key], first[key]
    judged = _judge(moved, record["caption"])
    assert judged["both_ok"] and not judged["relation_ok"]


def test_flipped_relation_keeps_the_objects_and_reverses_the_relation() -> None:
    caption = "an orange star above a blue circle"
    assert flipped_relation(caption) == "an orange star below a blue circle"
    assert flipped_relation(flipped_relation(caption)) == caption
    with pytest.raises(ValueError, match="a red circle"):
        flipped_relation("a red circle")


def test_relation_follows_word_counts_only_layouts_that_move_with_the_word() -> None:
    # two different objects (two of the same satisfy a relation and its flip at once)
    distinct = (_scene(i, pair=True) for i in range(40))
    records = [r for r in distinct if len({(o["colour"], o["shape"]) for o in r["objects"]}) == 2]
    records = records[:6]
    as_captioned = [_judge(r) for r in records]
    flips = [flipped_relation(r["caption"]) for r in records]
    # the same layout under the flipped caption: right for one, so never for both
    same_layout = [_judge(r, f) for r, f in zip(records, flips, strict=True)]
    ignored = relation_follows_word(as_captioned, same_layout)
    assert ignored == {"relation": 1.0, "relation_flipped": 0.0, "follows": 0.0}
    # the layout mirrored for the flipped caption (the objects trade places): it follows
    mirrored = []
    for record, flip in zip(records, flips, strict=True):
        moved = copy.deepcopy(record)
        first, second = record["objects"]
        for key in ("x", "y"):
            moved["objects"][0][key], moved["objects"][1][key] = second[key], first[key]
        mirrored.append(_judge(moved, flip))
    assert relation_follows_word(as_captioned, mirrored)["follows"] == 1.0
    with pytest.raises(ValueError, match="6 records against 5"):
        relation_follows_word(as_captioned, mirrored[:5])


def test_a_shapeless_smudge_is_a_blob() -> None:
    image = np.full((SIZE, SIZE, 3), 250, dtype=np.uint8)
    image[20:24, 10:50] = shapes.COLOURS["red"]  # a thin bar: no template fits it
    image[24:40, 26:30] = shapes.COLOURS["red"]
    judged = judge(image, parse_caption("a red square"))
    assert judged["objects"][0]["shape"] == BLOB and not judged["shape_ok"]


def _run_folder(tmp_path: Path) -> Path:
    """A sample.py-style folder: two right single objects, one wrong, one right pair, one
    caption outside the grammar."""
    (tmp_path / "images").mkdir()
    entries = []
    records = [_scene(3, False), _scene(4, False), _scene(5, False), _scene(6, True)]
    captions = [r["caption"] for r in records]
    wrong = records[2]["objects"][0]
    wrong["shape"] = next(s for s in shapes.SHAPES if s != wrong["shape"])
    for i, (record, caption) in enumerate(zip(records, captions, strict=True)):
        shapes.render(record, SIZE).save(tmp_path / "images" / f"{i}.png")
        entries.append({"file": f"images/{i}.png", "caption": caption})
    shapes.render(records[0], SIZE).save(tmp_path / "images" / "x.png")
    entries.append({"file": "images/x.png", "caption": "a photo of a dog"})
    (tmp_path / "run.json").write_text(json.dumps({"images": entries}))
    return tmp_path


def test_shapes_score_judges_a_sample_folder_from_its_run_json(tmp_path, capsys) -> None:
    out = _run_folder(tmp_path)
    shapes_score.main([str(out), "--accuracy-renders", "10"])
    report = json.loads((out / shapes_score.SCORE_FILE).read_text())
    single = report["summary"]["held-in single"]
    assert single["images"] == 3 and single["shape_ok"] == pytest.approx(2 / 3)
    assert single["colour_ok"] == 1.0
    assert report["summary"]["held-in pairs"]["relation_ok"] == 1.0
    assert report["skipped_captions"] == 1 and report["judge_accuracy"]["images"] == 20
    assert report["bars_met"]["held-in single/shape_ok"] is False
    printed = capsys.readouterr().out
    assert "66.7% LOW" in printed and "fresh real renders at 64px" in printed


def test_shapes_score_names_a_folder_without_run_json(tmp_path) -> None:
    with pytest.raises(SystemExit, match="run.json"):
        shapes_score.main([str(tmp_path)])
