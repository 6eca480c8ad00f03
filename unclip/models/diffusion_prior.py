"""The diffusion prior stage: P(z_i | caption, z_t), trained on embedded shards (no pixels).

As in the paper: a Gaussian diffusion over the (normalised) CLIP image embedding whose network
predicts the unnoised embedding (x0, MSE loss); text conditioning dropped 10% of the time for
classifier-free guidance; at sampling, strided steps, then the best of N samples by dot product
with z_t. Validation and sampling use the EMA weights; outputs are in CLIP space.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unclip.diffusion import DiffusionConfig, classifier_free_guidance, is_guided
from unclip.evaluation.prior_metrics import prior_metrics
from unclip.models.captions import build_caption_encoder
from unclip.models.diffusion_stage import DiffusionStage
from unclip.models.embedding_norm import EmbeddingNorm, EmbeddingNormConfig
from unclip.models.prior_variants import ValVariants, log_prior_variants, variants_config
from unclip.models.selection import best_by_dot_product
from unclip.nn.caption_encoder import CaptionEncoderConfig
from unclip.nn.diffusion_prior_net import DiffusionPriorNet, DiffusionPriorNetConfig
from unclip.nn.transformer import Prefix
from unclip.nn.unit_norm import unit_norm
from unclip.training.config_check import ConfigError, build_config

log = logging.getLogger(__name__)

__all__ = [
    "DiffusionPriorConfig",
    "DiffusionPriorModule",
    "DiffusionPriorSampling",
    "best_by_dot_product",
]


@dataclass
class DiffusionPriorSampling:
    """`model.sampling` of the diffusion prior, beside its sampler's settings (steps, eta, ...):
    the defaults of `sample` and of the validation samples."""

    sampler: str = "ddpm"
    guidance_scale: float = 2.0
    # draw this many per caption, keep the one with the highest dot product with z_t (paper: 2)
    best_of: int = 2
    # clamp the predicted x0 to +-clip_x0 in the normalised space (None: no clamp; Karlo 10,
    # diffusers' scheduler 5)
    clip_x0: float | None = None

    def __post_init__(self) -> None:
        if int(self.best_of) < 1:
            raise ValueError(f"best_of must be at least 1, got {self.best_of}")
        if self.clip_x0 is not None and float(self.clip_x0) <= 0:
            raise ValueError(f"clip_x0 must be positive or null, got {self.clip_x0}")


# how z_t reaches the network: on the sphere of radius sqrt(d), or as the shards hold it (Karlo)
TEXT_EMBEDDINGS = ("sphere", "raw")
# the unconditional input of guidance: learned null tokens, or the CLIP encoding of the empty
# caption (Karlo, diffusers' UnCLIPPipeline; needs text_encoder.mode=clip)
NULL_CONDITIONS = ("learned", "empty_caption")
NO_CAPTION = ""


@dataclass
class DiffusionPriorConfig:
    """The diffusion prior's top-level `model.<key>` settings (the paper's values);
    conf/model/prior_diffusion*.yaml override them."""

    # CLIP embedding size (checked against the shards' meta.json at start-up)
    embed_dim: int
    name: str = "prior_diffusion"
    # how often the caption and z_t are replaced by learned nulls in training (paper: 10%)
    text_drop_prob: float = 0.1
    # L2-normalise sampled embeddings, like the embed tool's shards
    unit_norm_output: bool = True
    # seed of the validation noise, so validation metrics are comparable across steps
    val_seed: int = 0
    # sphere: z_t rescaled to radius sqrt(d); raw: as the shards hold it (Karlo)
    text_embedding: str = "sphere"
    # the unconditional input of guidance and the training drops: learned nulls, or
    # empty_caption (CLIP's encoding of "": caption states and text embedding; Karlo, needs
    # text_encoder.mode=clip)
    null_condition: str = "learned"

    def __post_init__(self) -> None:
        if self.text_embedding not in TEXT_EMBEDDINGS:
            raise ConfigError(
                f"model.text_embedding={self.text_embedding!r}: choose one of {TEXT_EMBEDDINGS}"
            )
        if self.null_condition not in NULL_CONDITIONS:
            raise ConfigError(
                f"model.null_condition={self.null_condition!r}: choose one of {NULL_CONDITIONS}"
            )
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if not 0.0 <= self.text_drop_prob < 1.0:
            raise ConfigError(f"model.text_drop_prob must be in [0, 1), got {self.text_drop_prob}")


class DiffusionPriorModule(DiffusionStage):
    """`settings`: DiffusionPriorConfig's keys. The blocks:

    net: DiffusionPriorNetConfig. text_encoder: CaptionEncoderConfig, mode "own" (trained with
        the prior) or "clip" (frozen token states of the CLIP named by `clip`, a load_clip spec).
    diffusion: schedule, num_timesteps, loss weighting (the prediction is always x0, as in the
        paper). normalization: EmbeddingNormConfig, kind "standardize" (per-dimension statistics
        of the first `max_samples` training embeddings, fitted once and saved in the checkpoint)
        or "l2" (z/|z| * sqrt(d)).
    sampling: DiffusionPriorSampling plus the sampler's settings.
    val_variants: {steps: [...], weights: [ema, online]}: the validation metric set again at these
        sampling step counts for these weights (first validation batch), `val/ema/steps16/cosine`.
    """

    data_fields = ["txt", "img_emb", "txt_emb"]
    sampling_config = DiffusionPriorSampling
    config_groups: ClassVar[dict[str, type]] = {
        **DiffusionStage.config_groups,
        "net": DiffusionPriorNetConfig,
        "text_encoder": CaptionEncoderConfig,
        "normalization": EmbeddingNormConfig,
        "val_variants": ValVariants,
    }
    settings_config = DiffusionPriorConfig

    def __init__(
        self,
        net: dict | None = None,
        text_encoder: dict | None = None,
        diffusion: dict | None = None,
        normalization: dict | None = None,
        sampling: dict | None = None,
        val_variants: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        **settings: Any,
    ) -> None:
        config = self.build_settings(settings)
        super().__init__(optim, ema, diffusion, sampling, config.val_seed)
        self.save_settings(config)
        self.val_variants = variants_config(val_variants, has_steps=True)
        self.text_embedding = config.text_embedding
        self.null_condition = config.null_condition
        self.name = config.name
        self.embed_dim = int(config.embed_dim)
        self.text_drop_prob = float(config.text_drop_prob)
        self.unit_norm_output = bool(config.unit_norm_output)
        norm_cfg = build_config(EmbeddingNormConfig, normalization, "model.normalization")
        self.stats_samples = int(norm_cfg.max_samples)
        self.embedding_norm = EmbeddingNorm(norm_cfg.kind, self.embed_dim, norm_cfg.eps)
        self.net = DiffusionPriorNet(
            self.embed_dim,
            build_config(DiffusionPriorNetConfig, net, "model.net"),
            caption_encoder=build_caption_encoder(text_encoder, "model.text_encoder"),
        )
        if self.null_condition == "empty_caption" and self.net.caption_encoder.clip_model is None:
            raise ValueError(
                "model.null_condition=empty_caption encodes the empty caption with the CLIP: "
                "set model.text_encoder.mode=clip"
            )
        self.init_ema()

    @classmethod
    def diffusion_config(cls, given: dict | None) -> DiffusionConfig:
        """The paper's prior predicts x0 with a fixed variance: those two are not settings."""
        fixed = sorted({"prediction", "learned_variance"} & set(given or {}))
        if fixed:
            raise ConfigError(
                f"model.diffusion.{fixed[0]}: the diffusion prior predicts x0 with a fixed "
                "variance (paper); remove it"
            )
        config = build_config(DiffusionConfig, given, "model.diffusion")
        return dataclasses.replace(config, prediction="x0", learned_variance=False)

    # ---- embedding statistics ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Fit the standardisation statistics once, before the first step. Lightning restores a
        checkpoint after `setup()` but before this hook, so a resumed run finds them fitted (they
        are buffers in the state dict) and never refits."""
        if not self.embedding_norm.needs_fit:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "stats_dataloader"):
            raise ValueError(
                "model.normalization.kind=standardize fits statistics on the training shards and "
                "needs a datamodule with stats_dataloader(); use kind=l2 otherwise"
            )
        loader = datamodule.stats_dataloader(self.stats_samples)
        embeddings = torch.cat([batch["img_emb"].float() for batch in loader])
        self.embedding_norm.fit(embeddings.to(self.device))
        log.info("fitted embedding statistics on %d training samples", len(embeddings))

    # ---- shared pieces -------------------------------------------------------------------------
    def text_condition(self, txt_emb: torch.Tensor) -> torch.Tensor:
        """z_t as the network sees it: on the sphere of radius sqrt(d), whatever the shards hold
        (text_embedding=sphere), or as given (raw)."""
        if self.text_embedding == "raw":
            return txt_emb.float()
        return unit_norm(txt_emb.float()) * math.sqrt(self.embed_dim)

    def empty_caption_embedding(self, batch_size: int) -> torch.Tensor:
        """[B, D] CLIP text embedding of the empty caption (null_condition=empty_caption)."""
        encoder = self.net.caption_encoder
        tokens = encoder.tokenize([NO_CAPTION]).to(self.device)
        return encoder.clip_text_embedding(tokens).float().expand(batch_size, -1)

    def with_empty_captions(
        self, captions: list[str], txt_emb: torch.Tensor, drop: torch.Tensor
    ) -> tuple[list[str], torch.Tensor]:
        """Dropped samples' captions and z_t replaced by the empty caption's (Karlo's null)."""
        captions = [NO_CAPTION if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        null = self.empty_caption_embedding(len(captions)).to(txt_emb.dtype)
        return captions, torch.where(drop[:, None], null, txt_emb)

    def unconditional_prefix(self, net: torch.nn.Module, batch_size: int) -> Prefix:
        """The prefix of guidance's unconditional half."""
        if self.null_condition == "learned":
            return net.null_condition(batch_size, self.device)
        null = self.text_condition(self.empty_caption_embedding(batch_size))
        return net.condition(self.tokenize([NO_CAPTION] * batch_size), null)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Caption tokens without the padding every caption of the batch has (exact, and cheaper)."""
        encoder = self.net.caption_encoder
        return encoder.trim(encoder.tokenize(captions)).to(self.device)

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = self.embedding_norm.normalize(batch["img_emb"].float())
        captions, txt_emb = list(batch["txt"]), batch["txt_emb"].float()
        drop = torch.rand(len(x0), device=self.device) < self.text_drop_prob
        if self.null_condition == "empty_caption":
            captions, txt_emb = self.with_empty_captions(captions, txt_emb.to(self.device), drop)
            drop = None
        tokens = self.tokenize(captions)
        txt = self.text_condition(txt_emb)
        losses = self.diffusion.training_losses(
            lambda x_t, t: self.net(x_t, t, tokens, txt, drop), x0
        )
        loss = losses["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = self.val_generator(batch_idx)
        x0 = self.embedding_norm.normalize(batch["img_emb"].float().to(self.device))
        size = len(x0)
        tokens = self.tokenize(batch["txt"])
        txt = self.text_condition(batch["txt_emb"])
        net = self.eval_net
        losses = self.seeded_losses(lambda x_t, t_: net(x_t, t_, tokens, txt), x0, generator)
        self.log("val/loss", losses["loss"].mean(), batch_size=size, sync_dist=True, prog_bar=True)
        sampled = self.sample(batch["txt"], batch["txt_emb"], generator=generator)
        metrics = prior_metrics(sampled, batch["img_emb"], batch["txt_emb"])
        for key, value in metrics.items():
            self.log(f"val/{key}", value, batch_size=size, sync_dist=True, prog_bar=key == "cosine")
        log_prior_variants(
            self,
            batch,
            batch_idx,
            lambda captions, txt_emb, steps: self.sample(
                captions, txt_emb, self.val_generator(0), steps=steps
            ),
        )

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        txt_emb: torch.Tensor,
        generator: torch.Generator | None = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Image embeddings [B, D] in CLIP space for captions and their CLIP text embeddings.

        `settings` (guidance_scale, best_of, sampler, steps, eta, ...) override `model.sampling`
        for this call; None leaves a setting at its configured value. Draws `best_of` samples per
        caption and keeps the one with the highest dot product with z_t.
        """
        s = self.sampling_settings(**settings)
        if len(captions) != len(txt_emb):
            raise ValueError(f"{len(captions)} captions but {len(txt_emb)} text embeddings")
        net = self.eval_net
        n, scale = int(s["best_of"]), float(s["guidance_scale"])
        txt_emb = txt_emb.to(self.device).float()
        prefix = net.condition(self.tokenize(list(captions)), self.text_condition(txt_emb))
        prefix = prefix.repeat_interleave(n)
        rows = len(prefix)
        if is_guided(scale):
            prefix = Prefix.cat([prefix, self.unconditional_prefix(net, rows)])
        model_fn = classifier_free_guidance(net.cache(prefix).denoise, scale)
        clip = None if s["clip_x0"] is None else (-float(s["clip_x0"]), float(s["clip_x0"]))
        x0 = self.run_sampler(
            model_fn, (rows, self.embed_dim), s, generator=generator, clip_denoised=clip
        )
        z = self.embedding_norm.denormalize(x0)
        if self.unit_norm_output:
            z = unit_norm(z)
        return best_by_dot_product(z.view(len(captions), n, -1), txt_emb)
