"""Logger factories that configs instantiate."""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_credentials_available() -> bool:
    """True when wandb could log in without prompting: an API key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_logger(
    project: str,
    name: str,
    save_dir: str,
    offline: bool | str = "auto",
    **kwargs,
) -> WandbLogger:
    """A WandbLogger that never blocks on a login prompt: with `offline="auto"` it logs offline
    (sync later with `wandb sync`) unless credentials are configured. The run id is derived from the
    run name, so a resumed run continues the same wandb run."""
    if offline == "auto":
        offline = not wandb_credentials_available()
    if offline:
        kwargs.pop("log_model", None)  # wandb refuses log_model together with offline
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64]
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=bool(offline),
        id=run_id,
        resume="allow",
        **kwargs,
    )
