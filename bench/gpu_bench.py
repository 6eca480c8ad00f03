"""The first GPU numbers, in one prepared run (under 8 minutes on one H200), in bf16-mixed:

(a) the diffusion prior net at paper width (conf/model/prior_diffusion_paper.yaml: 2048 wide, 32
    heads, 256 caption tokens + 4), at the paper's 24 layers or fewer when they do not fit in
    memory: step time, tokens/s and MFU against the GPU's bf16 dense peak, torch.compile off / on;
(b) the decoder UNet at paper width (conf/model/decoder_paper.yaml) at 64px: step time, images/s;
(c) the upsampler UNet at paper width (conf/model/upsampler_256.yaml) on 64px crops;
(d) `python train.py strategy=fsdp` on one GPU for the prior against the single-device strategy.

    python bench/gpu_bench.py --out /tmp/gpu_bench          # on the GPU machine
    python bench/gpu_bench.py --quick --out /tmp/gpu_quick  # everything tiny on CPU (a smoke test)

A step is forward, backward and a fused AdamW step under bf16 autocast (fp32 master weights, as
Lightning's bf16-mixed), timed over `--steps` steps after `--warmup` untimed ones (for compile the
warm-up includes compilation, reported apart; --quick compiles with the "eager" backend, which
checks the tracing but not inductor's kernels). Every part runs under try/except: a failure prints
one line and the others still run. Eager parts run first; the compiled ones run while
`--budget-s` lasts. The table goes to stdout and to <out>/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timing import synchronize
from unet_bench import decoder_config
from unet_bench import inputs as unet_inputs
from unet_bench import ours as decoder_unet

from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.diffusion_prior_net import TAIL_TOKENS, DiffusionPriorNet
from unclip.nn.unet import UNet

REPO = Path(__file__).resolve().parents[1]
# bf16 dense tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

PRIOR_PAPER = {"embed_dim": 1024, "width": 2048, "layers": 24, "heads": 32, "tokens": 256}
PRIOR_QUICK = {"embed_dim": 16, "width": 32, "layers": 2, "heads": 4, "tokens": 8}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU: a smoke test")
    parser.add_argument("--budget-s", type=float, default=360.0, help="no new part after this")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prior-batch", type=int, default=64)
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument("--upsampler-batch", type=int, default=16)
    parser.add_argument("--fsdp-steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak, if unknown")
    parser.add_argument("--parts", nargs="+", default=["prior", "decoder", "upsampler", "fsdp"])
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
        args.prior_batch, args.decoder_batch, args.upsampler_batch = 4, 2, 2
        args.fsdp_steps = 4
    return args


# ---- FLOPs ---------------------------------------------------------------------------------------
def prior_sequence(tokens: int) -> int:
    """Caption tokens, the text embedding, then timestep, z_t and the query (the prior's tail)."""
    return tokens + 1 + TAIL_TOKENS


def prior_step_flops(block_params: int, layers: int, width: int, seq: int, batch: int) -> float:
    """Training FLOPs of one step: 6 x N x tokens for the matmuls (forward 2, backward 4), N the
    transformer blocks' parameters (every token passes through them; the in/out projections touch
    one to 256 tokens and the embeddings are lookups, so both are left out), plus the attention
    scores and their weighted sum, 2 x 2 x seq^2 x width forward per layer, times 3 with backward
    = 12 x layers x seq^2 x width per sample (the causal mask's skipped half counted, as SDPA's
    masked kernel computes it)."""
    return batch * (6.0 * block_params * seq + 12.0 * layers * seq**2 * width)


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


# ---- one timed training step ---------------------------------------------------------------------
def timed_training(
    net: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
    compiled: bool,
) -> dict[str, float]:
    """Seconds per step (forward, backward, fused AdamW) under bf16 autocast, and the seconds
    the warm-up took (compilation included when `compiled`)."""
    # --quick traces with dynamo but skips inductor's code generation (minutes on a small CPU)
    run = torch.compile(net, backend="eager" if args.quick else "inductor") if compiled else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    net.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(run)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    out = {"step_s": (time.perf_counter() - start) / args.steps, "warmup_s": warm}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- (a) the prior -------------------------------------------------------------------------------
def prior_net(sizes: dict[str, int], layers: int) -> DiffusionPriorNet:
    """The paper prior as conf/model/prior_diffusion_paper.yaml builds it: the caption embedded
    (a text encoder of 0 layers) and one causal stack over caption + 4 tokens."""
    captions = CaptionEncoder(
        mode="own",
        width=sizes["width"],
        context_length=sizes["tokens"],
        layers=0,
        heads=sizes["heads"],
    )
    return DiffusionPriorNet(
        sizes["embed_dim"],
        width=sizes["width"],
        layers=layers,
        heads=sizes["heads"],
        mlp_ratio=4,
        caption_encoder=captions,
    )


def prior_part(args, device, compiled: bool, layers: int) -> dict[str, Any]:
    sizes = PRIOR_QUICK if args.quick else PRIOR_PAPER
    net = prior_net(sizes, layers).to(device)
    b, d = args.prior_batch, sizes["embed_dim"]
    tokens = torch.randint(1, 1000, (b, sizes["tokens"]), device=device)
    txt, x0 = torch.randn(b, d, device=device), torch.randn(b, d, device=device)
    t = torch.randint(0, 1000, (b,), device=device)

    def loss_fn(run: torch.nn.Module) -> torch.Tensor:
        return F.mse_loss(run(x0 + torch.randn_like(x0), t, tokens, txt).float(), x0)

    timing = timed_training(net, loss_fn, args, device, compiled)
    seq = prior_sequence(sizes["tokens"])
    block_params = count(net.transformer)
    flops = prior_step_flops(block_params, layers, sizes["width"], seq, b)
    peak = peak_flops(args, device)
    row = {
        "part": "prior",
        "config": f"width {sizes['width']}, {layers} layers, {sizes['heads']} heads, seq {seq}, "
        f"batch {b}",
        "params_M": count(net) / 1e6,
        "block_params_M": block_params / 1e6,
        "compile": compiled,
        **timing,
        "rate": b * seq / timing["step_s"],
        "unit": "tokens/s",
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / timing["step_s"] / 1e12,
    }
    if peak:
        row["mfu"] = flops / timing["step_s"] / peak
    return row


def prior_that_fits(args, device, chosen: list[int]) -> dict[str, Any]:
    """The paper's 24 layers, or the most of 16, 12, 8, 4 whose eager step fits in memory;
    `chosen` receives the depth, for the compiled run."""
    candidates = [PRIOR_QUICK["layers"]] if args.quick else [24, 16, 12, 8, 4]
    for layers in candidates:
        row = None
        try:
            row = prior_part(args, device, False, layers)
        except torch.OutOfMemoryError:
            print(f"[prior] {layers} layers: out of memory, trying fewer", flush=True)
        if row is None:  # outside the except block, whose traceback still holds the tensors
            torch.cuda.empty_cache()
            continue
        chosen.append(layers)
        return row
    raise RuntimeError("the prior did not fit at 4 layers")


# ---- (b, c) the UNets ----------------------------------------------------------------------------
def decoder_part(args, device, compiled: bool) -> dict[str, Any]:
    cfg = decoder_config("decoder" if args.quick else "decoder_paper")
    net = decoder_unet(cfg).to(device).to(memory_format=torch.channels_last)  # the stage default
    b = args.decoder_batch
    x, t, cond, context = unet_inputs(cfg, b, device)
    target = torch.randn(b, cfg["out_channels"], *x.shape[-2:], device=device)

    def loss_fn(run: torch.nn.Module) -> torch.Tensor:
        return F.mse_loss(run(x, t, cond, context).float(), target)

    timing = timed_training(net, loss_fn, args, device, compiled)
    size = cfg["image_size"]
    return {
        "part": "decoder",
        "config": f"base {cfg['unet']['model_channels']}, {size}px, {cfg['context_length']} "
        f"context tokens, batch {b}, channels_last",
        "params_M": count(net) / 1e6,
        "compile": compiled,
        **timing,
        "rate": b / timing["step_s"],
        "unit": "images/s",
    }


def upsampler_part(args, device, compiled: bool) -> dict[str, Any]:
    """The 64 -> 256 upsampler as UpsamplerModule builds it (no attention, noisy crop + resized
    low-res input: 6 channels) on 64px crops, the paper's training crop."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        model = compose("train", overrides=["model=upsampler_256"]).model
    unet = {k: v for k, v in dict(model.unet).items() if k != "attention_resolutions"}
    if args.quick:
        unet.update(model_channels=16, channel_mult=[1, 2], num_res_blocks=1)
    crop = 64
    net = UNet(**unet, attention_resolutions=(), in_channels=6, out_channels=3, image_size=crop)
    net = net.to(device).to(memory_format=torch.channels_last)
    b = args.upsampler_batch
    x = torch.randn(b, 6, crop, crop, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn(b, 3, crop, crop, device=device)

    def loss_fn(run: torch.nn.Module) -> torch.Tensor:
        return F.mse_loss(run(x, t).float(), target)

    timing = timed_training(net, loss_fn, args, device, compiled)
    return {
        "part": "upsampler",
        "config": f"base {unet['model_channels']}, {crop}px crops, batch {b}, channels_last",
        "params_M": count(net) / 1e6,
        "compile": compiled,
        **timing,
        "rate": b / timing["step_s"],
        "unit": "images/s",
    }


# ---- (d) train.py under FSDP vs one device ------------------------------------------------------
FSDP_PRIOR = {"embed_dim": 1024, "width": 2048, "layers": 8, "heads": 32, "tokens": 64}


def write_prior_shards(folder: Path, embed_dim: int, samples: int) -> None:
    """Random unit embeddings and short captions, in shards our writer makes, with a meta.json."""
    from unclip.data.format import embedding_meta, write_json_atomic
    from unclip.data.writer import AtomicShardWriter

    rng = np.random.default_rng(0)
    with AtomicShardWriter(folder / "train-000000.tar") as writer:
        for index in range(samples):
            emb = rng.standard_normal((2, embed_dim)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            writer.write(
                {
                    "__key__": f"k{index:06d}",
                    "txt": f"a red square {index}",
                    "img_emb": emb[0],
                    "txt_emb": emb[1],
                }  # fmt: skip
            )
    write_json_atomic(folder / "meta.json", embedding_meta("gpu-bench-random", embed_dim))


def train_py_rate(args, folder: Path, strategy: list[str], name: str) -> dict[str, Any]:
    """Run train.py for `--fsdp-steps` steps; steps/s from the throughput monitor's last window
    (logged to metrics.csv), the wall time of the whole run beside it."""
    sizes = PRIOR_QUICK if args.quick else FSDP_PRIOR
    window = max(2, args.fsdp_steps // 3)
    command = [
        sys.executable, str(REPO / "train.py"), "model=prior_diffusion", "data=shapes_emb",
        f"data.train_shards={folder}/train-*.tar", f"data.val_shards={folder}/train-*.tar",
        f"paths.runs_dir={folder}/runs", f"run_name={name}", "logger=csv",
        "~callbacks.progress_bar", "~callbacks.sample_grid", "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint",
        f"callbacks.throughput.window_size={window}", "data.num_workers=2",
        f"data.batch_size={args.prior_batch}", "data.shuffle_buffer=64",
        f"trainer.max_steps={args.fsdp_steps}", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
        "model.normalization.max_samples=64", f"model.embed_dim={sizes['embed_dim']}",
        f"model.net.width={sizes['width']}", f"model.net.layers={sizes['layers']}",
        f"model.net.heads={sizes['heads']}", f"model.text_encoder.width={sizes['width']}",
        f"model.text_encoder.context_length={sizes['tokens']}", "model.text_encoder.layers=0",
        f"model.text_encoder.heads={sizes['heads']}", *strategy,
    ]  # fmt: skip
    start = time.perf_counter()
    paths = [str(REPO), *([str(REPO / "tests")] if args.quick else [])]  # tests: fsdp_cpu
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    wall = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"train.py exited {done.returncode}: {tail[0][:300]}")
    rate = last_logged(folder / "runs" / name, "train/device/batches_per_sec")
    return {
        "part": "train.py prior",
        "config": f"{' '.join(strategy) or 'strategy=auto'}; width {sizes['width']}, "
        f"{sizes['layers']} layers, batch {args.prior_batch}, {args.fsdp_steps} steps",
        "compile": False,
        "step_s": 1 / rate if rate else float("nan"),
        "rate": rate,
        "unit": f"steps/s (last {window} steps)",
        "wall_s": wall,
    }


def last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of `key` in the run's metrics.csv files (the CSV logger's)."""
    import csv

    value = None
    for path in sorted(run_dir.rglob("metrics.csv")):
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                if row.get(key):
                    value = float(row[key])
    return value


def fsdp_parts(args, work: Path) -> list[dict[str, Any]]:
    sizes = PRIOR_QUICK if args.quick else FSDP_PRIOR
    folder = work / "fsdp_shards"
    write_prior_shards(folder, sizes["embed_dim"], 8 * args.prior_batch)
    if args.quick:  # the CPU stand-in for FSDP the tests use (tests/fsdp_cpu.py), one process
        device = ["trainer=cpu", "trainer.precision=32-true"]
        fsdp = ["strategy=fsdp", "strategy._target_=fsdp_cpu.cpu_test_fsdp_strategy",
                "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1"]  # fmt: skip
    else:
        device = ["trainer=gpu", "trainer.devices=1"]
        fsdp = ["trainer=gpu", "strategy=fsdp", "trainer.devices=1"]
    rows = []
    for name, strategy in (("single", device), ("fsdp", fsdp)):
        rows.append(run_part(f"train.py {name}", lambda s=strategy, n=name: train_py_rate(
            args, folder, s, f"bench-{n}")))  # fmt: skip
    return [r for r in rows if r]


def write_record(
    out: Path, name: str, peak: float | None, rows: list[dict[str, Any]], started: float
) -> None:
    record = {
        "device": name,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "torch": torch.__version__,
        "bf16_peak_flops": peak,
        "flops_formula": "6*block_params*seq + 12*layers*seq^2*width per sample",
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
    }
    (out / "gpu_bench.json").write_text(json.dumps(record, indent=2) + "\n")


# ---- the run -------------------------------------------------------------------------------------
def run_part(label: str, part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One part; its failure becomes a row with the error's one line, and the run goes on."""
    try:
        row = part()
    except Exception as error:  # noqa: BLE001 - every part reports, none stops the others
        line = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"[{label}] failed: {line[:300]}", flush=True)
        if os.environ.get("GPU_BENCH_TRACEBACK"):
            traceback.print_exc()
        row = {"part": label, "error": line[:300]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"[{label}] {format_row(row)}", flush=True)
    return row


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error']}"
    cells = [row.get("config", ""), f"compile {'on' if row.get('compile') else 'off'}"]
    cells.append(f"step {1000 * row['step_s']:.1f} ms")
    cells.append(f"{row['rate']:,.1f} {row['unit']}" if row.get("rate") else "rate -")
    if "params_M" in row:
        cells.append(f"{row['params_M']:.0f}M params")
    if "mfu" in row:
        cells.append(f"MFU {100 * row['mfu']:.1f}% ({row['achieved_tflops']:.0f} TFLOP/s)")
    return "; ".join(cells + notes(row))


def notes(row: dict[str, Any]) -> list[str]:
    """Compile warm-up, peak memory and a train.py run's wall clock, where a row has them."""
    found = []
    if row.get("compile"):
        found.append(f"warm-up incl. compile {row['warmup_s']:.0f} s")
    if "peak_mem_gib" in row:
        found.append(f"peak {row['peak_mem_gib']:.1f} GiB")
    if "wall_s" in row:
        found.append(f"run wall {row['wall_s']:.0f} s")
    return found


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    device = torch.device("cpu" if args.quick else "cuda")
    if args.quick:
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (quick)"
    peak = peak_flops(args, device)
    print(
        f"{name}, torch {torch.__version__}, bf16 autocast, fused AdamW; "
        f"{args.steps} timed steps after {args.warmup}; bf16 peak "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no MFU)'}\n"
        "MFU FLOPs: 6 x (transformer block params) x tokens + 12 x layers x seq^2 x width per "
        "sample (attention, causal half included); embeddings and in/out projections left out",
        flush=True,
    )
    torch.manual_seed(0)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    rows: list[dict[str, Any]] = []
    eager: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    compiled: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "prior" in args.parts:
        fits: list[int] = []
        eager.append(("prior", lambda: prior_that_fits(args, device, fits)))
        compiled.append(("prior compiled", lambda: prior_part(args, device, True, fits[0])))
    if "decoder" in args.parts:
        eager.append(("decoder", lambda: decoder_part(args, device, False)))
    if "upsampler" in args.parts:
        eager.append(("upsampler", lambda: upsampler_part(args, device, False)))
    if "fsdp" in args.parts:
        eager.append(("train.py", lambda: {"rows": fsdp_parts(args, args.out)}))
    if "upsampler" in args.parts:
        compiled.append(("upsampler compiled", lambda: upsampler_part(args, device, True)))
    if "decoder" in args.parts:
        compiled.append(("decoder compiled", lambda: decoder_part(args, device, True)))
    for label, part in eager + compiled:
        if left() <= 0:
            print(f"[{label}] skipped: --budget-s {args.budget_s:.0f} spent", flush=True)
            rows.append({"part": label, "error": "skipped: time budget spent"})
            continue
        row = run_part(label, part) if label != "train.py" else part()
        rows.extend(row.get("rows", [row]))
        write_record(args.out, name, peak, rows, started)  # after every part: a kill keeps them

    print(f"\n| part | configuration | compile | step ms | rate | MFU | notes |  ({name})")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['part']} | - | - | - | - | - | {row['error']} |")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        rate = f"{row['rate']:,.1f} {row['unit']}" if row.get("rate") else "-"
        print(
            f"| {row['part']} | {row['config']} | {'on' if row.get('compile') else 'off'} | "
            f"{1000 * row['step_s']:.1f} | {rate} | {mfu} | {'; '.join(notes(row))} |"
        )
    write_record(args.out, name, peak, rows, started)
    print(f"\n{time.perf_counter() - started:.0f} s; written {args.out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
