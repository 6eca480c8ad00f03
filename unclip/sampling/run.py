"""The body of `sample.py`: a composed config in, a grid, PNGs and `run.json` out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from unclip.data.samples import read_embeddings
from unclip.images import captioned_grid, load_image, save_images, slug
from unclip.sampling import manipulations as manip
from unclip.sampling.latents import fit_pca
from unclip.sampling.pipeline import UnclipPipeline

log = logging.getLogger(__name__)

MODES = ("text", "variations", "interpolate", "text_diff", "pca", "reconstruct")
IMAGES_PER_MODE = {"variations": None, "interpolate": 2, "text_diff": None, "pca": None}


def read_captions(cfg: DictConfig) -> list[str]:
    """`captions_file` (one a line; blank and # lines skipped) when set, else `captions`."""
    if cfg.get("captions_file"):
        path = Path(cfg.captions_file)
        if not path.is_file():
            raise FileNotFoundError(f"captions_file={str(path)!r}: no such file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        captions = [line for line in lines if line and not line.startswith("#")]
        source = f"captions_file={str(path)!r}"
    else:
        captions = [str(c) for c in (cfg.get("captions") or [])]
        source = "captions"
    if not captions:
        raise ValueError(f"{source} holds no caption")
    return captions


def settings(node: DictConfig | dict | None) -> dict[str, Any]:
    """A stage's sampling keyword arguments: its config block without the checkpoint."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return {k: v for k, v in (plain or {}).items() if k != "checkpoint"}


def load_pipeline(cfg: DictConfig, with_prior: bool) -> UnclipPipeline:
    upsamplers = [node.checkpoint for node in cfg.get("upsamplers") or []]
    return UnclipPipeline.load(
        clip=cfg.clip.checkpoint,
        decoder=cfg.decoder.checkpoint,
        prior=cfg.prior.checkpoint if with_prior else None,
        upsamplers=upsamplers,
        device=cfg.device,
        ema=cfg.ema,
        channels_last=cfg.channels_last,
        compile=cfg.get("compile", False),
    )


def upsampler_settings(cfg: DictConfig) -> list[dict[str, Any]]:
    return [settings(node) for node in cfg.get("upsamplers") or []]


def resize_to(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Input images shown beside results at the results' resolution."""
    size = tuple(like.shape[-2:])
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(-1, 1)


class ModeRunner:
    """Runs one of sample.py's modes (text, variations, ...) over a pipeline and collects grid
    rows and per-image records (a CLI mode, not a diffusion sampler: see diffusion.samplers)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        self.pipe = load_pipeline(cfg, with_prior=self.mode == "text")
        self.generator = self.pipe.generator(cfg.seed)
        self.upsampler_kwargs = upsampler_settings(cfg)
        self.rows: list[torch.Tensor] = []
        self.labels: list[str] = []
        self.records: list[dict[str, Any]] = []

    def add_row(
        self, images: torch.Tensor, label: str, names: list[str], extra: list[dict]
    ) -> None:
        self.rows.append(images.cpu())
        self.labels.append(label)
        for name, info in zip(names, extra, strict=True):
            self.records.append({"file": f"images/{name}.png", **info})

    # ---- modes -------------------------------------------------------------------------------------
    def text(self) -> None:
        captions = read_captions(self.cfg)
        count = int(self.cfg.samples_per_caption)
        prior_kwargs = settings(self.cfg.prior.get(self.pipe.prior_kind))
        expanded = [c for c in captions for _ in range(count)]
        out = self.pipe.text_to_image(
            expanded,
            prior_kwargs,
            settings(self.cfg.decoder),
            self.upsampler_kwargs,
            self.generator,
            batch_size=int(self.cfg.batch_size),
            progress=bool(self.cfg.progress),
        )
        for i, caption in enumerate(captions):
            chunk = out.images[i * count : (i + 1) * count]
            names = image_names([caption], count, first=i)
            extra = [{"caption": caption, "sample": j} for j in range(count)]
            self.add_row(chunk, caption, names, extra)

    def _decoder_kwargs(self, eta: float, guidance: float | None = None) -> dict[str, Any]:
        kwargs = settings(self.cfg.decoder)
        kwargs.update(sampler="ddim", eta=float(eta))
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        return kwargs

    def _inverted_kwargs(self) -> dict[str, Any]:
        """DDIM eta=0 at the inversion's step count: the decoding that gives the image back."""
        kwargs = self._decoder_kwargs(0.0, self.cfg.inversion_guidance_scale)
        kwargs["steps"] = int(self.cfg.inversion_steps)
        return kwargs

    def input_images(self, needed: int | None) -> list[tuple[str, torch.Tensor]]:
        paths = [str(p) for p in self.cfg.get("images") or []]
        if not paths or (needed is not None and len(paths) != needed):
            want = f"exactly {needed}" if needed else "at least one"
            raise ValueError(f"mode={self.mode} needs {want} input image(s) in images=[...]")
        return [(p, load_image(p)) for p in paths]

    def variations(self) -> None:
        opts = self.cfg.variations
        for i, (path, image) in enumerate(self.input_images(None)):
            out = manip.variations(
                self.pipe,
                image.to(self.pipe.device),
                int(opts.count),
                decoder_kwargs=self._decoder_kwargs(opts.eta),
                upsampler_kwargs=self.upsampler_kwargs,
                generator=self.generator,
            )
            row = torch.cat([resize_to(image[None], out.images), out.images])
            names = [f"{i:03d}-input"] + [f"{i:03d}-variation-{j}" for j in range(len(out.images))]
            extra = [{"input": path, "variation": j} for j in range(-1, len(out.images))]
            save_images(row, self.images_dir, names)
            self.add_row(
                row, f"{Path(path).name}: input, then variations (eta={opts.eta})", names, extra
            )

    def interpolate(self) -> None:
        opts = self.cfg.interpolate
        (path_a, a), (path_b, b) = self.input_images(2)
        noise = str(opts.noise)
        out = manip.interpolate(
            self.pipe,
            a.to(self.pipe.device),
            b.to(self.pipe.device),
            list(opts.thetas),
            noise=noise,
            inversion_steps=int(self.cfg.inversion_steps),
            decoder_kwargs=self._inverted_kwargs()
            if noise != "random"
            else self._decoder_kwargs(0.0),
            upsampler_kwargs=self.upsampler_kwargs,
            generator=self.generator,
        )
        names = [f"theta-{float(t):.3f}" for t in opts.thetas]
        extra = [
            {"theta": float(t), "inputs": [path_a, path_b], "noise": noise} for t in opts.thetas
        ]
        save_images(out.images, self.images_dir, names)
        self.add_row(
            out.images, f"{Path(path_a).name} -> {Path(path_b).name} (x_T {noise})", names, extra
        )

    def text_diff(self) -> None:
        opts = self.cfg.text_diff
        for i, (path, image) in enumerate(self.input_images(None)):
            out = manip.text_diffs(
                self.pipe,
                image.to(self.pipe.device),
                str(opts.caption),
                str(opts.target),
                list(opts.thetas),
                inversion_steps=int(self.cfg.inversion_steps),
                decoder_kwargs=self._inverted_kwargs(),
                upsampler_kwargs=self.upsampler_kwargs,
            )
            names = [f"{i:03d}-theta-{float(t):.3f}" for t in opts.thetas]
            extra = [{"input": path, "theta": float(t)} for t in opts.thetas]
            save_images(out.images, self.images_dir, names)
            label = f"{Path(path).name}: '{opts.caption}' -> '{opts.target}'"
            self.add_row(out.images, label, names, extra)

    def pca(self) -> None:
        opts = self.cfg.pca
        embeddings = read_embeddings(opts.shards, "img_emb", int(opts.max_samples), "pca.shards")
        if embeddings.shape[1] != self.pipe.embed_dim:
            raise ValueError(
                f"pca.shards={opts.shards!r} holds {embeddings.shape[1]}-dim embeddings; "
                f"clip.checkpoint makes {self.pipe.embed_dim}-dim ones"
            )
        fitted = fit_pca(embeddings)
        ks = [min(int(k), fitted.dim) for k in opts.ks]
        for i, (path, image) in enumerate(self.input_images(None)):
            out = manip.pca_reconstructions(
                self.pipe,
                image.to(self.pipe.device),
                fitted,
                ks,
                renormalize=bool(opts.renormalize),
                inversion_steps=int(self.cfg.inversion_steps),
                decoder_kwargs=self._inverted_kwargs(),
                upsampler_kwargs=self.upsampler_kwargs,
            )
            names = [f"{i:03d}-k{k}" for k in ks]
            extra = [
                {"input": path, "k": k, "explained_variance": fitted.explained_variance(k)}
                for k in ks
            ]
            save_images(out.images, self.images_dir, names)
            self.add_row(out.images, f"{Path(path).name}: first k = {ks} PCA dims", names, extra)

    def reconstruct(self) -> None:
        loaded = self.input_images(None)
        images = torch.stack([image for _, image in loaded])
        out = manip.reconstruct(
            self.pipe,
            images,
            inversion_steps=int(self.cfg.inversion_steps),
            decoder_kwargs=self._inverted_kwargs(),
            upsampler_kwargs=self.upsampler_kwargs,
        )
        for i, (path, _) in enumerate(loaded):
            row = torch.cat([resize_to(images[i : i + 1], out.images), out.images[i : i + 1]])
            names = [f"{i:03d}-input", f"{i:03d}-reconstruction"]
            save_images(row, self.images_dir, names)
            extra = [
                {"input": path, "reconstruction": False},
                {"input": path, "reconstruction": True},
            ]
            self.add_row(row, f"{Path(path).name}: input, reconstruction", names, extra)

    # ---- driver ------------------------------------------------------------------------------------
    def run(self, out_dir: Path) -> dict[str, Any]:
        self.images_dir = out_dir / "images"
        started = time.perf_counter()
        getattr(self, self.mode)()
        if self.mode == "text":
            names = [Path(r["file"]).stem for r in self.records]
            save_images(torch.cat(self.rows), self.images_dir, names)
        grid_path = out_dir / "grid.png"
        captioned_grid(self.rows, self.labels).save(grid_path)
        return {
            "mode": self.mode,
            "seed": int(self.cfg.seed),
            "device": str(self.pipe.device),
            "checkpoints": self.pipe.paths,
            "ema": self.pipe.ema,
            "prior_kind": self.pipe.prior_kind,
            "grid": str(grid_path),
            "images": self.records,
            "seconds": round(time.perf_counter() - started, 2),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }


def save_run(sampler: ModeRunner, out_dir: Path) -> dict[str, Any]:
    """Run the sampler's mode into `out_dir` and write run.json beside the grid and images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = sampler.run(out_dir)
    (out_dir / "run.json").write_text(json.dumps(record, indent=2))
    log.info(
        "wrote %d images, %s and %s", len(record["images"]), record["grid"], out_dir / "run.json"
    )
    return record


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.mode`; writes grid.png, images/*.png and run.json to `cfg.out_dir`."""
    record = save_run(ModeRunner(cfg), Path(cfg.out_dir))
    print(f"grid: {record['grid']}")
    return record


def image_names(captions: Sequence[str], count: int, first: int = 0) -> list[str]:
    """`NNN-caption-slug-J` for sample J of caption NNN."""
    return [f"{i:03d}-{slug(c)}-{j}" for i, c in enumerate(captions, first) for j in range(count)]
