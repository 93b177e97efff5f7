"""LSL out: re-publish any stream as a Lab Streaming Layer outlet (docs/lsl-out.md).

Whatever feeds a sink (a replayed recording at any speed, a live device, a simulation,
or a remote stream through the RemoteAPI) can be pushed into an LSL outlet, so LSL
tools (LabRecorder, mne-lsl, BCI software) see it as a live stream on this machine.

- The outlet's StreamInfo carries the stream's name, type, nominal rate and, in its
  ``desc``, ``channels/channel/{label, unit, type}`` as XDF files expect them.
- String streams become string outlets of type ``Markers``.
- Timestamps move onto this machine's LSL clock (:class:`ClockMap`): LSL-clocked
  streams keep theirs, wall-clock streams are shifted by ``local_clock() - time()``, and
  recordings are anchored so that each frame's last sample maps to the moment the frame
  is pushed, with the recording's spacing scaled by the replay speed. After a jump in a
  replay (a ``StreamStatus`` marking a seek or a loop), the mapping is anchored afresh,
  so LSL time never runs backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .clocks import ClockName, monotonic, stream_clock
from .errors import InvalidRequest, NotFound, Unavailable
from .model import Frame, Stream, StreamError, StreamStatus
from .util import END_OF_STREAM

__all__ = [
    "JUMP_STATUSES",
    "LINGER_S",
    "LSL_FORMATS",
    "ClockMap",
    "LslOutlet",
    "Publication",
    "Publications",
    "lsl_format",
    "publish_collection_stream",
    "publish_stream",
    "stream_info",
]

log = logging.getLogger(__name__)

#: How long an ended stream's outlet stays up for connected inlets to take the rest.
LINGER_S = 1.0
#: Status items after which a replayed stream's timestamps jump (replay control).
JUMP_STATUSES = frozenset({"seek", "loop", "resumed", "speed"})

# numpy dtype kind+size -> (LSL channel format, the dtype pushed). Every value converts
# exactly: unsigned types go to the next wider signed type; u64 has none and is refused.
LSL_FORMATS: dict[str, tuple[str, str]] = {
    "float32": ("float32", "float32"),
    "float16": ("float32", "float32"),
    "float64": ("double64", "float64"),
    "int8": ("int8", "int8"),
    "int16": ("int16", "int16"),
    "int32": ("int32", "int32"),
    "int64": ("int64", "int64"),
    "uint8": ("int16", "int16"),
    "uint16": ("int32", "int32"),
    "uint32": ("int64", "int64"),
    "bool": ("int8", "int8"),
}


def _pylsl() -> Any:
    try:
        import pylsl
    except (ImportError, RuntimeError) as exc:  # RuntimeError: liblsl is missing
        from .drivers.registry import lsl_load_error

        problem = lsl_load_error(exc)
        raise Unavailable(
            f"LSL out needs pylsl and liblsl: {problem.reason} (fix: {problem.fix})"
        ) from exc
    return pylsl


def lsl_format(dtype: np.dtype) -> tuple[str, np.dtype | None]:
    """The LSL channel format for a dtype, and the dtype to push (None for strings).

    Raises:
        InvalidRequest: a dtype no LSL format holds exactly (uint64).
    """
    if dtype.kind == "U":
        return "string", None
    try:
        fmt, pushed = LSL_FORMATS[dtype.name]
    except KeyError:
        raise InvalidRequest(
            f"LSL has no channel format that holds {dtype.name} exactly; "
            f"supported: {sorted(LSL_FORMATS)} and strings"
        ) from None
    return fmt, np.dtype(pushed)


def _lsl_type(stream: Stream) -> str:
    if stream.dtype.kind == "U":
        return "Markers"
    given = stream.attrs.get("type")
    if isinstance(given, str) and given:
        return given
    return stream.id.upper() if stream.id.lower() in {"eeg", "emg", "ecg", "eog"} else stream.id


def stream_info(
    stream: Stream,
    *,
    name: str | None = None,
    stream_type: str | None = None,
    source_id: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Any:
    """A ``pylsl.StreamInfo`` describing ``stream`` (XDF ``desc`` conventions).

    ``desc/channels/channel`` holds ``label``, ``unit`` and ``type`` per channel;
    ``desc/acquisition`` names datamux; ``desc/datamux`` holds the source and attrs.
    """
    pylsl = _pylsl()
    fmt, _ = lsl_format(stream.dtype)
    channels = list(stream.fields.values())
    if not channels:
        raise InvalidRequest(f"stream {stream.id!r} has no channels to publish")
    rate = float(stream.frequency) if stream.frequency > 0 else pylsl.IRREGULAR_RATE
    kind = stream_type or _lsl_type(stream)
    origin = stream.collection_id or stream.node_id or ""
    info = pylsl.StreamInfo(
        name or stream.name or stream.id,
        kind,
        len(channels),
        rate,
        fmt,
        source_id or f"datamux:{origin}/{stream.id}",
    )
    desc = info.desc()
    node = desc.append_child("channels")
    for channel in channels:
        entry = node.append_child("channel")
        entry.append_child_value("label", channel.name or channel.id)
        entry.append_child_value("unit", channel.unit or stream.unit)
        entry.append_child_value("type", kind)
    acquisition = desc.append_child("acquisition")
    acquisition.append_child_value("manufacturer", "streaminghub-datamux")
    source = desc.append_child("datamux")
    source.append_child_value("stream_id", stream.id)
    if stream.collection_id:
        source.append_child_value("collection_id", stream.collection_id)
    if stream.node_id:
        source.append_child_value("node_id", stream.node_id)
    source.append_child_value("clock", stream_clock(stream))
    if attrs:
        element = source.append_child("attrs")
        for key, value in attrs.items():
            element.append_child_value(str(key), str(value))
    return info


@dataclass
class ClockMap:
    """Maps source timestamps onto this machine's LSL clock: ``lsl0 + (t - t0) * scale``.

    Args:
        source: the stream's time base (:func:`~streaminghub_datamux.clocks.stream_clock`).
        speed: the replay speed (recordings only; 0, as fast as possible, keeps the
            recorded spacing).
    """

    source: ClockName
    speed: float = 1.0
    t0: float = 0.0
    lsl0: float | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.source == "lsl":
            self.lsl0 = 0.0
        elif self.source == "unix":
            # One reading of both clocks; wall-clock steps later are not followed (LSL's
            # clock is monotonic, and a stream must not jump with NTP).
            self.lsl0 = monotonic() - time.time()
        else:
            self.scale = 1.0 / self.speed if self.speed > 0 else 1.0

    def set_speed(self, speed: float) -> None:
        """A steered replay's new speed (recordings only; the next frame re-anchors)."""
        if self.source == "recording":
            self.speed = speed
            self.scale = 1.0 / speed if speed > 0 else 1.0

    def reanchor(self) -> None:
        """Anchor afresh at the next frame (after a jump in a recording's timeline)."""
        if self.source == "recording":
            self.lsl0 = None

    def map(self, timestamps: np.ndarray, now: float | None = None) -> np.ndarray:
        """The LSL times of ``timestamps`` (anchoring the last one at ``now`` if needed)."""
        if self.lsl0 is None:
            self.t0 = float(timestamps[-1])
            self.lsl0 = monotonic() if now is None else now
        return self.lsl0 + (np.asarray(timestamps, dtype=np.float64) - self.t0) * self.scale


class LslOutlet:
    """One LSL outlet fed from a sink of frames.

    Args:
        stream: the stream's metadata (channels, rate, units, clock).
        name, stream_type, source_id: override what goes into the StreamInfo.
        attrs: recorded in ``desc/datamux/attrs``.
        speed: the replay speed of a recording (for the clock mapping).
    """

    def __init__(
        self,
        stream: Stream,
        *,
        name: str | None = None,
        stream_type: str | None = None,
        source_id: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        speed: float = 1.0,
    ) -> None:
        pylsl = _pylsl()
        self.stream = stream
        self.info = stream_info(
            stream, name=name, stream_type=stream_type, source_id=source_id, attrs=attrs
        )
        self.clock = ClockMap(stream_clock(stream), speed)
        _, self._dtype = lsl_format(stream.dtype)
        self._outlet: Any = pylsl.StreamOutlet(self.info)
        self.samples = 0
        self.frames = 0

    @property
    def name(self) -> str:
        return str(self.info.name())

    @property
    def source_id(self) -> str:
        return str(self.info.source_id())

    def push(self, frame: Frame) -> None:
        """Push one frame's samples, each with its mapped timestamp."""
        if self._outlet is None:
            raise Unavailable(f"the LSL outlet {self.name!r} is closed")
        if len(frame) == 0:
            return
        stamps = self.clock.map(frame.timestamps).tolist()
        if self._dtype is None:
            self._outlet.push_chunk(frame.values.tolist(), stamps)
        else:
            values = np.ascontiguousarray(frame.values, dtype=self._dtype)
            self._outlet.push_chunk(values, stamps)
        self.samples += len(frame)
        self.frames += 1

    def has_consumers(self) -> bool:
        return self._outlet is not None and bool(self._outlet.have_consumers())

    async def wait_for_consumer(self, timeout: float) -> bool:
        """Wait until an inlet (LabRecorder, ...) is connected, at most ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.has_consumers():
            if loop.time() >= deadline:
                log.warning("LSL out %s: no consumer after %.1f s; starting", self.name, timeout)
                return False
            await asyncio.sleep(0.01)
        return True

    def on_status(self, status: StreamStatus) -> None:
        """Follow a steered replay: a jump, a resume or a new speed re-anchors the clock."""
        if status.status not in JUMP_STATUSES:
            return
        speed = status.data.get("speed")
        if status.status == "speed" and isinstance(speed, int | float) and speed >= 0:
            self.clock.set_speed(float(speed))
        self.clock.reanchor()

    async def run(self, sink: asyncio.Queue[Any]) -> int:
        """Push every frame on ``sink`` until END_OF_STREAM; then close. Samples pushed.

        An error item on the sink is logged; the outlet ends with the stream, after
        :data:`LINGER_S` while inlets are connected: liblsl drops what it has not sent
        yet when an outlet goes, so a fast replay's last chunks need the time to leave.
        """
        try:
            while (item := await sink.get()) is not END_OF_STREAM:
                if isinstance(item, Frame):
                    self.push(item)
                elif isinstance(item, StreamStatus):
                    self.on_status(item)
                elif isinstance(item, StreamError):
                    log.warning("LSL out %s: the stream failed: %s", self.name, item.reason)
            if self.has_consumers():
                await asyncio.sleep(LINGER_S)
        finally:
            self.close()
        return self.samples

    def close(self) -> None:
        """Take the outlet off the network."""
        self._outlet = None  # liblsl destroys it with its last reference


@dataclass
class Publication:
    """A task whose frames go to an LSL outlet; ``stop()`` ends both."""

    api: Any
    task_id: str
    outlet: LslOutlet
    runner: asyncio.Task[int] = field(repr=False)

    async def stop(self) -> int:
        """Stop the task; returns the samples pushed once the outlet is closed."""
        with contextlib.suppress(NotFound):
            await self.api.stop_task(self.task_id)
        return await self.runner

    async def wait(self) -> int:
        """Wait until the stream ends (a replay's end); the samples pushed."""
        return await self.runner


async def _find_stream(
    api: Any, collection_id: str | None, node_id: str | None, sid: str
) -> Stream:
    if collection_id is not None:
        streams = await api.list_collection_streams(collection_id)
        where = f"collection {collection_id!r}"
    else:
        streams = await api.list_live_streams(node_id)
        where = f"node {node_id!r}"
    for stream in streams:
        if stream.id == sid:
            return stream
    raise NotFound(f"{where} has no stream {sid!r}; streams: {sorted(s.id for s in streams)}")


async def publish_stream(
    api: Any,
    stream_id: str,
    attrs: Mapping[str, Any] | None = None,
    *,
    collection_id: str | None = None,
    node_id: str | None = None,
    name: str | None = None,
    stream_type: str | None = None,
    source_id: str | None = None,
    wait_consumer_s: float = 0.0,
    **task_options: Any,
) -> Publication:
    """Start a replay (``collection_id``) or live task (``node_id``) on ``api`` (an
    :class:`~streaminghub_datamux.API` or a connected RemoteAPI) and re-publish its frames
    as an LSL outlet on this machine.

    ``task_options`` go to the task (``speed``, ``framing``, replay control options...).
    ``wait_consumer_s`` holds the task back until an inlet has connected (at most that
    long), so a recorder started first misses no sample.

    Raises:
        InvalidRequest: neither or both of ``collection_id`` and ``node_id``.
        NotFound: no such stream.
        Unavailable: pylsl or liblsl is missing.
    """
    if (collection_id is None) == (node_id is None):
        raise InvalidRequest("give exactly one of collection_id (replay) or node_id (live)")
    _pylsl()  # fail before starting a task
    if node_id is not None and hasattr(api, "clock_offset"):
        # A remote live stream is stamped on the agent's clocks: move it onto ours first.
        task_options.setdefault("clock", "client")
    stream = await _find_stream(api, collection_id, node_id, stream_id)
    attrs = dict(attrs or {})
    speed = task_options.get("speed")
    outlet = LslOutlet(
        stream,
        name=name,
        stream_type=stream_type,
        source_id=source_id,
        attrs=attrs,
        speed=1.0 if speed is None else float(speed),
    )
    if wait_consumer_s > 0:
        await outlet.wait_for_consumer(wait_consumer_s)
    sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
    if collection_id is not None:
        ack = await api.replay_collection_stream(
            collection_id, stream_id, attrs, sink, **task_options
        )
    else:
        ack = await api.proxy_live_stream(node_id, stream_id, attrs, sink, **task_options)
    runner = asyncio.get_running_loop().create_task(outlet.run(sink), name=f"lsl-out-{outlet.name}")
    log.info("LSL out: %s -> outlet %r (task %s)", stream_id, outlet.name, ack.randseq)
    return Publication(api, str(ack.randseq), outlet, runner)


async def publish_collection_stream(
    api: Any, collection_id: str, stream_id: str, attrs: Mapping[str, Any], **options: Any
) -> Publication:
    """Upstream's ``publish_collection_stream``: replay a recording as an LSL outlet."""
    return await publish_stream(api, stream_id, attrs, collection_id=collection_id, **options)


class Publications:
    """The LSL outlets an API object runs, kept until their streams end."""

    def __init__(self) -> None:
        self._running: dict[str, Publication] = {}

    def add(self, publication: Publication) -> None:
        self._running[publication.task_id] = publication
        publication.runner.add_done_callback(lambda _: self._running.pop(publication.task_id, None))

    def get(self, task_id: str) -> Publication | None:
        return self._running.get(task_id)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """After the tasks were stopped: wait until every outlet is closed."""
        runners = [p.runner for p in self._running.values()]
        if runners:
            await asyncio.wait(runners, timeout=timeout)
