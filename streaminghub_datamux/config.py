"""Layered configuration: defaults < fleet rc < user rc < project rc < env < flags.

Every key lives in one table, :data:`SCHEMA`. To add a key, add a :class:`Key` row to
``_KEYS``; loading, environment names, type checks, error messages and ``datamux config``
all follow from it. Dotted names (``framing.max_samples``) are nested sections in a file
(``{"framing": {"max_samples": 64}}``) and double underscores in the environment
(``STREAMINGHUB_FRAMING__MAX_SAMPLES``).

rc files are JSON objects (what ``datamux init`` writes, and what upstream wrote); a file
that does not start with ``{`` is read as TOML, for hand-edited fleet configs.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
import shutil
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import dirs
from .codec import CODECS
from .errors import ConfigError
from .framing import PRESETS
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

Kind = Literal["path", "str", "int", "float", "bool", "dict"]

ENV_PREFIX = "STREAMINGHUB_"
RC_NAME = ".streaminghubrc"
SYSTEM_RC = Path("/etc/streaminghub/streaminghubrc")  # or in $CONFIGURATION_DIRECTORY
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Key:
    """One known config key.

    Attributes:
        name: Dotted name, e.g. ``framing.max_samples``.
        kind: Value type; env and flag strings are parsed to it.
        default: Value when no layer sets the key (paths may use ``~``).
        help: One line for docs and error messages.
        optional: Whether ``None`` (JSON ``null``) is allowed, meaning "not set".
        choices: Allowed values; matched case-insensitively, stored as spelled here.
        check: Extra rule on the typed value; returns a problem text or ``None``.
        secret: Masked by :func:`describe` (passwords, tokens).
        example: A valid value for error messages; defaults to ``default``.
    """

    name: str
    kind: Kind
    default: Any
    help: str
    optional: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    secret: bool = False
    example: Any = None

    @property
    def sample(self) -> Any:
        """A valid value to show in a fix."""
        return self.example if self.example is not None else self.default


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port, 1 to 65535"


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else "must be at least 2"


def _client_id(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", value):
        return None
    return "must be 1 to 64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"


def _topic_prefix(value: str) -> str | None:
    if not value or value.startswith("/") or value.endswith("/"):
        return "must be a non-empty topic without a leading or trailing /"
    if any(c in value for c in "+#\0"):
        return "must not contain the MQTT wildcards + or #"
    return None


_KEYS = (
    Key("data_dir", "path", "~/streaminghub/data", "Folder holding recordings (DFDS data)."),
    Key("meta_dir", "path", "~/streaminghub/meta", "Folder holding *.collection.json files."),
    Key("framing.preset", "str", "balanced", "Default framing preset.", choices=tuple(PRESETS)),
    Key(
        "framing.max_samples",
        "int",
        None,
        "Flush a frame at this many samples (overrides the preset).",
        optional=True,
        check=_positive,
        example=256,
    ),
    Key(
        "framing.max_latency_ms",
        "float",
        None,
        "Flush a frame when its oldest sample is this old (overrides the preset).",
        optional=True,
        check=_positive,
        example=20.0,
    ),
    Key(
        "simulate.nodes",
        "dict",
        {},
        "Simulated nodes by id; the simulate driver checks each (docs/simulate.md).",
        example={"bench-1": {"streams": {"ecg": {"frequency": 500, "channels": {"c1": {}}}}}},
    ),
    Key(
        "drivers.enabled",
        "str",
        "auto",
        'Live drivers to run: "auto" (every one whose packages are installed) or a comma '
        'list such as "sim,lsl".',
        example="sim,lsl,serial",
    ),
    Key("drivers.lsl", "dict", {}, "Options of the LSL driver (docs/drivers.md).", example={}),
    Key(
        "drivers.serial",
        "dict",
        {},
        "Serial devices and options of the serial driver (docs/drivers.md).",
        example={"devices": {}},
    ),
    Key(
        "drivers.ble",
        "dict",
        {},
        "BLE devices and options of the BLE driver (docs/drivers.md).",
        example={"devices": {}},
    ),
    Key(
        "drivers.extra",
        "dict",
        {},
        "Options of third-party drivers, by driver name (docs/drivers.md).",
        example={},
    ),
    Key("log_level", "str", "INFO", "Logging level.", choices=LOG_LEVELS),
    # -- the MQTT transport (docs/agent.md, docs/remote-api.md) ---------------------------
    Key("broker.host", "str", "127.0.0.1", "MQTT broker host."),
    Key("broker.port", "int", 1883, "MQTT broker port.", check=_port),
    Key(
        "broker.protocol",
        "str",
        "auto",
        'MQTT version: "5", "3.1.1", or "auto" (5, falling back to 3.1.1).',
        choices=("auto", "5", "3.1.1"),
    ),
    Key("broker.username", "str", None, "MQTT user name.", optional=True, example="pi-lab1"),
    Key("broker.password", "str", None, "MQTT password.", optional=True, secret=True),
    Key(
        "broker.tls.ca_file",
        "path",
        None,
        "CA certificate: connect with TLS and check the broker against it.",
        optional=True,
        example="/etc/streaminghub/ca.crt",
    ),
    Key(
        "broker.tls.cert_file",
        "path",
        None,
        "Client certificate for TLS client authentication.",
        optional=True,
        example="/etc/streaminghub/agent.crt",
    ),
    Key(
        "broker.tls.key_file",
        "path",
        None,
        "Private key of the client certificate.",
        optional=True,
        example="/etc/streaminghub/agent.key",
    ),
    Key(
        "broker.keepalive_s",
        "int",
        10,
        "MQTT keepalive; a client that dies loses its tasks within 1.5 times this.",
        check=_at_least_two,
    ),
    Key(
        "broker.embedded",
        "str",
        "auto",
        'Run an in-process broker (amqtt): "always", "never", or "auto" (when none answers '
        "on a loopback broker.host).",
        choices=("auto", "always", "never"),
    ),
    Key(
        "broker.prefix",
        "str",
        "streaminghub/v2",
        "Topic prefix of every message.",
        check=_topic_prefix,
    ),
    Key("agent.id", "str", "", "Agent id, unique in the fleet; empty means the host name."),
    Key("agent.codec", "str", "cbor", "Codec of the agent's own messages.", choices=CODECS),
    Key(
        "agent.state_dir",
        "path",
        None,
        "Agent state (the spool); empty means $STATE_DIRECTORY or the user state folder.",
        optional=True,
        example="/var/lib/streaminghub",
    ),
    Key(
        "agent.spool_max_mb",
        "float",
        64.0,
        "Disk for QoS 1 frames while the broker is unreachable; oldest dropped past it.",
        check=_positive,
    ),
    Key(
        "agent.spool_drain_per_s",
        "float",
        500.0,
        "Spooled messages sent per second after the broker returns.",
        check=_positive,
    ),
    Key(
        "agent.health_interval_s",
        "float",
        10.0,
        "Seconds between health messages.",
        check=_positive,
    ),
    Key(
        "agent.max_request_bytes",
        "int",
        65536,
        "Larger requests are refused with an error reply.",
        check=_positive,
    ),
    Key("agent.max_tasks", "int", 64, "Tasks an agent runs at once.", check=_positive),
    Key(
        "agent.will_grace_s",
        "float",
        0.5,
        "A client's last will ends its tasks after this long unless it comes back; behind "
        "a bridge, longer than a central broker restart (docs/operations.md).",
        check=_positive,
    ),
    Key(
        "agent.max_frame_bytes",
        "int",
        1 << 20,
        "Largest frame message; frames hold fewer samples to fit (and fit the broker's "
        "limit when it says).",
        check=_positive,
    ),
    Key(
        "client.id",
        "str",
        None,
        "RemoteAPI: who this client is in topics, owner of its tasks. With the shipped ACL "
        "profiles, the broker user name (a certificate's CN). Default: broker.username, "
        "else random.",
        optional=True,
        example="alice",
        check=_client_id,
    ),
    Key(
        "client.timeout_s",
        "float",
        10.0,
        "RemoteAPI: seconds a request may take before dm.errors.Timeout.",
        check=_positive,
    ),
)

SCHEMA: Mapping[str, Key] = {key.name: key for key in _KEYS}

# Every dotted prefix of a key is a section: "framing" for "framing.max_samples".
_SECTIONS = frozenset(
    name.rsplit(".", i)[0] for name in SCHEMA for i in range(1, name.count(".") + 1)
)

_KIND_TEXT = {
    "path": "a path (a string)",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "dict": "an object (a JSON object or TOML table)",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(key: str) -> str:
    """The environment variable for a key: ``framing.max_samples`` ->
    ``STREAMINGHUB_FRAMING__MAX_SAMPLES``."""
    return ENV_PREFIX + key.upper().replace(".", "__")


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
            raise KeyError(f"unknown config key {key!r}{_did_you_mean(key)}")
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


@dataclass(frozen=True)
class _Origin:
    """Where a raw value comes from: names it in errors, anchors relative paths."""

    label: str  # what Config.sources records
    kind: Literal["file", "env", "flag"]
    base: Path  # relative paths resolve against this folder
    home: Path
    toml: bool = False


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
        origin = _Origin(str(path), "file", path.parent, home)
        raw, origin = _read_rc(path, origin)
        for name, value in _flatten(raw, origin):
            values[name] = _coerce(SCHEMA[name], value, origin)
            sources[name] = origin.label

    for var, text in sorted(env.items()):
        env_key = _env_key(var)
        if env_key is None:
            continue
        if not text.strip():
            log.debug("ignoring empty %s", var)
            continue
        origin = _Origin(f"env {var}", "env", cwd, home)
        values[env_key] = _coerce(SCHEMA[env_key], text, origin, text=True)
        sources[env_key] = origin.label

    for name, value in (flags or {}).items():
        if value is None:
            continue
        origin = _Origin(f"flag --{name}", "flag", cwd, home)
        if name not in SCHEMA:
            raise ConfigError("unknown key", source=origin.label, key=name, fix=_fix_unknown(name))
        values[name] = _coerce(SCHEMA[name], value, origin, text=isinstance(value, str))
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
        return _to_path(str(key.default), home, home)
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


def _read_rc(path: Path, origin: _Origin) -> tuple[dict[str, Any], _Origin]:
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
    return data, _Origin(origin.label, "file", origin.base, origin.home, toml=True)


def _flatten(data: Mapping[str, Any], origin: _Origin) -> Iterator[tuple[str, Any]]:
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


def _walk(data: Mapping[str, Any], origin: _Origin, prefix: str) -> Iterator[tuple[str, Any]]:
    for part, value in data.items():
        name = prefix + str(part)
        if name in SCHEMA:
            yield name, value
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{name!r} is a section, so it needs {_KIND_TEXT['dict']}",
                    source=origin.label,
                    key=name,
                    fix=f"write it like {_example(_first_in(name), origin)}",
                )
            yield from _walk(value, origin, name + ".")
        else:
            raise ConfigError("unknown key", source=origin.label, key=name, fix=_fix_unknown(name))


def _first_in(section: str) -> Key:
    return next(key for key in SCHEMA.values() if key.name.startswith(section + "."))


def _env_key(var: str) -> str | None:
    if not var.startswith(ENV_PREFIX):
        return None
    name = var[len(ENV_PREFIX) :].lower().replace("__", ".")
    if name in SCHEMA:
        return name
    # Other STREAMINGHUB_* variables may belong to tools or tests; not ours to reject.
    log.debug("ignoring %s: not a config key%s", var, _did_you_mean(name))
    return None


def _coerce(key: Key, value: Any, origin: _Origin, *, text: bool = False) -> Any:
    """Check ``value`` against ``key`` and return it typed; strings from env/flags parse."""

    def wrong(problem: str) -> ConfigError:
        return ConfigError(
            problem, source=origin.label, key=key.name, fix=f"write it like {_example(key, origin)}"
        )

    if value is None:
        if key.optional:
            return None
        raise wrong(f"null is not allowed; expected {_KIND_TEXT[key.kind]}")
    try:
        typed = _parse_text(key.kind, value) if text else _check_type(key.kind, value)
    except (TypeError, ValueError) as exc:
        shown = f"{value!r}" if text else f"{type(value).__name__} {value!r}"
        raise wrong(f"expected {_KIND_TEXT[key.kind]}, got {shown}") from exc
    if key.kind == "path":
        typed = _to_path(typed, origin.base, origin.home)
    if key.choices:
        typed = _pick(key, typed, origin)
    problem = key.check(typed) if key.check else None
    if problem:
        raise wrong(f"{typed!r} {problem}")
    return typed


def _parse_text(kind: Kind, text: str) -> Any:
    text = text.strip() if kind not in ("str", "path") else text
    if kind in ("str", "path"):
        return text
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    parsed = json.loads(text)  # dict: JSON object text
    if not isinstance(parsed, dict):
        raise TypeError(type(parsed).__name__)
    return parsed


def _check_type(kind: Kind, value: Any) -> Any:
    # bool is an int subclass: true must not pass as 1.
    if kind == "path" and isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "dict" and isinstance(value, dict):
        return value
    raise TypeError(type(value).__name__)


def _pick(key: Key, value: str, origin: _Origin) -> str:
    for choice in key.choices:
        if choice.lower() == value.lower():
            return choice
    close = difflib.get_close_matches(value, key.choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"{value!r} is not one of {', '.join(key.choices)}",
        source=origin.label,
        key=key.name,
        fix=f"{hint}use one of {', '.join(key.choices)}",
    )


_HOME_VAR = re.compile(r"\$(?:HOME\b|\{HOME\})")


def _to_path(text: str, base: Path, home: Path) -> Path:
    """Expand ``~`` and ``$HOME``, anchor a relative path at ``base``."""
    text = _HOME_VAR.sub(lambda _: str(home), text)
    if text == "~" or text.startswith(("~/", "~" + os.sep)):
        text = str(home) + text[1:]
    elif text.startswith("~"):
        text = os.path.expanduser(text)  # ~otheruser
    return Path(os.path.normpath(base / text))


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(SCHEMA), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fix_unknown(name: str) -> str:
    # Also try the last part alone, so "max_samples" finds "framing.max_samples".
    close = difflib.get_close_matches(name, list(SCHEMA), n=1, cutoff=0.6)
    if not close:
        leaf = name.rsplit(".", 1)[-1]
        close = [key for key in SCHEMA if key.rsplit(".", 1)[-1] == leaf][:1]
    if close:
        return f"did you mean {close[0]!r}? ('datamux config' lists every key)"
    return f"remove it; known keys are {', '.join(SCHEMA)}"


def _example(key: Key, origin: _Origin) -> str:
    """A one-line, valid setting of ``key`` in the syntax of ``origin``."""
    sample = key.sample
    if origin.kind == "env":
        text = json.dumps(sample) if isinstance(sample, dict) else str(sample)
        return (
            f"{env_name(key.name)}={text!r}"
            if " " in text or "{" in text
            else f"{env_name(key.name)}={text}"
        )
    if origin.kind == "flag":
        text = json.dumps(sample) if isinstance(sample, dict) else str(sample)
        return f"--{key.name} {text!r}" if "{" in text else f"--{key.name} {text}"
    if origin.toml:
        return f"{key.name} = {_toml(sample)}"
    nested: Any = sample
    for part in reversed(key.name.split(".")):
        nested = {part: nested}
    return json.dumps(nested)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


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
        "data_dir": _to_path(os.fspath(data_dir), cwd, home),
        "meta_dir": _to_path(os.fspath(meta_dir), cwd, home),
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
