"""`init_from=PATH`: start a run from another checkpoint's weights (fine-tuning), not resume it.

Only weights move: the optimiser, LR schedule, step count and EMA counter start fresh. The source is
any unclip checkpoint of the same stage and shapes (a trained run, or one `python -m unclip.convert
from-diffusers` wrote); its EMA weights are taken when it has them (`init_from_ema=false`: the raw
ones), and the new run's EMA starts equal to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from unclip.training.module import UnclipModule

log = logging.getLogger(__name__)

NET, EMA_NET = "net.", "ema.module."
FRESH_KEYS = ("ema.num_updates",)


def source_weights(state: dict[str, torch.Tensor], use_ema: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with `net.*` taken from its EMA copy when asked and present."""
    weights = {k: v for k, v in state.items() if not k.startswith(EMA_NET) and k not in FRESH_KEYS}
    if use_ema:
        for key, value in state.items():
            if key.startswith(EMA_NET):
                weights[NET + key[len(EMA_NET) :]] = value
    return weights


def init_weights(module: UnclipModule, path: str | Path, use_ema: bool = True) -> None:
    """Copy the weights of checkpoint `path` into `module` (network, its EMA copy, fitted buffers
    such as the prior's embedding statistics); a tensor that is missing, extra or of another shape
    fails naming it and both shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={str(path)!r}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"init_from={str(path)!r} holds no state_dict: not a unclip checkpoint")
    weights = source_weights(checkpoint["state_dict"], use_ema)
    target = module.state_dict()
    wanted = {}
    for key in target:
        if key in FRESH_KEYS:
            continue
        source_key = NET + key[len(EMA_NET) :] if key.startswith(EMA_NET) else key
        wanted[key] = source_key
    missing = sorted({s for s in wanted.values() if s not in weights})
    extra = sorted(set(weights) - set(wanted.values()))
    if missing or extra:
        raise ValueError(
            f"init_from={str(path)!r} does not fit this model: "
            + "; ".join(
                part
                for part in (
                    f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "",
                )
                if part
            )
        )
    for key, source_key in wanted.items():
        have, want = tuple(weights[source_key].shape), tuple(target[key].shape)
        if have != want:
            raise ValueError(
                f"init_from={str(path)!r}: {source_key} has shape {have} in the checkpoint but "
                f"{want} in this model (check the model config against the checkpoint's)"
            )
    with torch.no_grad():
        module.load_state_dict(
            {**target, **{key: weights[source] for key, source in wanted.items()}}, strict=True
        )
    which = (
        "EMA" if use_ema and any(k.startswith(EMA_NET) for k in checkpoint["state_dict"]) else "raw"
    )
    log.info("initialised %s from %s (%s weights)", type(module).__name__, path, which)
