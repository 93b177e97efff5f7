"""Errors raised by streaminghub-datamux.

Every error derives from :class:`DatamuxError` and carries a stable ``code`` so that
it can cross a process or network boundary and be rebuilt on the other side::

    DatamuxError
    ├── ConfigError       a config file, key or value is wrong (names file, key, fix)
    ├── MetadataError     a DFDS metadata file is wrong (names file and JSON path)
    ├── DataError         a recording cannot be read (names file and line)
    ├── NotFound          an unknown collection, stream, node, recording or task id
    ├── InvalidRequest    a request that can never be served as asked
    ├── Timeout           no answer before the deadline
    ├── Unavailable       the agent or broker cannot serve now (offline, busy)
    │   └── RateLimited   this client sent more requests than the agent's budget
    ├── Forbidden         the task belongs to another client
    └── DeviceError       a device failed
        └── DeviceLost    a device vanished; tasks retry with backoff
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DatamuxError",
    "DeviceError",
    "DeviceLost",
    "Forbidden",
    "InvalidRequest",
    "MetadataError",
    "NotFound",
    "RateLimited",
    "Timeout",
    "Unavailable",
    "device_failure",
    "error_from_code",
]


class DatamuxError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "internal"


class ConfigError(DatamuxError):
    """A configuration file, key or value is wrong."""

    code = "config"

    def __init__(self, message: str, *, source: str = "", key: str = "", fix: str = "") -> None:
        self.source, self.key, self.fix = source, key, fix
        where = ", ".join(part for part in (source, f"key {key!r}" if key else "") if part)
        text = f"{where}: {message}" if where else message
        super().__init__(f"{text} (fix: {fix})" if fix else text)


class MetadataError(DatamuxError):
    """A DFDS metadata file (collection or node JSON) is wrong."""

    code = "metadata"

    def __init__(self, message: str, *, file: str = "", path: str = "") -> None:
        self.file, self.path = file, path
        where = f"{file} at {path or '/'}" if file else (path or "")
        super().__init__(f"{where}: {message}" if where else message)


class DataError(DatamuxError):
    """A recording cannot be read."""

    code = "data"

    def __init__(self, message: str, *, file: str = "", line: int | None = None) -> None:
        self.file, self.line = file, line
        where = file + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}" if where else message)


class NotFound(DatamuxError):
    """An unknown id: collection, stream, node, recording or task."""

    code = "not_found"


class InvalidRequest(DatamuxError):
    """A request that cannot be served as asked (bad parameters, ambiguous attrs)."""

    code = "invalid_request"


class Timeout(DatamuxError):
    """No answer arrived before the deadline."""

    code = "timeout"


class Unavailable(DatamuxError):
    """The agent or the broker cannot serve the request now (offline, at its task limit)."""

    code = "unavailable"


class RateLimited(Unavailable):
    """This client sent requests faster than the agent's per-client budget allows.

    Attributes:
        retry_after_s: seconds until the agent serves this client again, when it said.
    """

    code = "rate_limited"
    retry_after_s: float | None = None


class Forbidden(DatamuxError):
    """The request touches a task that another client started."""

    code = "forbidden"


class DeviceError(DatamuxError):
    """A device failed in a way that ends the task."""

    code = "device"


class DeviceLost(DeviceError):
    """A device vanished. Tasks report it and retry with backoff."""

    code = "device_lost"


_BY_CODE: dict[str, type[DatamuxError]] = {
    cls.code: cls
    for cls in (
        DatamuxError,
        ConfigError,
        MetadataError,
        DataError,
        NotFound,
        InvalidRequest,
        Timeout,
        Unavailable,
        RateLimited,
        Forbidden,
        DeviceError,
        DeviceLost,
    )
}


def device_failure(message: str, cause: BaseException | None, *, lost: bool) -> DeviceError:
    """A foreign library's error (pylsl, pyserial, bleak) as ours, with it as the cause.

    ``lost``: the device went away (DeviceLost: the task retries); else DeviceError
    (the task ends). A new exception each call, so several consumers of one device
    never share (and re-raise) one exception object.
    """
    error = DeviceLost(message) if lost else DeviceError(message)
    error.__cause__ = cause
    return error


def error_from_code(code: str, message: str) -> DatamuxError:
    """Rebuild an error sent as ``{code, message}``; unknown codes give the base class."""
    cls = _BY_CODE.get(code, DatamuxError)
    error = DatamuxError.__new__(cls)
    Exception.__init__(error, message)
    return error
