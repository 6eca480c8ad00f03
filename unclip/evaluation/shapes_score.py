"""Score a `sample.py` output folder with the independent pixel judge.

    python -m unclip.evaluation.shapes_score OUT_DIR [--accuracy-renders N]

Reads OUT_DIR/run.json, judges every image whose caption is a shapes caption (single objects and
two-object scenes; other captions are counted and skipped), prints the table per caption group with
the judge's own accuracy on fresh ground-truth renders at the images' size, and writes
OUT_DIR/shapes_score.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unclip.evaluation.shapes_judge import (
    METRICS,
    PAIR,
    SINGLE,
    JudgeSettings,
    describe_accuracy,
    judge,
    judge_accuracy,
    parse_caption,
    summarise,
)

SCORE_FILE = "shapes_score.json"
COLUMNS = {
    "colour_ok": "colour",
    "shape_ok": "shape",
    "one_object": "one object",
    "two_objects": "two objects",
    "colours_ok": "both colours",
    "both_ok": "both objects",
    "relation_ok": "+ relation",
}
# the bars on the judge, per group and metric
BARS: dict[str, dict[str, float]] = {
    "held-in single": {"colour_ok": 0.98, "shape_ok": 0.90, "one_object": 0.95},
    "held-out single": {"shape_ok": 0.80},
    "held-in pairs": {"both_ok": 0.50, "relation_ok": 0.40},
}


def read_run(out_dir: Path) -> dict[str, Any]:
    run_file = out_dir / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(
            f"{run_file}: no run.json (is {out_dir} a sample.py output folder?)"
        )
    return json.loads(run_file.read_text())


def judge_run(
    out_dir: Path, run: Mapping[str, Any], settings: JudgeSettings | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Judge records of the run's images with a shapes caption, and how many were skipped."""
    records, skipped = [], 0
    for entry in run.get("images", []):
        truth = parse_caption(str(entry.get("caption", "")))
        if truth is None:
            skipped += 1
            continue
        with Image.open(out_dir / entry["file"]) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        records.append({**judge(pixels, truth, settings), "file": entry["file"]})
    return records, skipped


def image_size(out_dir: Path, records: Sequence[Mapping[str, Any]]) -> int:
    with Image.open(out_dir / records[0]["file"]) as opened:
        return int(opened.size[0])


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def format_table(
    summary: Mapping[str, Mapping[str, float]],
    accuracy: Mapping[str, float] | None = None,
    extra: Mapping[str, Mapping[str, float]] | None = None,
    extra_name: str = "",
) -> str:
    """One row per caption group; a metric under its bar is marked LOW, over it ok. `extra`
    adds a column per group (e.g. the CLIP judge's shape accuracy)."""
    metrics = [m for kind in (SINGLE, PAIR) for m in METRICS[kind]]
    names = ["group", "images", *(COLUMNS[m] for m in metrics), "bg error"]
    if extra is not None:
        names.append(extra_name)
    rows = []
    for group, stats in summary.items():
        cells = [group, str(int(stats["images"]))]
        for metric in metrics:
            value = stats.get(metric)
            bar = BARS.get(group, {}).get(metric)
            mark = "" if value is None or bar is None else (" ok" if value >= bar else " LOW")
            cells.append(_pct(value) + mark)
        cells.append(f"{stats['background_error']:.1f}")
        if extra is not None:
            cells.append(_pct(extra.get(group, {}).get("value")))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [names, *rows]) for i in range(len(names))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(names, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    bars = "; ".join(
        f"{group}: " + ", ".join(f"{COLUMNS[m]} >= {100 * b:.0f}%" for m, b in metric_bars.items())
        for group, metric_bars in BARS.items()
    )
    lines.append(f"bars: {bars}")
    lines.append("bg error: mean RGB distance of the border from the nearest training background")
    if accuracy:
        lines.append(describe_accuracy(accuracy))
    return "\n".join(lines)


def bars_met(summary: Mapping[str, Mapping[str, float]]) -> dict[str, bool]:
    """Each bar of BARS as `group/metric` -> met (False when the group was not sampled)."""
    return {
        f"{group}/{metric}": summary.get(group, {}).get(metric, -1.0) >= bar
        for group, metric_bars in BARS.items()
        for metric, bar in metric_bars.items()
    }


def score(out_dir: str | Path, accuracy_count: int = 200) -> dict[str, Any]:
    """Judge OUT_DIR, print the table and write OUT_DIR/shapes_score.json."""
    out_dir = Path(out_dir)
    records, skipped = judge_run(out_dir, read_run(out_dir))
    if not records:
        raise SystemExit(f"{out_dir / 'run.json'}: no image has a shapes caption to judge")
    summary = summarise(records)
    accuracy = judge_accuracy(image_size(out_dir, records), accuracy_count)
    report = {
        "summary": summary,
        "bars_met": bars_met(summary),
        "judge_accuracy": accuracy,
        "skipped_captions": skipped,
        "images": records,
    }
    (out_dir / SCORE_FILE).write_text(json.dumps(report, indent=2))
    print(format_table(summary, accuracy))
    if skipped:
        print(f"{skipped} images with captions outside the shapes grammar were not judged")
    print(f"scores: {out_dir / SCORE_FILE}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="a sample.py output folder (holding run.json)")
    parser.add_argument(
        "--accuracy-renders",
        type=int,
        default=200,
        help="ground-truth renders per split the judge's own accuracy is measured on",
    )
    args = parser.parse_args(argv)
    try:
        score(args.out_dir, args.accuracy_renders)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
