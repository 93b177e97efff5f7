"""Bluetooth Low Energy: heart-rate straps and custom GATT devices as live nodes.

Devices come from two places. Every device declared in ``drivers.ble.devices`` is a node
named after its config key. With ``scan`` on, listing also shows the devices a
:class:`bleak.BleakScanner` hears advertising the Heart Rate service (0x180D), as nodes
``ble-<address without colons, lower case>``.

Two profiles are built in:

- ``heart_rate``: the Bluetooth SIG Heart Rate Service. The Heart Rate Measurement
  characteristic (0x2A37) gives two irregular streams: ``hr`` (channel ``bpm``, f32) and
  ``rr`` (channel ``rr``, f64 seconds, one sample per RR interval).
- ``custom``: one notifying characteristic whose payload is a whole number of samples,
  each laid out as a :mod:`struct` format (``"<hhh"``), optionally scaled per channel.

This process owns the adapter: one :class:`bleak.BleakClient` per device, shared by every
source on that device (reference counted), so a second task on the same device reuses
the connection and both get every notification. One :class:`asyncio.Lock` serialises
scans and connects, which BlueZ handles badly when they overlap. Every await on bleak
has a timeout; a device that drops raises
:class:`~streaminghub_datamux.errors.DeviceLost` at the source's next wait, so the task
reports it and reconnects with backoff. See docs/drivers.md, section "BLE devices".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakCharacteristicNotFoundError, BleakError
from bleak.uuids import normalize_uuid_str

from ..channel import Channel, ChannelClosed
from ..checks import check_keys, config_id, config_number, config_text
from ..clock import CLOCK_MAX_LAG_S, SampleClock
from ..errors import ConfigError, DeviceError, DeviceLost, NotFound
from ..framing import Framing
from ..model import Node, Stream, numpy_dtype
from .base import Chunk, Driver, DriverStatus, Source, live_stream

try:  # bleak >= 3.0
    from bleak.exc import BleakGATTProtocolError
except ImportError:  # pragma: no cover - older bleak
    _GATT_PROTOCOL_ERRORS: tuple[type[BaseException], ...] = ()
else:
    _GATT_PROTOCOL_ERRORS = (BleakGATTProtocolError,)

__all__ = [
    "HEART_RATE_MEASUREMENT",
    "HEART_RATE_SERVICE",
    "BleDriver",
    "BleOptions",
    "BleSource",
    "DeviceSpec",
    "HeartRate",
    "StreamSpec",
    "StructDecoder",
    "heart_rate_streams",
    "parse_device",
    "parse_heart_rate",
    "rr_timestamps",
    "scanned_node_id",
]

log = logging.getLogger(__name__)

# What to check when scanning fails (docs/operations.md, "Doctor").
BLE_FIX = (
    "check the adapter (bluetoothctl show; rfkill unblock bluetooth), that bluetoothd "
    "runs (systemctl status bluetooth) and that the agent's user is in group bluetooth"
)

CONFIG_PATH = "drivers.ble"

HEART_RATE_SERVICE = normalize_uuid_str("180d")
HEART_RATE_MEASUREMENT = normalize_uuid_str("2a37")  # 00002a37-0000-1000-8000-00805f9b34fb

PROFILES = ("heart_rate", "custom")

NOTIFY_TIMEOUT_S = 5.0  # start_notify / stop_notify
DISCONNECT_TIMEOUT_S = 5.0
# bleak's own timeouts (scan, connect) end their work; ours are a backstop a little
# later, for a backend that does not honour them.
BACKSTOP_S = 2.0
# How long a source waits for a notification before asking whether the link is alive:
# covers a backend that misses the disconnect event.
LIVENESS_CHECK_S = 1.0
# A stream with a rate continues its sample clock while the newest sample stays within
# max(CLOCK_SLACK_S, 2 / rate) of the notification's arrival (a steady SampleClock).
CLOCK_SLACK_S = CLOCK_MAX_LAG_S
# Chunks held between the notify callback and the task; past that the oldest are dropped
# (the task's own buffer is bounded too, so this only fills if the loop starves).
MAX_PENDING_CHUNKS = 1024
# The scanner needs a moment to start and stop: a scan listens this much less than
# scan_s so a listing that waits for it stays within scan_s.
SCAN_MARGIN_S = 0.5

_OPTION_KEYS = {"scan", "scan_s", "connect_timeout_s", "devices"}
_DEVICE_KEYS = {"address", "profile", "name", "description"}
_CUSTOM_KEYS = {"characteristic", "layout", "channels", "dtype", "rate", "scale", "stream", "unit"}
# Node and stream ids end up in MQTT topics and file names.
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_SHORT_UUID = re.compile(r"[0-9A-Fa-f]{4}([0-9A-Fa-f]{4})?")
_BYTE_ORDERS = "<>!="


# -- the Heart Rate Measurement characteristic ---------------------------------------------


@dataclass(frozen=True)
class HeartRate:
    """One Heart Rate Measurement notification (HRS 1.0, characteristic 0x2A37).

    Attributes:
        bpm: heart rate in beats per minute.
        contact: skin contact detected (True/False), or None if the sensor cannot tell.
        energy_kj: cumulative energy expended in kJ, when the sensor sends it.
        rr_s: RR intervals in seconds, oldest first (there may be none, or several).
    """

    bpm: int
    contact: bool | None = None
    energy_kj: int | None = None
    rr_s: tuple[float, ...] = ()


def _need(data: bytes, end: int, what: str) -> None:
    if len(data) < end:
        raise ValueError(f"heart rate measurement of {len(data)} bytes has no room for {what}")


def parse_heart_rate(data: bytes | bytearray | memoryview) -> HeartRate:
    """Decode a Heart Rate Measurement value.

    The flags byte says what follows, all little-endian: bit 0 the heart rate format
    (uint8 or uint16), bits 1-2 sensor contact (bit 2 supported, bit 1 detected), bit 3
    Energy Expended present (uint16, kJ), bit 4 RR intervals present (any number of
    uint16 in units of 1/1024 s, to the end of the value). Bits 5-7 are reserved and
    ignored, as are bytes after the last field a flag announces (the spec lets later
    versions append fields).

    Raises:
        ValueError: the value is shorter than its flags announce, or its RR intervals
            have an odd number of bytes.
    """
    data = bytes(data)
    _need(data, 1, "the flags")
    flags = data[0]
    if flags & 0x01:
        _need(data, 3, "a 16-bit heart rate")
        bpm, offset = int.from_bytes(data[1:3], "little"), 3
    else:
        _need(data, 2, "an 8-bit heart rate")
        bpm, offset = data[1], 2
    contact = bool(flags & 0x02) if flags & 0x04 else None
    energy = None
    if flags & 0x08:
        _need(data, offset + 2, "the energy expended")
        energy, offset = int.from_bytes(data[offset : offset + 2], "little"), offset + 2
    rr: tuple[float, ...] = ()
    if flags & 0x10:
        rest = data[offset:]
        if len(rest) % 2:
            raise ValueError(f"RR intervals take an even number of bytes, got {len(rest)}")
        rr = tuple(v / 1024.0 for v in struct.unpack(f"<{len(rest) // 2}H", rest))
    return HeartRate(bpm=bpm, contact=contact, energy_kj=energy, rr_s=rr)


def rr_timestamps(rr_s: Iterable[float] | np.ndarray, arrival: float) -> np.ndarray:
    """Timestamps for RR intervals that arrived together at ``arrival``.

    Each interval is stamped with the beat that ends it. The sensor sends an interval
    after its closing beat, so the newest interval ends about when the notification
    arrives and the older ones end earlier, by the intervals that follow them:
    ``[a, b, c]`` arriving at ``t`` are stamped ``[t - b - c, t - c, t]``.
    """
    rr = np.asarray(rr_s, dtype=np.float64)
    after = rr[::-1].cumsum()[::-1] - rr  # sum of the intervals that follow each one
    return arrival - after


def _decode_hr(data: bytes, arrival: float) -> Chunk:
    measurement = parse_heart_rate(data)
    return np.array([arrival]), np.array([[measurement.bpm]], dtype=np.float32)


def _decode_rr(data: bytes, arrival: float) -> Chunk:
    rr = np.array(parse_heart_rate(data).rr_s, dtype=np.float64)
    return rr_timestamps(rr, arrival), rr.reshape(-1, 1)


# -- custom characteristics ------------------------------------------------------------------


@dataclass(frozen=True)
class StructDecoder:
    """Decodes a notification holding whole samples of a :mod:`struct` layout.

    Attributes:
        layout: the struct format of one sample, with an explicit byte order (``"<hhh"``).
        dtype: the dtype of the decoded values.
        rate: sampling rate in Hz; 0 for irregular.
        scale: one factor per channel (values are ``raw * scale``), or None.
    """

    layout: str
    dtype: np.dtype
    rate: float = 0.0
    scale: tuple[float, ...] | None = None

    def __call__(self, data: bytes, arrival: float) -> Chunk:
        """Samples and their timestamps.

        A regular stream's samples are spaced ``1 / rate`` apart, the last one at
        ``arrival``; an irregular stream's samples all get ``arrival``.

        Raises:
            ValueError: the value is not a whole number of samples.
        """
        size = struct.calcsize(self.layout)
        if not data or len(data) % size:
            raise ValueError(f"{len(data)} bytes are not a whole number of {size}-byte samples")
        raw = np.array(list(struct.iter_unpack(self.layout, data)), dtype=np.float64)
        if self.scale is not None:
            raw *= np.asarray(self.scale)
        n = len(raw)
        if self.rate > 0:
            timestamps = arrival - np.arange(n - 1, -1, -1, dtype=np.float64) / self.rate
        else:
            timestamps = np.full(n, arrival)
        return timestamps, raw.astype(self.dtype)


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


def _parse_dtype(data: Mapping[str, Any], path: str) -> tuple[np.dtype, str]:
    name = data.get("dtype", "f32")
    fix = "use a numeric dtype: f32, f64, i16, i32, u8..."
    try:
        if not isinstance(name, str):
            raise ValueError(f"expected a dtype name, got {name!r}")
        dtype = numpy_dtype(name)
    except ValueError as exc:
        raise ConfigError(str(exc), key=f"{path}.dtype", fix=fix) from None
    if dtype.kind not in "biuf":
        raise ConfigError(f"dtype {name!r} is not numeric", key=f"{path}.dtype", fix=fix)
    return dtype, name.lower()


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
    dtype, dtype_name = _parse_dtype(data, path)
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
        scan = data.get("scan", cls.scan)
        if not isinstance(scan, bool):
            raise ConfigError(
                f"expected true or false, got {scan!r}", key=f"{CONFIG_PATH}.scan", fix="use true"
            )
        devices = data.get("devices")
        devices = {} if devices is None else devices
        if not isinstance(devices, Mapping):
            raise ConfigError(
                f"expected a JSON object of devices, got {type(devices).__name__}",
                key=f"{CONFIG_PATH}.devices",
                fix='write it as {"strap": {"address": "AA:BB:CC:DD:EE:FF"}}',
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


# -- the shared connection -----------------------------------------------------------------


class _Listener(Protocol):
    def deliver(self, data: bytes, arrival: float) -> None: ...

    def lost(self, reason: str) -> None: ...


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _scan_failure(exc: BaseException) -> str:
    """Why a scan failed, in words that point at the fix."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        # bleak's BlueZ backend talks to the D-Bus system bus socket; on a machine without
        # D-Bus (a container, a minimal install) connecting to it fails like this.
        return (
            "no BlueZ/D-Bus on this machine (the D-Bus system bus is not running); install "
            "and start bluez and dbus, or leave 'ble' out of drivers.enabled"
        )
    return _reason(exc)


async def _disconnect_quietly(client: BleakClient) -> None:
    """Disconnect, bounded; failures only matter to the log (the link is gone anyway)."""
    try:
        async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
            await client.disconnect()
    except (BleakError, TimeoutError, OSError) as exc:
        log.debug("BLE disconnect of %s: %s", client, _reason(exc))


@dataclass(frozen=True)
class _Seen:
    """A device heard by the last scan."""

    device: BLEDevice
    adv: AdvertisementData
    at: float  # monotonic time of the scan that heard it

    @property
    def heart_rate(self) -> bool:
        return HEART_RATE_SERVICE in (u.lower() for u in self.adv.service_uuids)


class _Link:
    """One device's connection, shared by every source on it.

    ``users`` counts the sources holding it; the last to leave disconnects. The notify
    callbacks fan out to every listener of their characteristic. A disconnect (bleak's
    callback, or a check that finds the client gone) tells every listener once and
    forgets the client; the next :meth:`acquire` connects again.
    """

    def __init__(self, driver: BleDriver, address: str) -> None:
        self.driver = driver
        self.address = address
        self.client: BleakClient | None = None
        self.users = 0
        self.generation = 0  # bumped whenever the client goes: stale callbacks are ignored
        self._listeners: dict[str, set[_Listener]] = {}
        self._notify_lock = asyncio.Lock()
        self._closing: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def acquire(self) -> None:
        """Count one more user and make sure the device is connected.

        Raises:
            DeviceLost: the device was not found or the connection failed.
        """
        self.users += 1
        try:
            await self._ensure_connected()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Count one user less; the last one disconnects (in the background)."""
        self.users = max(self.users - 1, 0)
        if self.users == 0 and self.client is not None:
            client = self._forget_client()
            self._closing = self.driver._spawn(_disconnect_quietly(client))

    async def _ensure_connected(self) -> None:
        if self._closing is not None:  # let the previous disconnect finish first
            await asyncio.wait({self._closing})
            self._closing = None
        async with self.driver._adapter_lock:
            if self.connected:
                return
            if self.client is not None:  # gone without telling us
                self._drop("connection lost")
            device = await self.driver._find(self.address)
            await self._connect(device)

    async def _connect(self, device: BLEDevice) -> None:
        timeout = self.driver.options.connect_timeout_s
        client: BleakClient | None = None
        try:
            client = BleakClient(device, disconnected_callback=self._on_disconnect, timeout=timeout)
            async with asyncio.timeout(timeout + BACKSTOP_S):
                await client.connect()
        except (BleakError, TimeoutError, OSError) as exc:
            if client is not None:
                await _disconnect_quietly(client)
            raise DeviceLost(
                f"cannot connect to BLE device {self.address}: {_reason(exc)}"
            ) from exc
        except BaseException:
            # Cancelled mid-connect (the task stopped): do not leave a half-open link.
            if client is not None:
                self.driver._spawn(_disconnect_quietly(client))
            raise
        self.client = client
        self.generation += 1
        log.info("BLE device %s connected", self.address)

    def _forget_client(self) -> BleakClient | None:
        client, self.client = self.client, None
        self.generation += 1
        self._listeners.clear()
        return client

    def _drop(self, reason: str, level: int = logging.WARNING) -> BleakClient | None:
        """The connection is gone: tell every listener once, forget the client."""
        listeners = [x for group in self._listeners.values() for x in group]
        client = self._forget_client()
        log.log(level, "BLE device %s: %s", self.address, reason)
        for listener in listeners:
            listener.lost(f"BLE device {self.address}: {reason}")
        return client

    def _on_disconnect(self, client: BleakClient) -> None:
        # bleak calls this on the event loop, also after our own disconnect(): only the
        # current client's loss matters.
        if client is self.client:
            self._drop("disconnected")

    def check(self) -> None:
        """Notice a client that is gone without a disconnect event."""
        if self.client is not None and not self.client.is_connected:
            self._drop("connection lost")

    def _notifier(
        self, characteristic: str
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        generation = self.generation

        def on_notify(sender: BleakGATTCharacteristic, data: bytearray) -> None:
            # bleak runs this on the event loop. One arrival time for every listener, so
            # streams fed by one notification (hr and rr) agree.
            if generation != self.generation:
                return
            arrival = time.time()
            payload = bytes(data)
            for listener in list(self._listeners.get(characteristic, ())):
                listener.deliver(payload, arrival)

        return on_notify

    async def subscribe(self, characteristic: str, listener: _Listener) -> int:
        """Deliver the characteristic's notifications to ``listener`` (start_notify once).

        Returns:
            The link's generation the listener is subscribed under: once the link's
            generation differs (or it has no client), the listener has lost the device.

        Raises:
            DeviceLost: not connected, disconnected while subscribing, or start_notify
                failed or timed out.
            DeviceError: the device has no such characteristic, it can neither notify nor
                indicate, or the device refused (a GATT protocol error such as missing
                authentication): retrying will not help.
        """
        async with self._notify_lock:
            client = self.client
            generation = self.generation
            if client is None or not client.is_connected:
                raise DeviceLost(f"BLE device {self.address} disconnected")
            listeners = self._listeners.get(characteristic)
            if listeners is None:
                target = self._notify_target(client, characteristic)
                try:
                    async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                        await client.start_notify(target, self._notifier(characteristic))
                except BleakCharacteristicNotFoundError as exc:
                    raise DeviceError(
                        f"BLE device {self.address} has no characteristic {characteristic}"
                    ) from exc
                except _GATT_PROTOCOL_ERRORS as exc:
                    raise DeviceError(
                        f"BLE device {self.address} refused notifications of "
                        f"{characteristic}: {_reason(exc)}"
                    ) from exc
                except (BleakError, TimeoutError, OSError) as exc:
                    raise DeviceLost(
                        f"BLE device {self.address}: cannot subscribe to {characteristic}: "
                        f"{_reason(exc)}"
                    ) from exc
                # The disconnect callback may have run while start_notify was pending
                # (BlueZ can deliver both in one loop iteration): then the listeners were
                # already told and forgotten, and this one would wait forever.
                if self.client is not client or self.generation != generation:
                    raise DeviceLost(f"BLE device {self.address}: disconnected")
                if not client.is_connected:
                    self._drop("connection lost")
                    raise DeviceLost(f"BLE device {self.address}: connection lost")
                listeners = self._listeners[characteristic] = set()
            listeners.add(listener)
            return generation

    def _notify_target(self, client: BleakClient, characteristic: str) -> Any:
        """The characteristic to pass to start_notify, checked for notify or indicate.

        Raises:
            DeviceError: the device has no such characteristic (or several), or it can
                neither notify nor indicate.
        """
        try:
            services = client.services
        except BleakError:  # not discovered yet: let start_notify find it
            return characteristic
        try:
            found = services.get_characteristic(characteristic)
        except BleakError as exc:  # several with this UUID
            raise DeviceError(f"BLE device {self.address}: {_reason(exc)}") from exc
        if found is None:
            raise DeviceError(f"BLE device {self.address} has no characteristic {characteristic}")
        if not {"notify", "indicate"} & set(found.properties):
            raise DeviceError(
                f"BLE device {self.address}: characteristic {characteristic} can neither "
                f"notify nor indicate (properties: {', '.join(found.properties) or 'none'})"
            )
        return found

    def alive(self, generation: int) -> bool:
        """Whether a listener subscribed under ``generation`` still has its connection."""
        self.check()
        return self.client is not None and self.generation == generation

    async def unsubscribe(self, characteristic: str, listener: _Listener) -> None:
        """Stop delivering to ``listener``; the last listener stops notifications."""
        async with self._notify_lock:
            listeners = self._listeners.get(characteristic)
            if listeners is None or listener not in listeners:
                return  # after a disconnect: nothing is subscribed any more
            listeners.discard(listener)
            if listeners:
                return
            del self._listeners[characteristic]
            client = self.client
            if client is None or not client.is_connected:
                return
            try:
                async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                    await client.stop_notify(characteristic)
            except (BleakError, TimeoutError, OSError) as exc:
                log.debug("BLE device %s: stop_notify: %s", self.address, _reason(exc))

    def close(self) -> None:
        """Disconnect now, whoever still uses the link (the driver is closing)."""
        client = self._drop("driver closed", logging.INFO) if self.client is not None else None
        if client is not None:
            self._closing = self.driver._spawn(_disconnect_quietly(client))


# -- sources -------------------------------------------------------------------------------


def _samples(chunk: Chunk) -> int:
    return len(chunk[0])


class BleSource(Source):
    """One stream of one BLE device, fed by notifications through a shared link.

    Timestamps are wall-clock seconds (``time.time()``) at the notification's arrival,
    spread backwards for several samples per notification (see :func:`rr_timestamps`
    and :class:`StructDecoder`), then clamped so they never go backwards.

    A stream with a rate keeps a steady :class:`SampleClock` instead: BLE
    delivers several notifications per connection event, so arrival times bunch up,
    and stamping each notification's last sample on arrival would give equal stamps.
    """

    paced = False

    def __init__(self, driver: BleDriver, device: DeviceSpec, spec: StreamSpec) -> None:
        super().__init__(spec.to_stream(device))
        self.device = device
        self.spec = spec
        self.malformed = 0  # notifications that did not decode
        self._driver = driver
        self._link: _Link | None = None
        self._channel: Channel[Chunk] = Channel(MAX_PENDING_CHUNKS, size=_samples)
        self._last_t = -math.inf
        self._clock = SampleClock(spec.frequency, steady=True)
        self._generation: int | None = None  # the link's, when subscribed
        self._closed = False

    async def open(self) -> None:
        """Connect (or join the device's connection) and subscribe.

        Raises:
            DeviceLost: the device is not there or the connection failed.
            DeviceError: the device lacks the stream's characteristic.
        """
        link = self._driver._link(self.device.address)
        await link.acquire()
        self._link = link
        try:
            self._generation = await link.subscribe(self.spec.characteristic, self)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Unsubscribe and leave the link (the last user disconnects). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        link, self._link = self._link, None
        if link is None:
            return
        try:
            await link.unsubscribe(self.spec.characteristic, self)
        finally:
            link.release()

    # Called by the link, on the event loop.

    def deliver(self, data: bytes, arrival: float) -> None:
        try:
            timestamps, values = self.spec.decode(data, arrival)
        except (ValueError, struct.error) as exc:
            self.malformed += 1
            where = f"{self.device.id}/{self.spec.id}"
            log.debug("BLE %s: bad notification %s: %s", where, data.hex(), exc)
            return
        if len(timestamps) == 0:
            return
        if self.spec.frequency > 0:
            timestamps = self._clock.stamp(len(timestamps), arrival)
        # Arrival times jitter; a later notification must not stamp before an earlier one.
        timestamps = np.maximum.accumulate(np.maximum(timestamps, self._last_t))
        self._last_t = float(timestamps[-1])
        self._channel.send((timestamps, values))

    @property
    def dropped(self) -> int:
        """Samples dropped because the loop fell behind."""
        return self._channel.dropped

    def lost(self, reason: str) -> None:
        self._channel.close(DeviceLost(reason))

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Yield decoded notifications; raise DeviceLost when the device drops."""
        if self._link is None and not self._closed:
            await self.open()
        while not self._closed:
            try:
                async with asyncio.timeout(LIVENESS_CHECK_S):
                    item = await self._channel.receive()
            except ChannelClosed:
                return
            except TimeoutError:
                link = self._link
                if (
                    link is not None
                    and self._generation is not None
                    and not link.alive(self._generation)
                    and not self._channel.closed  # else check() just reported the loss
                ):
                    # A loss this source was not told about (a client gone without a
                    # disconnect event is told through check(), which closes the channel).
                    raise DeviceLost(f"BLE device {self.device.address}: connection lost") from None
                continue
            yield item


# -- the driver ------------------------------------------------------------------------------


class BleDriver(Driver):
    """Configured BLE devices plus heart-rate sensors found by scanning.

    Args:
        options: the validated ``drivers.ble`` options.
    """

    name = "ble"

    def __init__(self, options: BleOptions | None = None) -> None:
        self.options = options or BleOptions()
        self._adapter_lock = asyncio.Lock()  # one scan or connect at a time
        self._links: dict[str, _Link] = {}  # by address key
        self._seen: dict[str, _Seen] = {}  # the last scan, by address key
        self._scanned_at: float | None = None  # monotonic start of the last finished scan
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_failed = False
        self._scan_problem = ""  # the last scan's failure, for status()
        self._known: dict[str, DeviceSpec] = {}  # every scanned device ever listed
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        configured = {_address_key(d.address) for d in self.options.devices.values()}
        self._configured_addresses = configured

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> BleDriver:
        """From the ``drivers.ble`` config section.

        Raises:
            ConfigError: an unknown key or a bad value (the message names the key).
        """
        return cls(BleOptions.parse(options))

    async def aclose(self) -> None:
        """Stop scanning, disconnect every device and wait (bounded) for the disconnects."""
        self._closed = True
        if self._scan_task is not None:
            self._scan_task.cancel()
            await asyncio.wait({self._scan_task})
        for link in self._links.values():
            link.close()
        if self._background:
            await asyncio.wait(set(self._background), timeout=DISCONNECT_TIMEOUT_S + BACKSTOP_S)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Keep a reference: the loop holds tasks weakly.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _link(self, address: str) -> _Link:
        if self._closed:
            # Not DeviceLost: a task must end here, not reconnect behind a closed driver.
            raise DeviceError("the BLE driver is closed")
        key = _address_key(address)
        if key not in self._links:
            self._links[key] = _Link(self, address)
        return self._links[key]

    # -- scanning ------------------------------------------------------------------------

    async def _scan(self) -> None:
        started = time.monotonic()
        try:
            async with self._adapter_lock:
                started = time.monotonic()
                async with asyncio.timeout(self.options.scan_s + BACKSTOP_S):
                    found = await BleakScanner.discover(
                        timeout=self.options.listen_s, return_adv=True
                    )
            self._scan_failed, self._scan_problem = False, ""
        except Exception as exc:  # no adapter, BlueZ not running, no permission...
            # Say it once, not at every listing; loudly only if BLE devices are configured,
            # since with drivers.enabled "auto" BLE may simply not be part of this setup.
            loud = logging.WARNING if self.options.devices else logging.INFO
            level = logging.DEBUG if self._scan_failed else loud
            log.log(level, "BLE scan failed: %s", _scan_failure(exc))
            self._scan_failed, found = True, {}
            self._scan_problem = f"BLE scan failed: {_reason(exc)}"
        finally:
            self._scan_task = None
        self._seen = {
            _address_key(address): _Seen(device, adv, started)
            for address, (device, adv) in found.items()
        }
        self._scanned_at = started

    async def _scanned_devices(self) -> list[DeviceSpec]:
        """Heart-rate devices nearby, from a scan at most ``scan_s`` old when possible."""
        if not self.options.scan:
            return []
        now = time.monotonic()
        stale = self._scanned_at is None or now - self._scanned_at >= self.options.scan_s
        if stale and self._scan_task is None:
            self._scan_task = asyncio.get_running_loop().create_task(self._scan())
        if self._scanned_at is None and self._scan_task is not None:
            # Nothing to show yet: wait for the first scan, but never longer than scan_s.
            await asyncio.wait({self._scan_task}, timeout=self.options.scan_s)
        visible: dict[str, DeviceSpec] = {}
        for key, seen in self._seen.items():
            if seen.heart_rate and key not in self._configured_addresses:
                spec = self._remember(seen)
                visible[spec.id] = spec
        # A connected sensor stops advertising: keep it listed while we hold it.
        for key, link in self._links.items():
            spec = next((d for d in self._known.values() if _address_key(d.address) == key), None)
            if spec is not None and link.connected:
                visible[spec.id] = spec
        return [visible[k] for k in sorted(visible)]

    def _remember(self, seen: _Seen) -> DeviceSpec:
        address = seen.device.address
        spec = DeviceSpec(
            id=scanned_node_id(address),
            address=address,
            profile="heart_rate",
            streams=heart_rate_streams(),
            name=seen.adv.local_name or seen.device.name or address,
            scanned=True,
        )
        self._known[spec.id] = spec
        return spec

    async def _find(self, address: str) -> BLEDevice:
        """The device to connect to: from the last scan if fresh, else a targeted scan.

        Called with the adapter lock held.

        Raises:
            DeviceLost: nothing with this address advertises within ``scan_s``.
        """
        seen = self._seen.get(_address_key(address))
        if seen is not None and time.monotonic() - seen.at < self.options.scan_s:
            return seen.device
        scan_s = self.options.scan_s
        try:
            async with asyncio.timeout(scan_s + BACKSTOP_S):
                device = await BleakScanner.find_device_by_address(address, timeout=scan_s)
        except (BleakError, TimeoutError, OSError) as exc:
            raise DeviceLost(f"cannot scan for BLE device {address}: {_reason(exc)}") from exc
        if device is None:
            raise DeviceLost(
                f"BLE device {address} not found: no advertisement within {scan_s:g} s "
                "(off, out of range, or connected to another host)"
            )
        return device

    # -- the Driver interface --------------------------------------------------------------

    def _device(self, node_id: str) -> DeviceSpec:
        device = self.options.devices.get(node_id) or self._known.get(node_id)
        if device is None:
            known = sorted([*self.options.devices, *self._known])
            raise NotFound(f"no BLE node {node_id!r}; BLE nodes: {known or 'none'}")
        return device

    def status(self) -> DriverStatus:
        # Scans repeat on every listing, so an adapter plugged in later clears this.
        if self._scan_problem:
            return DriverStatus(self.name, "degraded", self._scan_problem, BLE_FIX)
        return DriverStatus(self.name)

    async def list_nodes(self) -> list[Node]:
        scanned = await self._scanned_devices()
        return [d.to_node() for d in [*self.options.devices.values(), *scanned]]

    async def list_streams(self, node_id: str) -> list[Stream]:
        device = self._device(node_id)
        return [spec.to_stream(device) for spec in device.streams.values()]

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        # Devices listed once stay openable: after a loss the task reopens them by id, and
        # the source raises DeviceLost until the device is back.
        device = self._device(node_id)
        spec = device.streams.get(stream_id)
        if spec is None:
            streams = sorted(device.streams)
            raise NotFound(f"BLE node {node_id!r} has no stream {stream_id!r}; streams: {streams}")
        return BleSource(self, device, spec)
