"""What one image evaluation costs (`eval.enabled=true`, `python -m unclip.sampling.evaluate`, the
demo's FID line): the reference statistics (once per shard set and feature model), generating
`--num-samples` images with the demo decoder, and scoring them (FID/KID/CLIP score/precision-recall).

    python bench/eval_bench.py                        # demo sizes: unclip-tiny CLIP, 32 px decoder
    python bench/eval_bench.py --num-samples 256 --steps 25 --reference-samples 1000

Weights are random (the cost does not depend on them); the shards are shapes val images embedded
with that CLIP, written to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unclip.clip import load_clip
from unclip.data import shapes
from unclip.data.embed import embed_shards
from unclip.evaluation.features import ClipImageFeatures
from unclip.evaluation.generation import EvalSettings, Evaluator, generate, read_subset

CONF = Path(__file__).resolve().parents[1] / "conf"


def write_shards(folder: Path, clip_spec: str, count: int, size: int) -> str:
    """Shapes val images embedded with the CLIP by the embed tool, as users make them."""
    shapes.generate(folder / "shapes", size=size, train=8, val=count, holdout=8, workers=1)
    embed_shards(str(folder / "shapes" / "val-*.tar"), folder / "emb", clip_spec, split_name="val")
    return str(folder / "emb" / "val-*.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--reference-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        decoder = instantiate(compose("train", ["model=decoder"]).model, _convert_="all").eval()
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        measure(args, decoder, Path(tmp))


def measure(args: argparse.Namespace, decoder: torch.nn.Module, folder: Path) -> None:
    clip_file = str(folder / "clip.pt")
    torch.save(load_clip("unclip-tiny").model.state_dict(), clip_file)
    spec = f"{clip_file}:unclip-tiny"
    shards = write_shards(folder, spec, args.reference_samples, decoder.image_size)
    features = ClipImageFeatures(load_clip(spec))
    settings = EvalSettings(shards=shards, reference_samples=args.reference_samples)

    started = time.perf_counter()
    evaluator = Evaluator(features, settings, decoder.image_size)
    reference_s = time.perf_counter() - started
    started = time.perf_counter()
    Evaluator(features, settings, decoder.image_size)
    cached_s = time.perf_counter() - started
    subset = read_subset(shards, args.num_samples, with_txt_emb=False)
    generated = generate(
        subset,
        lambda z, c, g: decoder.sample(z, c, generator=g, steps=args.steps),
        batch_size=args.batch_size,
    )
    scores = evaluator.score(generated, subset)
    print(
        f"reference statistics, {args.reference_samples} real {decoder.image_size}px images: "
        f"{reference_s:.1f} s (from the cache: {cached_s:.3f} s)\n"
        f"generation, {args.num_samples} images x {args.steps} decoder steps (guidance "
        f"{decoder.sampling['guidance_scale']}): {generated.seconds:.1f} s\n"
        f"scoring (FID, KID, CLIP score, precision/recall): {scores['scoring_seconds']:.2f} s"
    )


if __name__ == "__main__":
    main()
