"""The diffusion prior stage: P(z_i | caption, z_t), trained on embedded shards (no pixels).

As in the paper: a Gaussian diffusion over the (normalised) CLIP image embedding whose network
predicts the unnoised embedding (x0, MSE loss); text conditioning dropped 10% of the time for
classifier-free guidance; at sampling, strided steps, then the best of N samples by dot product
with z_t. Validation and sampling use the EMA weights; outputs are in CLIP space.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from unclip.diffusion import SAMPLERS, GaussianDiffusion, guide
from unclip.evaluation.prior_metrics import prior_metrics
from unclip.models.config_keys import merged
from unclip.models.embedding_norm import EmbeddingNorm
from unclip.nn.diffusion_prior_net import DiffusionPriorNet, Prefix
from unclip.nn.unit_norm import unit_norm
from unclip.training.module import UnclipModule

log = logging.getLogger(__name__)

DEFAULT_NET: dict[str, Any] = {
    "width": 256,
    "layers": 4,
    "heads": 4,
    "mlp_ratio": 4,
    "dropout": 0.0,
}
DEFAULT_TEXT_ENCODER: dict[str, Any] = {
    "mode": "own",
    "width": 256,
    "context_length": 77,
    "layers": 2,
    "heads": 4,
    "clip": None,
    "dropout": 0.0,
}
DEFAULT_DIFFUSION: dict[str, Any] = {
    "schedule": "cosine",
    "num_timesteps": 1000,
    "loss_weighting": "uniform",
    "min_snr_gamma": 5.0,
}
DEFAULT_NORMALIZATION: dict[str, Any] = {"kind": "standardize", "max_samples": 10000, "eps": 1e-6}
DEFAULT_SAMPLING: dict[str, Any] = {
    "steps": 64,
    "guidance_scale": 2.0,
    "best_of": 2,
    "sampler": "ddpm",
    "eta": 0.0,
}


class DiffusionPriorModule(UnclipModule):
    """Every argument is a `model.*` config key:

    embed_dim: CLIP embedding size (checked against the shards' meta.json at start-up).
    net: DiffusionPriorNet width / layers / heads / mlp_ratio / dropout.
    text_encoder: CaptionEncoder arguments: mode "own" (trained with the prior) or "clip" (frozen
        token states of the CLIP named by `clip`, a load_clip spec).
    diffusion: schedule and num_timesteps (the prediction is always x0, as in the paper).
    normalization: kind "standardize" (per-dimension statistics of the first `max_samples`
        training embeddings, fitted once and saved in the checkpoint) or "l2" (z/|z| * sqrt(d)).
    text_drop_prob: how often the caption and z_t are replaced by learned nulls in training.
    sampling: defaults of `sample` (steps, guidance_scale, best_of, sampler ddpm|ddim, eta), also
        used for the validation samples.
    unit_norm_output: L2-normalise sampled embeddings, like the embed tool's shards.
    val_seed: seed of the validation noise, so validation metrics are comparable across steps.
    """

    data_fields = ["txt", "img_emb", "txt_emb"]

    def __init__(
        self,
        embed_dim: int = 64,
        name: str = "prior_diffusion",
        net: dict | None = None,
        text_encoder: dict | None = None,
        diffusion: dict | None = None,
        normalization: dict | None = None,
        text_drop_prob: float = 0.1,
        sampling: dict | None = None,
        unit_norm_output: bool = True,
        val_seed: int = 0,
        optim: dict | None = None,
        ema: dict | None = None,
    ) -> None:
        super().__init__(optim, ema)
        self.save_hyperparameters()
        if embed_dim < 1:
            raise ValueError(f"model.embed_dim must be positive, got {embed_dim}")
        if not 0.0 <= text_drop_prob < 1.0:
            raise ValueError(f"model.text_drop_prob must be in [0, 1), got {text_drop_prob}")
        self.name = name
        self.embed_dim = int(embed_dim)
        self.text_drop_prob = float(text_drop_prob)
        self.unit_norm_output = bool(unit_norm_output)
        self.val_seed = int(val_seed)
        self.sampling = self._check_sampling(merged(DEFAULT_SAMPLING, sampling, "model.sampling"))
        norm_cfg = merged(DEFAULT_NORMALIZATION, normalization, "model.normalization")
        self.stats_samples = int(norm_cfg["max_samples"])
        self.embedding_norm = EmbeddingNorm(norm_cfg["kind"], self.embed_dim, norm_cfg["eps"])
        diffusion_cfg = merged(DEFAULT_DIFFUSION, diffusion, "model.diffusion")
        self.diffusion = GaussianDiffusion(**diffusion_cfg, prediction="x0")
        self.net = DiffusionPriorNet(
            self.embed_dim,
            **merged(DEFAULT_NET, net, "model.net"),
            text_encoder=merged(DEFAULT_TEXT_ENCODER, text_encoder, "model.text_encoder"),
        )
        self.init_ema()

    @staticmethod
    def _check_sampling(cfg: dict[str, Any], where: str = "model.sampling") -> dict[str, Any]:
        if cfg["sampler"] not in SAMPLERS:
            raise ValueError(f"{where}.sampler={cfg['sampler']!r}: choose one of {SAMPLERS}")
        if int(cfg["best_of"]) < 1:
            raise ValueError(f"{where}.best_of must be at least 1, got {cfg['best_of']}")
        if int(cfg["steps"]) < 1:
            raise ValueError(f"{where}.steps must be at least 1, got {cfg['steps']}")
        return cfg

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
        """z_t as the network sees it: on the sphere of radius sqrt(d), whatever the shards hold."""
        return unit_norm(txt_emb.float()) * math.sqrt(self.embed_dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Caption tokens without the padding every caption of the batch has (exact, and cheaper)."""
        encoder = self.net.caption_encoder
        return encoder.trim(encoder.tokenize(captions)).to(self.device)

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = self.tokenize(batch["txt"])
        x0 = self.embedding_norm.normalize(batch["img_emb"].float())
        txt = self.text_condition(batch["txt_emb"])
        drop = torch.rand(len(x0), device=self.device) < self.text_drop_prob
        losses = self.diffusion.training_losses(
            lambda x_t, t: self.net(x_t, t, tokens, txt, drop), x0
        )
        loss = losses["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(self.val_seed + batch_idx)
        x0 = self.embedding_norm.normalize(batch["img_emb"].float())
        size = len(x0)
        t = torch.randint(0, self.diffusion.num_timesteps, (size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        tokens = self.tokenize(batch["txt"])
        txt = self.text_condition(batch["txt_emb"])
        net = self.eval_net
        losses = self.diffusion.training_losses(
            lambda x_t, t_: net(x_t, t_, tokens, txt), x0, t.to(self.device), noise.to(self.device)
        )
        self.log("val/loss", losses["loss"].mean(), batch_size=size, sync_dist=True, prog_bar=True)
        sampled = self.sample(batch["txt"], batch["txt_emb"], generator=generator)
        metrics = prior_metrics(sampled, batch["img_emb"], batch["txt_emb"])
        for key, value in metrics.items():
            self.log(f"val/{key}", value, batch_size=size, sync_dist=True, prog_bar=key == "cosine")

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        txt_emb: torch.Tensor,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        steps: int | None = None,
        best_of: int | None = None,
        eta: float = 0.0,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """Image embeddings [B, D] in CLIP space for captions and their CLIP text embeddings.

        Draws `best_of` samples per caption and keeps the one with the highest dot product with
        z_t (paper: 2). None takes the `model.sampling` value; `eta` is used by the ddim sampler.
        """
        cfg = self._check_sampling(
            {
                "steps": steps or self.sampling["steps"],
                "guidance_scale": self.sampling["guidance_scale"]
                if guidance_scale is None
                else guidance_scale,
                "best_of": best_of or self.sampling["best_of"],
                "sampler": sampler or self.sampling["sampler"],
                "eta": eta,
            },
            where="sample()",
        )
        if len(captions) != len(txt_emb):
            raise ValueError(f"{len(captions)} captions but {len(txt_emb)} text embeddings")
        net = self.eval_net
        n, scale = int(cfg["best_of"]), float(cfg["guidance_scale"])
        txt_emb = txt_emb.to(self.device).float()
        prefix = net.condition(self.tokenize(list(captions)), self.text_condition(txt_emb))
        prefix = prefix.repeat_interleave(n)
        rows = len(prefix)
        guided = scale != 1.0
        if guided:
            prefix = Prefix.cat([prefix, net.null_condition(rows, self.device)])
        cache = net.cache(prefix)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return cache.denoise(x_t, t)
            cond, uncond = cache.denoise(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
            return guide(cond, uncond, scale)

        x0 = self.diffusion.sample(
            model_fn,
            (rows, self.embed_dim),
            steps=int(cfg["steps"]),
            sampler=cfg["sampler"],
            eta=float(cfg["eta"]),
            generator=generator,
            device=self.device,
        )
        z = self.embedding_norm.denormalize(x0)
        if self.unit_norm_output:
            z = unit_norm(z)
        return best_by_dot_product(z.view(len(captions), n, -1), txt_emb)


def best_by_dot_product(candidates: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """[B, N, D] candidates -> [B, D]: per caption, the one with the highest dot product with z_t."""
    scores = (candidates * unit_norm(txt_emb)[:, None]).sum(-1)
    best = scores.argmax(dim=1)
    return candidates[torch.arange(len(candidates), device=candidates.device), best]
