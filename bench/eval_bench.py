"""What one image evaluation costs (`eval.enabled=true`, `python -m unclip.evaluation.run`, the
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

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unclip.clip import encode_images, encode_texts, load_clip
from unclip.data.format import embedding_meta, write_json_atomic
from unclip.data.shapes import render, scene
from unclip.data.writer import AtomicShardWriter
from unclip.evaluation.features import ClipImageFeatures
from unclip.evaluation.generation import EvalSettings, Evaluator, generate, read_subset
from unclip.images import from_pil, to_pil

CONF = Path(__file__).resolve().parents[1] / "conf"


def write_shards(folder: Path, clip_file: str, count: int, size: int) -> str:
    bundle = load_clip(clip_file)
    records = [scene("val", i, 0, 0.5) for i in range(count)]
    images = torch.stack([from_pil(render(r, size)) for r in records])
    captions = [r["caption"] for r in records]
    img_emb = encode_images(bundle.model, bundle.preprocess, images)
    txt_emb = encode_texts(bundle.model, bundle.tokenizer, captions)
    with AtomicShardWriter(folder / "val-000000.tar") as writer:
        for i in range(count):
            writer.write(
                {
                    "__key__": f"val{i:06d}",
                    "image": to_pil(images[i]),
                    "txt": captions[i],
                    "img_emb": img_emb[i].numpy().astype(np.float16),
                    "txt_emb": txt_emb[i].numpy().astype(np.float16),
                }
            )
    write_json_atomic(folder / "meta.json", embedding_meta(clip_file, img_emb.shape[1]))
    return str(folder / "val-*.tar")


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
    folder = Path(tempfile.mkdtemp(prefix="eval-bench-"))
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
