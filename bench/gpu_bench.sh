#!/usr/bin/env bash
# On a lent GPU machine: the whole table in under 8 minutes, written to ${OUT:-/tmp/gpu_bench}.
cd "$(dirname "$0")/.." && PYTHONPATH=$PWD WANDB_MODE=disabled timeout 470 python bench/gpu_bench.py --out "${OUT:-/tmp/gpu_bench}" "$@"
