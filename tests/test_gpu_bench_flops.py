"""bench/gpu_bench.py's MFU rests on its FLOP count: check it on a tiny prior against a count by
hand (a pre-LN block: qkv 3w^2+3w, out w^2+w, MLP 8w^2+5w, two LayerNorms 4w)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gpu_bench import count, prior_net, prior_sequence, prior_step_flops  # noqa: E402


def test_prior_flops_match_a_count_by_hand() -> None:
    width, layers, tokens, batch = 16, 2, 5, 3
    sizes = {"embed_dim": 8, "width": width, "layers": layers, "heads": 2, "tokens": tokens}
    net = prior_net(sizes, layers)
    block_params = count(net.transformer)
    assert block_params == layers * (12 * width**2 + 13 * width)
    seq = prior_sequence(tokens)
    assert seq == net.positional_embedding.shape[0] == tokens + 4
    # forward: 2 FLOPs per weight per token, QK^T and AV 2 x seq^2 x width each; backward twice that
    forward = batch * (2 * block_params * seq + layers * 4 * seq**2 * width)
    assert prior_step_flops(block_params, layers, width, seq, batch) == 3 * forward
