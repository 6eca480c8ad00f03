"""Gaussian diffusion (DDPM / improved DDPM / DDIM) as one object, after guided-diffusion's
`gaussian_diffusion.py`.

The samplers that walk the reverse chain are functions in unclip.diffusion.samplers.
The network is passed in as `model_fn(x_t, t) -> prediction`, a closure that holds its
conditioning, so the same process serves the prior (embeddings [B, D]), the decoder and the
upsamplers (images [B, C, H, W]). The network always sees the original training timesteps, also
when a sampler visits only a strided subset of them.

Notation: `alpha_bar[t]` is the cumulative product of (1 - beta); x_t = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unclip.diffusion.schedules import make_beta_schedule, strided_timesteps

PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast against `like` ([B] -> [B, 1, ..., 1])."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Log-likelihood of 8-bit images rescaled to [-1, 1] under a Gaussian discretised to the 256
    bins (the decoder term of the VLB at t = 0), elementwise."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


class Chain:
    """The reverse chain over a strided subset of timesteps: its own betas and posterior
    q(x_prev | x_t, x0), computed from the training alpha_bar at the visited steps."""

    def __init__(self, alpha_bar: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.timesteps = timesteps  # original indices, ascending
        self.alpha_bar = alpha_bar[timesteps]
        self.alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), self.alpha_bar[:-1]])
        self.betas = 1 - self.alpha_bar / self.alpha_bar_prev
        self.posterior_variance = self.betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        # at the first step the posterior variance is 0: use the next one in the log (as improved DDPM)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance = torch.log(clipped if len(clipped) > 1 else self.betas)
        self.coef_x0 = self.betas * self.alpha_bar_prev.sqrt() / (1 - self.alpha_bar)
        self.coef_xt = (1 - self.alpha_bar_prev) * (1 - self.betas).sqrt() / (1 - self.alpha_bar)


@dataclass
class DiffusionConfig:
    """`model.diffusion`: the process a stage trains (see GaussianDiffusion)."""

    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction: str = "eps"
    learned_variance: bool = False
    vlb_weight: float = 0.001
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0


class GaussianDiffusion(nn.Module):
    """The forward process, the training losses and the reverse chains the samplers
    (unclip.diffusion.samplers) walk.

    prediction: what the network outputs: `eps` (noise), `x0` (the clean sample; the paper's
    prior) or `v` (sqrt(a) eps - sqrt(1-a) x0). learned_variance: the network also outputs, as
    many channels again on dim 1, an interpolation between the posterior variance and beta
    (improved DDPM), trained with the hybrid loss mse + vlb_weight * T * L_vlb.
    loss_weighting: `uniform` (the plain mse of the prediction) or `min_snr` (Hang et al. 2023,
    "Efficient Diffusion Training via Min-SNR Weighting"): each timestep weighted as if the loss were
    on x0 with weight min(SNR, gamma), which stops the nearly clean steps from dominating and
    converges several times faster on small budgets.
    """

    def __init__(self, config: DiffusionConfig | None = None, /, **settings: Any) -> None:
        """From a config, or from DiffusionConfig's keyword arguments."""
        super().__init__()
        config = config if config is not None else DiffusionConfig(**settings)
        self.config = config
        schedule, num_timesteps, prediction = (
            config.schedule,
            config.num_timesteps,
            config.prediction,
        )
        learned_variance, vlb_weight = config.learned_variance, config.vlb_weight
        loss_weighting, min_snr_gamma = config.loss_weighting, config.min_snr_gamma
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: choose one of {PREDICTIONS}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r}: choose one of {LOSS_WEIGHTINGS}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma={min_snr_gamma}: must be > 0")
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.schedule = schedule
        self.num_timesteps = int(num_timesteps)
        self.prediction = prediction
        self.learned_variance = bool(learned_variance)
        self.vlb_weight = float(vlb_weight)

        betas = make_beta_schedule(schedule, self.num_timesteps)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        # float64, not saved: they are a function of the config
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self._full = Chain(alpha_bar, torch.arange(self.num_timesteps))

    # ---- the forward process -------------------------------------------------------------------
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device
        )
        return t.to(device)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x0)."""
        noise = torch.randn_like(x0) if noise is None else noise
        a = gather(self.alpha_bar, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x0) of the full chain."""
        chain = self._full
        mean = gather(chain.coef_x0, t, x_t) * x0 + gather(chain.coef_xt, t, x_t) * x_t
        return (
            mean,
            gather(chain.posterior_variance, t, x_t),
            gather(chain.posterior_log_variance, t, x_t),
        )

    # ---- reading the network's output ----------------------------------------------------------
    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance interpolation in [-1, 1] or None)."""
        if not self.learned_variance:
            return output, None
        prediction, frac = output.chunk(2, dim=1)
        return prediction, frac

    def predict_x0_eps(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network's prediction at x_t."""
        a = gather(self.alpha_bar, t, x_t)
        if self.prediction == "eps":
            eps = prediction
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        elif self.prediction == "x0":
            x0 = prediction
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        else:  # v
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * prediction
            eps = (1 - a).sqrt() * x_t + a.sqrt() * prediction
        return x0, eps

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = gather(self.alpha_bar, t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = gather(self.alpha_bar, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    # ---- training ------------------------------------------------------------------------------
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """[B] weight of each sample's mse: min(SNR, gamma) in x0 units, converted to the units of
        the prediction (eps: / SNR, v: / (SNR + 1)); ones for uniform weighting."""
        if self.loss_weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        a = self.alpha_bar.to(t.device)[t]
        snr = a / (1 - a)
        clipped = snr.clamp(max=self.min_snr_gamma)
        scale = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[self.prediction]
        return (clipped / scale).float()

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses [B]: `mse` of the prediction, `vb` (learned variance only) and
        `loss`, their sum as trained; `x0_pred` for metrics."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        prediction, frac = self.split_output(model_fn(x_t, t))
        target = self.training_target(x0, noise, t)
        mse = _mean_flat((prediction.float() - target.float()) ** 2)
        x0_pred, _ = self.predict_x0_eps(prediction.detach(), x_t, t)
        out = {"mse": mse, "loss": self.loss_weight(t) * mse, "x0_pred": x0_pred}
        if frac is not None:
            # the variance learns through the VLB only: the mean is held fixed (improved DDPM)
            vb = self._vb_term(prediction.detach(), frac, x0, x_t, t)
            out["vb"] = vb
            out["loss"] = out["loss"] + self.vlb_weight * self.num_timesteps * vb
        return out

    def _vb_term(self, prediction, frac, x0, x_t, t) -> torch.Tensor:
        """L_t of the VLB in bits per dimension: KL to the true posterior, or the discretised
        decoder likelihood at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        x0_pred, _ = self.predict_x0_eps(prediction, x_t, t)
        mean, _ = self.q_posterior(x0_pred, x_t, t)[:2]
        log_var = self.learned_log_variance(self._full, frac, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean.float(), log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
        return torch.where(t == 0, nll / math.log(2.0), kl)

    @staticmethod
    def learned_log_variance(chain: Chain, frac: torch.Tensor, index: torch.Tensor):
        """Interpolate, in the log domain, between the chain's posterior variance and beta at
        chain position `index` (the timestep itself on the full chain)."""
        min_log = gather(chain.posterior_log_variance, index, frac)
        max_log = gather(torch.log(chain.betas), index, frac)
        weight = (frac.float() + 1) / 2
        return weight * max_log + (1 - weight) * min_log

    # ---- the reverse chain ---------------------------------------------------------------------
    def chain(self, steps: int | None) -> Chain:
        """The reverse chain over `steps` strided timesteps (all of them for None)."""
        if steps is None or steps == self.num_timesteps:
            return self._full
        return Chain(self.alpha_bar, strided_timesteps(self.num_timesteps, steps))
