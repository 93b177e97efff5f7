"""``datamux simulate``: publish simulated streams on a real transport.

``datamux simulate --lsl [NODE] [--streams eeg,imu] [--seconds S]`` turns the streams of
a simulated node (default ``demo``) into real LSL outlets, so LSL tools (LabRecorder,
viewers, datamux's own LSL driver on another machine) see a device. The data comes from
the API (``proxy_live_stream`` of the sim node with low-latency framing), so the node's
simulated faults apply: a simulated disconnect takes the outlet off the network until
the device is back, like a real device would.

Each target is one ``publish_<target>(api, node_id, stream_ids, stop_event)`` coroutine;
a new transport (``--serial``) is a new function and a new entry in :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import preciseloop
from ..api import API
from ..config import load_config
from ..errors import ConfigError, InvalidRequest, NotFound
from ..lslout import LSL_FORMATS
from ..model import Frame, Stream, StreamError, StreamStatus, dtype_name
from ..util import END_OF_STREAM
from .text import count

__all__ = ["TARGETS", "PublishedStream", "publish_lsl", "register"]

# Stamps within this share of a sample period of the nominal grid count as regular, so
# the outlet can derive them from the chunk's last stamp (no per-sample list).
_REGULAR_TOLERANCE = 1e-3
_STOP_TIMEOUT_S = 2.0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``simulate`` subcommand."""
    parser = subparsers.add_parser(
        "simulate",
        help="publish simulated streams as real devices (LSL outlets, serial ports)",
        description="Publish the streams of a simulated node on a real transport until "
        "Ctrl-C or --seconds. Simulated faults (jitter, drops, disconnects) apply.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--lsl",
        nargs="?",
        const="demo",
        metavar="NODE",
        help="publish NODE's streams as LSL outlets (default node: demo)",
    )
    target.add_argument(
        "--serial",
        nargs="?",
        const="demo",
        metavar="NODE",
        help="present each of NODE's streams as a serial device on a new pseudo-terminal "
        "(CSV lines; prints the port and the drivers.serial entry that reads it)",
    )
    parser.add_argument(
        "--streams",
        metavar="IDS",
        help="comma list of stream ids, e.g. eeg,imu (default: every stream of the node)",
    )
    parser.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.seconds is not None and args.seconds <= 0:
        raise InvalidRequest(f"--seconds must be > 0, not {args.seconds:g}")
    stream_ids = [s.strip() for s in (args.streams or "").split(",") if s.strip()] or None
    config = load_config(flags=getattr(args, "config_flags", None))
    for name, publish in TARGETS.items():
        node_id = getattr(args, name, None)
        if node_id is not None:
            simulation = _simulate(API(config), publish, node_id, stream_ids, args.seconds)
            return preciseloop.run(simulation)
    raise InvalidRequest("choose where to publish, e.g. --lsl")


async def _simulate(
    api: API,
    publish: Publisher,
    node_id: str,
    stream_ids: Sequence[str] | None,
    seconds: float | None,
) -> int:
    """Run one publisher until Ctrl-C, SIGTERM or ``seconds``; 1 if a stream failed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # A signal ends the run cleanly (outlets closed) instead of a KeyboardInterrupt.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    timer = loop.call_later(seconds, stop.set) if seconds is not None else None
    try:
        published = await publish(api, node_id, stream_ids, stop)
    finally:
        if timer is not None:
            timer.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
        await api.aclose()
    for item in published:
        print(f"stopped {item.node_id}/{item.stream_id}: {count(item.samples, 'sample')} published")
    return 1 if any(item.error for item in published) else 0


# -- publishing ----------------------------------------------------------------------------


@dataclass
class PublishedStream:
    """What one stream published (returned by the publishers)."""

    node_id: str
    stream_id: str
    samples: int = 0
    error: str = ""


Publisher = Callable[
    [API, str, Sequence[str] | None, asyncio.Event], Awaitable[list[PublishedStream]]
]


async def _select_streams(api: API, node_id: str, stream_ids: Sequence[str] | None) -> list[Stream]:
    streams = {s.id: s for s in await api.list_live_streams(node_id)}
    if stream_ids is None:
        return list(streams.values())
    unknown = [sid for sid in stream_ids if sid not in streams]
    if unknown:
        raise NotFound(f"node {node_id!r} has no stream {unknown[0]!r}; streams: {sorted(streams)}")
    return [streams[sid] for sid in dict.fromkeys(stream_ids)]


async def publish_lsl(
    api: API, node_id: str, stream_ids: Sequence[str] | None, stop_event: asyncio.Event
) -> list[PublishedStream]:
    """Publish streams of a live node as LSL outlets until ``stop_event`` is set.

    Each stream becomes an outlet named ``<node>-<stream>`` with source_id
    ``datamux-sim-<node>-<stream>``, its channel labels and units in ``desc/channels``,
    its nominal rate and a matching channel format. Timestamps are moved from the wall
    clock to the LSL clock with one offset taken at the start, so their spacing is kept.

    Args:
        api: where the data comes from (``proxy_live_stream``).
        node_id: the node, usually a simulated one.
        stream_ids: the streams to publish; None for all.
        stop_event: set it to stop; the outlets are gone when this returns.

    Raises:
        NotFound: unknown node or stream.
        ConfigError: pylsl (the ``lsl`` extra) is not installed.
    """
    try:
        # Through the driver module: it keeps liblsl's INFO lines off stderr.
        from ..drivers.lsl import pylsl
    except (ImportError, RuntimeError) as exc:
        from ..drivers.registry import lsl_load_error

        problem = lsl_load_error(exc)
        raise ConfigError(
            f"publishing on LSL needs pylsl and liblsl: {problem.reason}", fix=problem.fix
        ) from exc
    streams = await _select_streams(api, node_id, stream_ids)
    # One offset for the whole run: per-chunk offsets would add clock-read jitter.
    offset = pylsl.local_clock() - time.time()
    publishers = [_LslPublisher(pylsl, node_id, stream, offset) for stream in streams]
    for publisher in publishers:
        print(publisher.describe(), flush=True)
    runs = [
        asyncio.create_task(publisher.run(api, stop_event), name=f"publish-{publisher.stream.id}")
        for publisher in publishers
    ]
    stopping = asyncio.create_task(stop_event.wait())
    waiting: set[asyncio.Future[Any]] = {stopping, asyncio.gather(*runs)}
    try:
        # Until stopped, or until every stream has ended (each failed, say).
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_event.set()
        await asyncio.gather(*runs, return_exceptions=True)
        stopping.cancel()
    return [publisher.result for publisher in publishers]


def lsl_format(stream: Stream) -> tuple[str, np.dtype | None]:
    """The LSL channel format for a stream, and the dtype its values are pushed in."""
    dtype = stream.dtype
    if dtype.kind == "U":
        return "string", None
    # lslout's exact mapping; what it refuses (uint64) a simulation may send as double64.
    channel_format, pushed = LSL_FORMATS.get(dtype.name, ("double64", "float64"))
    return channel_format, np.dtype(pushed)


class _LslPublisher:
    """One stream proxied from the API into one LSL outlet."""

    def __init__(self, pylsl: Any, node_id: str, stream: Stream, offset: float) -> None:
        self.pylsl = pylsl
        self.node_id = node_id
        self.stream = stream
        self.offset = offset
        self.channel_format, self.push_dtype = lsl_format(stream)
        self.name = f"{node_id}-{stream.id}"
        self.source_id = f"datamux-sim-{node_id}-{stream.id}"
        # LSL content types are conventions ("EEG", "Markers"...): markers are marked as
        # such, other streams carry their name, which for the demo node is the type.
        self.type = "Markers" if self.push_dtype is None else (stream.name or stream.id)
        self.result = PublishedStream(node_id, stream.id)
        self._outlet: Any = None

    def describe(self) -> str:
        rate = f"{self.stream.frequency:g} Hz" if self.stream.frequency else "irregular"
        return (
            f"publishing {self.node_id}/{self.stream.id} as LSL outlet {self.name!r} "
            f"(type {self.type}, {len(self.stream.channels)} x {self.channel_format}, {rate}, "
            f"source_id {self.source_id})"
        )

    def _info(self) -> Any:
        info = self.pylsl.StreamInfo(
            self.name,
            self.type,
            len(self.stream.channels),
            self.stream.frequency,
            self.channel_format,
            self.source_id,
        )
        desc = info.desc()
        desc.append_child_value("manufacturer", "streaminghub-datamux (simulated)")
        channels = desc.append_child("channels")
        for field in self.stream.fields.values():
            channel = channels.append_child("channel")
            channel.append_child_value("label", field.id)
            channel.append_child_value("unit", field.unit or self.stream.unit)
            channel.append_child_value("type", self.type)
        return info

    async def _open(self) -> None:
        # Making an outlet (and dropping one) takes liblsl tens of milliseconds: off the
        # loop, so the other simulated streams keep their pace.
        if self._outlet is None:
            self._outlet = await asyncio.to_thread(self.pylsl.StreamOutlet, self._info())

    async def _close(self) -> None:
        # The outlet leaves the network when its last reference goes.
        if self._outlet is not None:
            held, self._outlet = [self._outlet], None
            await asyncio.to_thread(held.clear)  # the last reference goes in that thread

    async def run(self, api: API, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set or the stream ends; errors end up in ``result``."""
        try:
            await self._run(api, stop)
        except Exception as exc:
            self.result.error = f"{type(exc).__name__}: {exc}"
            print(f"datamux: {self.node_id}/{self.stream.id} failed: {exc}", file=sys.stderr)
        finally:
            await self._close()

    async def _run(self, api: API, stop: asyncio.Event) -> None:
        sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        ack = await api.proxy_live_stream(
            self.node_id, self.stream.id, {}, sink, framing="low-latency"
        )
        await self._open()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                getting = asyncio.create_task(sink.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                if not await self._handle(getting.result()):
                    break
        finally:
            stopping.cancel()
            with contextlib.suppress(NotFound):
                await api.stop_task(ack.randseq or "")

    async def _handle(self, item: Any) -> bool:
        """Publish one sink item; False once the stream has ended."""
        if isinstance(item, Frame):
            await self._open()
            self._push(item)
            return True
        if isinstance(item, StreamStatus):
            # A simulated disconnect takes the outlet off the network, as a device would.
            print(f"[{item.status}] {self.node_id}/{self.stream.id} {item.reason}", file=sys.stderr)
            if item.status == "disconnected":
                await self._close()
            return True
        if isinstance(item, StreamError):
            self.result.error = item.reason
            print(
                f"datamux: {self.node_id}/{self.stream.id} failed: {item.reason}", file=sys.stderr
            )
            return False
        return item is not END_OF_STREAM

    def _push(self, frame: Frame) -> None:
        timestamps = frame.timestamps + self.offset
        if self.push_dtype is None:
            # A string outlet takes a flat list of values, sample after sample.
            self._outlet.push_chunk(
                frame.values.astype(str).reshape(-1).tolist(), timestamps.tolist()
            )
        elif _regular(timestamps, self.stream.frequency):
            self._outlet.push_chunk(
                np.ascontiguousarray(frame.values, dtype=self.push_dtype), float(timestamps[-1])
            )
        else:  # drops or jitter: every sample keeps its own stamp
            self._outlet.push_chunk(
                np.ascontiguousarray(frame.values, dtype=self.push_dtype), timestamps.tolist()
            )
        self.result.samples += len(frame)


def _regular(timestamps: np.ndarray, frequency: float) -> bool:
    """Whether stamps sit on the nominal grid, so LSL can derive them from the last one."""
    if frequency <= 0:
        return len(timestamps) == 1
    if len(timestamps) < 2:
        return True
    steps = np.diff(timestamps) * frequency
    return bool(np.all(np.abs(steps - 1.0) <= _REGULAR_TOLERANCE))


async def publish_serial(
    api: API, node_id: str, stream_ids: Sequence[str] | None, stop_event: asyncio.Event
) -> list[PublishedStream]:
    """Present streams of a live node as serial devices until ``stop_event`` is set.

    Each stream gets its own pseudo-terminal sending CSV lines, one sample per line; the
    port path and a ``drivers.serial.devices`` entry that reads it back are printed.
    """
    try:
        from ..drivers.serialframes import PtySerialWriter
    except ImportError as exc:  # pragma: no cover - numpy only, but keep the error clear
        raise ConfigError(f"serial simulation is unavailable: {exc}") from exc
    streams = await _select_streams(api, node_id, stream_ids)
    results = [PublishedStream(node_id, stream.id) for stream in streams]

    async def serve(stream: Stream, result: PublishedStream) -> None:
        try:
            await serve_on_pty(stream, result)
        except Exception as exc:  # reported, and the exit code says so
            result.error = f"{type(exc).__name__}: {exc}"
            print(f"datamux: {node_id}/{stream.id} failed: {exc}", file=sys.stderr)

    async def serve_on_pty(stream: Stream, result: PublishedStream) -> None:
        with PtySerialWriter() as writer:
            entry = writer.device_config(
                stream.channels,
                rate=stream.frequency,
                stream=stream.id,
                dtype=dtype_name(stream.dtype),
            )
            print(f"{node_id}/{stream.id} on {writer.path}", flush=True)
            print(
                f'  "drivers": {{"serial": {{"devices": {{"{node_id}-{stream.id}": '
                f"{json.dumps(entry)}}}}}}}",
                flush=True,
            )
            sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
            ack = await api.proxy_live_stream(node_id, stream.id, {}, sink, framing="low-latency")
            try:
                while not stop_event.is_set():
                    item = await sink.get()
                    if item is END_OF_STREAM:
                        break
                    if isinstance(item, StreamError):
                        result.error = item.reason
                        break
                    if isinstance(item, Frame):
                        writer.write_frame(item)
                        result.samples += len(item)
            finally:
                await api.stop_task(ack.randseq or "")

    runs = [asyncio.create_task(serve(s, r)) for s, r in zip(streams, results, strict=True)]
    all_runs = asyncio.gather(*runs, return_exceptions=True)
    stopping = asyncio.create_task(stop_event.wait())
    either: set[asyncio.Future[Any]] = {stopping, all_runs}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_event.set()
        for run in runs:
            run.cancel()  # each is waiting for its next frame
        await all_runs
        stopping.cancel()
    return results


TARGETS: dict[str, Publisher] = {"lsl": publish_lsl, "serial": publish_serial}
