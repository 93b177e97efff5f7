"""The config keys: one table, :data:`SCHEMA`, and the check of one value against it.

To add a key, add a :class:`Key` row to ``_KEYS``; loading (:mod:`.config`), environment
names, type checks, error messages and ``datamux config`` all follow from it. Every
check here names the key and where the value came from (:class:`Origin`), and its fix
shows a valid setting in that place's syntax.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .codec import CODECS
from .errors import ConfigError
from .framing import PRESETS

__all__ = [
    "ENV_PREFIX",
    "KIND_TEXT",
    "LOG_LEVELS",
    "SCHEMA",
    "SECTIONS",
    "Key",
    "Kind",
    "Origin",
    "coerce",
    "did_you_mean",
    "env_name",
    "example_setting",
    "first_in",
    "fix_unknown",
    "to_path",
]

Kind = Literal["path", "str", "int", "float", "bool", "dict"]

ENV_PREFIX = "STREAMINGHUB_"
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
        "agent.max_requests_per_s",
        "float",
        20.0,
        "Requests one client may send per second, sustained; more are refused with "
        "rate_limited (docs/protocol.md).",
        check=_positive,
    ),
    Key(
        "agent.request_burst",
        "int",
        # No more than an agent serves at once (agent/requests.py, 32): a burst past
        # that met "too many requests at once" although it was within its budget.
        32,
        "Requests one client may send at once, before agent.max_requests_per_s applies.",
        check=_positive,
    ),
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
SECTIONS = frozenset(
    name.rsplit(".", i)[0] for name in SCHEMA for i in range(1, name.count(".") + 1)
)

KIND_TEXT = {
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
class Origin:
    """Where a raw value comes from: names it in errors, anchors relative paths."""

    label: str  # what Config.sources records
    kind: Literal["file", "env", "flag"]
    base: Path  # relative paths resolve against this folder
    home: Path
    toml: bool = False


def first_in(section: str) -> Key:
    """The first key under ``section``: the example in a "this is a section" error."""
    return next(key for key in SCHEMA.values() if key.name.startswith(section + "."))


def coerce(key: Key, value: Any, origin: Origin, *, text: bool = False) -> Any:
    """Check ``value`` against ``key`` and return it typed; strings from env/flags parse."""

    def wrong(problem: str) -> ConfigError:
        return ConfigError(
            problem,
            source=origin.label,
            key=key.name,
            fix=f"write it like {example_setting(key, origin)}",
        )

    if value is None:
        if key.optional:
            return None
        raise wrong(f"null is not allowed; expected {KIND_TEXT[key.kind]}")
    try:
        typed = _parse_text(key.kind, value) if text else _check_type(key.kind, value)
    except (TypeError, ValueError) as exc:
        shown = f"{value!r}" if text else f"{type(value).__name__} {value!r}"
        raise wrong(f"expected {KIND_TEXT[key.kind]}, got {shown}") from exc
    if key.kind == "path":
        typed = to_path(typed, origin.base, origin.home)
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


def _pick(key: Key, value: str, origin: Origin) -> str:
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


def to_path(text: str, base: Path, home: Path) -> Path:
    """Expand ``~`` and ``$HOME``, anchor a relative path at ``base``."""
    text = _HOME_VAR.sub(lambda _: str(home), text)
    if text == "~" or text.startswith(("~/", "~" + os.sep)):
        text = str(home) + text[1:]
    elif text.startswith("~"):
        text = os.path.expanduser(text)  # ~otheruser
    return Path(os.path.normpath(base / text))


def did_you_mean(name: str) -> str:
    """The "; did you mean ..." suffix naming the closest known key, or nothing."""
    close = difflib.get_close_matches(name, list(SCHEMA), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def fix_unknown(name: str) -> str:
    """The fix for an unknown key: the closest known one, else the list of keys."""
    # Also try the last part alone, so "max_samples" finds "framing.max_samples".
    close = difflib.get_close_matches(name, list(SCHEMA), n=1, cutoff=0.6)
    if not close:
        leaf = name.rsplit(".", 1)[-1]
        close = [key for key in SCHEMA if key.rsplit(".", 1)[-1] == leaf][:1]
    if close:
        return f"did you mean {close[0]!r}? ('datamux config' lists every key)"
    return f"remove it; known keys are {', '.join(SCHEMA)}"


def example_setting(key: Key, origin: Origin) -> str:
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
