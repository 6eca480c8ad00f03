"""Where does a decoder take a two-object layout from: the relation word, the image embedding, or
the noise? Scored with the pixel judge on the two-object captions of an embedded shapes split.

    python -m unclip.sampling.layout_source --clip runs/demo-clip/checkpoints/last.ckpt \\
        --prior runs/demo-prior_diffusion/checkpoints/last.ckpt \\
        --decoder runs/demo-decoder/checkpoints/last.ckpt --shards 'data/shapes_emb/val-*.tar'

Each pair is decoded from one fixed noise six times: with the prior's z_i, the true z_i of its val
image and no z_i (the caption alone), each under the caption and under the caption with the
relation flipped ("left of" -> "right of"). A layout satisfies only one of a caption and its flip,
so the `follows` column (right under both) is the share of images whose layout moved with the word.
The relation column alone cannot tell this: a decoder that copies the layout from z_i scores well
on it with the true z_i and ignores the caption.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unclip.data.samples import read_samples
from unclip.evaluation.shapes_judge import (
    PAIR,
    flipped_relation,
    judge,
    parse_caption,
    relation_follows_word,
)
from unclip.evaluation.tables import format_markdown
from unclip.sampling.pipeline import UnclipPipeline

log = logging.getLogger(__name__)

SOURCES = ("prior", "true", "none")


def pair_subset(shards: str, pairs: int, scan: int) -> tuple[list[str], torch.Tensor]:
    """The first `pairs` two-object captions among `scan` samples of the shards, with their z_i."""
    batch = read_samples(shards, ["txt", "img_emb"], scan, config_key="--shards")
    keep = [i for i, c in enumerate(batch["txt"]) if (t := parse_caption(c)) and t.kind == PAIR]
    if not keep:
        raise ValueError(f"--shards {shards!r}: no two-object captions of the shapes grammar")
    keep = keep[:pairs]
    return [batch["txt"][i] for i in keep], batch["img_emb"][keep].float()


def judged(images: torch.Tensor, captions: Sequence[str]) -> list[dict[str, Any]]:
    return [judge(image, parse_caption(c)) for image, c in zip(images, captions, strict=True)]


@torch.no_grad()
def layout_sources(
    pipe: UnclipPipeline,
    captions: list[str],
    true_emb: torch.Tensor,
    seed: int = 0,
    batch_size: int = 64,
    **decoder_settings: Any,
) -> list[dict[str, Any]]:
    """One row per z_i source: both-right and relation rates under the caption and its flip,
    and `follows`. Every row decodes from the same noise and prior samples."""
    flipped = [flipped_relation(c) for c in captions]
    prior_emb = pipe.sample_prior(captions, pipe.encode_texts(captions), pipe.generator(seed))
    embeddings = {"prior": prior_emb, "true": true_emb.to(pipe.device), "none": prior_emb}
    size = pipe.decoder.image_size
    noise = torch.randn(
        len(captions), pipe.decoder.channels, size, size, generator=pipe.generator(seed + 1)
    )
    rows = []
    for source in SOURCES:
        records: dict[str, list[dict[str, Any]]] = {"caption": [], "flipped": []}
        for name, texts in (("caption", captions), ("flipped", flipped)):
            for start in range(0, len(captions), batch_size):
                part = slice(start, start + batch_size)
                images = pipe.decode(
                    embeddings[source][part],
                    texts[part],
                    generator=pipe.generator(seed + 2),
                    noise=noise[part].to(pipe.device),
                    drop_image_embedding=source == "none",
                    **decoder_settings,
                )
                records[name] += judged(images.cpu(), texts[part])
        follows = relation_follows_word(records["caption"], records["flipped"])
        both = sum(r["both_ok"] for r in records["caption"]) / len(captions)
        rows.append({"z_i": source, "pairs": len(captions), "both_right": both, **follows})
        log.info("z_i %s: %s", source, rows[-1])
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["z_i", "pairs", "both right", "relation", "relation (flipped)", "follows the word"]
    body = [
        [
            r["z_i"],
            str(r["pairs"]),
            *(f"{100 * r[k]:.1f}%" for k in ("both_right", "relation", "relation_flipped")),
            f"{100 * r['follows']:.1f}%",
        ]
        for r in rows
    ]
    return format_markdown([header, *body])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", required=True, help="the CLIP the shards were embedded with")
    parser.add_argument("--prior", required=True)
    parser.add_argument("--decoder", required=True)
    parser.add_argument("--shards", required=True, help="embedded shapes shards (val)")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--scan", type=int, default=1000, help="samples read to find the pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="decoder sampling steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        pipe = UnclipPipeline.load(args.clip, args.decoder, args.prior, device=args.device)
        captions, true_emb = pair_subset(args.shards, args.pairs, args.scan)
        settings = {"guidance_scale": args.guidance_scale, "steps": args.steps}
        rows = layout_sources(pipe, captions, true_emb, args.seed, **settings)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
