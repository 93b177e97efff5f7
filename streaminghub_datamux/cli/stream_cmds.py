"""``datamux ls``, ``datamux replay`` and ``datamux tail``: look at data from the shell."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import logging
import math
import signal
import sys
import time
from typing import Any, TextIO

import numpy as np

from .. import preciseloop
from ..api import API
from ..client import RemoteAPI
from ..config import load_config
from ..drivers.formats import format_for_path
from ..errors import InvalidRequest, NotFound
from ..model import Frame, StreamError, StreamStatus
from ..recording import record
from ..util import END_OF_STREAM
from .text import count

__all__ = ["register", "replay_control_flags", "replay_control_options"]


def _remote_flags() -> argparse.ArgumentParser:
    remote = argparse.ArgumentParser(add_help=False)
    group = remote.add_argument_group("remote (through agents behind an MQTT broker)")
    group.add_argument(
        "--broker",
        metavar="HOST[:PORT]",
        help="use the RemoteAPI through this broker instead of this machine's API",
    )
    group.add_argument(
        "--agent", metavar="ID", help="with --broker: only this agent (default: every agent)"
    )
    group.add_argument(
        "--codec", choices=["cbor", "json"], default="cbor", help="with --broker: the codec"
    )
    return remote


def replay_control_flags() -> argparse.ArgumentParser:
    """``--start``, ``--end`` and ``--loop`` of a replay (docs/replay-control.md)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("replay window and looping")
    group.add_argument(
        "--start", type=float, metavar="S", help="start S seconds into the recording"
    )
    group.add_argument("--end", type=float, metavar="S", help="stop S seconds into the recording")
    group.add_argument(
        "--loop",
        nargs="?",
        const="forever",
        metavar="N",
        help="play the window N times (no N: until interrupted)",
    )
    return flags


def replay_control_options(args: argparse.Namespace) -> dict[str, Any]:
    """The replay-control flags as keyword arguments of replay_collection_stream."""
    options: dict[str, Any] = {}
    if args.start is not None:
        options["start"] = args.start
    if args.end is not None:
        options["end"] = args.end
    if args.loop is not None:
        if args.loop == "forever":
            options["loop"] = True
        elif args.loop.isdigit() and int(args.loop) >= 1:
            options["loop"] = int(args.loop)
        else:
            raise InvalidRequest(f"--loop takes a number of passes >= 1, not {args.loop!r}")
    return options


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``ls``, ``replay``, ``tail`` and ``record`` subcommands."""
    remote = _remote_flags()
    ls = subparsers.add_parser(
        "ls",
        parents=[remote],
        help="list collections and live nodes, or the streams of one",
        description="Without an id: every collection and live node. With an id: its streams "
        "(and, for a collection, its recordings).",
    )
    ls.add_argument("id", nargs="?", help="a collection or node id")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument(
        "--all",
        action="store_true",
        help="also list serial ports that no device is configured for (this machine only)",
    )
    ls.set_defaults(handler=lambda args: run_command(_ls(args)))

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-a",
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="select a recording / set a stream attribute (repeatable)",
    )
    output.add_argument(
        "--rows",
        action="store_true",
        help="print one CSV row per sample instead of one line per frame",
    )
    output.add_argument("--frames", type=_at_least_one, metavar="N", help="stop after N frames")
    output.add_argument(
        "--framing",
        metavar="PRESET",
        help="low-latency, balanced or throughput (default: from config)",
    )

    replay = subparsers.add_parser(
        "replay",
        parents=[output, remote, replay_control_flags()],
        help="replay a recorded stream",
        description="Replay one stream of one recording and print its frames.",
    )
    replay.add_argument("collection", help="collection id")
    replay.add_argument("stream", help="stream id")
    replay.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 real time (default), 2 twice as fast, 0 as fast as possible",
    )
    replay.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    replay.set_defaults(handler=lambda args: run_command(_replay(args)))

    tail = subparsers.add_parser(
        "tail",
        parents=[output, remote],
        help="print a live stream",
        description="Proxy a live stream (a device or a simulated one) and print its frames.",
    )
    tail.add_argument("node", nargs="?", default="demo", help="node id (default: demo)")
    tail.add_argument("stream", nargs="?", default="eeg", help="stream id (default: eeg)")
    tail.add_argument("--seconds", type=_positive, metavar="S", help="stop after S seconds")
    tail.set_defaults(handler=lambda args: run_command(_tail(args)))

    rec = subparsers.add_parser(
        "record",
        parents=[remote],
        help="record a live or replayed stream into a replayable collection",
        description="Record one stream into <data_dir>/<into>/<recording attrs...>/<stream>.csv "
        "and describe it in <meta_dir>/<into>.collection.json. Ctrl-C stops; what was "
        "written stays replayable.",
    )
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--node", help="record a live stream of this node")
    source.add_argument("--collection", help="record a replay of this collection")
    rec.add_argument("stream", help="stream id")
    rec.add_argument(
        "--into", required=True, metavar="COLLECTION", help="collection to record into"
    )
    rec.add_argument(
        "-r",
        "--recording",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attribute of the new recording, e.g. -r subject=A (repeatable)",
    )
    rec.add_argument(
        "-a",
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attribute of the source (for --collection: which recording)",
    )
    rec.add_argument(
        "--seconds",
        type=_positive,
        metavar="S",
        help="record S seconds of the stream's samples (S x its rate, for a regular stream)",
    )
    rec.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="replay speed for --collection (default 0: as fast as possible)",
    )
    rec.add_argument("--overwrite", action="store_true", help="replace an existing recording")
    rec.add_argument(
        "--format",
        choices=["csv", "parquet"],
        default="csv",
        help="csv (default; crash-safe text) or parquet (typed; complete when recording ends)",
    )
    rec.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="show progress on stderr (auto: when stderr is a terminal)",
    )
    rec.set_defaults(handler=lambda args: run_command(_record(args)))


def _at_least_one(text: str) -> int:
    """argparse type of --frames: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _positive(text: str) -> float:
    """argparse type of --seconds: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return value


def run_command(coro: Any) -> int:
    """Run a command's coroutine on a loop with on-time timers; Ctrl-C exits with 130."""
    try:
        return preciseloop.run(coro)
    except KeyboardInterrupt:
        return 130


async def _api(args: argparse.Namespace) -> Any:
    """The local API, or with ``--broker`` a connected RemoteAPI (same methods)."""
    flags = getattr(args, "config_flags", None) or {}
    config = load_config(flags=flags)
    if getattr(args, "all", False) and not getattr(args, "broker", None):
        # Unconfigured ports are listed on request only: they cannot stream anything.
        serial_options = {**(config.get("drivers.serial") or {}), "list_ports": True}
        config = load_config(flags={**flags, "drivers.serial": serial_options})
    if not getattr(args, "broker", None):
        if not getattr(args, "verbose", 0):
            # A failed task's error item is printed by this command: its log line would
            # say the same thing twice (-v shows it).
            logging.getLogger("streaminghub_datamux.tasks").setLevel(logging.ERROR)
        return API(config)
    host, _, port = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
    if port and not port.isdigit():
        raise InvalidRequest(f"--broker takes HOST or HOST:PORT, not {args.broker!r}")
    api = RemoteAPI("mqtt", args.codec, agent_id=args.agent, config=config)
    await api.connect(host or None, int(port) if port else None)
    return api


def _attrs(pairs: list[str]) -> dict[str, str]:
    attrs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--attr takes KEY=VALUE, not {pair!r}")
        attrs[key] = value
    return attrs


# -- ls ----------------------------------------------------------------------------------


async def _ls(args: argparse.Namespace) -> int:
    api = await _api(args)
    try:
        return await _ls_with(api, args)
    finally:
        await api.aclose()


async def _ls_with(api: Any, args: argparse.Namespace) -> int:
    if args.id is None:
        collections = await api.list_collections()
        nodes = await api.list_live_nodes()
        if args.json:
            print(
                json.dumps(
                    {
                        "collections": [c.to_dict() for c in collections],
                        "nodes": [n.to_dict() for n in nodes],
                    },
                    indent=2,
                )
            )
            return 0
        if getattr(args, "broker", None):
            print(_agents_line(api, args.broker))
            where = f"on {args.broker}"
        else:
            # Metadata files in meta_dir, and folders of XDF/EDF/BDF files in data_dir.
            where = f"in {api.config.meta_dir} and {api.config.data_dir}"
        print(f"collections {where}:")
        for c in collections:
            print(f"  {c.id:<20} {count(len(c.streams), 'stream'):<10}  {c.name}")
        if not collections:
            print("  (none)")
        print("live nodes:")
        for n in nodes:
            print(f"  {n.id:<20} {n.kind:<11} {n.name}")
        if not nodes:
            print("  (none)")
        return 0
    recordings: list[dict[str, str]] | None = None
    try:
        recordings = await api.list_collection_recordings(args.id)
        listed = await api.list_collection_streams(args.id)
        streams = list({s.id: s for s in listed}.values())  # one per recording: once each
    except NotFound:
        if args.id in {c.id for c in await api.list_collections()}:
            raise  # no recordings: the error names the folders searched and the pattern
        try:
            streams = await api.list_live_streams(args.id)
        except NotFound:
            raise NotFound(await _unknown_id(api, args.id)) from None
    if args.json:
        out: dict[str, Any] = {"streams": {s.id: s.to_dict() for s in streams}}
        if recordings is not None:
            out["recordings"] = recordings
        print(json.dumps(out, indent=2))
        return 0
    print("streams:")
    for s in streams:
        rate = f"{s.frequency:g} Hz" if s.frequency else "irregular"
        dtype = "str" if s.dtype.kind == "U" else s.dtype.name
        channels = ", ".join(s.channels[:8]) + (", ..." if len(s.channels) > 8 else "")
        print(f"  {s.id:<14} {rate:>10}  {len(s.channels)} x {dtype}  [{channels}]")
    if recordings is not None:
        print(f"recordings ({len(recordings)}):")
        for attrs in recordings:
            print("  " + " ".join(f"{k}={v}" for k, v in attrs.items()))
    return 0


def _agents_line(api: Any, broker: str) -> str:
    """Which agents the broker knows, so an empty listing is never a mystery."""
    states = api.agents()
    online = sorted(a for a, s in states.items() if s.get("state") == "online")
    offline = sorted(a for a, s in states.items() if s.get("state") != "online")
    if online:
        more = f" (offline: {', '.join(offline)})" if offline else ""
        return f"agents on {broker}: {', '.join(online)}{more}"
    seen = f"offline: {', '.join(offline)}" if offline else "none has ever connected"
    return (
        f"agents on {broker}: none online ({seen}); "
        "start one with 'datamux serve' on the box with the data"
    )


async def _unknown_id(api: Any, wanted: str) -> str:
    """Say that neither a collection nor a live node has this id, and what is close."""
    collections = await api.list_collections()
    nodes = await api.list_live_nodes()
    ids = [c.id for c in collections] + [n.id for n in nodes]
    by_name = [c.id for c in collections if c.name == wanted]
    if by_name:
        hint = f"'{wanted}' is the name of collection '{by_name[0]}': use its id. "
    else:
        close = difflib.get_close_matches(wanted, ids, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"no collection or live node {wanted!r}; {hint}"
        f"collections: {[c.id for c in collections] or 'none'}; "
        f"live nodes: {[n.id for n in nodes] or 'none'}"
    )


# -- printing frames ---------------------------------------------------------------------


class FramePrinter:
    """Prints frames as one summary line each, or as CSV rows (``--rows``)."""

    def __init__(self, rows: bool, out: TextIO = sys.stdout) -> None:
        self.rows, self.out, self.header_done = rows, out, False

    def frame(self, frame: Frame) -> None:
        if self.rows:
            if not self.header_done:
                print(",".join(["t", *frame.channels]), file=self.out)
                self.header_done = True
            table = np.column_stack([frame.timestamps.astype(str), frame.values.astype(str)])
            self.out.write("\n".join(",".join(row) for row in table.tolist()) + "\n")
            return
        last = frame.values[-1]
        shown = " ".join(f"{c}={_short(v)}" for c, v in zip(frame.channels[:6], last, strict=False))
        more = " ..." if len(frame.channels) > 6 else ""
        span = f"t={frame.timestamps[0]:.3f}..{frame.timestamps[-1]:.3f}"
        print(f"#{frame.seq:<5} {len(frame):>5} samples  {span}  {shown}{more}", file=self.out)

    def other(self, item: Any) -> None:
        if isinstance(item, StreamStatus):
            print(f"[{item.status}] {item.reason}", file=sys.stderr)
        elif isinstance(item, StreamError):
            print(f"datamux: stream failed ({item.code}): {item.reason}", file=sys.stderr)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float | np.floating) else str(value)


class Progress:
    """A one-line progress bar on stderr (a counter when the total is unknown).

    No dependency; redrawn at most 10 times a second.
    """

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.drawn_at = total, enabled, 0, 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if not self.enabled or (now - self.drawn_at < 0.1 and not finished):
            return
        self.drawn_at = now
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 30)
            line = f"[{bar:<30}] {share:6.1%} {self.done}/{self.total} samples"
        else:
            line = f"{self.done} samples"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def _consume(
    api: API,
    ack_id: str,
    sink: asyncio.Queue[Any],
    args: argparse.Namespace,
    progress: Progress | None = None,
    seconds: float | None = None,
) -> int:
    printer = FramePrinter(args.rows)
    deadline = None if seconds is None else asyncio.get_running_loop().time() + seconds
    frames, status = 0, 0
    try:
        async with asyncio.timeout_at(deadline):
            while (item := await sink.get()) is not END_OF_STREAM:
                if not isinstance(item, Frame):
                    printer.other(item)
                    status = 1 if isinstance(item, StreamError) else status
                    continue
                printer.frame(item)
                frames += 1
                if progress:
                    progress.advance(len(item))
                if args.frames is not None and frames >= args.frames:
                    break
    except TimeoutError:
        pass  # --seconds elapsed
    finally:
        if progress:
            progress.close()
        await api.aclose()
    return status


# -- replay and tail ---------------------------------------------------------------------


async def _replay(args: argparse.Namespace) -> int:
    api = await _api(args)
    try:
        return await _replay_with(api, args)
    except BaseException:
        await api.aclose()  # _consume closes it otherwise
        raise


async def _replay_with(api: Any, args: argparse.Namespace) -> int:
    attrs = _attrs(args.attr)
    sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
    ack = await api.replay_collection_stream(
        args.collection,
        args.stream,
        attrs,
        sink,
        speed=args.speed,
        framing=args.framing,
        **replay_control_options(args),
    )
    enabled = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(None, enabled) if enabled else None
    if enabled and isinstance(api, API):  # the total comes from the local file
        stream, recording = api.catalog.resolve(args.collection, args.stream, attrs)
        path = recording.file_for(args.stream)
        total = None
        if path is not None:
            total = await asyncio.to_thread(format_for_path(path).sample_count, path, stream)
        progress = Progress(total, enabled)
    return await _consume(api, ack.randseq or "", sink, args, progress)


async def _tail(args: argparse.Namespace) -> int:
    api = await _api(args)
    try:
        return await _tail_with(api, args)
    except BaseException:
        await api.aclose()  # _consume closes it otherwise
        raise


async def _tail_with(api: Any, args: argparse.Namespace) -> int:
    sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
    ack = await api.proxy_live_stream(
        args.node, args.stream, _attrs(args.attr), sink, framing=args.framing
    )
    return await _consume(api, ack.randseq or "", sink, args, seconds=args.seconds)


async def _record(args: argparse.Namespace) -> int:
    api = await _api(args)
    enabled = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(None, enabled)
    # Ctrl-C is the documented way to end a recording without --seconds: it stops the
    # recording cleanly and the summary is printed; a second Ctrl-C interrupts for real.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        summary = await _record_with(api, args, progress, stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        progress.close()
        await api.aclose()
    how = " (stopped by Ctrl-C)" if stop.is_set() else ""
    print(
        f"recorded {count(summary.samples, 'sample')} in {count(summary.frames, 'frame')} "
        f"({summary.seconds:.1f} s) to {summary.path}{how}"
    )
    if summary.error:
        print(f"datamux: the stream failed: {summary.error}", file=sys.stderr)
        return 1
    return 0


async def _record_with(
    api: Any, args: argparse.Namespace, progress: Progress, stop: asyncio.Event
) -> Any:
    return await record(
        api,
        mode="proxy" if args.node else "replay",
        source_id=args.node or args.collection,
        stream_id=args.stream,
        into=args.into,
        recording=_attrs(args.recording),
        attrs=_attrs(args.attr),
        config=load_config(flags=getattr(args, "config_flags", None)),
        duration=args.seconds,
        speed=args.speed,
        overwrite=args.overwrite,
        on_frame=lambda frame: progress.advance(len(frame)),
        stop=stop,
        file_format=args.format,
    )
