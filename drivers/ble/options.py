"""The drivers.ble options: devices, their profiles and custom streams, validated."""

from __future__ import annotations

import contextlib
import math
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bleak.uuids import normalize_uuid_str

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
from ...model import Node, Stream
from ..base import Chunk, live_stream
from .decoders import HEART_RATE_MEASUREMENT, StructDecoder, _decode_hr, _decode_rr

# The scanner needs a moment to start and stop: a scan listens this much less than
# scan_s so a listing that waits for it stays within scan_s.
SCAN_MARGIN_S = 0.5

CONFIG_PATH = "drivers.ble"

PROFILES = ("heart_rate", "custom")

_OPTION_KEYS = {"scan", "scan_s", "connect_timeout_s", "devices"}
_DEVICE_KEYS = {"address", "profile", "name", "description"}
_CUSTOM_KEYS = {"characteristic", "layout", "channels", "dtype", "rate", "scale", "stream", "unit"}
# Node and stream ids end up in MQTT topics and file names.
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_SHORT_UUID = re.compile(r"[0-9A-Fa-f]{4}([0-9A-Fa-f]{4})?")
_BYTE_ORDERS = "<>!="


# -- validated config ------------------------------------------------------------------------

Decoder = Callable[[bytes, float], Chunk]


@dataclass(frozen=True)
class StreamSpec:
    """One stream of a device: which characteristic feeds it and how to decode it."""

    id: str
    characteristic: str  # normalised 128-bit UUID
    channels: tuple[str, ...]
    dtype_name: str
    decode: Decoder
    frequency: float = 0.0
    name: str = ""
    description: str = ""
    unit: str = ""

    def to_stream(self, device: DeviceSpec) -> Stream:
        """The public :class:`Stream` metadata of this stream on ``device``."""
        return live_stream(
            self.id,
            device.id,
            self.channels,
            dtype=self.dtype_name,
            attrs={"mode": "ble", "address": device.address, "profile": device.profile},
            name=self.name,
            description=self.description,
            unit=self.unit,
            frequency=self.frequency,
        )


def heart_rate_streams() -> dict[str, StreamSpec]:
    """The ``hr`` and ``rr`` streams of the Heart Rate profile."""
    return {
        "hr": StreamSpec(
            id="hr",
            characteristic=HEART_RATE_MEASUREMENT,
            channels=("bpm",),
            dtype_name="f32",
            decode=_decode_hr,
            name="Heart rate",
            description="Heart rate per notification (about 1/s), stamped on arrival",
            unit="bpm",
        ),
        "rr": StreamSpec(
            id="rr",
            characteristic=HEART_RATE_MEASUREMENT,
            channels=("rr",),
            dtype_name="f64",
            decode=_decode_rr,
            name="RR intervals",
            description="Beat-to-beat intervals, one sample per interval",
            unit="s",
        ),
    }


@dataclass(frozen=True)
class DeviceSpec:
    """One device: its node id, address, profile and streams."""

    id: str
    address: str
    profile: str
    streams: Mapping[str, StreamSpec]
    name: str = ""
    description: str = ""
    scanned: bool = False

    def to_node(self) -> Node:
        """The public :class:`Node` metadata of this device."""
        what = "heart-rate sensor" if self.profile == "heart_rate" else "device"
        found = " (found by scanning)" if self.scanned else ""
        return Node(
            id=self.id,
            name=self.name or self.id,
            description=self.description or f"Bluetooth LE {what} {self.address}{found}",
            device={"address": self.address, "profile": self.profile},
            kind="ble",
        )


def _address_key(address: str) -> str:
    """One spelling per address, to compare config, scans and links."""
    return address.upper()


def scanned_node_id(address: str) -> str:
    """The node id of a device found by scanning: ``ble-`` + the address without colons.

    macOS reports a UUID instead of an address; its dashes stay.
    """
    return "ble-" + address.replace(":", "").lower()


def _parse_address(data: Mapping[str, Any], path: str) -> str:
    address = data.get("address")
    if isinstance(address, str) and _MAC.fullmatch(address):
        return address.upper()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(uuid.UUID(address)).upper()  # macOS names devices by UUID
    raise ConfigError(
        f"expected a Bluetooth address, got {address!r}",
        key=f"{path}.address",
        fix='write it like "AA:BB:CC:DD:EE:FF" (on macOS, the device UUID bleak reports)',
    )


def _parse_characteristic(data: Mapping[str, Any], path: str) -> str:
    value = data.get("characteristic")
    if isinstance(value, str):
        text = value.strip()
        if _SHORT_UUID.fullmatch(text):
            return normalize_uuid_str(text)
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(text))
    raise ConfigError(
        f"expected a characteristic UUID, got {value!r}",
        key=f"{path}.characteristic",
        fix='use a 16-bit ("2a37") or 128-bit ("6e400003-b5a3-f393-e0a9-e50e24dcca9e") UUID',
    )


def _parse_layout(data: Mapping[str, Any], path: str) -> tuple[str, int]:
    """The struct format and its number of fields."""
    layout = data.get("layout")
    fix = 'use a struct format with a byte order, e.g. "<hhh" (three little-endian int16)'
    if not isinstance(layout, str) or not layout or layout[0] not in _BYTE_ORDERS:
        # Native order and alignment ("@") would change with the machine, the device's do not.
        raise ConfigError(
            f"expected a struct layout, got {layout!r}", key=f"{path}.layout", fix=fix
        )
    try:
        size = struct.calcsize(layout)
        fields = struct.unpack(layout, bytes(size))
    except struct.error as exc:
        raise ConfigError(f"bad struct layout: {exc}", key=f"{path}.layout", fix=fix) from None
    if size == 0 or not fields or not all(isinstance(v, int | float) for v in fields):
        raise ConfigError(
            f"layout {layout!r} has no numeric fields",
            key=f"{path}.layout",
            fix="use numeric formats only (b B h H i I q Q e f d, '?' for flags, 'x' to skip)",
        )
    return layout, len(fields)


def _parse_channels(data: Mapping[str, Any], path: str, count: int) -> tuple[str, ...]:
    channels = data.get("channels")
    fix = f"list {count} unique names, one per field of the layout, e.g. {['x', 'y', 'z'][:count]}"
    if (
        not isinstance(channels, list)
        or not all(isinstance(c, str) and c for c in channels)
        or len(set(channels)) != len(channels)
    ):
        raise ConfigError(
            f"expected channel names, got {channels!r}", key=f"{path}.channels", fix=fix
        )
    if len(channels) != count:
        raise ConfigError(
            f"{len(channels)} channels for a layout of {count} fields",
            key=f"{path}.channels",
            fix=fix,
        )
    return tuple(channels)


def _parse_scale(data: Mapping[str, Any], path: str, count: int) -> tuple[float, ...] | None:
    scale = data.get("scale")
    if scale is None:
        return None
    values = [scale] * count if isinstance(scale, int | float) else scale
    if (
        isinstance(scale, bool)
        or not isinstance(values, list)
        or len(values) != count
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
    ):
        raise ConfigError(
            f"expected {count} finite numbers, got {scale!r}",
            key=f"{path}.scale",
            fix="give one factor per channel (e.g. [0.001, 0.001, 0.001]) or one for all",
        )
    return tuple(float(v) for v in values)


def _parse_custom(data: Mapping[str, Any], path: str) -> StreamSpec:
    characteristic = _parse_characteristic(data, path)
    layout, count = _parse_layout(data, path)
    channels = _parse_channels(data, path, count)
    dtype = config_dtype(data, path, "use a numeric dtype: f32, f64, i16, i32, u8...", numeric=True)
    dtype_name = str(data.get("dtype", "f32")).lower()
    scale = _parse_scale(data, path, count)
    if scale is not None and dtype.kind != "f":
        raise ConfigError(
            f"scaled values would be truncated to {dtype_name}",
            key=f"{path}.dtype",
            fix='use a float dtype ("f32" or "f64") with scale',
        )
    rate = config_number(data, "rate", path, 0.0, low=0)
    stream_id = data.get("stream", "data")
    config_id(stream_id, f"{path}.stream", "stream")
    return StreamSpec(
        id=stream_id,
        characteristic=characteristic,
        channels=channels,
        dtype_name=dtype_name,
        decode=StructDecoder(layout, dtype, rate, scale),
        frequency=rate,
        description=f"characteristic {characteristic}, layout {layout}",
        unit=config_text(data, "unit", path),
    )


def parse_device(node_id: str, data: Any, path: str) -> DeviceSpec:
    """Validate one ``drivers.ble.devices.<node_id>`` entry.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    config_id(node_id, path, "node")
    data = check_keys(data, path, _DEVICE_KEYS | _CUSTOM_KEYS, "BLE device")
    profile = data.get("profile", "heart_rate")
    if profile not in PROFILES:
        raise ConfigError(
            f"unknown profile {profile!r}",
            key=f"{path}.profile",
            fix=f"use one of {list(PROFILES)}",
        )
    custom = profile == "custom"
    if not custom:
        check_keys(data, path, _DEVICE_KEYS, "heart_rate device")
    address = _parse_address(data, path)
    if custom:
        spec = _parse_custom(data, path)
        streams: dict[str, StreamSpec] = {spec.id: spec}
    else:
        streams = heart_rate_streams()
    return DeviceSpec(
        id=node_id,
        address=address,
        profile=profile,
        streams=streams,
        name=config_text(data, "name", path),
        description=config_text(data, "description", path),
    )


@dataclass(frozen=True)
class BleOptions:
    """The ``drivers.ble`` options, validated.

    Attributes:
        scan: list devices that advertise the Heart Rate service, besides configured ones.
        scan_s: how long a scan may take, and how often listings rescan at most. Also
            how long a connect looks for a device it has not just seen in a scan.
        connect_timeout_s: how long one connection attempt may take.
        devices: configured devices, by node id.
    """

    scan: bool = True
    scan_s: float = 5.0
    connect_timeout_s: float = 20.0
    devices: Mapping[str, DeviceSpec] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BleOptions:
        """Validate the ``drivers.ble`` section.

        Raises:
            ConfigError: naming ``drivers.ble.<key>`` and how to fix it.
        """
        data = check_keys(options or {}, CONFIG_PATH, _OPTION_KEYS, "BLE driver option")
        scan = config_bool(data, "scan", CONFIG_PATH, cls.scan, "use true")
        devices = config_entries(
            data, "devices", CONFIG_PATH, "devices", '{"strap": {"address": "AA:BB:CC:DD:EE:FF"}}'
        )
        path = f"{CONFIG_PATH}.devices"
        return cls(
            scan=scan,
            scan_s=config_number(data, "scan_s", CONFIG_PATH, cls.scan_s, positive=True, high=120),
            connect_timeout_s=config_number(
                data, "connect_timeout_s", CONFIG_PATH, cls.connect_timeout_s, positive=True
            ),
            devices={
                nid: parse_device(nid, spec, f"{path}.{nid}") for nid, spec in devices.items()
            },
        )

    @property
    def listen_s(self) -> float:
        """How long a scan listens: a little less than ``scan_s`` (see SCAN_MARGIN_S)."""
        return max(self.scan_s - SCAN_MARGIN_S, self.scan_s / 2)
