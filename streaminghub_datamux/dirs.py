"""Where datamux keeps its files: systemd's folders when it runs as a unit, else platformdirs.

Under systemd the unit's ``StateDirectory=``, ``ConfigurationDirectory=`` and
``CacheDirectory=`` arrive as ``$STATE_DIRECTORY``, ``$CONFIGURATION_DIRECTORY`` and
``$CACHE_DIRECTORY`` (a ``:``-separated list; the first one is ours). Otherwise the
platform's conventions apply through platformdirs (on Linux the XDG folders:
``~/.local/state/streaminghub``, ``~/.cache/streaminghub``, ``~/.config/streaminghub``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

__all__ = [
    "APP",
    "SYSTEM_CONFIG_DIR",
    "cache_dir",
    "config_dir",
    "describe_state_dir",
    "state_dir",
    "system_rc",
]

APP = "streaminghub"
SYSTEM_CONFIG_DIR = Path("/etc/streaminghub")
RC_FILE = "streaminghubrc"


def _systemd(variable: str, environ: Mapping[str, str] | None) -> Path | None:
    value = (os.environ if environ is None else environ).get(variable, "")
    first = value.split(":")[0]
    return Path(first) if first else None


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The agent's state folder (the spool): ``$STATE_DIRECTORY``, else the user's."""
    return _systemd("STATE_DIRECTORY", environ) or platformdirs.user_state_path(APP)


def describe_state_dir(environ: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """:func:`state_dir` and where it came from, for ``datamux config``."""
    from_systemd = _systemd("STATE_DIRECTORY", environ)
    if from_systemd is not None:
        return from_systemd, "default ($STATE_DIRECTORY)"
    return platformdirs.user_state_path(APP), "default (platformdirs user state folder)"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Disposable files (the demo's spool): ``$CACHE_DIRECTORY``, else the user's cache."""
    return _systemd("CACHE_DIRECTORY", environ) or platformdirs.user_cache_path(APP)


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The fleet config folder: ``$CONFIGURATION_DIRECTORY``, else ``/etc/streaminghub``."""
    return _systemd("CONFIGURATION_DIRECTORY", environ) or SYSTEM_CONFIG_DIR


def system_rc(environ: Mapping[str, str] | None = None) -> Path:
    """The fleet-wide rc file, in :func:`config_dir`."""
    return config_dir(environ) / RC_FILE
