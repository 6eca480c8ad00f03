"""Errors a user can fix print as one line; the traceback only with HYDRA_FULL_ERROR=1.

Bad config values, missing files, unusable data and diverged runs are the user's to fix, and the
one sentence naming the key or file is what they need: a DataLoader worker's error otherwise
arrives inside three chained tracebacks, and Hydra's instantiate wraps errors in its own. Any
other exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

# ValueError covers ConfigError, CheckpointError and torch's re-raised worker errors of that type
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    OmegaConfBaseException,
)
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_error(error: BaseException) -> BaseException | None:
    """The user-fixable error inside `error` (unwrapping Hydra's instantiate), or None."""
    from unclip.data.decoding import DataError
    from unclip.training.nan_guard import NonFiniteError

    seen = 0
    while isinstance(error, InstantiationException) and error.__cause__ is not None and seen < 5:
        error, seen = error.__cause__, seen + 1
    if isinstance(error, (*USER_ERRORS, DataError, NonFiniteError)):
        return error
    return None


def one_line(error: BaseException) -> str:
    """The error's own sentence: a DataLoader worker's traceback and the exception's module path
    removed, lines joined."""
    text = str(error) or type(error).__name__
    if WORKER_TRACEBACK in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    if isinstance(error, KeyError) and text.startswith("'"):
        text = text.strip("'")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextmanager
def reported_errors() -> Iterator[None]:
    """Around an entry point's body: a user error exits 1 after one line on stderr (in a Hydra
    multirun it is logged as one line and re-raised, so Hydra runs the remaining jobs)."""
    try:
        yield
    except Exception as error:
        found = user_error(error)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = one_line(found)
        if in_multirun():
            log.error("%s", message)
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
