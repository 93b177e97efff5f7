"""LSL: every Lab Streaming Layer outlet on the network is a live stream.

Discovery runs in the background with a :class:`pylsl.ContinuousResolver`, started on
first use and closed by :meth:`LslDriver.aclose`. Outlets are grouped into one node per
host (``lsl-<hostname>``); each outlet is a stream named after the outlet. The channel
labels and units come from the outlet's full description (``desc/channels/channel``),
fetched once per outlet; odd or missing descriptions fall back to ``ch0, ch1, ...``.

Proxying opens a :class:`pylsl.StreamInlet` owned by one reader thread per source. The
thread pulls chunks into a preallocated numpy buffer and hands copies to the event loop
with ``loop.call_soon_threadsafe``. Timestamps are on this machine's LSL clock
(``pylsl.local_clock()``): the inlet applies the time correction (``proc_clocksync``).

An outlet that vanishes raises :class:`~streaminghub_datamux.errors.DeviceLost`; the task
retries and resumes when an outlet with the same ``source_id`` (or, without one, the same
name on the same host) is back. See docs/drivers.md, section "LSL".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import pylsl
    from pylsl.util import LostError
    from pylsl.util import TimeoutError as LslTimeout
except RuntimeError as exc:  # pylsl is installed but cannot find liblsl
    # The registry skips drivers whose import fails with ImportError ("auto" mode).
    raise ImportError(f"pylsl cannot load liblsl: {exc}", name="liblsl") from exc

from ..channel import Channel
from ..checks import ID_PATTERN, check_keys, config_number
from ..errors import DatamuxError, DeviceError, DeviceLost, NotFound
from ..framing import Framing
from ..model import Field, Node, Stream, numpy_dtype, seconds_index
from .base import Chunk, Driver, DriverStatus, Source

__all__ = [
    "LSL_DTYPES",
    "PROCESSING_FLAGS",
    "LslDriver",
    "LslOptions",
    "LslSource",
    "describe_channels",
    "safe_id",
]

log = logging.getLogger(__name__)

# Where liblsl looks for its config file (after $LSLAPICFG), in its own order.
_LSL_CONFIG_FILES = ("lsl_api.cfg", "~/lsl_api/lsl_api.cfg", "/etc/lsl_api/lsl_api.cfg")


def _quiet_liblsl() -> None:
    """Keep liblsl's INFO lines ("Loaded default config") off every command's stderr.

    Only when the user has no lsl_api.cfg: configuration content replaces a file
    wholesale, and theirs may hold KnownPeers or multicast settings. liblsl reads its
    configuration once, on first use, so this must run before any other pylsl call.
    """
    if os.environ.get("LSLAPICFG"):
        return
    if any(os.path.exists(os.path.expanduser(path)) for path in _LSL_CONFIG_FILES):
        return
    try:
        pylsl.util.set_config_content("[log]\nlevel = -1\n")  # warnings and errors only
    except (AttributeError, NotImplementedError):  # liblsl older than 1.17.7
        log.debug("cannot lower liblsl's log level: this liblsl has no lsl_set_config_content")


_quiet_liblsl()

CONFIG_PATH = "drivers.lsl"

#: LSL channel format (pylsl ``cf_*``) -> DFDS dtype name. cf_undefined (0) cannot be
#: transmitted, so such outlets are not listed.
LSL_DTYPES: dict[int, str] = {
    pylsl.cf_float32: "f32",
    pylsl.cf_double64: "f64",
    pylsl.cf_string: "str",
    pylsl.cf_int32: "i32",
    pylsl.cf_int16: "i16",
    pylsl.cf_int8: "i8",
    pylsl.cf_int64: "i64",
}

# Timestamps on the consumer's clock: clocksync adds the inlet's time correction, so
# stamps made on another host are comparable with pylsl.local_clock() here. No dejitter:
# liblsl fits timestamps against the sample count, so a device that drops samples would
# get the gap smeared over its neighbours, and the fit needs 30-120 s to settle after
# every (re)connection; datamux passes on what the device stamped. Monotonize only clamps
# the small backward steps a refreshed time-correction estimate can cause, so frames stay
# ascending (the framer and replay of recordings rely on that).
PROCESSING_FLAGS = pylsl.proc_clocksync | pylsl.proc_monotonize

# Node and stream ids end up in MQTT topics and file names.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

PULL_TIMEOUT_S = 0.1  # how long one pull waits: also how fast a reader notices a stop
CONNECT_STEP_S = 0.25  # connect steps are sliced so a stop is noticed quickly
CONNECT_TIMEOUT_S = 3.0  # per candidate outlet: subscribe + first time correction
INFO_TIMEOUT_S = 2.0  # fetching one outlet's full description
INFO_RETRY_S = 10.0  # after a failed fetch, list the outlet without labels this long
LOSS_CHECK_S = 1.0  # a silent inlet asks the resolver this often whether its outlet is there
JOIN_TIMEOUT_S = 2.0
MAX_PENDING_CHUNKS = 16  # chunks between a reader thread and the loop; then liblsl buffers
MIN_PULL_ROWS = 1024
MAX_PULL_ROWS = 65536
MAX_STRING_PULL_ROWS = 1024

_OPTION_KEYS = {"wait_s", "forget_after_s", "max_buffered_s"}


def safe_id(text: str, prefix: str = "", default: str = "stream") -> str:
    """``prefix + text`` made a valid id: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``.

    Other characters become ``_``; a leading ``.`` or ``-`` gets a ``_`` in front; the
    result is cut to 64 characters. Empty text gives ``prefix + default``.
    """
    body = _UNSAFE.sub("_", text.strip()) or default
    candidate = prefix + body
    if not ID_PATTERN.match(candidate[:1]):
        candidate = "_" + candidate
    return candidate[:64]


@dataclass(frozen=True)
class LslOptions:
    """The ``drivers.lsl`` options, validated.

    Attributes:
        wait_s: how long the first listing waits for the resolver to hear from outlets.
        forget_after_s: an outlet that stops answering is dropped from listings after
            this long (also how long a silently vanished outlet takes to be noticed).
        max_buffered_s: what an inlet buffers while the consumer is slow, in seconds of
            data (for irregular streams liblsl counts 100 samples per "second").
    """

    wait_s: float = 1.0
    forget_after_s: float = 5.0
    max_buffered_s: float = 60.0

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> LslOptions:
        """Validate the ``drivers.lsl`` section.

        Raises:
            ConfigError: naming ``drivers.lsl.<key>`` and how to fix it.
        """
        data = check_keys(options or {}, CONFIG_PATH, _OPTION_KEYS, "LSL driver option")
        return cls(
            wait_s=config_number(data, "wait_s", CONFIG_PATH, cls.wait_s, low=0, high=60),
            forget_after_s=config_number(
                data, "forget_after_s", CONFIG_PATH, cls.forget_after_s, positive=True
            ),
            max_buffered_s=config_number(
                data, "max_buffered_s", CONFIG_PATH, cls.max_buffered_s, low=1, high=3600
            ),
        )


# -- what the resolver says about an outlet --------------------------------------------


@dataclass(frozen=True)
class _Outlet:
    """One outlet as the resolver reports it (core fields only, no description)."""

    info: Any  # pylsl.StreamInfo, kept to open an inlet
    uid: str
    name: str
    type: str
    source_id: str
    hostname: str
    channel_count: int
    channel_format: int
    rate: float
    created_at: float

    @classmethod
    def read(cls, info: Any) -> _Outlet:
        return cls(
            info=info,
            uid=info.uid(),
            name=info.name(),
            type=info.type(),
            source_id=info.source_id(),
            hostname=info.hostname(),
            channel_count=info.channel_count(),
            channel_format=info.channel_format(),
            rate=float(info.nominal_srate()),
            created_at=float(info.created_at()),
        )

    @property
    def key(self) -> str:
        """What identifies the device across outlet restarts (source_id, else the uid)."""
        return f"sid:{self.source_id}" if self.source_id else f"uid:{self.uid}"

    @property
    def node_id(self) -> str:
        return safe_id(self.hostname, prefix="lsl-", default="unknown-host")

    @property
    def layout(self) -> tuple[int, int]:
        return self.channel_count, self.channel_format


@dataclass(frozen=True)
class _Description:
    """Channel labels and units from an outlet's full description."""

    labels: tuple[str, ...]
    units: tuple[str, ...]
    labelled: bool  # False: the labels are the ch0.. fallback


def describe_channels(xml: str, channel_count: int) -> _Description:
    """Labels and units from ``desc/channels/channel/{label,unit}`` of a stream's XML.

    Labels fall back to ``ch0..`` unless there is exactly one non-empty, unique label per
    channel; units are kept per channel when their count matches, else left empty. Never
    raises on odd XML.

    Why ElementTree on ``as_xml()`` and not ``desc()`` traversal: one call into liblsl
    instead of several per channel, and a malformed tree is a ParseError we can catch.
    """
    fallback = tuple(f"ch{i}" for i in range(channel_count))
    empty = ("",) * channel_count
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError):
        return _Description(fallback, empty, labelled=False)
    channels = root.findall("./desc/channels/channel")
    if len(channels) != channel_count:
        return _Description(fallback, empty, labelled=False)
    labels = tuple((ch.findtext("label") or "").strip() for ch in channels)
    units = tuple((ch.findtext("unit") or "").strip() for ch in channels)
    labelled = all(labels) and len(set(labels)) == channel_count
    return _Description(labels if labelled else fallback, units, labelled)


def _fetch_description(outlet: _Outlet) -> _Description:
    """The outlet's labels and units (blocking: opens a short-lived inlet)."""
    inlet = pylsl.StreamInlet(outlet.info, max_buflen=1, recover=False)
    try:
        full = inlet.info(timeout=INFO_TIMEOUT_S)
        return describe_channels(full.as_xml(), outlet.channel_count)
    finally:
        del inlet  # disconnects now, not at garbage collection


def _build_stream(
    outlet: _Outlet, node_id: str, stream_id: str, description: _Description
) -> Stream:
    dtype = LSL_DTYPES[outlet.channel_format]
    fields = {
        label: Field(id=label, name=label, dtype=dtype, unit=unit)
        for label, unit in zip(description.labels, description.units, strict=True)
    }
    units = set(description.units)
    kind = f"{outlet.type} " if outlet.type else ""
    return Stream(
        id=stream_id,
        name=outlet.name,
        description=f"LSL {kind}outlet {outlet.name!r} on {outlet.hostname}",
        unit=units.pop() if len(units) == 1 else "",
        frequency=outlet.rate,
        fields=fields,
        index=seconds_index(),
        node_id=node_id,
        attrs={
            "mode": "lsl",
            "type": outlet.type,
            "source_id": outlet.source_id,
            "uid": outlet.uid,
            "hostname": outlet.hostname,
        },
    )


@dataclass(frozen=True)
class _Known:
    """A stream that was listed: its metadata and how to find its outlet again."""

    stream: Stream
    outlet: _Outlet  # the outlet it was last seen as

    def matches(self, other: _Outlet) -> bool:
        """Whether ``other`` is (a restart of) this stream's device."""
        mine = self.outlet
        if mine.source_id:
            return other.source_id == mine.source_id
        if other.uid == mine.uid:
            return True
        # No source_id: a restarted app on the same host with the same stream.
        return (not other.source_id and other.name == mine.name
                and other.hostname == mine.hostname and other.type == mine.type)  # fmt: skip

    def label(self) -> str:
        mine = self.outlet
        who = f"source_id {mine.source_id!r}" if mine.source_id else f"uid {mine.uid}"
        return f"LSL outlet {mine.name!r} ({who})"


@dataclass
class _Catalog:
    """The streams listed so far and the ids handed out (they stay stable)."""

    known: dict[tuple[str, str], _Known] = field(default_factory=dict)  # every id ever listed
    ids: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> key -> stream id


class LslDriver(Driver):
    """Every LSL outlet on the network, one node per host.

    Args:
        options: the validated ``drivers.lsl`` options.
    """

    name = "lsl"

    def __init__(self, options: LslOptions | None = None) -> None:
        self.options = options or LslOptions()
        self._resolver: Any = None  # pylsl.ContinuousResolver, started on first use
        self._ready_at = 0.0  # loop time at which the first listing may answer
        self._catalog = _Catalog()
        self._descriptions: dict[str, _Description] = {}  # by outlet uid
        self._failed: dict[str, float] = {}  # uid -> monotonic time of a failed fetch
        # Outlets whose inlet just broke, by uid -> monotonic time until which they are
        # skipped: the resolver keeps listing a vanished outlet for forget_after_s.
        self._suspect: dict[str, float] = {}
        self._lock = threading.Lock()  # _suspect is written by reader threads
        self._readers: set[_InletReader] = set()
        self._closed = False  # after aclose: no discovery, no new sources
        self._problem = ""  # why discovery does not run, for status()

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> LslDriver:
        """From the ``drivers.lsl`` config section.

        Raises:
            ConfigError: an unknown key or a bad value (the message names the key).
        """
        return cls(LslOptions.parse(options))

    def status(self) -> DriverStatus:
        if self._problem:
            fix = "check that a network interface with multicast is up"
            return DriverStatus(self.name, "degraded", self._problem, fix)
        return DriverStatus(self.name)

    async def aclose(self) -> None:
        """Stop the resolver and every reader thread still running.

        Open sources end with a DeviceError ("LSL driver closed"); afterwards listings
        are empty and opening a stream raises DeviceError.
        """
        self._closed = True
        readers = list(self._readers)
        for reader in readers:
            reader.stop()
        for reader in readers:
            await _join(reader)
        # Dropping the only reference destroys the liblsl resolver and its threads.
        self._resolver = None

    # -- discovery ---------------------------------------------------------------------

    async def _ensure_resolver(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:  # no resolver is started again after aclose
            return
        if self._resolver is None:
            try:
                self._resolver = pylsl.ContinuousResolver(forget_after=self.options.forget_after_s)
            except RuntimeError as exc:  # no usable network: no LSL nodes, no failure
                if not self._problem:
                    log.warning("LSL discovery unavailable: %s", exc)
                self._problem = f"LSL discovery unavailable: {exc}"
                return
            self._problem = ""
            self._ready_at = loop.time() + self.options.wait_s
        delay = self._ready_at - loop.time()
        if delay > 0:  # the first multicast answers take a moment to arrive
            await asyncio.sleep(delay)

    def _results(self) -> list[_Outlet]:
        """Outlets the resolver sees now, minus suspects and untransmittable ones."""
        resolver = self._resolver
        if resolver is None:
            return []
        outlets = []
        for info in resolver.results():
            try:
                outlet = _Outlet.read(info)
            except Exception as exc:  # a broken announcement must not break listing
                log.debug("skipping an unreadable LSL stream info: %s", exc)
                continue
            if outlet.channel_format in LSL_DTYPES and outlet.channel_count > 0:
                outlets.append(outlet)
        now = time.monotonic()
        with self._lock:
            self._suspect = {u: t for u, t in self._suspect.items() if t > now}
            suspects = set(self._suspect)
        return [o for o in outlets if o.uid not in suspects]

    def _mark_suspect(self, uid: str) -> None:
        with self._lock:
            self._suspect[uid] = time.monotonic() + self.options.forget_after_s

    def _is_listed(self, uid: str) -> bool:
        """Whether the resolver still sees the outlet (called from reader threads)."""
        resolver = self._resolver
        if resolver is None:  # the driver is closing: not a loss
            return True
        return any(info.uid() == uid for info in resolver.results())

    async def _describe(self, outlets: Sequence[_Outlet]) -> None:
        """Fetch the full description of outlets not seen before, concurrently."""
        visible = {o.uid for o in outlets}
        for cache in (self._descriptions, self._failed):
            for uid in [u for u in cache if u not in visible]:
                del cache[uid]
        now = time.monotonic()
        wanted = [
            o for o in outlets
            if o.uid not in self._descriptions and now - self._failed.get(o.uid, -math.inf)
            > INFO_RETRY_S
        ]  # fmt: skip
        if not wanted:
            return
        results = await asyncio.gather(
            *(asyncio.to_thread(_fetch_description, o) for o in wanted), return_exceptions=True
        )
        for outlet, result in zip(wanted, results, strict=True):
            if isinstance(result, _Description):
                self._descriptions[outlet.uid] = result
                self._failed.pop(outlet.uid, None)
            else:
                log.info("LSL outlet %r: no description (%s)", outlet.name, result)
                self._failed[outlet.uid] = time.monotonic()

    async def _refresh(self) -> dict[str, dict[str, _Known]]:
        """List the outlets now; update ids and metadata. Returns node -> id -> stream."""
        if self._closed:
            return {}
        await self._ensure_resolver()
        outlets = await asyncio.to_thread(self._results)
        await self._describe(outlets)
        visible: dict[str, dict[str, _Known]] = {}
        for node_id, group in _by_node(outlets).items():
            ids = self._assign_ids(node_id, group)
            for outlet in group:
                stream_id = ids[outlet.key]
                description = self._descriptions.get(outlet.uid) or describe_channels(
                    "", outlet.channel_count
                )
                known = _Known(_build_stream(outlet, node_id, stream_id, description), outlet)
                visible.setdefault(node_id, {})[stream_id] = known
                self._catalog.known[(node_id, stream_id)] = known
        return visible

    def _assign_ids(self, node_id: str, group: Sequence[_Outlet]) -> dict[str, str]:
        """Stream ids for one node's outlets (one per key), stable across listings.

        A key keeps the id it had. A new key gets the outlet name made safe, or, when a
        visible outlet holds that already, the name plus a source_id or uid prefix.
        """
        sticky = self._catalog.ids.setdefault(node_id, {})
        keys = {o.key: o for o in group}
        taken: dict[str, str] = {}  # stream id -> key, this listing
        for key in keys:
            if key in sticky and sticky[key] not in taken:
                taken[sticky[key]] = key
        for key, outlet in keys.items():
            if key in taken.values():
                continue
            stream_id = _free_id(outlet, taken)
            taken[stream_id] = key
            sticky[key] = stream_id
        # An id now held by another key is no longer the old key's (its outlet is gone).
        for key in [k for k, sid in sticky.items() if taken.get(sid) not in (k, None)]:
            del sticky[key]
        return {key: sid for sid, key in taken.items()}

    async def list_nodes(self) -> list[Node]:
        visible = await self._refresh()
        nodes = []
        for node_id, streams in sorted(visible.items()):
            host = next(iter(streams.values())).outlet.hostname
            nodes.append(
                Node(
                    id=node_id,
                    name=host,
                    description=f"LSL outlets on host {host}",
                    device={"hostname": host},
                    kind="lsl",
                )
            )
        return nodes

    async def list_streams(self, node_id: str) -> list[Stream]:
        visible = await self._refresh()
        if node_id not in visible:
            raise NotFound(f"no LSL node {node_id!r}; LSL nodes now: {sorted(visible) or 'none'}")
        return [known.stream for _, known in sorted(visible[node_id].items())]

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        # Streams listed once stay openable: after a loss the task reopens them by id, and
        # the source raises DeviceLost until the outlet is back.
        known = self._catalog.known.get((node_id, stream_id))
        if known is None:
            streams = sorted(sid for (nid, sid) in self._catalog.known if nid == node_id)
            if not streams:
                raise NotFound(f"no LSL node {node_id!r}")
            raise NotFound(f"LSL node {node_id!r} has no stream {stream_id!r}; streams: {streams}")
        return LslSource(known, self, framing)

    async def _candidates(self, known: _Known) -> list[_Outlet]:
        """Outlets that could be this stream's device now, newest first."""
        self._check_open()
        await self._ensure_resolver()
        outlets = await asyncio.to_thread(self._results)
        found = [o for o in outlets if known.matches(o)]
        found.sort(key=lambda o: (o.uid != known.outlet.uid, -o.created_at))
        return found

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("LSL driver closed")

    def _register(self, reader: _InletReader) -> None:
        self._check_open()
        self._readers.add(reader)

    def _unregister(self, reader: _InletReader) -> None:
        self._readers.discard(reader)


def _by_node(outlets: Sequence[_Outlet]) -> dict[str, list[_Outlet]]:
    """Outlets per node, one per key (the newest), in a stable order."""
    newest: dict[tuple[str, str], _Outlet] = {}
    for outlet in sorted(outlets, key=lambda o: (o.created_at, o.uid)):
        newest[(outlet.node_id, outlet.key)] = outlet
    nodes: dict[str, list[_Outlet]] = {}
    for (node_id, _), outlet in newest.items():
        nodes.setdefault(node_id, []).append(outlet)
    return nodes


def _free_id(outlet: _Outlet, taken: Mapping[str, str]) -> str:
    base = safe_id(outlet.name)
    if base not in taken:
        return base
    suffix = safe_id(outlet.source_id or outlet.uid)[:8]
    candidate = safe_id(f"{base[: 64 - len(suffix) - 1]}-{suffix}")
    n = 2
    while candidate in taken:
        tail = f"-{suffix}-{n}"
        candidate = safe_id(base[: 64 - len(tail)] + tail)
        n += 1
    return candidate


# -- proxying ----------------------------------------------------------------------------


class _Lost(Exception):
    """The inlet's outlet is gone (raised inside a reader thread)."""


class _Stopped(Exception):
    """The reader was stopped (by its source or the driver): not the outlet's fault."""


def _stopped() -> DeviceError:
    return DeviceError("LSL driver closed")


class _InletReader(threading.Thread):
    """Owns one inlet: connects, pulls chunks, hands them to the event loop.

    Why a dedicated thread rather than ``asyncio.to_thread`` per pull: a pull blocks up
    to :data:`PULL_TIMEOUT_S`, and many open streams would each pin a worker of the
    loop's shared default executor (which replay and the catalog use too). One thread
    per inlet also keeps every liblsl call on one inlet in one thread, so the inlet is
    destroyed by the thread that uses it, never while a pull is running.

    Sends on ``channel`` the outlet it connected to, then chunks; it always closes the
    channel as it ends: with DeviceLost (the outlet is gone) or DeviceError (failed,
    or stopped: only the driver stops a reader under a running source). A chunk is sent only
    with a credit, given back as the loop takes it: the thread waits, and liblsl keeps
    buffering, rather than the channel dropping samples.
    """

    def __init__(
        self,
        known: _Known,
        candidates: Sequence[_Outlet],
        driver: LslDriver,
        channel: Channel[Any],
        rows: int,
    ) -> None:
        super().__init__(name=f"lsl-{known.stream.id}", daemon=True)
        self.known = known
        self.candidates = list(candidates)
        self.driver = driver
        self.channel = channel
        self.rows = rows
        self.credits = threading.Semaphore(MAX_PENDING_CHUNKS)
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        inlet = None
        try:
            inlet, outlet = self._connect()
            self.channel.send(outlet)
            self._pump(inlet, outlet)
            self.channel.close(_stopped())  # the pump returns only when stopped
        except _Stopped:
            self.channel.close(_stopped())
        except _Lost as exc:
            self.channel.close(DeviceLost(str(exc)))
        except Exception as exc:
            if not isinstance(exc, DatamuxError):
                reason = f"{type(exc).__name__}: {exc}"
                wrapped = DeviceError(f"{self.known.label()} failed: {reason}")
                wrapped.__cause__ = exc
                exc = wrapped
            self.channel.close(exc)
        finally:
            if inlet is not None:
                with contextlib.suppress(Exception):
                    inlet.close_stream()
            del inlet  # destroyed here, in the only thread that ever used it
            self.driver._unregister(self)

    def _connect(self) -> tuple[Any, _Outlet]:
        expected = self.known.outlet.layout
        reasons = []
        for outlet in self.candidates:
            if outlet.layout != expected:
                reasons.append(
                    f"{outlet.uid} has {outlet.channel_count} channels of format "
                    f"{outlet.channel_format}, expected {expected[0]} of {expected[1]}"
                )
                continue
            inlet = None
            try:
                inlet = pylsl.StreamInlet(
                    outlet.info,
                    max_buflen=max(1, math.ceil(self.driver.options.max_buffered_s)),
                    recover=False,  # we want LostError, and to report the outage ourselves
                    processing_flags=PROCESSING_FLAGS,
                )
                self._until_connected(inlet.open_stream)
                # The first correction takes a few round trips: take it now, so the
                # first pull is not delayed and a dead outlet fails here.
                self._until_connected(inlet.time_correction)
                return inlet, outlet
            except _Stopped:
                del inlet  # a stop says nothing about the outlet: it stays listed
                raise
            except (_Lost, RuntimeError) as exc:  # pylsl's errors are RuntimeErrors
                self.driver._mark_suspect(outlet.uid)
                reasons.append(f"{outlet.uid}: {exc or type(exc).__name__}")
                del inlet
            if self._stopping.is_set():
                raise _Stopped
        detail = "; ".join(reasons) or "not on the network"
        raise _Lost(f"{self.known.label()}: {detail}")

    def _until_connected(self, step: Callable[..., Any]) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            if self._stopping.is_set():
                raise _Stopped
            try:
                step(timeout=CONNECT_STEP_S)
                return
            except LslTimeout:
                if time.monotonic() >= deadline:
                    raise _Lost(f"no answer within {CONNECT_TIMEOUT_S:g} s") from None

    def _pump(self, inlet: Any, outlet: _Outlet) -> None:
        pull = self._string_pull(inlet) if outlet.channel_format == pylsl.cf_string else (
            self._numeric_pull(inlet, outlet)
        )  # fmt: skip
        checked = time.monotonic()
        while not self._stopping.is_set():
            try:
                chunk = pull()
            except LostError:
                self.driver._mark_suspect(outlet.uid)
                raise _Lost(f"{self.known.label()} vanished (connection lost)") from None
            now = time.monotonic()
            if chunk is None:
                # Silence is normal for markers; a vanished host never closes the
                # connection, so ask the resolver whether the outlet still answers.
                if now - checked >= LOSS_CHECK_S:
                    checked = now
                    if not self.driver._is_listed(outlet.uid):
                        raise _Lost(f"{self.known.label()} no longer answers on the network")
                continue
            checked = now
            if not self._take_credit():
                return
            self.channel.send(chunk)

    def _take_credit(self) -> bool:
        """Wait until the loop has room; meanwhile liblsl keeps buffering. False: stop."""
        while not self.credits.acquire(timeout=PULL_TIMEOUT_S):
            if self._stopping.is_set():
                return False
        return True

    def _numeric_pull(self, inlet: Any, outlet: _Outlet) -> Callable[[], Chunk | None]:
        dtype = numpy_dtype(LSL_DTYPES[outlet.channel_format])
        buffer = np.empty((self.rows, outlet.channel_count), dtype=dtype)

        def pull() -> Chunk | None:
            # min_samples=1: wait for the first sample only, then take what is there.
            values, timestamps = inlet.pull_chunk(
                timeout=PULL_TIMEOUT_S, max_samples=self.rows, dest_obj=buffer,
                min_samples=1, as_numpy=True,
            )  # fmt: skip
            n = len(timestamps)
            if n == 0:
                return None
            # Copies: the buffer is reused, and the timestamp array is rows long.
            return np.array(timestamps, dtype=np.float64), values[:n].copy()

        return pull

    def _string_pull(self, inlet: Any) -> Callable[[], Chunk | None]:
        rows = min(self.rows, MAX_STRING_PULL_ROWS)

        def pull() -> Chunk | None:
            raw, timestamps = inlet.pull_chunk(
                timeout=PULL_TIMEOUT_S, max_samples=rows, min_samples=1, as_numpy=True
            )
            if len(timestamps) == 0:
                return None
            # Raw bytes as sent; a device that sends invalid UTF-8 gets U+FFFD, not a crash.
            text = np.char.decode(raw.astype(np.bytes_), "utf-8", errors="replace")
            return np.asarray(timestamps, dtype=np.float64), text

        return pull


async def _join(reader: _InletReader) -> None:
    """Wait (at most JOIN_TIMEOUT_S) for a stopped reader thread to end.

    A cancellation during the wait is held back until the thread has ended, then
    re-raised: a stopped task must leave no thread behind, and Task.stop cancels
    repeatedly while it waits. The wait is short: a reader notices the stop within one
    pull timeout.
    """
    joining = asyncio.ensure_future(asyncio.to_thread(reader.join, JOIN_TIMEOUT_S))
    cancelled = False
    while not joining.done():
        try:
            await asyncio.shield(joining)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class LslSource(Source):
    """One LSL stream, proxied through an inlet in a reader thread (live, not paced)."""

    paced = False

    def __init__(self, known: _Known, driver: LslDriver, framing: Framing) -> None:
        super().__init__(known.stream)
        self._known = known
        self._driver = driver
        # Pull as much as a frame holds (at least MIN_PULL_ROWS): fewer, larger pulls.
        self._rows = min(max(framing.max_samples, MIN_PULL_ROWS), MAX_PULL_ROWS)
        self._reader: _InletReader | None = None
        self._channel: Channel[Any] | None = None
        self.outlet: _Outlet | None = None  # the outlet this source is connected to

    async def open(self) -> None:
        """Connect to the stream's outlet. Raises DeviceLost if none answers.

        Raises DeviceError once the driver is closed.
        """
        candidates = await self._driver._candidates(self._known)
        if not candidates:
            raise DeviceLost(f"{self._known.label()} is not on the network")
        # Made here, not in __init__: the API builds sources in a worker thread.
        # Chunks never overflow it: the reader sends only with a credit.
        self._channel = channel = Channel(MAX_PENDING_CHUNKS + 1)
        reader = _InletReader(self._known, candidates, self._driver, channel, self._rows)
        self._driver._register(reader)  # raises DeviceError once the driver is closed
        self._reader = reader
        reader.start()
        try:
            self.outlet = await channel.receive()
        except BaseException:
            # Lost, failed, stopped by the driver, or cancelled while connecting (the
            # thread notices a stop within one connect step).
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the reader thread (it closes the inlet) and wait for it. Idempotent."""
        reader, self._reader = self._reader, None
        if reader is None:
            return
        reader.stop()
        await _join(reader)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Yield chunks as the inlet delivers them; raise DeviceLost when the outlet goes."""
        if self._reader is None:
            await self.open()
        reader, channel = self._reader, self._channel
        assert reader is not None and channel is not None
        async for chunk in channel:
            reader.credits.release()
            yield chunk
