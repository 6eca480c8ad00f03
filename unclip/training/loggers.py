"""Logger factories that configs instantiate, and one wandb run per run directory."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"
MAX_TAG_LENGTH = 64  # wandb refuses longer tags


def wandb_credentials_available() -> bool:
    """True when wandb could log in without prompting: an API key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def run_id(run_dir: str | Path) -> str:
    """The wandb id of the run living in `run_dir`: made once, kept in `run_dir/wandb_id`, read
    back on resume. Two configs sharing a run name, or the jobs of a multirun (each in its own job
    folder), never share a dashboard run. Created exclusively, so DDP processes agree on it."""
    path = Path(run_dir) / WANDB_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as handle:
            handle.write(secrets.token_hex(6) + "\n")
    except FileExistsError:
        pass
    return path.read_text().strip()


def sweep_context() -> tuple[str | None, list[str]]:
    """In a Hydra multirun: the sweep's name (its folder) and this job's values of the swept keys
    (`model.optim.lr=0.001`), read from the sweep's multirun.yaml; (None, []) otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, []
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    job_overrides = list(hydra_cfg.overrides.task)
    return sweep_dir.name, varying_overrides(sweep_dir / "multirun.yaml", job_overrides)


def varying_overrides(multirun_yaml: Path, job_overrides: list[str]) -> list[str]:
    """The job's overrides of keys the sweep varies (a sweep override: `a=1,2`, `range(..)`...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not multirun_yaml.is_file():
        return []
    sweep_overrides = OmegaConf.load(multirun_yaml).hydra.overrides.task
    parser = OverridesParser.create()
    swept = {
        o.get_key_element() for o in parser.parse_overrides(list(sweep_overrides))
        if o.is_sweep_override()
    }  # fmt: skip
    job = parser.parse_overrides(job_overrides)
    return [
        text[:MAX_TAG_LENGTH]
        for o, text in zip(job, job_overrides, strict=True)
        if o.get_key_element() in swept
    ]


def wandb_logger(
    project: str,
    name: str,
    save_dir: str,
    offline: bool | str = "auto",
    group: str | None = None,
    tags: list[str] | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that never blocks on a login prompt: with `offline="auto"` it logs offline
    (sync later with `wandb sync`) unless credentials are configured. Its id is the run
    directory's (`run_id`); in a multirun the sweep's name is the group (unless `group` is set)
    and the swept keys' values are added to `tags`."""
    if offline == "auto":
        offline = not wandb_credentials_available()
    if offline:
        kwargs.pop("log_model", None)  # wandb refuses log_model together with offline
    sweep, swept = sweep_context()
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=bool(offline),
        id=run_id(save_dir),
        resume="allow",
        group=group or sweep,
        tags=[*(tags or []), *(t for t in swept if t not in (tags or []))],
        **kwargs,
    )


def finish_loggers(loggers: list[Any]) -> None:
    """End each wandb run this process started, so the next job of a multirun opens its own
    (Lightning leaves the run open: the next `wandb.init` would log into it)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            try:
                logger.experiment.finish()
            except Exception as error:  # noqa: BLE001 - a failed upload must not fail the job
                log.warning("wandb: finishing the run failed: %s", error)
