"""Samplers as plain functions over a GaussianDiffusion's reverse chain (the k-diffusion style).

Each sampler is registered by name with the dataclass of the settings it reads, so a stage's
`sampling` block, `{sampler: ddim, steps: 50, eta: 0.0}`, is passed through unchanged:

    x0 = sample(diffusion, model_fn, shape, {"sampler": "dpmpp_2m", "steps": 20}, generator=g)

Adding a sampler is one function here plus its test. The network is `model_fn(x_t, t)` (see
gaussian_diffusion); it always sees the original training timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from unclip.diffusion.gaussian_diffusion import Chain, GaussianDiffusion, ModelFn, gather

SAMPLER_KEY = "sampler"
DEFAULT_SAMPLER = "ddpm"

ClipRange = tuple[float, float] | None


@dataclass
class DDPMConfig:
    """Ancestral sampling over `steps` strided timesteps, with the chain's posterior variance (or
    the network's learned one)."""

    steps: int = 64


@dataclass
class DDIMConfig:
    """DDIM (Song et al. 2021): `eta` 0 is deterministic, 1 adds as much noise as DDPM."""

    steps: int = 50
    eta: float = 0.0


@dataclass
class DPMSolverConfig:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep on the x0 prediction;
    deterministic, good samples in 15-25 steps."""

    steps: int = 20


SamplerFn = Callable[..., torch.Tensor]


class RegisteredSampler(NamedTuple):
    fn: SamplerFn
    config: type


SAMPLERS: dict[str, RegisteredSampler] = {}


def register(name: str, config: type) -> Callable[[SamplerFn], SamplerFn]:
    def add(fn: SamplerFn) -> SamplerFn:
        SAMPLERS[name] = RegisteredSampler(fn, config)
        return fn

    return add


def _field_names(config: type) -> set[str]:
    return {f.name for f in fields(config)}


def resolve(settings: Mapping[str, Any], where: str = "sampling") -> tuple[str, Any]:
    """(name, config) from `{sampler: name, **settings}`. A key only another sampler reads is
    accepted at that sampler's default (a shared YAML block) and refused otherwise: it would do
    nothing. A key no sampler reads is refused."""
    given = dict(settings)
    name = given.pop(SAMPLER_KEY, DEFAULT_SAMPLER)
    if name not in SAMPLERS:
        raise ValueError(f"{where}.{SAMPLER_KEY}={name!r}: choose one of {sorted(SAMPLERS)}")
    config = SAMPLERS[name].config
    for key in sorted(set(given) - _field_names(config)):
        readers = {n: s.config() for n, s in SAMPLERS.items() if key in _field_names(s.config)}
        if not readers:
            known = sorted(
                {SAMPLER_KEY}.union(*(_field_names(s.config) for s in SAMPLERS.values()))
            )
            raise ValueError(f"{where}.{key}: no sampler reads it; sampler settings: {known}")
        if all(given[key] != getattr(default, key) for default in readers.values()):
            raise ValueError(
                f"{where}.{key}={given[key]!r} does nothing with {SAMPLER_KEY}={name!r} "
                f"(read by {', '.join(sorted(readers))})"
            )
        del given[key]
    resolved = config(**given)
    if int(resolved.steps) < 1:
        raise ValueError(f"{where}.steps must be at least 1, got {resolved.steps}")
    return name, resolved


def sampler_defaults(name: str = DEFAULT_SAMPLER) -> dict[str, Any]:
    """The settings dict a sampler runs with when nothing is given."""
    config = SAMPLERS[name].config()
    return {SAMPLER_KEY: name, **{f.name: getattr(config, f.name) for f in fields(config)}}


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor):
    """Gaussian noise drawn on the generator's device (so a CPU generator gives the same samples
    on any device), then moved next to `like`."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    settings: Mapping[str, Any] | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: ClipRange = None,
    progress: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x0 from x_T = `noise` (or fresh noise from `generator`) with the sampler `settings` name."""
    name, config = resolve(settings or {})
    like = torch.empty(0, device=device or diffusion.alpha_bar.device, dtype=dtype)
    x = randn(tuple(shape), generator, like) if noise is None else noise.to(like)
    chain = diffusion.chain(int(config.steps))
    positions = range(len(chain.timesteps) - 1, -1, -1)
    steps = tqdm(positions, desc=f"{name} sampling", disable=not progress, leave=False)
    return SAMPLERS[name].fn(diffusion, model_fn, x, chain, steps, config, generator, clip_denoised)


def denoise(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x: torch.Tensor,
    chain: Chain,
    index: torch.Tensor,
    clip_denoised: ClipRange,
):
    """Network call at chain position `index`: (x0, eps, frac) with x0 optionally clipped."""
    t_model = chain.timesteps.to(x.device)[index]
    prediction, frac = diffusion.split_output(model_fn(x, t_model))
    x0, eps = diffusion.predict_x0_eps(prediction, x, t_model)
    if clip_denoised is not None:
        x0 = x0.clamp(*clip_denoised)
        eps = diffusion.eps_from_x0(x0, x, t_model)
    return x0, eps, frac


def _index(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)


@register("ddpm", DDPMConfig)
def ddpm(diffusion, model_fn, x, chain, positions, config, generator, clip_denoised):
    for i in positions:
        index = _index(x, i)
        x0, _, frac = denoise(diffusion, model_fn, x, chain, index, clip_denoised)
        mean = gather(chain.coef_x0, index, x) * x0 + gather(chain.coef_xt, index, x) * x
        if i == 0:
            x = mean
            continue
        if frac is None:
            log_var = gather(chain.posterior_log_variance, index, x)
        else:
            log_var = diffusion.learned_log_variance(chain, frac, index).to(x.dtype)
        x = mean + (0.5 * log_var).exp() * randn(tuple(x.shape), generator, x)
    return x


@register("ddim", DDIMConfig)
def ddim(diffusion, model_fn, x, chain, positions, config, generator, clip_denoised):
    eta = float(config.eta)
    for i in positions:
        index = _index(x, i)
        x0, eps, _ = denoise(diffusion, model_fn, x, chain, index, clip_denoised)
        a = gather(chain.alpha_bar, index, x0)
        a_prev = gather(chain.alpha_bar_prev, index, x0)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if i != 0 and eta != 0:
            x = x + sigma * randn(tuple(x.shape), generator, x)
    return x


@register("dpmpp_2m", DPMSolverConfig)
def dpmpp_2m(diffusion, model_fn, x, chain, positions, config, generator, clip_denoised):
    """x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D with h the step in
    log(alpha / sigma) and D the x0 prediction, extrapolated from the previous one (second
    order) after the first step. The last two steps are first order (diffusers'
    `lower_order_final`): the strided steps widen in log-SNR there, and extrapolating over them
    overshoots; the very last lands on the x0 prediction itself."""
    previous: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for i in positions:
        index = _index(x, i)
        x0, _, _ = denoise(diffusion, model_fn, x, chain, index, clip_denoised)
        if i == 0:
            return x0
        a, a_next = chain.alpha_bar[i], chain.alpha_bar_prev[i]
        lam, lam_next = (0.5 * torch.log(v / (1 - v)) for v in (a, a_next))
        h = lam_next - lam
        d = x0
        if previous is not None and i > 1:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        ratio = ((1 - a_next) / (1 - a)).sqrt()
        x = ratio.to(x.dtype) * x - (a_next.sqrt() * torch.expm1(-h)).to(x.dtype) * d
        previous, h_last = x0, h
    return x


@torch.no_grad()
def ddim_invert(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x0: torch.Tensor,
    steps: int | None = 50,
    progress: bool = False,
) -> torch.Tensor:
    """x_T such that deterministic DDIM (eta = 0, same steps) decodes back to about x0: the
    chain run forwards, each step using the noise the network predicts at the current point."""
    chain = diffusion.chain(steps)
    x = x0
    for i in tqdm(range(len(chain.timesteps)), desc="ddim inversion", disable=not progress):
        index = _index(x, i)
        _, eps, _ = denoise(diffusion, model_fn, x, chain, index, None)
        a_from = gather(chain.alpha_bar_prev, index, x)
        a_to = gather(chain.alpha_bar, index, x)
        x0_here = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = a_to.sqrt() * x0_here + (1 - a_to).sqrt() * eps
    return x
