"""Fail at start-up, naming the key, when a config has a wrong key, a wrong type or a missing value.

Hydra already refuses overrides of keys that do not exist; this catches the rest before anything
trains: keys a `_target_` does not accept, values of the wrong simple type, `???` left unset, and
(through `build_config`, the one way nested blocks are read) unknown or mistyped keys of the
typed dataclass configs a stage's `net`, `diffusion`, `sampling`, `optim`, ... blocks fill.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    pass


T = TypeVar("T")


def build_config(
    cls: type[T],
    given: Mapping[str, Any] | T | None,
    where: str,
    also_known: set[str] | frozenset[str] = frozenset(),
) -> T:
    """The dataclass `cls` from a config block: its defaults, overridden by `given`. An unknown
    key, a value of the wrong type or a required field left out fails naming `where.key`
    (`also_known`: other keys of the block, listed in the message); nested dataclass fields are
    built from nested blocks the same way. Checkpoints keep plain containers, never the result."""
    if isinstance(given, cls):
        return given
    if given is not None and not isinstance(given, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {given!r}")
    given = dict(given or {})
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(given) - set(names))
    if unknown:
        known = sorted({*names, *also_known})
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; known under {where}: {known}")
    for field in fields:
        required = field.default is dataclasses.MISSING
        if required and field.default_factory is dataclasses.MISSING and field.name not in given:
            raise ConfigError(f"{where}.{field.name}: required, not set")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _typed(value, hints[key], f"{where}.{key}") for key, value in given.items()})


def _nested_dataclass(annotation: Any) -> type | None:
    """The dataclass of an annotation `D` or `D | None`."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _typed(value: Any, annotation: Any, where: str) -> Any:
    nested = _nested_dataclass(annotation)
    if nested is not None and isinstance(value, Mapping):
        return build_config(nested, value, where)
    allowed = _simple_types(annotation)
    if allowed and not _type_ok(value, allowed):
        names = ", ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def _import_target(target: str, where: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{where}._target_: cannot import {target!r} ({error})") from error


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows, or None when it is too rich to check cheaply."""
    if annotation in (int, float, str, bool):
        return (annotation,)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        return (list, tuple, ListConfig)
    if origin is dict or annotation is dict:
        return (dict, DictConfig)
    if origin in (typing.Union, types.UnionType):
        allowed: list[type] = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                allowed.append(type(None))
                continue
            simple = _simple_types(arg)
            if simple is None:
                return None
            allowed.extend(simple)
        return tuple(allowed)
    return None


def _type_ok(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def check_target_node(node: DictConfig, where: str) -> None:
    target = _import_target(node["_target_"], where)
    _check_signature(node, target, where)
    validate = getattr(target, "validate_config", None)
    if callable(validate):  # a stage's typed blocks (net, diffusion, sampling, ...)
        validate(OmegaConf.to_container(node, resolve=True), where)


def _check_signature(node: DictConfig, target: Any, where: str) -> None:
    func = target.__init__ if isinstance(target, type) else target
    signature = inspect.signature(func)
    params = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations: skip type checks, keep key checks
        hints = {}
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in params and not accepts_any:
            known = sorted(k for k in params if k not in ("self", "args", "kwargs"))
            raise ConfigError(
                f"{where}.{key}: not an argument of {node['_target_']}; known: {known}"
            )
        value = node[key]
        allowed = _simple_types(hints.get(key))
        if (
            allowed
            and not isinstance(value, (DictConfig, ListConfig))
            and not _type_ok(value, allowed)
        ):
            names = ", ".join(t.__name__ for t in allowed)
            raise ConfigError(
                f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}"
            )


def check_config(cfg: DictConfig, groups: tuple[str, ...]) -> None:
    """Resolve everything (missing `???` values raise, naming the key), then check each group."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ConfigError(
            f"missing required value: {error.full_key} (set it on the command line)"
        ) from error
    for group in groups:
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _walk(node, group)


def _walk(node: DictConfig, where: str) -> None:
    if "_target_" in node:
        check_target_node(node, where)
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            _walk(child, f"{where}.{key}")
