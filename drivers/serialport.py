"""Serial devices (USB-serial adapters, Arduinos, OpenBCI-style boards) as live nodes.

Every device configured under ``drivers.serial.devices`` is a node with one stream. With
``list_ports`` (``datamux ls --all`` sets it) the ports the OS reports that are not
configured are listed too, as nodes without streams, so the user can see what to
configure; by default they are not, since a node that cannot stream is noise everywhere. See
docs/drivers.md ("Serial devices") for the config format.

One reader thread per open port does the blocking reads, parses each batch with numpy
(:mod:`.serialframes`) and hands ``(timestamps, values)`` chunks to the event loop with
``loop.call_soon_threadsafe``; the loop never blocks. Every source open on a device
shares that reader, since a serial port has one byte stream and two readers would split
it between them. A read that fails (unplugged adapter, closed pseudo-terminal) ends the
chunks with :class:`~streaminghub_datamux.errors.DeviceLost`; the task then reopens the
port with backoff and reports the gap.

A consumer that falls behind by more than :data:`MAX_QUEUED_CHUNKS` chunks loses the
oldest ones. The loss is counted (:attr:`SerialSource.dropped`, the device's
``stats.dropped``), logged at WARNING with the count (rate-limited), and shows in the
data as a gap in the timestamps (they come from the device's clock model, not from
delivery). The task reads ``source.dropped`` and reports every increase to the consumer
as a ``StreamStatus("dropped")``, as it does for its own framer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import serial
from serial.tools import list_ports

from ..channel import Channel
from ..checks import check_keys, config_id, config_number, config_text
from ..errors import ConfigError, DeviceError, DeviceLost, NotFound
from ..framing import Framing
from ..model import Node, Stream, dtype_name, numpy_dtype
from .base import Chunk, Driver, DriverStatus, Source, live_stream
from .serialframes import (
    FormatSpec,
    ParseStats,
    PtySerialWriter,
    SampleClock,
    make_parser,
    parse_format,
    serve_stream_on_pty,
)

__all__ = [
    "CONFIG_PATH",
    "DeviceSpec",
    "PtySerialWriter",
    "SerialDriver",
    "SerialSource",
    "parse_device",
    "parse_options",
    "serve_stream_on_pty",
]

log = logging.getLogger(__name__)

CONFIG_PATH = "drivers.serial"
DEFAULT_BAUDRATE = 115200
# A blocking read returns after this long without data, so a stop is noticed even where
# cancel_read() is not available (non-POSIX ports, URL handlers).
READ_TIMEOUT_S = 0.1
# A regular stream's reads are batched this long: a 1 kHz device then costs ~250 reads
# and chunks a second instead of 1000, for at most 4 ms of added latency.
BATCH_S = 0.004
# Chunks waiting for a source's consumer; past this the oldest are dropped and counted.
MAX_QUEUED_CHUNKS = 512
JOIN_TIMEOUT_S = 2.0
WARN_EVERY_S = 10.0

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


def _parse_dtype(data: Mapping[str, Any], path: str) -> np.dtype:
    name = data.get("dtype", "f32")
    try:
        if not isinstance(name, str):
            raise ValueError(f"expected a dtype name, got {name!r}")
        return numpy_dtype(name)
    except ValueError as exc:
        raise ConfigError(
            str(exc), key=f"{path}.dtype", fix="use f32, f64, i16, i32, u8, bool or str"
        ) from None


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
    dtype = _parse_dtype(data, path)
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
    list_ports_flag = options.get("list_ports", False)
    if not isinstance(list_ports_flag, bool):
        raise ConfigError(
            f"expected true or false, got {list_ports_flag!r}",
            key=f"{CONFIG_PATH}.list_ports",
            fix="use true to list unconfigured ports as nodes, false to hide them",
        )
    raw = options.get("devices")
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"expected a JSON object of devices, got {type(raw).__name__}",
            key=f"{CONFIG_PATH}.devices",
            fix='write it as {"my-sensor": {"port": "/dev/ttyUSB0", "channels": [...]}}',
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


# -- the reader ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Ended:
    """End of chunks with a reason; each source raises its own exception from it."""

    reason: str
    lost: bool  # DeviceLost (retried by the task) or DeviceError (ends the task)


class _Warner:
    """Rate-limited WARNING about bad input, so a noisy device cannot flood the log."""

    def __init__(self, node_id: str, stats: ParseStats) -> None:
        self.node_id = node_id
        self.stats = stats
        self._last_time = -math.inf
        self._last_count = stats.problems()

    def check(self) -> None:
        count = self.stats.problems()
        now = time.monotonic()
        if count == self._last_count or now - self._last_time < WARN_EVERY_S:
            return
        s = self.stats
        log.warning(
            "serial device %s: %d new problems (so far %d bad lines/packets, %d missing "
            "values, %d resyncs, %d samples dropped); last bad input: %r",
            self.node_id, count - self._last_count, s.bad, s.missing, s.resyncs, s.dropped,
            s.last_bad,
        )  # fmt: skip
        self._last_time, self._last_count = now, count


def _open_port(spec: DeviceSpec) -> serial.SerialBase:
    """Open the port (blocking). Raises DeviceLost if it is not there (yet)."""
    try:
        return serial.serial_for_url(
            spec.port,
            baudrate=spec.baudrate,
            timeout=READ_TIMEOUT_S,
            # POSIX: an flock, so another process cannot open the port and split the
            # byte stream with us (pyserial ignores it for URL handlers).
            **({"exclusive": True} if os.name == "posix" else {}),
        )
    except (serial.SerialException, OSError) as exc:
        hint = ""
        if getattr(exc, "errno", None) == errno.EACCES:
            hint = " (permission denied: add the user to the port's group, e.g. dialout)"
        raise DeviceLost(f"port {spec.port} not available: {exc}{hint}") from exc
    except ValueError as exc:  # an unknown URL scheme or setting: retrying cannot help
        raise DeviceError(f"port {spec.port} cannot be opened: {exc}") from exc


async def _open_port_async(spec: DeviceSpec) -> serial.SerialBase:
    """Open the port in a thread; if the caller is cancelled meanwhile, close it after."""
    opening = asyncio.ensure_future(asyncio.to_thread(_open_port, spec))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The thread cannot be stopped mid-open: let it finish, then release the port.
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[serial.SerialBase]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        with contextlib.suppress(Exception):
            opening.result().close()


class _PortReader:
    """The one reader of a device's port, shared by every source open on it.

    The port is opened when the first source attaches and closed when the last detaches
    (or the device is lost, or the driver closes). The thread owns the port while it
    runs; the event loop only attaches, detaches and asks it to stop.
    """

    def __init__(self, spec: DeviceSpec, stats: ParseStats) -> None:
        self.spec = spec
        self.stats = stats
        self._guard = threading.Lock()  # the fields below, between loop and thread
        self._subscribers: list[SerialSource] = []
        self._port: serial.SerialBase | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        # Irregular streams are read as soon as bytes come: their arrival is their time.
        self._batch_s = BATCH_S if spec.rate > 0 else 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _lock(self) -> asyncio.Lock:
        # Attach and detach take turns on the loop; one lock per loop, as locks bind to one.
        loop = asyncio.get_running_loop()
        if loop not in self._locks:
            self._locks = {loop: asyncio.Lock()}
        return self._locks[loop]

    async def attach(self, source: SerialSource) -> None:
        """Start delivering to ``source``; open the port first if no one has it open."""
        async with self._lock():
            with self._guard:
                if self._port is not None and not self._stop.is_set():
                    self._subscribers.append(source)
                    return
            await self._join()  # a reader that is ending still holds the port
            if self.running:
                # It did not stop in time: opening the port again would give two readers
                # one byte stream. The task retries later, when the old one has ended.
                raise DeviceLost(f"the previous reader of {self.spec.port} has not stopped yet")
            port = await _open_port_async(self.spec)
            stop = threading.Event()  # each reader has its own: an old one cannot clear it
            with self._guard:
                self._subscribers.append(source)
                self._port = port
                self._stop = stop
                self._thread = threading.Thread(
                    target=self._run,
                    args=(port, stop),
                    name=f"serial-{self.spec.id}",
                    daemon=True,
                )
                self._thread.start()

    async def detach(self, source: SerialSource) -> None:
        """Stop delivering to ``source``; the last one out stops the reader."""
        async with self._lock():
            with self._guard:
                if source in self._subscribers:
                    self._subscribers.remove(source)
                if self._subscribers:
                    return
                self._request_stop()
            await self._join()

    async def halt(self) -> None:
        """Stop the reader whoever is attached (they get the end of their chunks)."""
        async with self._lock():
            with self._guard:
                self._request_stop()
            await self._join()

    def _request_stop(self) -> None:
        # Called with the guard held, so the port cannot be closed under us.
        self._stop.set()
        if self._port is not None and hasattr(self._port, "cancel_read"):
            with contextlib.suppress(Exception):  # a port that is failing anyway
                self._port.cancel_read()  # wake a blocked read now, not at its timeout

    async def _join(self) -> None:
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(thread.join, JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error("serial reader of %s did not stop in %.1f s", self.spec.id, JOIN_TIMEOUT_S)
        else:
            self._thread = None

    def _publish(self, chunk: Chunk) -> None:
        with self._guard:
            subscribers = list(self._subscribers)
        for i, source in enumerate(subscribers):
            # Every consumer gets arrays of its own: frames are theirs to modify.
            source.post(chunk if i == 0 else (chunk[0].copy(), chunk[1].copy()))

    def _run(self, port: serial.SerialBase, stop: threading.Event) -> None:
        """The reader thread: read, parse, stamp, publish, until stopped or lost."""
        spec = self.spec
        ending: _Ended | None = None
        warner = _Warner(spec.id, self.stats)
        try:
            parser = make_parser(spec.format, spec.channel_names, spec.dtype, self.stats)
            clock = SampleClock(spec.rate, spec.format.counter_bits)
            if spec.start:
                port.write(spec.start)
            while not stop.is_set():
                data = port.read(max(1, port.in_waiting))
                if not data:
                    continue
                if self._batch_s and stop.wait(self._batch_s):
                    break
                waiting = port.in_waiting
                if waiting:
                    data += port.read(waiting)
                arrival = time.time()
                values, counters = parser.feed(data)
                if len(values):
                    self._publish((clock.stamp(len(values), arrival, counters), values))
                warner.check()
        except (serial.SerialException, OSError) as exc:
            if not stop.is_set():
                ending = _Ended(f"port {spec.port} lost: {exc}", lost=True)
        except Exception as exc:  # a bug here, not the device: end the tasks, loudly
            log.exception("serial reader of %s failed", spec.id)
            ending = _Ended(f"serial reader of {spec.id} failed: {exc!r}", lost=False)
        finally:
            self._finish(port, stop, ending)
            warner.check()

    def _finish(
        self, port: serial.SerialBase, stop: threading.Event, ending: _Ended | None
    ) -> None:
        if self.spec.stop and ending is None:
            with contextlib.suppress(Exception):  # best effort: the device may be gone
                port.write(self.spec.stop)
                port.flush()
        subscribers: list[SerialSource] = []
        with self._guard:
            stop.set()  # a stopped reader is not reused: the next attach reopens
            if self._port is port:  # only the current reader's state is ours to end
                subscribers, self._subscribers = self._subscribers, []
                self._port = None
            with contextlib.suppress(Exception):
                port.close()
        for source in subscribers:
            source.end(ending)


# -- sources and the driver ----------------------------------------------------------


class SerialSource(Source):
    """A live serial stream: chunks from the device's shared reader.

    Bad input is counted in :attr:`stats` (shared by every source of the device and kept
    across reopens); :attr:`bad`, :attr:`missing` and :attr:`resyncs` are shortcuts.
    """

    paced = False

    def __init__(self, stream: Stream, reader: _PortReader) -> None:
        super().__init__(stream)
        self._reader = reader
        self._channel = self._new_channel()
        self._attached = False
        self._dropped = 0

    def _new_channel(self) -> Channel[Chunk]:
        return Channel(MAX_QUEUED_CHUNKS, size=lambda chunk: len(chunk[0]), on_drop=self._count)

    def _count(self, samples: int) -> None:
        self.stats.dropped += samples
        self._dropped += samples

    @property
    def stats(self) -> ParseStats:
        return self._reader.stats

    @property
    def bad(self) -> int:
        """Lines or packets rejected so far."""
        return self.stats.bad

    @property
    def missing(self) -> int:
        """key=value: channel values missing from good lines so far (NaN)."""
        return self.stats.missing

    @property
    def dropped(self) -> int:
        """Samples this source's consumer lost by falling behind (oldest chunks first)."""
        return self._dropped

    @property
    def resyncs(self) -> int:
        """binary: times bytes were skipped to find the next packet."""
        return self.stats.resyncs

    async def open(self) -> None:
        """Attach to the device's reader, opening the port. DeviceLost if it is absent."""
        if self._attached:
            return
        self._channel = self._new_channel()  # bound to this loop
        await self._reader.attach(self)
        self._attached = True

    async def aclose(self) -> None:
        """Detach; the last source of a device stops its reader and closes the port."""
        if not self._attached:
            return
        self._attached = False
        await self._reader.detach(self)
        self._channel.close()

    def post(self, chunk: Chunk) -> None:
        """From the reader thread: hand a chunk to this source's loop."""
        self._channel.send(chunk)

    def end(self, ending: _Ended | None) -> None:
        """From the reader thread: no more chunks; with a reason, the source raises."""
        if ending is None:
            self._channel.close()
            return
        error = DeviceLost if ending.lost else DeviceError
        self._channel.close(error(ending.reason))

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Yield chunks as the device sends them; DeviceLost when it vanishes."""
        if not self._attached:
            await self.open()
        async for chunk in self._channel:
            yield chunk


def _port_node_id(info: Any, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", info.name or os.path.basename(info.device))
    base = (base if base and base[0] not in ".-" else f"port{base}")[:58]
    node_id, n = base, 1
    while node_id in taken:
        n += 1
        node_id = f"{base}-{n}"
    return node_id


class SerialDriver(Driver):
    """Serial devices from ``drivers.serial``, plus the ports the OS sees.

    Args:
        devices: configured devices by node id (see :func:`parse_options`).
        list_ports: also list unconfigured ports as nodes without streams.
    """

    name = "serial"

    def __init__(
        self, devices: Mapping[str, DeviceSpec] | None = None, *, list_ports: bool = False
    ) -> None:
        self.devices = dict(devices or {})
        self.list_ports = list_ports
        self._readers = {nid: _PortReader(spec, ParseStats()) for nid, spec in self.devices.items()}

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> SerialDriver:
        """From the ``drivers.serial`` section: ``{"devices": {...}, "list_ports": false}``."""
        devices, list_ports_flag = parse_options(options)
        return cls(devices, list_ports=list_ports_flag)

    def status(self) -> DriverStatus:
        # Device files only; URLs (socket://, rfc2217://) are checked when opened.
        missing = sorted(
            spec.port
            for spec in self.devices.values()
            if not _URL.match(spec.port) and not os.path.exists(spec.port)
        )
        if missing:
            fix = "plug the device in (its reader retries), or fix the port in drivers.serial"
            return DriverStatus(self.name, "degraded", f"missing ports: {', '.join(missing)}", fix)
        return DriverStatus(self.name)

    def stats(self, node_id: str) -> ParseStats:
        """The bad-input counters of one configured device (kept across reopens)."""
        return self._reader(node_id).stats

    def _reader(self, node_id: str) -> _PortReader:
        try:
            return self._readers[node_id]
        except KeyError:
            known = ", ".join(self.devices) or "none"
            raise NotFound(f"no serial device {node_id!r}; configured: {known}") from None

    def _port_nodes(self) -> list[Node]:
        """Ports the OS reports that no configured device uses (blocking: sysfs, registry)."""
        try:
            ports = sorted(list_ports.comports(), key=lambda p: p.device)
        except Exception as exc:  # listing is a convenience; never fail a node listing
            log.debug("listing serial ports failed: %s", exc)
            return []
        used = {os.path.realpath(d.port) for d in self.devices.values() if not _URL.match(d.port)}
        taken = set(self.devices)
        nodes = []
        for info in ports:
            if os.path.realpath(info.device) in used:
                continue
            node_id = _port_node_id(info, taken)
            taken.add(node_id)
            described = info.description if info.description not in (None, "n/a") else ""
            hwid = info.hwid if info.hwid not in (None, "n/a") else ""
            about = ", ".join(part for part in (described, hwid) if part) or "no details"
            nodes.append(
                Node(
                    id=node_id,
                    name=described or info.device,
                    description=f"{info.device} ({about}); not configured: add it under "
                    f"{CONFIG_PATH}.devices with its channels and format to stream it",
                    device={
                        "port": info.device,
                        "description": described,
                        "hwid": hwid,
                        "vid": info.vid,
                        "pid": info.pid,
                        "serial_number": info.serial_number,
                        "manufacturer": info.manufacturer,
                        "product": info.product,
                    },
                    kind="serial-port",
                )
            )
        return nodes

    async def list_nodes(self) -> list[Node]:
        nodes = [spec.to_node() for spec in self.devices.values()]
        if self.list_ports:
            nodes.extend(await asyncio.to_thread(self._port_nodes))
        return nodes

    async def list_streams(self, node_id: str) -> list[Stream]:
        if node_id in self.devices:
            return [self.devices[node_id].to_stream()]
        if self.list_ports and node_id in {n.id for n in await asyncio.to_thread(self._port_nodes)}:
            return []  # a port nobody configured: nothing to stream yet
        raise NotFound(f"no serial node {node_id!r}")

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> SerialSource:
        unconfigured = node_id not in self.devices and self.list_ports
        if unconfigured and node_id in {n.id for n in self._port_nodes()}:
            raise NotFound(
                f"serial port {node_id!r} has no streams until it is configured: add it "
                f"under {CONFIG_PATH}.devices with its port, channels and format"
            )
        reader = self._reader(node_id)
        spec = reader.spec
        if stream_id != spec.stream:
            raise NotFound(
                f"serial device {node_id!r} has no stream {stream_id!r}; stream: {spec.stream}"
            )
        return SerialSource(spec.to_stream(), reader)

    async def aclose(self) -> None:
        """Stop every reader and close every port."""
        await asyncio.gather(*(reader.halt() for reader in self._readers.values()))
