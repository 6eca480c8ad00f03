"""Exponential moving average of a network's weights.

Only the trained network is averaged (never a frozen CLIP beside it), and the average lives in the
LightningModule's state dict, so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`decay` is the target; early on the effective decay is min(decay, (1 + n) / (10 + n)), so a
    short run is not dominated by its random initialisation (the warm-up of TensorFlow's
    ExponentialMovingAverage with num_updates; guided-diffusion uses a fixed rate)."""

    def __init__(self, net: nn.Module, decay: float, update_every: int = 1, start_step: int = 0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay = decay
        self.update_every = update_every
        self.start_step = start_step
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        ema_params = list(self.module.parameters())
        net_params = [p.detach() for p in net.parameters()]
        if step < self.start_step:
            torch._foreach_copy_(ema_params, net_params)
            return
        if step % self.update_every:
            return
        decay = self.current_decay()
        # parameter by parameter, so it works on FSDP shards too (training/fsdp.py: the copy is
        # wrapped like the network, each rank updating the shards it holds)
        torch._foreach_lerp_(ema_params, net_params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), net.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        # the averaged copy always stays in eval mode (no dropout, frozen norms)
        super().train(mode)
        self.module.eval()
        return self
