"""The driver registry: built-in drivers and third-party ones, found by name.

A driver is a :class:`~streaminghub_datamux.drivers.base.Driver` subclass with a
``name`` and a ``from_config(options, *, recordings)`` classmethod. Built-in drivers are
listed below; a third-party package adds one with an entry point in the group
``streaminghub_datamux.drivers``::

    [project.entry-points."streaminghub_datamux.drivers"]
    e4 = "my_package.e4:E4Driver"

Modules are imported only when their driver is used, so optional packages (pylsl,
pyserial, bleak) stay optional: with ``drivers.enabled = "auto"`` a driver whose package is
missing is skipped; named explicitly, it is an error that says what to install.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError
from .base import Driver

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "available", "create_drivers", "load_driver"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "streaminghub_datamux.drivers"

# name -> ("module:Class", the extra that installs its dependencies)
BUILTIN: dict[str, tuple[str, str]] = {
    "sim": ("streaminghub_datamux.drivers.simulate:SimDriver", ""),
    "lsl": ("streaminghub_datamux.drivers.lsl:LslDriver", "lsl"),
    "serial": ("streaminghub_datamux.drivers.serialport:SerialDriver", "serial"),
    "ble": ("streaminghub_datamux.drivers.ble:BleDriver", "ble"),
}


def available() -> dict[str, str]:
    """Every known driver name and where it lives (built-ins, then entry points)."""
    found = {name: target for name, (target, _) in BUILTIN.items()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def load_driver(name: str) -> type[Driver]:
    """The driver class registered as ``name``.

    Raises:
        ConfigError: unknown name, or its module or a package it needs is missing.
    """
    targets = available()
    if name not in targets:
        raise ConfigError(
            f"unknown driver {name!r}",
            key="drivers.enabled",
            fix=f"use some of {sorted(targets)}, or install the package that provides it",
        )
    module_name, _, class_name = targets[name].partition(":")
    try:
        driver_class = getattr(import_module(module_name), class_name)
    except ImportError as exc:
        extra = BUILTIN.get(name, ("", ""))[1]
        fix = f"pip install 'streaminghub-datamux[{extra}]'" if extra else "install it"
        raise ConfigError(
            f"driver {name!r} needs a package that is missing: {exc.name or exc}",
            key="drivers.enabled",
            fix=fix,
        ) from exc
    if not (isinstance(driver_class, type) and issubclass(driver_class, Driver)):
        raise ConfigError(
            f"{targets[name]} is not a Driver subclass",
            key="drivers.enabled",
            fix="fix the entry point",
        )
    return driver_class


def create_drivers(
    enabled: str, options: Mapping[str, Any], *, recordings: Any = None
) -> list[Driver]:
    """Instantiate the drivers named in ``enabled`` ("auto" or "sim,lsl,...").

    Args:
        enabled: ``"auto"`` (every driver whose packages are installed) or a comma list.
        options: the ``drivers`` config section: driver name -> its options.
        recordings: what guided simulation replays from (the local API).
    """
    explicit = enabled.strip().lower() != "auto"
    names = [n.strip() for n in enabled.split(",") if n.strip()] if explicit else list(available())
    drivers: list[Driver] = []
    for name in dict.fromkeys(names):
        try:
            driver_class = load_driver(name)
        except ConfigError as exc:
            if explicit:
                raise
            log.debug("driver %s skipped: %s", name, exc)
            continue
        drivers.append(driver_class.from_config(options.get(name) or {}, recordings=recordings))
    return drivers
