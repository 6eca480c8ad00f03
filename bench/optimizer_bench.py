"""AdamW step time: torch's per-tensor default against its foreach and fused kernels, on the demo's
networks (the CLIP stage and the decoder), in one run on one device.

    python bench/optimizer_bench.py
    python bench/optimizer_bench.py --device cuda

Why it matters: on CPU torch defaults to the per-tensor loop, which for the tiny demo networks costs
as much as a fifth of each training step; `UnclipModule` asks for the fused kernel (foreach under
mixed precision, where Lightning refuses fused optimizers with gradient clipping).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
IMPLEMENTATIONS = {
    "per-tensor (CPU default)": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["clip", "decoder"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args()


def build_net(model: str, device: str) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    return instantiate(cfg.model).net.to(device)


def step_ms(params: list[torch.Tensor], kwargs: dict, steps: int, warmup: int) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-4, **kwargs)
    for i in range(warmup + steps):
        if i == warmup:
            if params[0].is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        optimizer.step()
    if params[0].is_cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / steps


def main() -> None:
    args = parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| network | params | {' | '.join(IMPLEMENTATIONS)} |")
    print(f"| --- | ---: | {' | '.join('---:' for _ in IMPLEMENTATIONS)} |")
    for model in args.models:
        net = build_net(model, args.device)
        params = [p for p in net.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        times = [step_ms(params, kw, args.steps, args.warmup) for kw in IMPLEMENTATIONS.values()]
        count = sum(p.numel() for p in params) / 1e6
        cells = " | ".join(f"{t:.1f} ms" for t in times)
        print(f"| {model} | {count:.2f} M | {cells} |")


if __name__ == "__main__":
    main()
