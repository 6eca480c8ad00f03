"""A demo training stage on a CPU: one process using every core against Lightning's DDP with one
process per core (gloo), at the same global batch. Each side is a real `train.py` run (data
loaders, EMA, logging, no validation); its rate is the progress line's steps/s over the run.

    python bench/ddp_cpu_bench.py                       # the demo decoder, 2 cores, 200 steps
    python bench/ddp_cpu_bench.py --experiment demo_clip --batch-size 64

Needs the demo's data and runs (`make demo`, or --data-dir/--runs-dir of one). The two sides take
turns over --rounds rounds (bench/timing.py); cells are median (min-max) of the rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import round_orders, spread  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RATE = re.compile(r"^step (\d+)/\d+ .*\| ([\d.]+) steps/s", re.MULTILINE)


def run_stage(args: argparse.Namespace, processes: int, out: Path) -> tuple[float, float]:
    """(steps/s of the training loop, wall seconds of the whole command)."""
    threads = max(1, args.cores // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("WANDB_MODE", "disabled")
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"experiment={args.experiment}",
        f"paths.data_dir={args.data_dir}",
        f"paths.runs_dir={out}",
        "run_name=bench",
        "callbacks=default",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        f"data.batch_size={args.batch_size // processes}",
        "logger=none",
    ]
    if processes > 1:
        command += ["strategy=ddp", f"trainer.devices={processes}", "trainer.accelerator=cpu"]
    for run in Path(args.runs_dir).glob("demo-*"):  # the stages this one reads (the demo CLIP)
        (out / run.name).symlink_to(run.resolve())
    started = time.perf_counter()
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rates = RATE.findall(result.stdout + result.stderr)
    if not rates:
        raise SystemExit(f"no progress line in the output of {' '.join(command)}")
    return float(rates[-1][1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="demo_decoder")
    parser.add_argument("--data-dir", default=str(REPO / "data"))
    parser.add_argument("--runs-dir", default=str(REPO / "runs"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch of both sides")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sides = {"1 process": 1, f"DDP, {args.cores} processes": args.cores}
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    for order in round_orders(len(names), args.rounds):
        for index in order:
            name = names[index]
            with tempfile.TemporaryDirectory() as out:
                rate, wall = run_stage(args, sides[name], Path(out))
            rates[name].append(rate)
            walls[name].append(wall)
            print(f"  {name}: {rate:.2f} steps/s, {wall:.0f} s", flush=True)
    print(
        f"\n{args.experiment}, global batch {args.batch_size}, {args.steps} steps, "
        f"{args.cores} cores, {args.rounds} rounds\n"
    )
    print("| side | threads per process | steps/s | samples/s | command wall (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        samples = [r * args.batch_size for r in rates[name]]
        threads = max(1, args.cores // sides[name])
        print(
            f"| {name} | {threads} | {spread(rates[name], '.2f')} | {spread(samples)} | "
            f"{spread(walls[name], '.0f')} |"
        )


if __name__ == "__main__":
    main()
