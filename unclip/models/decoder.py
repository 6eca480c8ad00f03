"""The decoder stage: a diffusion model of 64x64 images (32x32 in the tiny demo) given their CLIP
image embedding and, optionally, their caption (paper section 2.1).

Training drops the image embedding 10% of the time and the caption 50% of the time (independently)
for classifier-free guidance; sampling runs the conditional and unconditional model as one doubled
batch and combines them with the guidance scale. Sampling and DDIM inversion (the bipartite latent of
the manipulations) use the EMA network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unclip.diffusion import SAMPLERS, GaussianDiffusion, guide
from unclip.models.config_keys import check_keys
from unclip.nn.decoder_net import DecoderNet
from unclip.training.module import UnclipModule

NO_CAPTION = ""
# UNet arguments the module sets itself: image size and channels follow from the rest of the config
UNET_OWNED_KEYS = ("in_channels", "out_channels", "image_size")
DEFAULT_GUIDANCE: dict[str, float] = {"image_drop_prob": 0.1, "caption_drop_prob": 0.5}
DEFAULT_SAMPLING: dict[str, Any] = {
    "guidance_scale": 3.0,
    "steps": 50,
    "sampler": "ddim",
    "eta": 0.0,
    "clip_denoised": True,
}

Conditioning = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def guidance_drops(
    batch_size: int,
    image_drop_prob: float,
    caption_drop_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent Bernoulli masks [B] (True = dropped) for the image embedding and the caption."""
    draws = torch.rand(2, batch_size, generator=generator)
    return draws[0] < image_drop_prob, draws[1] < caption_drop_prob


class DecoderModule(UnclipModule):
    """Every argument is a `model.*` config key.

    embed_dim: size of the CLIP image embeddings (checked against the shards' meta.json).
    image_size: side of the generated images; the data must be resized to it (data.image_size).
    net: `DecoderNet` arguments (unet, text, num_image_tokens, ...), without embed_dim.
    diffusion: `GaussianDiffusion` arguments. guidance: image_drop_prob, caption_drop_prob.
    sampling: the defaults of `sample` (guidance_scale, steps, sampler, eta, clip_denoised).
    val_seed: seeds the timesteps and noise of the validation loss, so it is comparable across
    validations.
    """

    data_fields = ["image", "txt", "img_emb"]

    def __init__(
        self,
        name: str = "decoder",
        embed_dim: int = 64,
        image_size: int = 64,
        net: dict | None = None,
        diffusion: dict | None = None,
        guidance: dict | None = None,
        sampling: dict | None = None,
        val_seed: int = 0,
        optim: dict | None = None,
        ema: dict | None = None,
    ) -> None:
        super().__init__(optim, ema)
        self.save_hyperparameters()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.image_size = int(image_size)
        self.channels = 3
        self.val_seed = int(val_seed)
        check_keys(guidance or {}, set(DEFAULT_GUIDANCE), "model.guidance")
        self.guidance = {**DEFAULT_GUIDANCE, **(guidance or {})}
        for key, value in self.guidance.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.guidance.{key} must be in [0, 1], got {value}")
        self.sampling = self._check_sampling({**DEFAULT_SAMPLING, **(sampling or {})})
        self.diffusion = GaussianDiffusion(**(diffusion or {}))
        self.net = DecoderNet(self.embed_dim, **self._net_args(net or {}))
        self.init_ema()

    # ---- construction ---------------------------------------------------------------------------
    def _net_args(self, net: dict) -> dict:
        net = dict(net)
        unet = dict(net.pop("unet", None) or {})
        owned = sorted(set(unet) & set(UNET_OWNED_KEYS))
        if owned:
            raise ValueError(f"model.net.unet.{owned[0]} is set by the decoder itself; remove it")
        out_channels = 2 * self.channels if self.diffusion.learned_variance else self.channels
        unet.update(
            in_channels=self.channels, out_channels=out_channels, image_size=self.image_size
        )
        return {**net, "unet": unet}

    @staticmethod
    def _check_sampling(sampling: dict) -> dict:
        check_keys(sampling, set(DEFAULT_SAMPLING), "model.sampling")
        if sampling["sampler"] not in SAMPLERS:
            raise ValueError(
                f"model.sampling.sampler={sampling['sampler']!r}: choose one of {SAMPLERS}"
            )
        return sampling

    # ---- conditioning ---------------------------------------------------------------------------
    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.net.tokenize(list(captions)).to(self.device)

    def _check_images(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"batch images are {tuple(images.shape[-2:])} but model.image_size="
                f"{self.image_size}: set data.image_size={self.image_size}"
            )

    def conditioning(
        self,
        net: DecoderNet,
        img_emb: torch.Tensor,
        captions: list[str],
        guidance_scale: float = 1.0,
    ) -> Conditioning:
        """The network's conditioning for sampling; with guidance (scale != 1) a doubled batch:
        the conditional half, then the unconditional half (null embedding, empty caption)."""
        img_emb = img_emb.to(self.device)
        if guidance_scale == 1.0:
            return net.condition(img_emb, self._tokens(captions))
        batch = img_emb.shape[0]
        drop = torch.arange(2 * batch, device=self.device) >= batch
        tokens = self._tokens(list(captions) + [NO_CAPTION] * batch)
        return net.condition(img_emb.repeat(2, 1), tokens, drop)

    def model_fn(
        self, net: DecoderNet, conditioning: Conditioning, guidance_scale: float = 1.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`model_fn(x_t, t)` for the diffusion samplers: one network call per step, guided when
        `conditioning` is a doubled batch from `conditioning(..., guidance_scale)`."""
        if guidance_scale == 1.0:
            return lambda x, t: net.denoise(x, t, conditioning)
        mean_channels = self.channels if self.diffusion.learned_variance else None

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = net.denoise(torch.cat([x, x]), torch.cat([t, t]), conditioning)
            cond, uncond = out.chunk(2)
            return guide(cond, uncond, guidance_scale, mean_channels)

        return guided

    # ---- training -------------------------------------------------------------------------------
    def forward_losses(
        self,
        net: DecoderNet,
        batch: dict,
        drop: bool,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        images, img_emb, captions = batch["image"], batch["img_emb"], list(batch["txt"])
        self._check_images(images)
        size = images.shape[0]
        drop_image = None
        if drop:
            drop_image, drop_caption = guidance_drops(
                size,
                self.guidance["image_drop_prob"],
                self.guidance["caption_drop_prob"],
                generator,
            )
            captions = [
                NO_CAPTION if dropped else caption
                for caption, dropped in zip(captions, drop_caption.tolist(), strict=True)
            ]
            drop_image = drop_image.to(self.device)
        tokens = self._tokens(captions)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x_t, t, img_emb, tokens, drop_image)

        t = noise = None
        if generator is not None:
            t = self.diffusion.sample_timesteps(size, self.device, generator)
            noise = torch.randn(images.shape, generator=generator).to(images)
        return self.diffusion.training_losses(model_fn, images, t, noise)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.forward_losses(self.net, batch, drop=True)
        size = batch["image"].shape[0]
        loss = out["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/mse", out["mse"].mean(), batch_size=size)
        if "vb" in out:
            self.log("train/vb", out["vb"].mean(), batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The conditional loss of the EMA network at fixed timesteps and noise."""
        generator = torch.Generator().manual_seed(self.val_seed + batch_idx)
        out = self.forward_losses(self.eval_net, batch, drop=False, generator=generator)
        size = batch["image"].shape[0]
        self.log("val/loss", out["loss"].mean(), batch_size=size, sync_dist=True, prog_bar=True)
        self.log("val/mse", out["mse"].mean(), batch_size=size, sync_dist=True)

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        img_emb: torch.Tensor,
        captions: list[str],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        clip_denoised: bool | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] for image embeddings [B, D] and captions ("" = none).
        Unset arguments take the `model.sampling` defaults; `noise` fixes x_T."""
        given = {
            "guidance_scale": guidance_scale,
            "steps": steps,
            "sampler": sampler,
            "eta": eta,
            "clip_denoised": clip_denoised,
        }
        settings = self._check_sampling(
            {**self.sampling, **{k: v for k, v in given.items() if v is not None}}
        )
        if len(captions) != img_emb.shape[0]:
            raise ValueError(f"{len(captions)} captions for {img_emb.shape[0]} image embeddings")
        net = self.eval_net
        scale = float(settings["guidance_scale"])
        conditioning = self.conditioning(net, img_emb, captions, scale)
        shape = (img_emb.shape[0], self.channels, self.image_size, self.image_size)
        images = self.diffusion.sample(
            self.model_fn(net, conditioning, scale),
            shape,
            steps=int(settings["steps"]),
            sampler=settings["sampler"],
            eta=float(settings["eta"]),
            noise=noise,
            generator=generator,
            clip_denoised=(-1.0, 1.0) if settings["clip_denoised"] else None,
            progress=progress,
            device=self.device,
        )
        return images.clamp(-1, 1)

    @torch.no_grad()
    def invert(
        self,
        images: torch.Tensor,
        img_emb: torch.Tensor,
        captions: list[str],
        steps: int,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """x_T of the bipartite latent (z_i, x_T): deterministic DDIM run forwards from the images
        [B, 3, H, W] in [-1, 1], conditioned on their embeddings; `sample(..., noise=x_T,
        sampler="ddim", eta=0, steps=steps, guidance_scale=guidance_scale)` gives them back."""
        self._check_images(images)
        net = self.eval_net
        conditioning = self.conditioning(net, img_emb, captions, guidance_scale)
        model_fn = self.model_fn(net, conditioning, guidance_scale)
        return self.diffusion.ddim_invert(model_fn, images.to(self.device), steps=int(steps))

    @torch.no_grad()
    def sample_grid_images(
        self, batch: dict, n: int, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(samples, ground truth, captions) for the first `n` items of a validation batch, drawn
        with the `model.sampling` settings from fixed noise."""
        n = min(int(n), batch["image"].shape[0])
        generator = torch.Generator().manual_seed(self.val_seed if seed is None else seed)
        captions = list(batch["txt"][:n])
        samples = self.sample(batch["img_emb"][:n], captions, generator=generator)
        return samples, batch["image"][:n], captions
