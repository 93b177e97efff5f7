"""The driver registry: built-in drivers and third-party ones, found by name.

A driver is a :class:`~streaminghub_datamux.drivers.base.Driver` subclass with a
``name`` and a ``from_config(options, *, recordings)`` classmethod. Built-in drivers are
listed below; a third-party package adds one with an entry point in the group
``streaminghub_datamux.drivers``::

    [project.entry-points."streaminghub_datamux.drivers"]
    e4 = "my_package.e4:E4Driver"

Modules are imported only when their driver is used, so optional packages (pylsl,
pyserial, bleak) stay optional: with ``drivers.enabled = "auto"`` a driver whose package is
not installed is skipped. A driver that cannot start although it is wanted (named in
``drivers.enabled``, or installed but broken, like pylsl without a loadable liblsl) never
stops the agent: it logs one WARNING with the cause and the fix, is reported as
``unavailable`` (:class:`~.pending.PendingDriver`) and retried with backoff, while every
other driver serves. Only an unknown name or a bad option is a config error.
"""

from __future__ import annotations

import functools
import importlib
import logging
import platform
from collections.abc import Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError
from .base import Driver
from .pending import PendingDriver

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "DriverLoadError",
    "available",
    "check_driver_names",
    "create_drivers",
    "liblsl_fix",
    "load_driver",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "streaminghub_datamux.drivers"

# name -> ("module:Class", the extra that installs its dependencies)
BUILTIN: dict[str, tuple[str, str]] = {
    "sim": ("streaminghub_datamux.drivers.simulate:SimDriver", ""),
    "lsl": ("streaminghub_datamux.drivers.lsl:LslDriver", "lsl"),
    "serial": ("streaminghub_datamux.drivers.serial:SerialDriver", "serial"),
    "ble": ("streaminghub_datamux.drivers.ble:BleDriver", "ble"),
}


class DriverLoadError(ConfigError):
    """A known driver whose module, or a package or library it needs, does not load.

    ``installed`` is True when the driver's packages are there but broken (pylsl that
    finds no liblsl): worth a warning even with ``drivers.enabled = "auto"``.
    """

    def __init__(self, name: str, reason: str, fix: str, *, installed: bool) -> None:
        super().__init__(f"driver {name!r} cannot load: {reason}", key="drivers.enabled", fix=fix)
        self.name, self.reason, self.installed = name, reason, installed


def liblsl_fix(machine: str | None = None) -> str:
    """How to get a liblsl that loads on this machine (pylsl's Linux ARM wheels lack one)."""
    machine = machine or platform.machine()
    arch = {"aarch64": "arm64", "arm64": "arm64", "armv7l": "armhf", "armv6l": "armhf"}.get(machine)
    package = (
        f"install the liblsl release package for {arch} (liblsl-*-{arch}.deb from "
        "github.com/sccn/liblsl/releases: sudo apt install ./liblsl-*.deb)"
        if arch
        else "install liblsl (a release package from github.com/sccn/liblsl/releases, "
        "or conda install -c conda-forge liblsl)"
    )
    return f"{package}, or set PYLSL_LIB to the full path of a liblsl.so built for {machine}"


def available() -> dict[str, str]:
    """Every known driver name and where it lives (built-ins, then entry points)."""
    found = {name: target for name, (target, _) in BUILTIN.items()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def _unknown(name: str, known: Mapping[str, str]) -> ConfigError:
    return ConfigError(
        f"unknown driver {name!r}",
        key="drivers.enabled",
        fix=f"use some of {sorted(known)}, or install the package that provides it",
    )


def check_driver_names(enabled: str) -> None:
    """Check a ``drivers.enabled`` value's names without importing any driver.

    Raises:
        ConfigError: the first name no driver is registered as.
    """
    if enabled.strip().lower() == "auto":
        return
    known = available()
    for name in (n.strip() for n in enabled.split(",")):
        if name and name not in known:
            raise _unknown(name, known)


def load_driver(name: str) -> type[Driver]:
    """The driver class registered as ``name``.

    Raises:
        ConfigError: unknown name, or its module or a package it needs is missing.
    """
    targets = available()
    if name not in targets:
        raise _unknown(name, targets)
    module_name, _, class_name = targets[name].partition(":")
    try:
        driver_class = getattr(import_module(module_name), class_name)
    except ImportError as exc:
        raise _load_error(name, exc) from exc
    if not (isinstance(driver_class, type) and issubclass(driver_class, Driver)):
        raise ConfigError(
            f"{targets[name]} is not a Driver subclass",
            key="drivers.enabled",
            fix="fix the entry point",
        )
    return driver_class


def lsl_load_error(exc: ImportError | RuntimeError) -> DriverLoadError:
    """Why pylsl cannot be used here, with the right fix (LSL out, ``simulate --lsl``).

    pylsl raises RuntimeError when it is installed but liblsl does not load: installing
    the extra again does not help then, liblsl itself is missing.
    """
    if isinstance(exc, RuntimeError):
        wrapped = ImportError(f"pylsl cannot load liblsl: {exc}", name="liblsl")
        wrapped.__cause__ = exc
        return _load_error("lsl", wrapped)
    return _load_error("lsl", exc)


def _load_error(name: str, exc: ImportError) -> DriverLoadError:
    if exc.name == "liblsl":  # drivers/lsl.py: pylsl is installed, its liblsl does not load
        # pylsl's own text goes on with advice for conda users; its first line is the cause.
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else "no liblsl"
        return DriverLoadError(
            name, f"pylsl cannot load liblsl: {reason}", liblsl_fix(), installed=True
        )
    extra = BUILTIN.get(name, ("", ""))[1]
    fix = f"pip install 'streaminghub-datamux[{extra}]'" if extra else "install it"
    missing = exc.name or str(exc)
    # A package that imports but fails inside (a broken install) is not simply "missing".
    installed = not isinstance(exc, ModuleNotFoundError)
    reason = f"a package it needs is missing: {missing}" if not installed else str(exc)
    return DriverLoadError(name, reason, fix, installed=installed)


def _build(name: str, options: Mapping[str, Any], recordings: Any) -> Driver:
    """Import and configure one driver; a retry after a failed import looks afresh."""
    importlib.invalidate_caches()  # a package installed since the last try is found
    return load_driver(name).from_config(options, recordings=recordings)


def create_drivers(
    enabled: str, options: Mapping[str, Any], *, recordings: Any = None
) -> list[Driver]:
    """Instantiate the drivers named in ``enabled`` ("auto" or "sim,lsl,...").

    A driver that is wanted but cannot load becomes a :class:`PendingDriver`: it warns
    once, reports itself ``unavailable`` and retries with backoff.

    Args:
        enabled: ``"auto"`` (every driver whose packages are installed) or a comma list.
        options: the ``drivers`` config section: driver name -> its options.
        recordings: opens replays of the collections (a :class:`.replay.ReplayOpener`),
            for drivers that replay them (guided simulation).

    Raises:
        ConfigError: an unknown driver name, or bad driver options.
    """
    explicit = enabled.strip().lower() != "auto"
    names = [n.strip() for n in enabled.split(",") if n.strip()] if explicit else list(available())
    known = available()
    drivers: list[Driver] = []
    for name in dict.fromkeys(names):
        if name not in known:
            load_driver(name)  # raises the ConfigError that lists the known names
        driver_options = options.get(name) or {}
        try:
            driver_class = load_driver(name)
        except DriverLoadError as exc:
            if not (explicit or exc.installed):
                log.debug("driver %s skipped: %s", name, exc)
                continue
            drivers.append(
                PendingDriver(
                    name,
                    functools.partial(_build, name, driver_options, recordings),
                    exc.reason,
                    exc.fix,
                )
            )
            continue
        drivers.append(driver_class.from_config(driver_options, recordings=recordings))
    return drivers
