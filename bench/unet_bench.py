"""Decoder UNet speed: training samples/s and DDIM sampling latency, ours beside diffusers'
UNet2DConditionModel of the nearest parameter count, in one run on one device.

    python bench/unet_bench.py --threads 1             # the demo decoder (conf/model/decoder.yaml)
    python bench/unet_bench.py --device cuda --precision bf16 --batch-size 64 --sample-steps 50
    python bench/unet_bench.py --model decoder_paper --device cuda --precision bf16 --batch-size 4

The networks take turns over `--rounds` rounds (the order rotated each round); each round times
`--train-iters` training steps (forward, backward, fused AdamW) after `--warmup` untimed ones, and
one DDIM sampling run after a 2-step warm-up. Each cell is the median (min-max) over the rounds.
Rows: ours with NCHW weights, ours with channels_last weights (how the decoder and upsampler stages
train by default, `channels_last: true`, and how `UnclipPipeline.load` samples), diffusers.

Both networks get the same inputs: noisy images, timesteps, a conditioning vector added to the
timestep embedding (diffusers: class_embed_type="projection") and context tokens to attend to
(diffusers: cross-attention). Ours attends to the context inside its self-attention layers (GLIDE);
diffusers' blocks run a transformer (self-attention, cross-attention, MLP) at the same resolutions.
Sampling: DDIM through our GaussianDiffusion, with classifier-free guidance as a doubled batch.
The script prints what the blocks are and how many parameters sit in attention vs resnets, since
equal parameters do not mean equal blocks.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from timing import round_orders, seconds_per_call, spread, synchronize

from unclip.diffusion import GaussianDiffusion, guide_halves, sample
from unclip.nn.unet import AttentionBlock, ResBlock, UNet

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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--skip-diffusers", action="store_true")
    return parser.parse_args()


def decoder_config(name: str) -> dict:
    """The decoder UNet's sizes and conditioning widths from conf/model/<name>.yaml."""
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
    """Our decoder UNet as the decoder stage builds it (3 input channels, learned variance: 6 out)."""
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


# ---- what the blocks are -------------------------------------------------------------------------
@dataclass
class Blocks:
    """Attention-type blocks and resnets of one network, with the parameters in each kind."""

    attention: int = 0
    attention_params: int = 0
    resnets: int = 0
    resnet_params: int = 0
    total: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # block class name -> count

    @property
    def other_params(self) -> int:
        return self.total - self.attention_params - self.resnet_params


def blocks(net: torch.nn.Module) -> Blocks:
    """Ours: AttentionBlock (one attention over pixels + context tokens) and ResBlock; diffusers:
    Transformer2DModel (norm, proj_in, BasicTransformerBlocks, proj_out) and ResnetBlock2D."""
    found = Blocks(total=count(net))
    attention_types: tuple[type, ...] = (AttentionBlock,)
    resnet_types: tuple[type, ...] = (ResBlock,)
    try:
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        attention_types += (Transformer2DModel,)
        resnet_types += (ResnetBlock2D,)
    except ImportError:
        pass
    for module in net.modules():
        if isinstance(module, attention_types):
            found.attention += 1
            found.attention_params += count(module)
        elif isinstance(module, resnet_types):
            found.resnets += 1
            found.resnet_params += count(module)
        else:
            continue
        name = type(module).__name__
        found.kinds[name] = found.kinds.get(name, 0) + 1
    inner = sum(type(m).__name__ == "BasicTransformerBlock" for m in net.modules())
    if inner:
        found.kinds["BasicTransformerBlock (inside)"] = inner
    return found


def describe_blocks(named: dict[str, torch.nn.Module]) -> None:
    """Print the block difference: equal parameters are not equal blocks."""
    print("\nblocks (parameters in M):")
    for name, net in named.items():
        b = blocks(net)
        kinds = ", ".join(f"{n} x{c}" for n, c in b.kinds.items())
        print(
            f"  {name}: {b.total / 1e6:.2f}M total; {b.attention} attention blocks "
            f"{b.attention_params / 1e6:.2f}M, {b.resnets} resnets {b.resnet_params / 1e6:.2f}M, "
            f"other {b.other_params / 1e6:.2f}M  [{kinds}]"
        )
    print(
        "  the same places in both: after each resnet at the attention resolutions, and in the "
        "middle block\n"
        "  ours: one attention layer there, over its own pixels and the context tokens jointly "
        "(GLIDE: norm, qkv, context k/v, proj_out)\n"
        "  diffusers: a Transformer2DModel there (norm, proj_in, then a BasicTransformerBlock: "
        "self-attention, cross-attention to the context, GEGLU feed-forward; proj_out)"
    )


# ---- timing --------------------------------------------------------------------------------------
@dataclass
class Row:
    """One network as timed; `train_rates` and `latencies` gather one value per round."""

    name: str
    net: torch.nn.Module
    fn: Callable
    train_rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


def fused_adamw(net: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW's fused kernel, as UnclipModule asks for it (CUDA and CPU both have one)."""
    return torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))


def train_speed(row: Row, cfg: dict, args: argparse.Namespace, device, autocast) -> float:
    """Training samples/s over `--train-iters` steps after `--warmup` untimed ones."""
    if row.optimizer is None:
        row.optimizer = fused_adamw(row.net, device)
    optimizer = row.optimizer
    x, t, cond, context = inputs(cfg, args.batch_size, device)
    target = torch.randn(args.batch_size, cfg["out_channels"], *x.shape[-2:], device=device)
    row.net.train()

    def step() -> None:
        with autocast():
            loss = torch.nn.functional.mse_loss(row.fn(x, t, cond, context).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return args.batch_size / seconds_per_call(step, args.train_iters, args.warmup, device)


@torch.no_grad()
def sample_latency(row: Row, cfg: dict, args: argparse.Namespace, device, autocast) -> float:
    """Seconds for one DDIM run of `--sample-steps` steps on `--sample-batch` images, guided."""
    learned = cfg["out_channels"] == 6
    diffusion = GaussianDiffusion(schedule="cosine", prediction="v", learned_variance=learned)
    diffusion = diffusion.to(device)
    row.net.eval()
    _, _, cond, context = inputs(cfg, 2 * args.sample_batch, device)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = row.fn(torch.cat([x, x]), torch.cat([t, t]), cond, context).float()
        return guide_halves(out, args.guidance_scale, 3 if learned else None)

    shape = (args.sample_batch, 3, cfg["image_size"], cfg["image_size"])
    sample(diffusion, model_fn, shape, {"sampler": "ddim", "steps": 2}, device=device)  # warm-up
    settings = {"sampler": "ddim", "steps": args.sample_steps}
    return seconds_per_call(
        lambda: sample(diffusion, model_fn, shape, settings, device=device), 1, 0, device
    )


def measure(rows: list[Row], cfg: dict, args: argparse.Namespace, device, autocast) -> None:
    """Every round times every row (training, then sampling), in an order rotated each round."""
    for number, order in enumerate(round_orders(len(rows), args.rounds), 1):
        for index in order:
            row = rows[index]
            row.train_rates.append(train_speed(row, cfg, args, device, autocast))
            row.latencies.append(sample_latency(row, cfg, args, device, autocast))
        synchronize(device)
        print(f"round {number}/{args.rounds} done", flush=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = decoder_config(args.model)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    nchw = ours(cfg)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)  # the same weights, NHWC
    rows = [
        Row("unclip UNet (NCHW)", nchw.to(device), call_ours(nchw)),
        Row("unclip UNet, channels_last (default)", nhwc.to(device), call_ours(nhwc)),
    ]
    if not args.skip_diffusers:
        try:
            theirs, base = matched_diffusers(cfg, count(nchw))
        except ImportError:
            print("diffusers is not installed (pip install -e '.[bench]'): only our UNet is timed")
        else:
            name = f"diffusers UNet2DConditionModel (base {base})"
            rows.append(Row(name, theirs.to(device), call_diffusers(theirs)))

    where = f"{device.type}" + (
        f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    )
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    print(
        f"model={args.model} ({cfg['image_size']}px, {where}, {args.precision}); train batch "
        f"{args.batch_size}, {args.train_iters} steps after {args.warmup} (fwd+bwd+fused AdamW); "
        f"DDIM {args.sample_steps} steps, batch {args.sample_batch}, guidance "
        f"{args.guidance_scale} (doubled batch); our base {cfg['unet']['model_channels']}"
    )
    describe_blocks({r.name: r.net for r in rows if "channels_last" not in r.name})
    print()
    measure(rows, cfg, args, device, autocast)

    print(f"\n{args.rounds} interleaved rounds: median (min-max)")
    header = (
        f"| {'network':44} | {'params':>8} | {'train samples/s':>24} | {'DDIM latency s':>24} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(
            f"| {row.name:44} | {count(row.net) / 1e6:7.2f}M | {spread(row.train_rates):>24} | "
            f"{spread(row.latencies, '.2f'):>24} |"
        )


if __name__ == "__main__":
    main()
