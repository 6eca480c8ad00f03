"""The autoregressive prior stage: captions and z_t in, CLIP image embeddings z_i out.

z_i is turned into a sequence of codes by `EmbeddingTokenizer` (PCA, then quantile buckets per
component) and `ARPriorNet` predicts the codes with cross-entropy, conditioned on the caption, z_t
and the quantised dot product z_i . z_t (paper, section 2.2). At sampling the dot product is drawn
from the top half of its training distribution and the codes are decoded back to CLIP space.

The tokenizer is fitted once, on the first `fit_samples` training samples, and lives in the
checkpoint: a resumed run or a loaded checkpoint never refits it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from unclip.diffusion import guide_halves, is_guided
from unclip.evaluation.prior_metrics import prior_metrics
from unclip.models.ar_prior_tokenizer import EmbeddingTokenizer
from unclip.models.captions import build_caption_encoder
from unclip.models.prior_variants import ValVariants, log_prior_variants, variants_config
from unclip.models.selection import best_by_dot_product
from unclip.nn.ar_prior_net import ARPriorNet, ARPriorNetConfig
from unclip.nn.caption_encoder import CaptionEncoderConfig
from unclip.training.config_check import ConfigError, build_config
from unclip.training.module import UnclipModule

log = logging.getLogger(__name__)


@dataclass
class ARPriorSampling:
    """`model.sampling` of the AR prior: the defaults of `sample` and of validation."""

    # 1: the plain conditional model (the configs guide at 2)
    guidance_scale: float = 1.0
    temperature: float = 1.0
    # None or 0: no top-k filtering
    top_k: int | None = None
    # None or 1.0: no nucleus filtering
    top_p: float | None = None
    # the training quantiles the dot-product token is drawn from (paper: the top half)
    dot_quantiles: tuple[float, float] = (0.5, 1.0)
    # samples per caption; the one closest to z_t is kept
    best_of: int = 1

    def __post_init__(self) -> None:
        if int(self.best_of) < 1:
            raise ValueError(f"best_of must be at least 1, got {self.best_of}")


@dataclass
class ARPriorConfig:
    """The AR prior's top-level `model.<key>` settings; defaults are the paper's where it gives
    them (appendix C), and conf/model/prior_ar.yaml overrides them for the tiny CPU demo."""

    # CLIP embedding size; must match the shards' meta.json
    embed_dim: int
    name: str = "prior_ar"
    # the tokenizer, fitted once on the first `fit_samples` training samples and kept in the
    # checkpoint: principal components kept (paper: 319 of 1024, under 1% reconstruction error)
    num_components: int = 319
    # quantile buckets per component (paper: 1024)
    num_buckets: int = 1024
    # quantile buckets of the dot product z_i . z_t (the paper does not say how many)
    dot_buckets: int = 16
    fit_samples: int = 10_000
    # classifier-free guidance: the caption, z_t and dot product are dropped together this often
    text_drop_prob: float = 0.1
    # validation batches that are sampled for val/cosine, val/retrieval_acc (None: all)
    val_sample_batches: int | None = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.text_drop_prob < 1.0:
            raise ConfigError(f"model.text_drop_prob must be in [0, 1), got {self.text_drop_prob}")
        if self.fit_samples < 1:
            raise ConfigError(f"model.fit_samples must be at least 1, got {self.fit_samples}")


class ARPriorModule(UnclipModule):
    """`settings`: ARPriorConfig's keys; the blocks fill `config_groups`' dataclasses
    (conf/model/prior_ar.yaml documents them)."""

    data_fields = ["txt", "img_emb", "txt_emb"]
    config_groups: ClassVar[dict[str, type]] = {
        **UnclipModule.config_groups,
        "net": ARPriorNetConfig,
        "text_encoder": CaptionEncoderConfig,
        "sampling": ARPriorSampling,
        "val_variants": ValVariants,
    }
    settings_config = ARPriorConfig

    def __init__(
        self,
        net: dict | None = None,
        text_encoder: dict | None = None,
        sampling: dict | None = None,
        val_variants: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(optim, ema)
        config = self.build_settings(settings)
        self.save_settings(config)
        self.name = config.name
        self.embed_dim = config.embed_dim
        self.fit_samples = config.fit_samples
        self.text_drop_prob = config.text_drop_prob
        self.val_variants = variants_config(val_variants, has_steps=False)
        self.sampling = build_config(ARPriorSampling, sampling, "model.sampling")
        self.val_sample_batches = config.val_sample_batches
        codes = (config.num_components, config.num_buckets, config.dot_buckets)
        self.tokenizer = EmbeddingTokenizer(config.embed_dim, *codes)
        self.net = ARPriorNet(
            config.embed_dim,
            *codes,
            build_config(ARPriorNetConfig, net, "model.net"),
            caption_encoder=build_caption_encoder(text_encoder, "model.text_encoder"),
        )
        self.tokenizer_report: dict[str, float] = {}
        self.init_ema()

    # ---- the tokenizer fit ---------------------------------------------------------------------
    # Lightning calls setup() *before* it restores a checkpoint, so a resumed run cannot tell there
    # that its tokenizer is about to be restored. These hooks run after the restore under every
    # strategy (FSDP restores after on_fit_start) and before anything encodes: the sanity-check
    # validation, or the first training batch.
    def on_validation_start(self) -> None:
        self.fit_tokenizer_once()

    def on_train_start(self) -> None:
        self.fit_tokenizer_once()

    def fit_tokenizer_once(self) -> None:
        """Fit the tokenizer on the datamodule's `stats_dataloader`, unless it is already fitted
        (restored from a checkpoint, or fitted earlier in this run)."""
        if bool(self.tokenizer.fitted):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "stats_dataloader"):
            raise RuntimeError(
                "the AR prior fits its tokenizer on the datamodule's stats_dataloader(): train it "
                "with a ShardDataModule, or load a checkpoint that holds a fitted tokenizer"
            )
        img, txt = [], []
        loader = datamodule.stats_dataloader(self.fit_samples)
        progress = tqdm(
            loader, desc="fitting the AR prior's tokenizer", disable=not self.trainer.is_global_zero
        )
        for batch in progress:
            img.append(batch["img_emb"].float())
            txt.append(batch["txt_emb"].float())
        meta = getattr(datamodule, "meta", None) or {}
        self.tokenizer_report = self.tokenizer.fit(
            torch.cat(img), torch.cat(txt), normalized=meta.get("normalized")
        )
        log.info(
            "AR prior tokenizer fitted on %d embeddings: %s",
            sum(len(x) for x in img),
            ", ".join(f"{k}={v:.4f}" for k, v in self.tokenizer_report.items()),
        )
        for logger in self.loggers:
            logger.log_metrics(
                {f"tokenizer/{k}": v for k, v in self.tokenizer_report.items()},
                step=self.global_step,
            )

    # ---- training and validation ---------------------------------------------------------------
    def _targets(self, batch: dict) -> tuple[torch.Tensor, ...]:
        img_emb, txt_emb = batch["img_emb"].float(), batch["txt_emb"].float()
        tokens = self.net.caption_encoder.tokenize(batch["txt"]).to(self.device)
        codes = self.tokenizer.encode(img_emb)
        dot_codes = self.tokenizer.encode_dot(img_emb, txt_emb)
        return tokens, img_emb, txt_emb, codes, dot_codes

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens, _, txt_emb, codes, dot_codes = self._targets(batch)
        drop = torch.rand(len(codes), device=self.device) < self.text_drop_prob
        loss = self._cross_entropy(self.net(tokens, txt_emb, dot_codes, codes, drop), codes)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(codes))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens, img_emb, txt_emb, codes, dot_codes = self._targets(batch)
        size = len(codes)
        loss = self._cross_entropy(self.eval_net(tokens, txt_emb, dot_codes, codes), codes)
        self.log("val/loss", loss, batch_size=size, sync_dist=True, prog_bar=True)
        round_trip = F.cosine_similarity(self.tokenizer.decode(codes), img_emb, dim=-1).mean()
        self.log("val/round_trip_cosine", round_trip, batch_size=size, sync_dist=True)
        if self.val_sample_batches is not None and batch_idx >= self.val_sample_batches:
            return
        sampled = self.sample(batch["txt"], txt_emb, generator=self.generator(batch_idx))
        for key, value in prior_metrics(sampled, img_emb, txt_emb).items():
            self.log(f"val/{key}", value, batch_size=size, sync_dist=True)
        log_prior_variants(
            self,
            batch,
            batch_idx,
            lambda captions, txt_emb, steps: self.sample(captions, txt_emb, self.generator(0)),
        )

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        txt_emb: torch.Tensor,
        generator: torch.Generator | None = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Image embeddings [B, D] in CLIP space (unit norm when the training ones were) for
        captions and their CLIP text embeddings [B, D]. `settings` (ARPriorSampling's keys)
        override `model.sampling` for this call; None leaves a setting at its configured value,
        so pass top_k=0 / top_p=1.0 to switch filtering off explicitly."""
        given = {k: v for k, v in settings.items() if v is not None}
        s = build_config(ARPriorSampling, {**vars(self.sampling), **given}, "sampling argument")
        if txt_emb.ndim != 2 or txt_emb.shape != (len(captions), self.embed_dim):
            raise ValueError(
                f"sample needs txt_emb [{len(captions)}, {self.embed_dim}] for {len(captions)} "
                f"captions, got {list(txt_emb.shape)}"
            )
        best_of = int(s.best_of)
        net = self.eval_net
        tokens = net.caption_encoder.tokenize(list(captions)).to(self.device)
        txt_emb = txt_emb.to(self.device).float()
        tokens, txt_rows = (
            tokens.repeat_interleave(best_of, 0),
            txt_emb.repeat_interleave(best_of, 0),
        )
        first, last = self.tokenizer.dot_code_range(*s.dot_quantiles)
        dot_codes = torch.randint(
            first, last + 1, (len(tokens),), generator=generator, device=self.device
        )
        scale = float(s.guidance_scale)
        codes = net.generate(
            tokens,
            txt_rows,
            dot_codes,
            guidance=functools.partial(guide_halves, scale=scale) if is_guided(scale) else None,
            temperature=float(s.temperature),
            top_k=s.top_k,
            top_p=s.top_p,
            generator=generator,
        )
        samples = self.tokenizer.decode(codes).view(len(captions), best_of, -1)
        return best_by_dot_product(samples, txt_emb)
