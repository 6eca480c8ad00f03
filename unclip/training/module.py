"""The base LightningModule every unclip stage extends.

It owns what all stages share: the optimiser and LR schedule built from the `optim` config, the EMA
of `self.net`, logging of skipped data samples, and a tag in every checkpoint naming the stage's class,
so `load_module(path)` can rebuild any stage without being told which one it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from unclip.training.config_check import build_config
from unclip.training.ema import EMA
from unclip.training.fsdp import clip_sharded_gradients, mark_unit
from unclip.training.nan_guard import first_non_finite

CHECKPOINT_CLASS_KEY = "unclip_module"
SKIPPED_KEY = "unclip_skipped_samples"
# stage classes that moved: the path an older checkpoint names -> where the class lives now
CLASS_ALIASES = {
    "unclip.models.prior_diffusion.DiffusionPriorModule": (
        "unclip.models.diffusion_prior.DiffusionPriorModule"
    ),
    "unclip.models.prior_ar.ARPriorModule": "unclip.models.ar_prior.ARPriorModule",
}


@dataclass
class OptimConfig:
    """`model.optim`: AdamW and its LR schedule."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # constant | cosine (to min_lr_ratio * lr at trainer.max_steps)
    schedule: str = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class EMAConfig:
    """`model.ema` (null: no EMA): the average's target decay, how often it updates, and the
    step before which it copies the weights instead."""

    decay: float = 0.999
    update_every: int = 1
    start_step: int = 0


class UnclipModule(L.LightningModule):
    """Subclasses build `self.net` (the trained nn.Module) and call `self.init_ema()` after it.

    `config_groups` maps a stage's nested config blocks to the dataclasses they fill, and
    `settings_config` is the dataclass of its top-level scalar settings (`model.<key>`, taken as
    `**settings`): both the only place their defaults live, so `validate_config` (run by train.py
    before anything is built) and the stage itself read them the same way."""

    data_fields: list[str] = []
    embed_dim: int | None = None  # the CLIP embedding size the stage consumes
    net: nn.Module
    config_groups: ClassVar[dict[str, type]] = {"optim": OptimConfig, "ema": EMAConfig}
    settings_config: ClassVar[type | None] = None

    def __init__(self, optim: dict | None = None, ema: dict | None = None) -> None:
        super().__init__()
        self.optim_cfg = dataclasses.asdict(build_config(OptimConfig, optim, "model.optim"))
        self.ema_cfg = None if ema is None else build_config(EMAConfig, ema, "model.ema")
        self.ema: EMA | None = None
        self._skipped_total = 0

    @classmethod
    def validate_config(cls, cfg: dict[str, Any], where: str = "model") -> None:
        """Fail naming `where.<group>.<key>` on an unknown or mistyped key of a typed block."""
        for group, config in cls.config_groups.items():
            if cfg.get(group) is not None:
                build_config(config, cfg[group], f"{where}.{group}")
        if cls.settings_config is not None:
            cls.build_settings(cls.scalar_settings(cfg), where)

    @classmethod
    def block_names(cls) -> set[str]:
        """The constructor's named arguments: the nested blocks; the rest are scalar settings."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"self"}

    @classmethod
    def scalar_settings(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The keys of a `model` block that `settings_config` holds (what `**settings` gets)."""
        blocks = cls.block_names()
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in blocks}

    @classmethod
    def build_settings(cls, settings: Mapping[str, Any], where: str = "model") -> Any:
        """`settings_config` from the scalar `model.<key>` settings: its defaults, overridden."""
        return build_config(cls.settings_config, settings, where, also_known=cls.block_names())

    def save_settings(self, settings: Any) -> None:
        """Checkpoint the effective scalar settings (a later change of a default does not move
        an old checkpoint) beside the nested blocks as the constructor holds them: plain
        containers, `weights_only` loading, and `cls(**hparams)` rebuilds the stage. Called
        from the stage's `__init__`, whose blocks it reads (as Lightning's
        `save_hyperparameters` reads its arguments)."""
        caller = inspect.currentframe().f_back.f_locals
        blocks = {name: caller[name] for name in self.block_names()}
        self.save_hyperparameters({**dataclasses.asdict(settings), **blocks})

    def generator(self, seed: int) -> torch.Generator:
        """Where random generators live: on the module's device (the AR prior draws codes there),
        seeded explicitly. Diffusion noise is drawn on the generator's device and moved."""
        return torch.Generator(device=self.device).manual_seed(int(seed))

    # ---- EMA -----------------------------------------------------------------------------------
    def init_ema(self) -> None:
        # shapes as built: under FSDP the parameters become flat 1-D shards (weight decay groups)
        self._param_ndims = {name: p.ndim for name, p in self.net.named_parameters()}
        mark_unit(self.net)  # network and EMA copy: FSDP units of one structure (training/fsdp.py)
        if self.ema_cfg is not None and self.ema_cfg.decay > 0:
            self.ema = EMA(self.net, **dataclasses.asdict(self.ema_cfg))

    @property
    def eval_net(self) -> nn.Module:
        """The network used for validation and sampling: the EMA weights when there are any."""
        return self.ema.module if self.ema is not None else self.net

    @contextlib.contextmanager
    def sampling_weights(self, which: str = "ema") -> Iterator[None]:
        """Inside, `eval_net` is the EMA network (`"ema"`, the default) or the online one
        (`"online"`): metrics of both sets of weights from one module."""
        if which not in ("ema", "online"):
            raise ValueError(f"sampling weights must be 'ema' or 'online', got {which!r}")
        ema = self.ema
        if which == "online":
            self.ema = None
        try:
            yield
        finally:
            self.ema = ema

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA follows each optimiser step here, before any callback's on_train_batch_end, so a
        # checkpoint written at step n holds the EMA of step n (a resumed run misses no update)
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.net, self.global_step + 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # counted before the step, so a checkpoint written after it holds this batch's skips too
        if isinstance(batch, dict) and "skipped" in batch:
            self._skipped_total += int(batch["skipped"].sum())
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "take_startup_skipped"):
            startup = datamodule.take_startup_skipped()  # the same on every rank: count it once
            if self.trainer.is_global_zero:
                self._skipped_total += startup
        self.log("data/skipped_total", self.skipped_over_ranks(), on_step=True)

    def skipped_over_ranks(self) -> float:
        """Skipped samples of every rank, summed (each rank counts only its own stream's)."""
        local = torch.tensor(float(self._skipped_total), device=self.device)
        return float(self.trainer.strategy.reduce(local, reduce_op="sum"))

    # ---- optimisation --------------------------------------------------------------------------
    def parameters_to_optimize(self) -> list[dict]:
        """AdamW groups: no weight decay on biases, norms and embeddings (1-D tensors)."""
        decay, no_decay = [], []
        ndims = getattr(self, "_param_ndims", {})
        for name, param in self.net.named_parameters():
            if param.requires_grad:
                ndim = ndims.get(unwrapped_name(name), param.ndim)
                (decay if ndim >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.optim_cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # FSDP: the norm over all shards, through the root module (Lightning's FSDP precision
        # plugin refuses norm clipping); everything else: Lightning's own clipping
        norm = bool(gradient_clip_val) and gradient_clip_algorithm in (None, "norm")
        if norm and clip_sharded_gradients(self._trainer, float(gradient_clip_val)):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _adamw_implementation(self) -> dict[str, bool]:
        """The fused kernel (one call for every parameter: 5-6x faster steps than torch's
        per-tensor default on CPU, bench/optimizer_bench.py) where Lightning allows it. Its AMP
        plugin refuses gradient clipping with an optimizer that unscales internally, as fused ones
        do, so mixed precision gets foreach."""
        params = list(self.net.parameters())
        if not params or any(p.device.type not in ("cpu", "cuda") for p in params):
            return {}
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if "mixed" in precision:
            return {"foreach": True}
        return {"fused": True}

    def configure_optimizers(self) -> dict:
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(
            self.parameters_to_optimize(),
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            eps=cfg["eps"],
            **self._adamw_implementation(),
        )
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        schedule = lr_lambda(cfg["schedule"], cfg["warmup_steps"], total, cfg["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        # every rank saves (and reduces) together; the file holds the total over ranks
        checkpoint[SKIPPED_KEY] = int(self.skipped_over_ranks()) if self._trainer else 0

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed run keeps counting from the total over ranks, carried on by rank 0
        total = int(checkpoint.get(SKIPPED_KEY, 0))
        self._skipped_total = total if self._trainer is None or self.trainer.is_global_zero else 0


def unwrapped_name(name: str) -> str:
    """A parameter's name without FSDP / activation-checkpointing wrapper segments."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


class _LRSchedule:
    """A picklable LR multiplier: linear warm-up, then constant or cosine decay."""

    def __init__(self, schedule: str, warmup: int, total: int | None, min_ratio: float) -> None:
        if schedule not in ("constant", "cosine"):
            raise ValueError(
                f"model.optim.schedule must be 'constant' or 'cosine', got {schedule!r}"
            )
        if schedule == "cosine" and not total:
            raise ValueError("model.optim.schedule=cosine needs trainer.max_steps > 0")
        self.schedule, self.warmup, self.total, self.min_ratio = schedule, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_lambda(schedule: str, warmup: int, total: int | None, min_ratio: float) -> _LRSchedule:
    return _LRSchedule(schedule, warmup, total, min_ratio)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file, or a sharded FSDP checkpoint folder (`strategy.state_dict_type=sharded`)
    consolidated in memory into the same one-file form."""
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        return _format_checkpoint(_load_distributed_checkpoint(path))
    return torch.load(path, map_location=map_location, weights_only=True)


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> UnclipModule:
    """Rebuild whichever stage a checkpoint holds, with its EMA weights, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = read_checkpoint(path, map_location)
    class_path = checkpoint.get(CHECKPOINT_CLASS_KEY)
    if class_path is None:
        raise ValueError(f"{path} is not an unclip checkpoint (no '{CHECKPOINT_CLASS_KEY}' entry)")
    bad_key = first_non_finite(checkpoint.get("state_dict", {}))
    if bad_key is not None:
        raise ValueError(f"{path} holds NaN/inf weights ({bad_key}): refusing to sample with it")
    module_name, _, class_name = CLASS_ALIASES.get(class_path, class_path).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    source: Path | io.BytesIO = path
    if path.is_dir():  # consolidated above: hand Lightning the one-file form
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    module = cls.load_from_checkpoint(source, map_location=map_location, weights_only=True)
    module.checkpoint_path = str(path)
    return module.eval()
