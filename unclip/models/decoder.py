"""The decoder stage: a diffusion model of 64x64 images (32x32 in the tiny demo) given their CLIP
image embedding and, optionally, their caption (paper section 2.1).

Training drops the image embedding 10% of the time and the caption 50% of the time (independently)
for classifier-free guidance; sampling runs the conditional and unconditional model as one doubled
batch and combines them with the guidance scale. Sampling and DDIM inversion (the bipartite latent of
the manipulations) use the EMA network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unclip.diffusion import classifier_free_guidance, is_guided, samplers
from unclip.models.captions import build_caption_encoder
from unclip.models.diffusion_stage import DiffusionStage, ModelFn
from unclip.nn.decoder_net import DecoderNet, DecoderNetConfig
from unclip.training.config_check import build_config

NO_CAPTION = ""

Conditioning = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class GuidanceDrops:
    """`model.guidance`: how often training drops each conditioning (classifier-free guidance)."""

    image_drop_prob: float = 0.1
    caption_drop_prob: float = 0.5

    def __post_init__(self) -> None:
        for key in ("image_drop_prob", "caption_drop_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(
                    f"model.guidance.{key} must be in [0, 1], got {getattr(self, key)}"
                )


@dataclass
class DecoderSampling:
    """`model.sampling` of the decoder, beside its sampler's settings (steps, eta, ...)."""

    sampler: str = "ddim"
    guidance_scale: float = 3.0
    # clip each step's x0 prediction to the image range [-1, 1]
    clip_denoised: bool = True


def guidance_drops(
    batch_size: int,
    image_drop_prob: float,
    caption_drop_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent Bernoulli masks [B] (True = dropped) for the image embedding and the caption."""
    draws = torch.rand(2, batch_size, generator=generator)
    return draws[0] < image_drop_prob, draws[1] < caption_drop_prob


@dataclass
class DecoderConfig:
    """The decoder's top-level `model.<key>` settings; conf/model/decoder*.yaml set them."""

    # size of the CLIP image embeddings (checked against the shards' meta.json)
    embed_dim: int
    # side of the generated images (paper: 64); the data must be resized to it (data.image_size)
    image_size: int
    name: str = "decoder"
    # seeds the timesteps and noise of the validation loss, so it is comparable across validations
    val_seed: int = 0
    # the UNet's convolution weights (and so its activations) in NHWC for training too: the
    # convolution kernels run faster on it (bench/unet_bench.py); equal results up to rounding
    channels_last: bool = True


class DecoderModule(DiffusionStage):
    """`settings`: DecoderConfig's keys. The blocks:

    net: DecoderNetConfig (unet, text, num_image_tokens, ...); the UNet's channels and size follow
    from the rest. diffusion: DiffusionConfig. guidance: GuidanceDrops.
    sampling: DecoderSampling plus the sampler's settings: the defaults of `sample`.
    """

    data_fields = ["image", "txt", "img_emb"]
    sampling_config = DecoderSampling
    config_groups: ClassVar[dict[str, type]] = {
        **DiffusionStage.config_groups,
        "net": DecoderNetConfig,
        "guidance": GuidanceDrops,
    }
    settings_config = DecoderConfig

    def __init__(
        self,
        net: dict | None = None,
        diffusion: dict | None = None,
        guidance: dict | None = None,
        sampling: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        **settings: Any,
    ) -> None:
        config = self.build_settings(settings)
        super().__init__(optim, ema, diffusion, sampling, config.val_seed)
        self.save_settings(config)
        self.name = config.name
        self.embed_dim = int(config.embed_dim)
        self.image_size = int(config.image_size)
        self.channels = 3
        self.guidance = build_config(GuidanceDrops, guidance, "model.guidance")
        net_config = build_config(DecoderNetConfig, net, "model.net")
        text = None
        if net_config.text is not None:
            text = build_caption_encoder(net_config.text, "model.net.text")
        out_channels = 2 * self.channels if self.diffusion.learned_variance else self.channels
        self.net = DecoderNet(
            self.embed_dim,
            net_config,
            caption_encoder=text,
            in_channels=self.channels,
            out_channels=out_channels,
            image_size=self.image_size,
        )
        self.use_channels_last(config.channels_last)
        self.init_ema()

    # ---- conditioning ---------------------------------------------------------------------------
    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.net.tokenize(list(captions)).to(self.device)

    def conditioning(
        self,
        net: DecoderNet,
        img_emb: torch.Tensor,
        captions: list[str],
        guidance_scale: float = 1.0,
        drop_image_embedding: bool = False,
    ) -> Conditioning:
        """The network's conditioning for sampling; with guidance (scale != 1) a doubled batch:
        the conditional half, then the unconditional half (null embedding, empty caption).
        `drop_image_embedding`: the conditional half gets the null embedding too (the caption
        alone, as trained under the guidance drops)."""
        img_emb = img_emb.to(self.device)
        batch = img_emb.shape[0]
        if not is_guided(guidance_scale):
            dropped = torch.ones(batch, dtype=torch.bool, device=self.device)
            return net.condition(
                img_emb, self._tokens(captions), dropped if drop_image_embedding else None
            )
        drop = torch.arange(2 * batch, device=self.device) >= (0 if drop_image_embedding else batch)
        tokens = self._tokens(list(captions) + [NO_CAPTION] * batch)
        return net.condition(img_emb.repeat(2, 1), tokens, drop)

    def model_fn(
        self, net: DecoderNet, conditioning: Conditioning, guidance_scale: float = 1.0
    ) -> ModelFn:
        """`model_fn(x_t, t)` for the diffusion samplers: one network call per step, guided when
        `conditioning` is a doubled batch from `conditioning(..., guidance_scale)`."""
        mean_channels = self.channels if self.diffusion.learned_variance else None
        return classifier_free_guidance(
            lambda x, t: net.denoise(x, t, conditioning), guidance_scale, mean_channels
        )

    # ---- training -------------------------------------------------------------------------------
    def conditioned(self, net: DecoderNet, batch: dict, drop: bool) -> tuple[ModelFn, torch.Tensor]:
        """(model_fn, x0) of a batch; `drop` applies the classifier-free guidance drops."""
        images, img_emb, captions = batch["image"], batch["img_emb"], list(batch["txt"])
        self.check_image_size(images, self.image_size)
        drop_image = None
        if drop:
            drop_image, drop_caption = guidance_drops(
                images.shape[0], self.guidance.image_drop_prob, self.guidance.caption_drop_prob
            )
            captions = [
                NO_CAPTION if dropped else caption
                for caption, dropped in zip(captions, drop_caption.tolist(), strict=True)
            ]
            drop_image = drop_image.to(self.device)
        tokens = self._tokens(captions)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x_t, t, img_emb, tokens, drop_image)

        return model_fn, images

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.diffusion.training_losses(*self.conditioned(self.net, batch, drop=True))
        size = batch["image"].shape[0]
        loss = out["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/mse", out["mse"].mean(), batch_size=size)
        if "vb" in out:
            self.log("train/vb", out["vb"].mean(), batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The conditional loss of the EMA network at seeded timesteps and noise."""
        model_fn, images = self.conditioned(self.eval_net, batch, drop=False)
        out = self.seeded_losses(model_fn, images, self.val_generator(batch_idx))
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
        progress: bool = False,
        drop_image_embedding: bool = False,
        **settings: Any,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] for image embeddings [B, D] and captions ("" = none).
        `settings` (guidance_scale, clip_denoised, sampler, steps, eta, ...) override
        `model.sampling` for this call; `noise` fixes x_T; `drop_image_embedding` samples from
        the caption alone."""
        s = self.sampling_settings(**settings)
        if len(captions) != img_emb.shape[0]:
            raise ValueError(f"{len(captions)} captions for {img_emb.shape[0]} image embeddings")
        net = self.eval_net
        scale = float(s["guidance_scale"])
        conditioning = self.conditioning(net, img_emb, captions, scale, drop_image_embedding)
        shape = (img_emb.shape[0], self.channels, self.image_size, self.image_size)
        images = self.run_sampler(
            self.model_fn(net, conditioning, scale),
            shape,
            s,
            noise=noise,
            generator=generator,
            clip_denoised=(-1.0, 1.0) if s["clip_denoised"] else None,
            progress=progress,
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
        self.check_image_size(images, self.image_size)
        net = self.eval_net
        conditioning = self.conditioning(net, img_emb, captions, guidance_scale)
        model_fn = self.model_fn(net, conditioning, guidance_scale)
        return samplers.ddim_invert(self.diffusion, model_fn, images.to(self.device), int(steps))

    @torch.no_grad()
    def sample_grid_images(
        self, batch: dict, n: int, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(samples, ground truth, captions) for the first `n` items of a validation batch, drawn
        with the `model.sampling` settings from fixed noise."""
        n = min(int(n), batch["image"].shape[0])
        generator = self.generator(self.val_seed if seed is None else seed)
        captions = list(batch["txt"][:n])
        samples = self.sample(batch["img_emb"][:n], captions, generator=generator)
        return samples, batch["image"][:n], captions
