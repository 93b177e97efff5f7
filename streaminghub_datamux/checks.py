"""Checks of untrusted values: ids, numbers, texts, flags, dtypes and option keys.

Every error names the key that failed.

One place for what the config loader, the drivers and the protocol accept, so that an id
valid in one is valid in all, and every rejection says which key failed and how to fix it.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import numpy as np

from .errors import ConfigError, InvalidRequest
from .model import numpy_dtype

__all__ = [
    "ID_PATTERN",
    "check_keys",
    "check_sink",
    "check_text",
    "config_bool",
    "config_dtype",
    "config_entries",
    "config_id",
    "config_number",
    "config_text",
    "is_id",
]

# Ids appear in topics, folder names and file names: no "/", "+", "#" or spaces, not
# starting with "." or "-", and a bounded length.
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
ID_FIX = "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def is_id(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a string :data:`ID_PATTERN` accepts."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def config_id(value: Any, path: str, what: str) -> str:
    """An id from a config file, or ConfigError naming ``path``."""
    if not is_id(value):
        raise ConfigError(f"invalid {what} id {value!r}", key=path, fix=ID_FIX)
    return value


def config_number(
    data: Mapping[str, Any],
    key: str,
    path: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
) -> float:
    """Read a finite number in ``[low, high]`` (``> 0`` if ``positive``), else ConfigError."""
    if key not in data:
        return default
    value = data[key]
    wanted = " and ".join(
        part
        for part in (
            "> 0" if positive else "",
            f">= {low:g}" if low is not None and not positive else "",
            f"<= {high:g}" if high is not None else "",
        )
        if part
    )
    fix = f"use a number {wanted}" if wanted else "use a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected a number, got {value!r}", key=f"{path}.{key}", fix=fix)
    if (
        (positive and value <= 0)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise ConfigError(f"{value!r} is out of range", key=f"{path}.{key}", fix=fix)
    return float(value)


def config_text(data: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
    """Read an optional string, or raise ConfigError naming ``path.key``."""
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", key=f"{path}.{key}", fix="quote it")
    return value


def config_bool(data: Mapping[str, Any], key: str, path: str, default: bool, fix: str) -> bool:
    """Read an optional true/false, or raise ConfigError naming ``path.key``."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", key=f"{path}.{key}", fix=fix)
    return value


def config_dtype(
    data: Mapping[str, Any], path: str, fix: str, *, default: str = "f32", numeric: bool = False
) -> np.dtype:
    """Read ``dtype`` (``f32``, ``i16``, ``str``...; ``numeric`` refuses ``str``) as a numpy
    dtype, or raise ConfigError naming ``path.dtype``."""
    name = data.get("dtype", default)
    try:
        if not isinstance(name, str):
            raise ValueError(f"expected a dtype name, got {name!r}")
        dtype = numpy_dtype(name)
    except ValueError as exc:
        raise ConfigError(str(exc), key=f"{path}.dtype", fix=fix) from None
    if numeric and dtype.kind not in "biuf":
        raise ConfigError(f"dtype {name!r} is not numeric", key=f"{path}.dtype", fix=fix)
    return dtype


def config_entries(
    data: Mapping[str, Any], key: str, path: str, what: str, example: str
) -> Mapping[str, Any]:
    """Read an optional JSON object of named entries (devices by node id...); ``{}`` if unset.

    Raises:
        ConfigError: naming ``path.key``, with ``example`` as the fix.
    """
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"expected a JSON object of {what}, got {type(value).__name__}",
            key=f"{path}.{key}",
            fix=f"write it as {example}",
        )
    return value


def check_keys(data: Any, path: str, allowed: set[str], what: str) -> Mapping[str, Any]:
    """Require a JSON object with only ``allowed`` keys; return it.

    Raises:
        ConfigError: ``data`` is not an object, or has an unknown key (likely a typo).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{what} must be a JSON object, got {type(data).__name__}",
            key=path,
            fix=f"write it as {{...}} with keys {sorted(allowed)}",
        )
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"unknown {what} key {key!r}",
                key=f"{path}.{key}",
                fix=f"remove it or use one of {sorted(allowed)}",
            )
    return data


# -- API arguments: an InvalidRequest naming the argument --------------------------------


def check_text(value: Any, what: str) -> str:
    """An API argument that must be a string (ids are matched where they are looked up)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, not {type(value).__name__}")
    return value


def check_sink(sink: Any) -> asyncio.Queue[Any]:
    """The queue a task's frames go to."""
    if not isinstance(sink, asyncio.Queue):
        raise InvalidRequest(f"sink must be an asyncio.Queue, not {type(sink).__name__}")
    return sink
