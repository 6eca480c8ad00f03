"""Diffusion prior speed: training samples/s and sampling latency, ours beside diffusers'
PriorTransformer at the same width, depth, heads and sequence, in one run on one device.

    python bench/prior_bench.py                                   # the demo prior's sizes
    python bench/prior_bench.py --width 2048 --layers 20 --heads 32 --embed-dim 768 \
        --device cuda --precision bf16                             # Karlo's prior (~1B)
    python bench/prior_bench.py --model prior_diffusion_paper --device cuda --precision bf16

Both networks see the same sequence: caption tokens (`--tokens`, every position a real token unless
`--caption-tokens` says fewer), z_t, timestep, noised z_i, query. diffusers gets the caption as
ready-made `encoder_hidden_states` and its padding mask as `attention_mask` (without it it runs
without its causal mask); ours embeds caption token ids (a text encoder of 0 layers) and masks the
same padding. Sampling: `--sample-steps` strided steps of our GaussianDiffusion on `--sample-batch`
captions with classifier-free guidance as a doubled batch, best of 1, the network being the only
difference. Ours runs the transformer over the caption once per sample (`PrefixCache`); the row
"ours, no prefix cache" runs the full sequence every step, as diffusers does.

The rows take turns over `--rounds` rounds (the order rotated each round): each round times
`--train-iters` training steps after `--warmup` untimed ones and one sampling run after one untimed
run; each cell is the median (min-max) over the rounds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from timing import round_orders, seconds_per_call, spread

from unclip.diffusion import GaussianDiffusion, guide_halves, sample
from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.diffusion_prior_net import DiffusionPriorNet
from unclip.nn.transformer import Prefix

CONF = Path(__file__).resolve().parents[1] / "conf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="prior_diffusion", help="conf/model/*.yaml for sizes")
    parser.add_argument("--width", type=int, default=None, help="override the config's net.width")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="caption context length")
    parser.add_argument(
        "--caption-tokens", type=int, default=None, help="real tokens per caption (default: all)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--skip-diffusers", action="store_true")
    return parser.parse_args()


def sizes(args: argparse.Namespace) -> dict[str, int]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        model = compose("train", overrides=[f"model={args.model}"]).model
    picked = {
        "width": args.width or int(model.net.width),
        "layers": args.layers or int(model.net.layers),
        "heads": args.heads or int(model.net.heads),
        "embed_dim": args.embed_dim or int(model.embed_dim),
        "tokens": args.tokens or int(model.text_encoder.context_length),
    }
    picked["caption_tokens"] = min(args.caption_tokens or picked["tokens"], picked["tokens"])
    return picked


def ours(s: dict[str, int]) -> DiffusionPriorNet:
    """Caption states come in at embed_dim and are projected to the width, as in diffusers."""
    text_encoder = CaptionEncoder(
        mode="own", width=s["embed_dim"], context_length=s["tokens"], layers=0, heads=1
    )
    net = DiffusionPriorNet(
        s["embed_dim"],
        width=s["width"],
        layers=s["layers"],
        heads=s["heads"],
        caption_encoder=text_encoder,
    )
    net.caption_encoder.requires_grad_(False)  # unused: the bench feeds caption states
    return net


def theirs(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import PriorTransformer

    return PriorTransformer(
        num_attention_heads=s["heads"],
        attention_head_dim=s["width"] // s["heads"],
        num_layers=s["layers"],
        embedding_dim=s["embed_dim"],
        num_embeddings=s["tokens"],
        additional_embeddings=4,
    )


# a network call in the bench: (x_t, t, caption states, caption mask, txt_emb) -> x0
NetFn = Callable[..., torch.Tensor]


def ours_fn(net: DiffusionPriorNet, trim: int | None = None) -> NetFn:
    """`trim`: keep only the first `trim` caption positions (what CaptionEncoder.trim does)."""

    def run(x_t, t, states, mask, txt):
        if trim is not None:
            states, mask = states[:, :trim], mask[:, :trim]
        return net.denoise(x_t, t, net.condition_on_states(states, mask, txt))

    return run


def theirs_fn(net: torch.nn.Module) -> NetFn:
    def run(x_t, t, states, mask, txt):
        out = net(x_t, t, proj_embedding=txt, encoder_hidden_states=states, attention_mask=mask)
        return out.predicted_image_embedding

    return run


class Bench:
    def __init__(self, args: argparse.Namespace, s: dict[str, int]) -> None:
        self.args, self.s = args, s
        self.device = torch.device(args.device)
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"
        )
        self.diffusion = GaussianDiffusion(
            schedule="cosine", num_timesteps=1000, prediction="x0"
        ).to(self.device)

    def inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption states [B, L, D], their padding mask and z_t."""
        d, length, real = self.s["embed_dim"], self.s["tokens"], self.s["caption_tokens"]
        states = torch.randn(batch, length, d, device=self.device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        mask[:, :real] = True
        return states, mask, torch.randn(batch, d, device=self.device)

    def train_step(self, net: torch.nn.Module, fn: NetFn) -> Callable[[], None]:
        """One training step: forward, backward and an AdamW step on `--batch-size` samples."""
        b = self.args.batch_size
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as UnclipModule asks
        states, mask, txt = self.inputs(b)
        x0 = torch.randn(b, self.s["embed_dim"], device=self.device)

        def step() -> None:
            net.train()
            t = self.diffusion.sample_timesteps(b, self.device)
            with self.autocast:
                pred = fn(self.diffusion.q_sample(x0, t), t, states, mask, txt)
                loss = F.mse_loss(pred.float(), x0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def sample_run(self, make_model_fn: Callable[[int], Callable]) -> Callable[[], None]:
        """Sampling one batch of `--sample-batch` captions, conditioning included."""
        b, d = self.args.sample_batch, self.s["embed_dim"]

        @torch.no_grad()
        def run() -> None:
            with self.autocast:
                model_fn = make_model_fn(b)
                sample(
                    self.diffusion,
                    model_fn,
                    (b, d),
                    {"steps": self.args.sample_steps},
                    device=self.device,
                )

        return run

    def guided(self, fn: NetFn, batch: int) -> Callable:
        """Cond and uncond as one doubled batch through the full sequence, every step."""
        states, mask, txt = (torch.cat([x, x]) for x in self.inputs(batch))
        scale = self.args.guidance_scale

        def model_fn(x_t, t):
            both = fn(torch.cat([x_t, x_t]), torch.cat([t, t]), states, mask, txt).float()
            return guide_halves(both, scale)

        return model_fn

    def guided_cached(self, net: DiffusionPriorNet, batch: int) -> Callable:
        """Ours as the prior module samples: the caption prefix computed once, then the tail."""
        states, mask, txt = self.inputs(batch)
        cond = net.condition_on_states(states, mask, txt)
        cache = net.cache(Prefix.cat([cond, net.null_condition(batch, self.device)]))
        scale = self.args.guidance_scale

        def model_fn(x_t, t):
            both = cache.denoise(torch.cat([x_t, x_t]), torch.cat([t, t])).float()
            return guide_halves(both, scale)

        return model_fn


@dataclass
class Row:
    name: str
    params: int
    train: Callable[[], None] | None = None  # a training step
    sample: Callable[[], None] | None = None  # sampling one batch
    train_rates: list[float] = field(default_factory=list)  # samples/s, one per round
    latencies: list[float] = field(default_factory=list)  # seconds per sampling run, per round


def measure(rows: list[Row], args: argparse.Namespace, device: torch.device) -> None:
    """Every round times every row, in an order rotated each round, so neither a neighbour's load
    on a shared machine nor running first decides the comparison."""
    for number, order in enumerate(round_orders(len(rows), args.rounds), 1):
        for index in order:
            row = rows[index]
            if row.train is not None:
                step_s = seconds_per_call(row.train, args.train_iters, args.warmup, device)
                row.train_rates.append(args.batch_size / step_s)
            if row.sample is not None:
                row.latencies.append(seconds_per_call(row.sample, 1, 1, device))
        print(f"round {number}/{args.rounds} done", flush=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = sizes(args)
    bench = Bench(args, s)
    device = bench.device

    torch.manual_seed(0)
    our_net = ours(s).to(device)
    params = sum(p.numel() for p in our_net.transformer.parameters())
    rows = [
        Row(
            "ours (SDPA, fused QKV, prefix cache)",
            params,
            bench.train_step(our_net, ours_fn(our_net)),
            bench.sample_run(lambda b: bench.guided_cached(our_net, b)),
        ),
        Row(
            "ours, no prefix cache",
            params,
            sample=bench.sample_run(lambda b: bench.guided(ours_fn(our_net), b)),
        ),
    ]
    if s["caption_tokens"] < s["tokens"]:
        trimmed = ours_fn(our_net, trim=s["caption_tokens"])
        rows.append(
            Row("ours, caption padding trimmed", params, bench.train_step(our_net, trimmed))
        )
    if not args.skip_diffusers:
        try:
            their_net = theirs(s).to(device)
        except ImportError:
            print("diffusers is not installed (pip install -e '.[bench]'): only our prior is timed")
        else:
            rows.append(
                Row(
                    "diffusers PriorTransformer",
                    sum(p.numel() for p in their_net.transformer_blocks.parameters()),
                    bench.train_step(their_net, theirs_fn(their_net)),
                    bench.sample_run(lambda b: bench.guided(theirs_fn(their_net), b)),
                )
            )
    measure(rows, args, device)

    print(
        f"\ndevice {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"{args.precision}; width {s['width']}, layers {s['layers']}, heads {s['heads']}, "
        f"embed_dim {s['embed_dim']}, caption {s['caption_tokens']}/{s['tokens']} tokens + 4"
    )
    print(
        f"train: batch {args.batch_size}, fwd+bwd+fused AdamW; sample: batch {args.sample_batch}, "
        f"{args.sample_steps} steps, guidance {args.guidance_scale} (doubled batch); "
        f"{args.rounds} interleaved rounds: median (min-max)\n"
    )
    header = (
        f"{'network':38s} {'block params':>13s} {'train samples/s':>24s} {'sample latency s':>24s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        train, latency = spread(row.train_rates), spread(row.latencies, ".3f")
        print(f"{row.name:38s} {row.params / 1e6:12.2f}M {train:>24s} {latency:>24s}")


if __name__ == "__main__":
    main()
