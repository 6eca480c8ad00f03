"""Start-up checks of the numbers a datamodule is configured with, naming the `data.*` key."""

from __future__ import annotations


def check_data_values(
    at_least_one: dict[str, int], non_negative: dict[str, int], max_bad_fraction: float
) -> None:
    """Counts that must be >= 1, counts that must be >= 0, and the bad-sample fraction in [0, 1]."""
    for key, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"data.{key} must be at least 1, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"data.{key} must not be negative, got {value}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
