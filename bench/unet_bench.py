"""Decoder UNet speed: training samples/s and DDIM sampling latency, ours beside diffusers'
UNet2DConditionModel of about the same parameter count, in one run on one device.

    python bench/unet_bench.py                         # the demo decoder (conf/model/decoder.yaml)
    python bench/unet_bench.py --device cuda --batch-size 64 --sample-steps 50
    python bench/unet_bench.py --model decoder_paper --device cuda --batch-size 4   (big)

Both networks get the same inputs: noisy images, timesteps, a conditioning vector added to the
timestep embedding (diffusers: class_embed_type="projection") and context tokens to attend to
(diffusers: cross-attention). Ours attends to the context inside its self-attention layers (GLIDE);
diffusers' blocks run a transformer (self-attention, cross-attention, MLP) at the same resolutions.
Sampling: DDIM through our GaussianDiffusion, with classifier-free guidance as a doubled batch.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from unclip.diffusion import GaussianDiffusion, guide_halves, sample
from unclip.nn.unet import UNet

CONF = Path(__file__).resolve().parents[1] / "conf"
CONTEXT_TOKENS = 4  # the image tokens; the caption adds context_length more


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="decoder", help="a conf/model/*.yaml decoder config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast"
    )
    parser.add_argument("--skip-diffusers", action="store_true")
    return parser.parse_args()


def decoder_config(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    model = cfg.model
    text = model.net.text
    context_dim = model.net.context_dim or text.width
    return {
        "unet": dict(model.net.unet),
        "image_size": int(model.image_size),
        "out_channels": 6 if model.diffusion.learned_variance else 3,
        "cond_dim": int(model.embed_dim) + (int(text.width) if model.net.add_pooled_text else 0),
        "context_dim": int(context_dim),
        "context_length": int(text.context_length) + CONTEXT_TOKENS,
    }


def ours(cfg: dict) -> UNet:
    return UNet(
        **cfg["unet"],
        in_channels=3,
        out_channels=cfg["out_channels"],
        image_size=cfg["image_size"],
        cond_dim=cfg["cond_dim"],
        context_dim=cfg["context_dim"],
    )


def diffusers_unet(cfg: dict, base: int) -> torch.nn.Module:
    """UNet2DConditionModel with our layout (levels, blocks per level, attention resolutions,
    channels per head, scale-shift norm) and `base` channels."""
    from diffusers import UNet2DConditionModel

    unet = cfg["unet"]
    mults = list(unet["channel_mult"])
    sizes = [cfg["image_size"] // 2**i for i in range(len(mults))]
    attends = [s in unet["attention_resolutions"] for s in sizes]
    channels = [base * m for m in mults]
    heads = [max(1, c // unet["num_head_channels"]) for c in channels]
    return UNet2DConditionModel(
        sample_size=cfg["image_size"],
        in_channels=3,
        out_channels=cfg["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        block_out_channels=channels,
        layers_per_block=unet["num_res_blocks"],
        cross_attention_dim=cfg["context_dim"],
        attention_head_dim=heads,  # diffusers reads this as the number of heads
        norm_num_groups=math.gcd(32, base),
        resnet_time_scale_shift="scale_shift"
        if unet.get("use_scale_shift_norm", True)
        else "default",
        class_embed_type="projection",
        projection_class_embeddings_input_dim=cfg["cond_dim"],
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_diffusers(cfg: dict, target: int) -> tuple[torch.nn.Module, int]:
    """The diffusers UNet whose base width (a multiple of 4) gives the nearest parameter count."""
    best = None
    for base in range(4, 4 * 257, 4):
        net = diffusers_unet(cfg, base)
        gap = abs(count(net) - target)
        if best is not None and gap > best[0]:
            break
        best = (gap, net, base)
    assert best is not None
    return best[1], best[2]


def call_ours(net: UNet) -> Callable:
    return lambda x, t, cond, context: net(x, t, cond, context)


def call_diffusers(net: torch.nn.Module) -> Callable:
    return lambda x, t, cond, context: (
        net(x, t, encoder_hidden_states=context, class_labels=cond).sample
    )


def inputs(cfg: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    size = cfg["image_size"]
    return (
        torch.randn(batch, 3, size, size, device=device),
        torch.randint(0, 1000, (batch,), device=device),
        torch.randn(batch, cfg["cond_dim"], device=device),
        torch.randn(batch, cfg["context_length"], cfg["context_dim"], device=device),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(net, fn, cfg, args, device, autocast) -> float:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t, cond, context = inputs(cfg, args.batch_size, device)
    target = torch.randn(args.batch_size, cfg["out_channels"], *x.shape[-2:], device=device)
    net.train()
    for i in range(args.warmup + args.train_iters):
        if i == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.mse_loss(fn(x, t, cond, context).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return args.batch_size * args.train_iters / (time.perf_counter() - start)


@torch.no_grad()
def sample_latency(net, fn, cfg, args, device, autocast) -> float:
    learned = cfg["out_channels"] == 6
    diffusion = GaussianDiffusion(schedule="cosine", prediction="v", learned_variance=learned)
    diffusion = diffusion.to(device)
    net.eval()
    _, _, cond, context = inputs(cfg, 2 * args.sample_batch, device)
    channels = 3

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = fn(torch.cat([x, x]), torch.cat([t, t]), cond, context).float()
        return guide_halves(out, args.guidance_scale, channels if learned else None)

    shape = (args.sample_batch, 3, cfg["image_size"], cfg["image_size"])
    sample(diffusion, model_fn, shape, {"sampler": "ddim", "steps": 2}, device=device)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    settings = {"sampler": "ddim", "steps": args.sample_steps}
    sample(diffusion, model_fn, shape, settings, device=device)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = decoder_config(args.model)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    nets = {"unclip UNet": (ours(cfg).to(device), call_ours)}
    if not args.skip_diffusers:
        theirs, base = matched_diffusers(cfg, count(nets["unclip UNet"][0]))
        nets[f"diffusers UNet2DConditionModel (base {base})"] = (theirs.to(device), call_diffusers)

    where = f"{device.type}" + (
        f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    )
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    print(
        f"model={args.model} ({cfg['image_size']}px, {where}, {args.precision}); train batch "
        f"{args.batch_size}; DDIM {args.sample_steps} steps, batch {args.sample_batch}, "
        f"guidance {args.guidance_scale} (doubled batch)"
    )
    header = (
        f"| {'network':44} | {'params':>8} | {'train samples/s':>15} | {'DDIM latency s':>14} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, (net, wrap) in nets.items():
        fn = wrap(net)
        speed = train_speed(net, fn, cfg, args, device, autocast)
        latency = sample_latency(net, fn, cfg, args, device, autocast)
        print(
            f"| {name:44} | {count(net) / 1e6:7.2f}M | {speed:15.1f} | {latency:14.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
