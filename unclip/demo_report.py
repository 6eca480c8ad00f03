"""The demo's last stage: sample a grid with sample.py's own code, then score it and print the table
(colour from pixels, shape by CLIP zero-shot, held-in vs held-out, and the prior's cosine to truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from unclip.data.samples import read_samples
from unclip.evaluation.binding import (
    HELD_IN,
    HELD_OUT,
    judge_images,
    per_caption,
    single_object_captions,
    summarise,
)
from unclip.evaluation.prior_fit import cosine_to_truth
from unclip.evaluation.sample_set import format_scores, score_sample_run
from unclip.images import load_image
from unclip.sampling.run import ModeRunner, save_run, settings


class Demo(Protocol):
    """What the report reads of unclip.demo.Demo (which imports this module, not the reverse)."""

    cfg: DictConfig
    shapes: Path
    shapes_emb: Path
    conf_dir: Path

    def run_dir(self, stage: str) -> Path: ...
    def sample_overrides(self) -> list[str]: ...
    def shown(self, command: list[str]) -> str: ...


PRIOR_SPLITS = {HELD_IN: "val", HELD_OUT: "holdout"}


def compose_sample(conf_dir: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose("sample", overrides=overrides)


def vocabulary(shapes_dir: Path) -> dict[str, Any]:
    """Colours (name -> RGB), shapes and held-out pairs, as the generator recorded them."""
    description = json.loads((shapes_dir / "dataset.json").read_text())
    return {k: description[k] for k in ("colours", "shapes", "holdout")}


def score_images(
    record: dict[str, Any],
    out_dir: Path,
    vocab: dict[str, Any],
    sampler: ModeRunner,
    cfg: DictConfig,
) -> list[dict[str, Any]]:
    """Judge every sampled image of a single-object caption, read back from its PNG."""
    specs = {
        s.caption: s
        for s in single_object_captions(vocab["colours"], vocab["shapes"], vocab["holdout"])
    }
    rows = [r for r in record["images"] if r.get("caption") in specs]
    images = torch.stack([load_image(out_dir / r["file"]) for r in rows])
    judged = judge_images(
        images,
        [specs[r["caption"]] for r in rows],
        vocab["colours"],
        sampler.pipe.clip,
        cfg.evaluation.template,
        vocab["shapes"],
        colour_options=dict(cfg.evaluation.colour),
    )
    return [{**j, "file": r["file"]} for j, r in zip(judged, rows, strict=True)]


def score_prior(demo: Demo, sampler: ModeRunner) -> dict[str, dict[str, float]]:
    pipe, cfg = sampler.pipe, sampler.cfg
    prior_kwargs = settings(cfg.prior.get(pipe.prior_kind))
    generator = pipe.generator(cfg.seed)

    def sample_prior(captions: list[str], txt_emb: torch.Tensor) -> torch.Tensor:
        return pipe.sample_prior(captions, txt_emb.to(pipe.device), generator, **prior_kwargs)

    scores = {}
    for group, split in PRIOR_SPLITS.items():
        shards = demo.shapes_emb / f"{split}-*.tar"
        batch = read_samples(
            str(shards), ["txt", "txt_emb", "img_emb"], int(demo.cfg.evaluation.prior_samples)
        )
        scores[group] = cosine_to_truth(
            sample_prior, batch["txt"], batch["txt_emb"], batch["img_emb"], int(cfg.batch_size)
        )
    return scores


def score_and_report(demo: Demo) -> dict[str, Any]:
    cfg = demo.cfg
    out_dir = Path(cfg.sample.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(demo.shapes)
    specs = single_object_captions(vocab["colours"], vocab["shapes"], vocab["holdout"])
    captions = [s.caption for s in specs] + list(cfg.sample.extra_captions)
    (out_dir / "captions.txt").write_text("\n".join(captions) + "\n")
    overrides = demo.sample_overrides()
    print(f"$ {demo.shown(['python', 'sample.py', *overrides])}", flush=True)
    sampler = ModeRunner(compose_sample(demo.conf_dir, overrides))
    record = save_run(sampler, out_dir)
    judged = score_images(record, out_dir, vocab, sampler, cfg)
    summary = summarise(judged)
    prior = score_prior(demo, sampler)
    reference = clip_reference(demo)
    image_metrics = score_sample_run(
        record,
        out_dir,
        str(demo.shapes_emb / "val-*.tar"),
        reference_samples=int(cfg.evaluation.get("reference_samples", 1000)),
    )
    report = {
        "grid": record["grid"],
        "summary": summary,
        "prior_cosine_to_truth": prior,
        "clip_on_real_val_images": reference,
        "bars": dict(cfg.evaluation.bars),
        "per_caption": per_caption(judged),
        "images": judged,
        "sampling_seconds": record["seconds"],
        "image_metrics": image_metrics,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(format_table(summary, prior, dict(cfg.evaluation.bars), reference))
    print(format_scores(image_metrics))
    print(f"\ngrid: {record['grid']}\nscores: {out_dir / 'report.json'}")
    return report


def clip_reference(demo: Demo) -> dict[str, float]:
    """The CLIP stage's own zero-shot accuracy on real validation images: the ceiling of its
    judgement of shapes in generated ones."""
    metrics_file = demo.run_dir("clip") / "metrics.json"
    if not metrics_file.is_file():
        return {}
    metrics = json.loads(metrics_file.read_text()).get("metrics", {})
    keys = {"shape": "val/zero_shot_shape_acc", "colour": "val/zero_shot_colour_acc"}
    return {name: metrics[key] for name, key in keys.items() if key in metrics}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def format_table(
    summary: dict[str, dict[str, float]],
    prior: dict[str, dict[str, float]],
    bars: dict[str, float],
    reference: dict[str, float] | None = None,
) -> str:
    """The demo's score table, one row per held-in / held-out group."""
    header = (
        f"{'captions':<10} {'images':>6}  {'colour (pixels)':>15}  {'shape (CLIP)':>12}  "
        f"{'prior cos-to-truth':>18}  {'text baseline':>13}"
    )
    lines = [header, "-" * len(header)]
    for group in (HELD_IN, HELD_OUT):
        row = summary.get(group, {})
        fit = prior.get(group, {})
        marks = {
            name: ("" if group != HELD_IN else (" ok" if row.get(name, 0) >= bar else " LOW"))
            for name, bar in bars.items()
        }
        lines.append(
            f"{group:<10} {int(row.get('images', 0)):>6}  "
            f"{_pct(row.get('colour')) + marks.get('colour', ''):>15}  "
            f"{_pct(row.get('shape')) + marks.get('shape', ''):>12}  "
            f"{fit.get('cosine', float('nan')):>18.3f}  "
            f"{fit.get('text_baseline_cosine', float('nan')):>13.3f}"
        )
    bar_text = ", ".join(f"{name} >= {100 * bar:.0f}%" for name, bar in bars.items())
    lines.append(f"bars on held-in captions: {bar_text}")
    if reference:
        lines.append(
            "the CLIP judge on real val images: "
            + ", ".join(f"{name} {_pct(value).strip()}" for name, value in reference.items())
        )
    return "\n".join(lines)


def print_timings(timings: dict[str, float | None], total: float) -> None:
    print("\nstage        wall clock")
    for name, seconds in timings.items():
        print(f"{name:<12} {'skipped' if seconds is None else f'{seconds:7.1f} s':>10}")
    print(f"{'total':<12} {total:7.1f} s")
