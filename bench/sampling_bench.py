"""Text -> image speed against quality: seconds per image and the independent pixel judge's scores
for each decoder / upsampler sampler and step count, on the demo's trained stack.

    python bench/sampling_bench.py                          # runs/demo-* checkpoints (make demo)
    python bench/sampling_bench.py --configs ddim:50/ddim:20 dpmpp_2m:15/dpmpp_2m:7 --rounds 5

A config is `DECODER/UPSAMPLER`, each `sampler:steps`; `+nchw` at the end keeps the weights in
NCHW (default: channels_last, what sample.py uses). The prior runs as conf/sample.yaml says for
every config. Quality: every single-object caption (held-in and held-out pairs) `--per-caption`
times plus `--pairs` two-object captions, one seed, judged from pixels by
unclip.evaluation.shapes_judge (no network of the stack involved; its own accuracy on fresh
ground-truth renders is printed). Speed: one batch of `--batch-size` captions through the whole
stack, configs interleaved over `--rounds` rounds, median and spread (min-max) per image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from unclip.evaluation.shapes_judge import (
    describe_accuracy,
    judge,
    judge_accuracy,
    pair_captions,
    parse_caption,
    single_captions,
    summarise,
)
from unclip.resources import conf_dir
from unclip.sampling.pipeline import UnclipPipeline

DEFAULT_CONFIGS = [
    "ddim:50/ddim:20+nchw",  # the demo's sampling before this bench
    "ddim:50/ddim:20",
    "dpmpp_2m:25/dpmpp_2m:10",
    "dpmpp_2m:15/dpmpp_2m:7",
    "dpmpp_2m:10/dpmpp_2m:5",
    "ddim:25/ddim:10",
]
GROUP_METRICS = {
    "held-in single": ("colour_ok", "shape_ok", "one_object"),
    "held-out single": ("shape_ok",),
    "held-in pairs": ("both_ok", "relation_ok"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs", help="folder of the demo-* runs")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--per-caption", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def stage(text: str) -> dict[str, Any]:
    sampler, steps = text.split(":")
    return {"sampler": sampler, "steps": int(steps)}


def parse_config(text: str) -> tuple[dict[str, Any], dict[str, Any], bool]:
    nchw = text.endswith("+nchw")
    decoder, upsampler = text.removesuffix("+nchw").split("/")
    return stage(decoder), stage(upsampler), not nchw


def sample_settings() -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("sample")
    return OmegaConf.to_container(cfg, resolve=False)


def load(runs: Path, channels_last: bool) -> UnclipPipeline:
    return UnclipPipeline.load(
        clip=str(runs / "demo-clip/checkpoints/last.ckpt"),
        prior=runs / "demo-prior_diffusion/checkpoints/last.ckpt",
        decoder=runs / "demo-decoder/checkpoints/last.ckpt",
        upsamplers=[runs / "demo-upsampler/checkpoints/last.ckpt"],
        device="cpu",
        channels_last=channels_last,
    )


def run(pipe, captions, prior_kwargs, decoder_kwargs, upsampler_kwargs, seed, batch_size):
    return pipe.text_to_image(
        captions,
        prior_kwargs,
        decoder_kwargs,
        [upsampler_kwargs],
        generator=pipe.generator(seed),
        batch_size=batch_size,
    ).images


def to_pixels(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    settings = sample_settings()
    prior_kwargs = dict(settings["prior"]["diffusion"])
    # the decoder's other settings (guidance scale) as sample.py uses them; the sampler is the config's
    decoder_extra = {
        k: v
        for k, v in settings["decoder"].items()
        if k not in ("checkpoint", "sampler", "steps", "eta")
    }
    captions = [c for c in single_captions() for _ in range(args.per_caption)]
    captions += pair_captions(args.pairs)
    configs = [parse_config(c) for c in args.configs]
    pipes = {cl: load(runs, cl) for cl in {c[2] for c in configs}}

    scores: dict[str, dict[str, dict[str, float]]] = {}
    for text, (decoder, upsampler, channels_last) in zip(args.configs, configs, strict=True):
        images = run(
            pipes[channels_last],
            captions,
            prior_kwargs,
            {**decoder_extra, **decoder},
            upsampler,
            args.seed,
            args.batch_size,
        )
        records = []
        for caption, image in zip(captions, images, strict=True):
            records.append(judge(to_pixels(image), parse_caption(caption)))
        scores[text] = summarise(records)

    timing_captions = captions[: args.batch_size]
    seconds: dict[str, list[float]] = {text: [] for text in args.configs}
    for _ in range(args.rounds):
        for text, (decoder, upsampler, channels_last) in zip(args.configs, configs, strict=True):
            start = time.perf_counter()
            run(
                pipes[channels_last],
                timing_captions,
                prior_kwargs,
                {**decoder_extra, **decoder},
                upsampler,
                args.seed,
                args.batch_size,
            )
            seconds[text].append((time.perf_counter() - start) / len(timing_captions))

    size = int(pipes[next(iter(pipes))].upsamplers[0].image_size)
    columns = [(g, m) for g, metrics in GROUP_METRICS.items() for m in metrics]
    header = [
        "decoder/upsampler",
        "s per image",
        *(f"{g.split()[0]} {g.split()[1][:4]} {m}" for g, m in columns),
    ]
    rows = []
    for text in args.configs:
        times = seconds[text]
        cells = [text, f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"]
        for group, metric in columns:
            value = scores[text].get(group, {}).get(metric)
            cells.append("" if value is None else f"{100 * value:.1f}%")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"\n{len(captions)} images per config ({args.per_caption} per single caption, "
        f"{args.pairs} pair captions) at {size}px; timing: batch {args.batch_size}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds"
    )
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(describe_accuracy(judge_accuracy(size=size)))


if __name__ == "__main__":
    main()
