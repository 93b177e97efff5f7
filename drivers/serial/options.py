"""The drivers.serial options: devices, their channels, ports and formats, validated."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...checks import (
    check_keys,
    config_bool,
    config_dtype,
    config_entries,
    config_id,
    config_number,
    config_text,
)
from ...errors import ConfigError
from ...model import Node, Stream, dtype_name
from ..base import live_stream
from .formats import FormatSpec, parse_format

CONFIG_PATH = "drivers.serial"
DEFAULT_BAUDRATE = 115200
_OPTION_KEYS = {"devices", "list_ports"}
_DEVICE_KEYS = {
    "port", "baudrate", "stream", "channels", "dtype", "rate", "format",
    "name", "description", "unit", "start", "stop",
}  # fmt: skip
_CHANNEL_KEYS = {"unit", "name", "description"}
# Node and stream ids end up in MQTT topics and file names: no '/', '+', '#', spaces.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# -- config --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelInfo:
    """One channel of a serial stream: metadata only (values come from the device)."""

    unit: str = ""
    name: str = ""
    description: str = ""


@dataclass(frozen=True)
class DeviceSpec:
    """One configured serial device, validated (see :func:`parse_device`)."""

    id: str
    port: str
    channels: Mapping[str, ChannelInfo]
    format: FormatSpec = field(default_factory=FormatSpec)
    baudrate: int = DEFAULT_BAUDRATE
    stream: str = "data"
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    rate: float = 0.0
    name: str = ""
    description: str = ""
    unit: str = ""
    start: bytes = b""
    stop: bytes = b""

    @property
    def channel_names(self) -> list[str]:
        return list(self.channels)

    def to_node(self) -> Node:
        """The public :class:`Node` of this device."""
        return Node(
            id=self.id,
            name=self.name or self.id,
            description=self.description or f"serial device on {self.port}",
            device={"port": self.port, "baudrate": self.baudrate, "format": self.format.type},
            kind="serial",
        )

    def to_stream(self) -> Stream:
        """The public :class:`Stream` metadata of the device's one stream."""
        return live_stream(
            self.stream,
            self.id,
            self.channels,
            dtype=dtype_name(self.dtype),
            attrs={"mode": "live"},
            name=self.name,
            description=self.description,
            unit=self.unit,
            frequency=self.rate,
        )


def _parse_channels(data: Any, path: str) -> dict[str, ChannelInfo]:
    fix = 'list them in column order, e.g. ["ax", "ay", "az"] or {"ax": {"unit": "g"}}'
    if isinstance(data, list | tuple):
        names = list(data)
        infos: list[ChannelInfo] = [ChannelInfo() for _ in names]
    elif isinstance(data, Mapping):
        names = list(data)
        infos = []
        for name, spec in data.items():
            spec = check_keys(
                {} if spec is None else spec, f"{path}.{name}", _CHANNEL_KEYS, "channel"
            )
            infos.append(
                ChannelInfo(
                    unit=config_text(spec, "unit", f"{path}.{name}"),
                    name=config_text(spec, "name", f"{path}.{name}"),
                    description=config_text(spec, "description", f"{path}.{name}"),
                )
            )
    else:
        raise ConfigError("a serial device needs its channels", key=path, fix=fix)
    if not names:
        raise ConfigError("a serial device needs at least one channel", key=path, fix=fix)
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigError(f"invalid channel name {name!r}", key=path, fix=fix)
    if len(set(names)) != len(names):
        raise ConfigError("channel names repeat", key=path, fix="give each channel its own name")
    return dict(zip(names, infos, strict=True))


def _parse_port(data: Mapping[str, Any], path: str) -> str:
    port = data.get("port")
    if not isinstance(port, str) or not port.strip():
        raise ConfigError(
            f"expected a port, got {port!r}",
            key=f"{path}.port",
            fix='set the device path, e.g. "/dev/ttyUSB0" or "COM3", or a pyserial URL '
            'such as "socket://host:4000"',
        )
    return port


def _parse_baudrate(data: Mapping[str, Any], path: str) -> int:
    baud = data.get("baudrate", DEFAULT_BAUDRATE)
    if isinstance(baud, bool) or not isinstance(baud, int) or baud <= 0:
        raise ConfigError(
            f"expected a positive integer, got {baud!r}",
            key=f"{path}.baudrate",
            fix="use the rate the device's firmware opens the port at, e.g. 115200",
        )
    return baud


def parse_device(node_id: str, data: Any, path: str | None = None) -> DeviceSpec:
    """Validate one device (``{"port": ..., "channels": [...], "format": {...}}``).

    Args:
        node_id: the node id (the device's key).
        data: the device's JSON object.
        path: its key path for errors; default ``drivers.serial.devices.<node_id>``.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    path = path or f"{CONFIG_PATH}.devices.{node_id}"
    config_id(node_id, path, "node")
    data = check_keys(data, path, _DEVICE_KEYS, "serial device")
    port = _parse_port(data, path)
    channels = _parse_channels(data.get("channels"), f"{path}.channels")
    dtype = config_dtype(data, path, "use f32, f64, i16, i32, u8, bool or str")
    rate = config_number(data, "rate", path, 0.0, low=0)
    fmt = parse_format(data.get("format"), f"{path}.format", list(channels))
    if fmt.counter is not None and rate <= 0:
        raise ConfigError(
            "counter timestamps need the nominal rate",
            key=f"{path}.rate",
            fix="set rate in Hz: sample timestamps are t0 + counter / rate",
        )
    if dtype.kind == "U" and (fmt.type != "lines" or len(channels) != 1):
        raise ConfigError(
            "a str stream reads one label per line",
            key=f"{path}.dtype",
            fix='use one channel and the "lines" format, or a numeric dtype',
        )
    return DeviceSpec(
        id=node_id,
        port=port,
        channels=channels,
        format=fmt,
        baudrate=_parse_baudrate(data, path),
        stream=config_id(data.get("stream", "data"), f"{path}.stream", "stream"),
        dtype=dtype,
        rate=rate,
        name=config_text(data, "name", path),
        description=config_text(data, "description", path),
        unit=config_text(data, "unit", path),
        start=config_text(data, "start", path).encode(),
        stop=config_text(data, "stop", path).encode(),
    )


def parse_options(options: Mapping[str, Any] | None) -> tuple[dict[str, DeviceSpec], bool]:
    """Validate the ``drivers.serial`` section: ``(devices by node id, list_ports)``.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    options = check_keys(options or {}, CONFIG_PATH, _OPTION_KEYS, "serial driver")
    list_ports_flag = config_bool(
        options,
        "list_ports",
        CONFIG_PATH,
        False,
        "use true to list unconfigured ports as nodes, false to hide them",
    )
    raw = config_entries(
        options,
        "devices",
        CONFIG_PATH,
        "devices",
        '{"my-sensor": {"port": "/dev/ttyUSB0", "channels": [...]}}',
    )
    devices: dict[str, DeviceSpec] = {}
    owners: dict[str, str] = {}
    for node_id, data in raw.items():
        spec = parse_device(node_id, data, f"{CONFIG_PATH}.devices.{node_id}")
        where = spec.port if _URL.match(spec.port) else os.path.realpath(spec.port)
        if where in owners:
            raise ConfigError(
                f"port {spec.port!r} is already device {owners[where]!r}",
                key=f"{CONFIG_PATH}.devices.{node_id}.port",
                fix="give each device its own port (one port carries one byte stream)",
            )
        owners[where] = node_id
        devices[node_id] = spec
    return devices, list_ports_flag
