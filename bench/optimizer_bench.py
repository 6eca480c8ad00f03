"""AdamW step time: torch's per-tensor default against its foreach and fused kernels, on the demo's
networks (the CLIP stage and the decoder), in one run on one device.

    python bench/optimizer_bench.py
    python bench/optimizer_bench.py --device cuda

Why it matters: on CPU torch defaults to the per-tensor loop, which for the tiny demo networks costs
as much as a fifth of each training step; `UnclipModule` asks for the fused kernel (foreach under
mixed precision, where Lightning refuses fused optimizers with gradient clipping).

The three implementations take turns over `--rounds` rounds (the order rotated each round), each
with its own optimizer state kept across rounds; each round times `--steps` steps after `--warmup`
untimed ones, and each cell is the median (min-max) over the rounds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from timing import round_orders, seconds_per_call, spread

CONF = Path(__file__).resolve().parents[1] / "conf"
IMPLEMENTATIONS = {
    "per-tensor (CPU default)": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--models", nargs="+", default=["clip", "decoder"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    return parser.parse_args()


def build_net(model: str, device: str) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    return instantiate(cfg.model).net.to(device)


def step_ms(
    params: list[torch.Tensor], implementations: list[dict], args: argparse.Namespace
) -> list[list[float]]:
    """Milliseconds per step of each implementation, one value per round. Each optimizer steps
    its own copy of the parameters (same gradients), so none inherits another's state."""
    device = params[0].device
    optimizers = []
    for kwargs in implementations:
        copies = [p.detach().clone().requires_grad_() for p in params]
        for copy, p in zip(copies, params, strict=True):
            copy.grad = p.grad.clone()
        optimizers.append(torch.optim.AdamW(copies, lr=1e-4, **kwargs))
    times: list[list[float]] = [[] for _ in implementations]
    for order in round_orders(len(implementations), args.rounds):
        for index in order:
            seconds = seconds_per_call(optimizers[index].step, args.steps, args.warmup, device)
            times[index].append(1000 * seconds)
    return times


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.rounds} interleaved rounds of {args.steps} steps: ms per step, median (min-max)")
    print(f"| network | params | {' | '.join(IMPLEMENTATIONS)} |")
    print(f"| --- | ---: | {' | '.join('---:' for _ in IMPLEMENTATIONS)} |")
    for model in args.models:
        net = build_net(model, args.device)
        params = [p for p in net.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        times = step_ms(params, list(IMPLEMENTATIONS.values()), args)
        count = sum(p.numel() for p in params) / 1e6
        cells = " | ".join(spread(t) for t in times)
        print(f"| {model} | {count:.2f} M | {cells} |")


if __name__ == "__main__":
    main()
