"""Noise schedules: the betas of the forward process, as float64 so the cumulative products stay
exact over a thousand steps (guided-diffusion does the same with numpy)."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear")


def make_beta_schedule(name: str, num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """`cosine`: improved DDPM's schedule (s = 0.008), betas capped at `max_beta` so the last step
    is not singular. `linear`: DDPM's 1e-4..0.02 at 1000 steps, rescaled for other step counts so
    the total amount of noise stays the same."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps}: need at least one diffusion step")
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=max_beta)
    raise ValueError(f"schedule={name!r}: choose one of {SCHEDULES}")


def strided_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """`steps` training timesteps evenly spread over [0, T-1], both ends included (improved DDPM's
    respacing): the subset a shortened sampler visits."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps}: choose between 1 and num_timesteps={num_timesteps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()
