"""Score checkpoints on a shard set: FID/KID/CLIP score/precision/recall of generated images and the
prior metric set, one row per stack, written to `eval.json` and `eval.md`.

    python -m unclip.sampling.evaluate --shards 'data/shapes_emb/val-*.tar' --out runs/eval \\
        runs/demo-prior_diffusion/checkpoints/last.ckpt runs/demo-prior_ar/checkpoints/last.ckpt \\
        runs/demo-decoder/checkpoints/last.ckpt [runs/demo-upsampler/checkpoints/last.ckpt]

Each checkpoint's stage is read from the checkpoint. Every prior is scored alone (the prior metric
set, for each `--weights` and `--prior-steps`) and, when a decoder is given, through every decoder
(then the upsamplers, in order); every decoder is also scored from the true image embeddings, the
ceiling a prior's stack is measured against.
The feature model is the shards' CLIP (meta.json) unless `--feature-model` names another.
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

from unclip.evaluation.features import load_features
from unclip.evaluation.generation import (
    EvalSettings,
    Evaluator,
    generate,
    read_subset,
    stage_role,
)
from unclip.evaluation.prior_metrics import PRIOR_METRICS, WEIGHTS, prior_metric_variants
from unclip.evaluation.tables import format_markdown

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("fid_clip", "kid_clip", "clip_score", "precision", "recall", "fid_inception")
# stacks report the prior metric set of the prior's samples as prior_*, priors alone plainly
TABLE_COLUMNS = (
    *IMAGE_COLUMNS,
    *(f"prior_{name}" for name in PRIOR_METRICS),
    *PRIOR_METRICS,
)


def load_stages(paths: Sequence[str], device: torch.device) -> dict[str, list[tuple[str, Any]]]:
    """{"prior": [(path, module)], "decoder": [...], "upsampler": [...]} from checkpoint files."""
    from unclip.training.module import load_module  # Lightning only when loading checkpoints

    stages: dict[str, list[tuple[str, Any]]] = {"prior": [], "decoder": [], "upsampler": []}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path!r}: no such file")
        module = load_module(path).to(device).eval()
        role = stage_role(module)
        if role is None:
            raise ValueError(
                f"checkpoint {path!r} holds a {type(module).__name__}: nothing to score"
            )
        stages[role].append((str(path), module))
    return stages


def label(path: str) -> str:
    """A short row label: the run folder of `runs/<run>/checkpoints/last.ckpt`, else the file."""
    p = Path(path)
    return p.parents[1].name if p.parent.name == "checkpoints" else p.name


def prior_rows(
    priors: list[tuple[str, Any]],
    subset: Any,
    steps: Sequence[int],
    weights: Sequence[str],
    batch_size: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The prior metric set of each prior alone, for every weights / steps variant."""
    rows = []
    for path, prior in priors:
        has_steps = hasattr(prior, "diffusion")  # a diffusion stage samples in steps; AR does not
        for which in weights:
            for count in list(steps) if has_steps and steps else [None]:

                def sample(count: int | None, which: str, prior: Any = prior) -> torch.Tensor:
                    generator = torch.Generator(device=prior.device).manual_seed(seed)
                    kwargs = {} if count is None else {"steps": int(count)}
                    parts = []
                    with prior.sampling_weights(which):
                        for start in range(0, len(subset), batch_size):
                            stop = start + batch_size
                            captions = subset.captions[start:stop]
                            txt = subset.txt_emb[start:stop].to(prior.device)
                            parts.append(prior.sample(captions, txt, generator=generator, **kwargs))
                    return torch.cat(parts).float().cpu()

                metrics = prior_metric_variants(
                    sample, subset.img_emb, subset.txt_emb, [(which, count)]
                )
                name = (
                    f"{label(path)} ({which}" + ("" if count is None else f", {count} steps") + ")"
                )
                plain = {k.rsplit("/", 1)[-1]: float(v) for k, v in metrics.items()}
                rows.append({"row": name, "checkpoints": {"prior": path}, "metrics": plain})
    return rows


def stack_rows(
    stages: dict[str, list[tuple[str, Any]]],
    subset: Any,
    evaluator: Evaluator,
    decoder_kwargs: dict[str, Any],
    prior_kwargs: dict[str, Any],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Image metrics of every prior (or the true z_i) through every decoder and the upsamplers."""
    rows = []
    upsamplers = [module for _, module in stages["upsampler"]]
    for decoder_path, decoder in stages["decoder"]:
        # the true image embeddings first: the decoder's own ceiling, beside each prior's stack
        for prior_path, prior in [(None, None), *stages["prior"]]:
            generated = generate(
                subset,
                lambda z, c, g, d=decoder: d.sample(z, c, generator=g, **decoder_kwargs),
                None
                if prior is None
                else lambda c, t, g, p=prior: p.sample(
                    c, t.to(device), generator=g, **prior_kwargs
                ),
                [lambda x, g, u=u: u.upsample(x, generator=g) for u in upsamplers],
                batch_size=batch_size,
                seed=seed,
                device=device,
            )
            metrics = evaluator.score(generated, subset)
            source = "true z_i" if prior_path is None else label(prior_path)
            rows.append(
                {
                    "row": f"{source} -> {label(decoder_path)}"
                    + "".join(f" -> {label(p)}" for p, _ in stages["upsampler"]),
                    "checkpoints": {
                        "prior": prior_path,
                        "decoder": decoder_path,
                        "upsamplers": [p for p, _ in stages["upsampler"]],
                    },
                    "metrics": metrics,
                }
            )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in TABLE_COLUMNS if any(c in r["metrics"] for r in rows)]
    table = [["run", *columns]]
    for row in rows:
        values = [row["metrics"].get(c) for c in columns]
        table.append([row["row"], *("-" if v is None else f"{v:.4f}" for v in values)])
    return format_markdown(table)


def evaluate_checkpoints(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    stages = load_stages(args.checkpoints, device)
    if not stages["prior"] and not stages["decoder"]:
        raise ValueError("give at least one prior or decoder checkpoint")
    if stages["upsampler"] and not stages["decoder"]:
        raise ValueError("upsampler checkpoints need a decoder checkpoint to upsample from")
    subset = read_subset(args.shards, args.num_samples, with_txt_emb=bool(stages["prior"]))
    settings = EvalSettings(
        shards=args.shards,
        reference_samples=args.reference_samples,
        kid_subset_size=args.kid_subset_size,
        feature_extractor_weights_path=args.feature_extractor_weights_path,
        cache_dir=args.cache_dir,
    )
    rows = prior_rows(
        stages["prior"], subset, args.prior_steps, args.weights, args.batch_size, args.seed
    )
    report: dict[str, Any] = {"shards": args.shards, "num_samples": len(subset)}
    if stages["decoder"]:
        features = load_features(args.feature_model, args.shards, device)
        last = (stages["upsampler"] or stages["decoder"])[-1][1]
        evaluator = Evaluator(features, settings, int(last.image_size))
        decoder_kwargs = {"steps": args.decoder_steps} if args.decoder_steps else {}
        prior_kwargs = {"steps": args.stack_prior_steps} if args.stack_prior_steps else {}
        rows += stack_rows(
            stages,
            subset,
            evaluator,
            decoder_kwargs,
            prior_kwargs,
            args.batch_size,
            args.seed,
            device,
        )
        report["reference"] = {
            "facts": evaluator.reference.facts,
            "path": str(evaluator.reference.path),
            "reused": evaluator.reference.reused,
        }
    report["rows"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "eval.md").write_text(table + "\n")
    print(table)
    print(f"\n{out / 'eval.json'}\n{out / 'eval.md'}")
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", help="prior / decoder / upsampler checkpoints")
    parser.add_argument("--shards", required=True, help="embedded validation shards")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.json and eval.md")
    parser.add_argument("--feature-model", default=None, help="CLIP spec (default: the shards')")
    parser.add_argument("--num-samples", type=int, default=256, help="captions generated")
    parser.add_argument("--reference-samples", type=int, default=1000, help="real images")
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--decoder-steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--stack-prior-steps", type=int, default=None, help="prior steps in stacks")
    parser.add_argument("--prior-steps", type=int, nargs="*", default=[], help="prior-alone rows")
    parser.add_argument("--weights", nargs="+", default=["ema"], choices=WEIGHTS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--feature-extractor-weights-path", default=None, help="Inception FID")
    parser.add_argument("--cache-dir", default=None, help="reference cache for read-only shards")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        evaluate_checkpoints(parse_args(argv))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
