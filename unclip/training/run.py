"""From a composed Hydra config to a trained checkpoint: the body of `train.py`."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf, open_dict

from unclip.training.checkpoints import SafeCheckpointIO, newest_loadable, remove_staged
from unclip.training.config_check import check_config
from unclip.training.fsdp import FullWeightsForEval
from unclip.training.generation_eval import generation_eval
from unclip.training.loggers import finish_loggers
from unclip.training.seeding import RankSeed

log = logging.getLogger(__name__)

CHECKED_GROUPS = ("model", "data", "trainer", "strategy", "logger", "callbacks")


def use_job_dir_in_sweeps(cfg: DictConfig) -> None:
    """In a multirun every job gets its own run directory (the sweep's job folder)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg.paths.run_dir = HydraConfig.get().runtime.output_dir


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` means this run's own last checkpoint; a fresh run with `last` starts from scratch,
    so one command both starts and resumes a preemptible job."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        folder = run_dir / "checkpoints"
        last = folder / "last.ckpt"
        remove_staged(folder)
        found = newest_loadable(folder, first=last)
        if found is None:
            log.warning(
                "ckpt_path=last but %s holds no loadable checkpoint: starting from scratch", folder
            )
            return None
        if found != last:
            log.warning(
                "ckpt_path=last: %s is missing or broken; resuming from %s instead", last, found
            )
        else:
            log.info("resuming from %s", last)
        return str(found)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    return ckpt_path


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    if not cfg:
        return []
    return [
        instantiate(node, _convert_="all") for node in cfg.values() if node and "_target_" in node
    ]


def instantiate_loggers(cfg: DictConfig | None) -> list:
    if not cfg:
        return []
    return [
        instantiate(node, _convert_="all") for node in cfg.values() if node and "_target_" in node
    ]


def without_logger_only(callbacks: list[L.Callback]) -> list[L.Callback]:
    """Drop the callbacks that exist only to write to a logger (Lightning's LearningRateMonitor
    refuses to start without one), so `logger=none` keeps every other default callback."""
    kept = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if len(kept) < len(callbacks):
        log.info("logger=none: the learning-rate monitor is left out (it has nothing to write to)")
    return kept


def instantiate_strategy(cfg: DictConfig) -> Any:
    if "_target_" in cfg:
        return instantiate(cfg, _convert_="all")
    return cfg.get("name", "auto")


def trainer_plugins() -> list:
    """Checkpoints written beside their target and renamed (training/checkpoints.py)."""
    return [SafeCheckpointIO()]


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate model, data and trainer; checks that need all three happen here."""
    check_config(cfg, CHECKED_GROUPS)
    model = instantiate(cfg.model, _convert_="all")
    datamodule = instantiate(cfg.data, fields=list(model.data_fields), _convert_="all")
    expected_dim = getattr(model, "embed_dim", None)
    if expected_dim and hasattr(datamodule, "check_embed_dim"):
        datamodule.check_embed_dim(expected_dim, "model.embed_dim")
    loggers = instantiate_loggers(cfg.get("logger"))
    strategy = instantiate_strategy(cfg.strategy)
    callbacks = [*instantiate_callbacks(cfg.get("callbacks")), RankSeed(cfg.seed)]
    if not loggers:
        callbacks = without_logger_only(callbacks)
    evaluation = generation_eval(OmegaConf.to_container(cfg.get("eval") or {}, resolve=True))
    if evaluation is not None:
        callbacks.append(evaluation)
    if isinstance(strategy, FSDPStrategy):
        callbacks.append(FullWeightsForEval())
    trainer = instantiate(
        cfg.trainer,
        strategy=strategy,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=trainer_plugins(),
        default_root_dir=cfg.paths.run_dir,
        _convert_="all",
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return model, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one stage; returns (and writes to `run_dir/metrics.json`) the final metrics."""
    use_job_dir_in_sweeps(cfg)
    # the EMA copy (and a frozen CLIP where a stage has one) are in eval mode on purpose: Lightning's
    # warning about eval-mode modules at the start of training would only alarm users
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning
    )
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    model, datamodule, trainer = build(cfg)
    try:
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
        initialise(model, cfg, resuming=ckpt_path is not None)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer.loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        write_metrics(run_dir, cfg, metrics, trainer.global_step)
    return metrics


def initialise(model: L.LightningModule, cfg: DictConfig, resuming: bool) -> None:
    """`init_from=PATH`: weights from PATH, fresh optimiser and step count; a run that resumes
    (`ckpt_path=last` with a checkpoint) keeps its own weights instead."""
    path = cfg.get("init_from")
    if not path:
        return
    if resuming:
        log.info("resuming this run's checkpoint: init_from=%s is not used", path)
        return
    from unclip.training.init_from import init_weights

    init_weights(model, path, use_ema=bool(cfg.get("init_from_ema", True)))


def write_metrics(run_dir: Path, cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {
        "run_name": cfg.run_name,
        "model": cfg.model.get("name"),
        "data": cfg.data.get("name"),
        "overrides": overrides,
        "step": step,
        # JSON has no NaN: a non-finite metric is null
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2, allow_nan=False))
