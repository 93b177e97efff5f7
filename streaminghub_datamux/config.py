"""Layered configuration: defaults < fleet rc < user rc < project rc < env < flags.

Every key lives in one table, :data:`SCHEMA` (in :mod:`.config_schema`, with the check of
one value); this module finds the layers, merges them, and writes the user's rc. Dotted
names (``framing.max_samples``) are nested sections in a file
(``{"framing": {"max_samples": 64}}``) and double underscores in the environment
(``STREAMINGHUB_FRAMING__MAX_SAMPLES``).

rc files are JSON objects (what ``datamux init`` writes, and what upstream wrote); a file
that does not start with ``{`` is read as TOML, for hand-edited fleet configs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dirs
from .config_schema import (
    ENV_PREFIX,
    KIND_TEXT,
    SCHEMA,
    SECTIONS,
    Key,
    Origin,
    coerce,
    did_you_mean,
    env_name,
    example_setting,
    first_in,
    fix_unknown,
    to_path,
)
from .errors import ConfigError
from .host import default_agent_id

__all__ = [
    "ENV_PREFIX",
    "RC_NAME",
    "SCHEMA",
    "SYSTEM_RC",
    "Config",
    "Key",
    "describe",
    "env_name",
    "load_config",
    "write_user_config",
]

log = logging.getLogger(__name__)

RC_NAME = ".streaminghubrc"
SYSTEM_RC = Path("/etc/streaminghub/streaminghubrc")  # or in $CONFIGURATION_DIRECTORY


@dataclass(frozen=True)
class Config:
    """The effective configuration and where each value came from.

    Attributes:
        data_dir: Absolute folder of recordings.
        meta_dir: Absolute folder of collection metadata.
        framing: The ``framing.*`` keys that are set, e.g. ``{"preset": "balanced"}``;
            :meth:`Framing.coerce <streaminghub_datamux.framing.Framing.coerce>` takes it.
        simulate: The ``simulate.*`` keys, e.g. ``{"nodes": {...}}``.
        log_level: A :mod:`logging` level name.
        values: Every key, flat and dotted, to its value (``None`` when unset).
        sources: Every key to ``"default"``, a file path, ``"env NAME"`` or ``"flag --key"``.
    """

    data_dir: Path
    meta_dir: Path
    framing: dict[str, Any]
    simulate: dict[str, Any]
    log_level: str
    values: dict[str, Any] = field(repr=False)
    sources: dict[str, str] = field(repr=False)

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. ``config.get("framing.max_samples")``.

        Raises:
            KeyError: ``key`` is not in :data:`SCHEMA`.
        """
        if key not in self.values:
            raise KeyError(f"unknown config key {key!r}{did_you_mean(key)}")
        return self.values[key]

    def section(self, name: str) -> dict[str, Any]:
        """The keys under ``name`` that are set, nested: ``section("framing")``."""
        return _section(self.values, name)


def _section(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prefix = name + "."
    for key, value in values.items():
        if key.startswith(prefix) and value is not None:
            *parents, leaf = key[len(prefix) :].split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
    system_rc: Path | None = None,
) -> Config:
    """Load the effective configuration from every layer.

    Layers, lowest first: defaults, ``system_rc``, ``~/.streaminghubrc``,
    ``./.streaminghubrc``, ``STREAMINGHUB_*`` environment variables, then ``flags``.
    Missing files are skipped. Relative paths in a file resolve against the file's
    folder; in the environment and in flags, against ``cwd``.

    Args:
        flags: Dotted key to value from the command line; ``None`` values are ignored.
        env: Environment; defaults to ``os.environ``.
        cwd: Folder searched for a project rc; defaults to the current directory.
        home: Home folder for ``~``, ``$HOME`` and the user rc; defaults to ``Path.home()``.
        system_rc: Fleet-wide rc; defaults to ``streaminghubrc`` in
            ``$CONFIGURATION_DIRECTORY`` (systemd) or ``/etc/streaminghub``.

    Returns:
        The merged :class:`Config`.

    Raises:
        ConfigError: A file is not valid JSON/TOML, or a key is unknown or mistyped.
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else Path(home)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if system_rc is None:
        system_rc = dirs.system_rc(env) if "CONFIGURATION_DIRECTORY" in env else SYSTEM_RC
    system_rc = Path(system_rc)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in SCHEMA.values():
        values[key.name] = _default(key, home)
        sources[key.name] = "default"

    for path in _rc_paths(system_rc, home / RC_NAME, cwd / RC_NAME):
        origin = Origin(str(path), "file", path.parent, home)
        raw, origin = _read_rc(path, origin)
        for name, value in _flatten(raw, origin):
            values[name] = coerce(SCHEMA[name], value, origin)
            sources[name] = origin.label

    for var, text in sorted(env.items()):
        env_key = _env_key(var)
        if env_key is None:
            continue
        if not text.strip():
            log.debug("ignoring empty %s", var)
            continue
        origin = Origin(f"env {var}", "env", cwd, home)
        values[env_key] = coerce(SCHEMA[env_key], text, origin, text=True)
        sources[env_key] = origin.label

    for name, value in (flags or {}).items():
        if value is None:
            continue
        origin = Origin(f"flag --{name}", "flag", cwd, home)
        if name not in SCHEMA:
            raise ConfigError("unknown key", source=origin.label, key=name, fix=fix_unknown(name))
        values[name] = coerce(SCHEMA[name], value, origin, text=isinstance(value, str))
        sources[name] = origin.label

    return _build(values, sources)


def _build(values: dict[str, Any], sources: dict[str, str]) -> Config:
    return Config(
        data_dir=values["data_dir"],
        meta_dir=values["meta_dir"],
        framing=_section(values, "framing"),
        simulate=_section(values, "simulate"),
        log_level=values["log_level"],
        values=values,
        sources=sources,
    )


def _default(key: Key, home: Path) -> Any:
    if key.default is None:
        return None
    if key.kind == "path":
        return to_path(str(key.default), home, home)
    return copy.deepcopy(key.default)  # dict defaults must not be shared between configs


def _rc_paths(*candidates: Path) -> Iterator[Path]:
    seen: set[Path] = set()
    for path in candidates:
        try:
            if not path.is_file():
                continue
            real = path.resolve()
        except OSError:
            continue
        # Run from $HOME, ./.streaminghubrc is ~/.streaminghubrc: read it once.
        if real not in seen:
            seen.add(real)
            yield path


def _read_rc(path: Path, origin: Origin) -> tuple[dict[str, Any], Origin]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read: {exc}", source=str(path), fix="make it a readable UTF-8 file"
        ) from exc
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                source=str(path),
                fix=f"correct the JSON near line {exc.lineno} "
                "(keys in double quotes, no trailing commas)",
            ) from exc
        return data, origin
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"not valid TOML: {exc}",
            source=str(path),
            fix="correct the TOML, or write a JSON object "
            "(a file starting with '{' is read as JSON)",
        ) from exc
    return data, Origin(origin.label, "file", origin.base, origin.home, toml=True)


def _flatten(data: Mapping[str, Any], origin: Origin) -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, raw value) for a file's object, checking every name."""
    seen: set[str] = set()
    for name, value in _walk(data, origin, ""):
        if name in seen:
            raise ConfigError(
                "set twice in the same file",
                source=origin.label,
                key=name,
                fix="keep one of the nested and the dotted spelling",
            )
        seen.add(name)
        yield name, value


def _walk(data: Mapping[str, Any], origin: Origin, prefix: str) -> Iterator[tuple[str, Any]]:
    for part, value in data.items():
        name = prefix + str(part)
        if name in SCHEMA:
            yield name, value
        elif name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{name!r} is a section, so it needs {KIND_TEXT['dict']}",
                    source=origin.label,
                    key=name,
                    fix=f"write it like {example_setting(first_in(name), origin)}",
                )
            yield from _walk(value, origin, name + ".")
        else:
            raise ConfigError("unknown key", source=origin.label, key=name, fix=fix_unknown(name))


def _env_key(var: str) -> str | None:
    if not var.startswith(ENV_PREFIX):
        return None
    name = var[len(ENV_PREFIX) :].lower().replace("__", ".")
    if name in SCHEMA:
        return name
    # Other STREAMINGHUB_* variables may belong to tools or tests; not ours to reject.
    log.debug("ignoring %s: not a config key%s", var, did_you_mean(name))
    return None


def describe(config: Config) -> list[tuple[str, str, str]]:
    """Rows of ``(key, value, source)`` in schema order, for printing.

    Values are shown as text: paths and strings as is, ``None`` as ``(not set)``,
    other values as JSON; secret keys are masked.
    """
    rows = []
    for name, key in SCHEMA.items():
        value, source = config.values.get(name), config.sources.get(name, "default")
        if source == "default" and name in _IN_USE:
            value, source = _IN_USE[name]()
        rows.append((name, _show(value, key.secret), source))
    return rows


def _agent_id_in_use() -> tuple[Any, str]:
    return default_agent_id(), "default (host name)"


# Keys whose empty default stands for a value found at run time: shown as that value.
_IN_USE: dict[str, Callable[[], tuple[Any, str]]] = {
    "agent.id": _agent_id_in_use,
    "agent.state_dir": dirs.describe_state_dir,
}


def _show(value: Any, secret: bool) -> str:
    if value is None:
        return "(not set)"
    if secret:
        return "********"
    if isinstance(value, str | Path):
        return str(value)
    return json.dumps(value, sort_keys=True)


def write_user_config(
    data_dir: str | os.PathLike[str],
    meta_dir: str | os.PathLike[str],
    *,
    home: Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``data_dir`` and ``meta_dir`` to ``~/.streaminghubrc`` and create both folders.

    Other keys already in the file are kept. Paths are written absolute (``~`` and
    ``$HOME`` expanded, relative paths taken from the current directory) so the file
    means the same from any folder.

    Args:
        data_dir: Folder of recordings.
        meta_dir: Folder of collection metadata.
        home: Home folder; defaults to ``Path.home()``.
        force: Replace a file that is not a JSON object (TOML or broken) instead of
            refusing; the old file is kept as ``~/.streaminghubrc.bak``.

    Returns:
        The path of the file written.

    Raises:
        ConfigError: The existing file is not a JSON object and ``force`` is false, or a
            folder cannot be created.
    """
    home = Path.home() if home is None else Path(home)
    path = home / RC_NAME
    cwd = Path.cwd()
    data = _existing_json(path, force)
    dirs = {
        "data_dir": to_path(os.fspath(data_dir), cwd, home),
        "meta_dir": to_path(os.fspath(meta_dir), cwd, home),
    }
    for name, folder in dirs.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create folder {folder}: {exc}",
                source=f"flag --{name}",
                key=name,
                fix="choose a folder you can write to",
            ) from exc
        data[name] = str(folder)
    # Write next to the target, then rename: a crash never leaves half a file.
    tmp = path.with_name(RC_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _existing_json(path: Path, force: bool) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        if isinstance(data, dict):
            return data
        problem = "is not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"is not valid JSON ({exc})"
    if not force:
        raise ConfigError(
            f"{problem}; refusing to overwrite it",
            source=str(path),
            fix="fix the file, or run 'datamux init --force' to replace it (a .bak copy is kept)",
        )
    shutil.copy2(path, path.with_name(RC_NAME + ".bak"))
    return {}
