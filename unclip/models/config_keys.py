"""Nested `model.*` config dicts that Hydra cannot check: an unknown key (a typo) fails naming it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_keys(given: Mapping[str, Any] | None, known: Iterable[str], key: str) -> dict[str, Any]:
    """`given` as a dict, or a ValueError naming each unknown key as `key.name`."""
    known = sorted(known)
    unknown = sorted(set(given or {}) - set(known))
    if unknown:
        names = ", ".join(f"{key}.{name}" for name in unknown)
        raise ValueError(f"unknown config key {names}; known under {key}: {known}")
    return dict(given or {})


def merged(
    defaults: Mapping[str, Any], given: Mapping[str, Any] | None, key: str
) -> dict[str, Any]:
    """`given` over `defaults`, refusing keys the defaults do not have."""
    return {**defaults, **check_keys(given, defaults, key)}
