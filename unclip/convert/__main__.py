"""python -m unclip.convert from-diffusers SRC --stage prior|decoder|upsampler --out CKPT [--clip SPEC]
python -m unclip.convert to-diffusers --prior P.ckpt --decoder D.ckpt --upsampler U.ckpt --out DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclip.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inward = commands.add_parser(
        "from-diffusers", help="a diffusers model or UnCLIPPipeline folder -> a unclip checkpoint"
    )
    inward.add_argument("source", help="save_pretrained folder of one model, or a pipeline folder")
    inward.add_argument("--stage", required=True, choices=("prior", "decoder", "upsampler"))
    inward.add_argument("--out", required=True, help="the unclip checkpoint to write (.ckpt)")
    inward.add_argument(
        "--clip",
        default=None,
        help="CLIP spec whose text tower the prior/decoder reads (Karlo: ViT-L-14:openai)",
    )
    inward.add_argument(
        "--text-proj", default=None, help="decoder from a model folder: the text_proj folder"
    )
    inward.add_argument(
        "--low-res-size",
        type=int,
        default=None,
        help="upsampler input size (default: the pipeline decoder's size, else 1/4 of the output)",
    )

    outward = commands.add_parser(
        "to-diffusers", help="unclip checkpoints -> a folder UnCLIPPipeline.from_pretrained loads"
    )
    outward.add_argument("--prior", required=True, help="diffusion prior checkpoint")
    outward.add_argument("--decoder", required=True, help="decoder checkpoint")
    outward.add_argument(
        "--upsampler",
        required=True,
        help="upsampler checkpoint (UnCLIPPipeline always runs one super-resolution stage)",
    )
    outward.add_argument(
        "--clip", default=None, help="CLIP spec of the text encoder (default: the prior's)"
    )
    outward.add_argument("--out", required=True, help="folder to write")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "from-diffusers":
            from unclip.convert.from_diffusers import convert

            path = convert(
                args.source,
                args.stage,
                args.out,
                clip=args.clip,
                text_proj=args.text_proj,
                low_res_size=args.low_res_size,
            )
        else:
            from unclip.convert.to_diffusers import export

            path = export(
                prior=args.prior,
                decoder=args.decoder,
                upsampler=args.upsampler,
                clip=args.clip,
                out=args.out,
            )
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {error}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
