"""Shared by the benches: interleaved rounds and their median (min-max), so that a neighbour's load
on a shared machine, or the order the sides run in, does not decide a comparison."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(
    call: Callable[[], object], iters: int, warmup: int, device: torch.device
) -> float:
    """Seconds per call of `call`, after `warmup` untimed calls (kernels chosen, caches warm)."""
    for _ in range(warmup):
        call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def round_orders(count: int, rounds: int) -> list[list[int]]:
    """The order the `count` sides run in each round: rotated by one every round, so no side is
    always first (a cold cache) or always after the same neighbour."""
    return [[(r + i) % count for i in range(count)] for r in range(rounds)]


def spread(values: Sequence[float], fmt: str = ".1f") -> str:
    """`median (min-max)` of one row's rounds; `-` when the row was not measured."""
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:{fmt}} ({low:{fmt}}-{high:{fmt}})"
