"""Record any stream (live or replayed, local or remote) into a replayable DFDS collection.

A recording is one CSV file per stream, ``<data_dir>/<collection>/<attr values...>/<stream>.csv``,
described by ``<meta_dir>/<collection>.collection.json`` with the pattern
``csv://{attr1}/{attr2}/{stream}``. Replay reads it back bit-exact: numbers are written in
the shortest text that reads back to the same float32/float64/integer, markers are quoted.
With ``format="parquet"`` the file is ``<stream>.parquet`` (pattern ``parquet://...``),
typed columns, bit-exact by construction; it is complete only once the recording ends.

Crash-safe by construction: the metadata file is written (atomically) before any data;
each frame is appended with one unbuffered ``write`` of whole lines, and the file is
fsync'ed at least once a second. A recording killed mid-way keeps every frame written
before the kill and replays as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .checks import is_id
from .config import Config, load_config
from .errors import DataError, InvalidRequest, NotFound
from .interface import DatamuxAPI
from .model import Frame, Stream, StreamError, dtype_name
from .util import END_OF_STREAM

__all__ = ["CsvFrameWriter", "ParquetFrameWriter", "RecordingSummary", "record"]

_FSYNC_EVERY_S = 1.0


@dataclass(frozen=True)
class RecordingSummary:
    """What a recording wrote."""

    path: Path
    frames: int
    samples: int
    seconds: float
    error: str | None = None


def _check_segment(value: str, what: str) -> str:
    """Ids and attr values become path segments: no separators, no '..'."""
    if not is_id(value) or value in (".", ".."):
        raise InvalidRequest(
            f"{what} {value!r} cannot name a file: use letters, digits, '_', '-' and '.' "
            "(at most 64, not starting with '.' or '-')"
        )
    return value


def _column_id(channel: str, taken: set[str]) -> str:
    """A CSV-safe column name for a channel (the original stays as the field's name)."""
    base = re.sub(r'[,"\r\n]', "_", channel).strip() or "ch"
    column, n = base, 1
    while column in taken or column == "t":
        n += 1
        column = f"{base}_{n}"
    taken.add(column)
    return column


def _text_columns(values: np.ndarray) -> list[np.ndarray]:
    """Each column as shortest round-trip text (numpy's repr), markers quoted."""
    if values.dtype.kind == "U":
        quoted = np.char.replace(values.astype(str), '"', '""')
        return [np.char.add(np.char.add('"', quoted[:, j]), '"') for j in range(values.shape[1])]
    if values.dtype.kind == "b":
        values = values.astype(np.uint8)
    return [values[:, j].astype(str) for j in range(values.shape[1])]


class CsvFrameWriter:
    """Appends frames to one CSV recording file, whole lines per write."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._fd: int | None = None
        self._synced_at = 0.0

    def open(self, overwrite: bool = False) -> None:
        """Create the file (refusing an existing one unless ``overwrite``) and write the header."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise InvalidRequest(
                f"{self.path} exists; pick other recording attrs, or replace it with "
                "--overwrite (overwrite=True in Python)"
            ) from None
        self._write_all(("t," + ",".join(self.columns) + "\n").encode())

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def write(self, timestamps: np.ndarray, values: np.ndarray) -> None:
        """Append one frame's samples as whole lines."""
        if len(timestamps) == 0:
            return
        row = timestamps.astype(np.float64).astype(str)
        for column in _text_columns(values):
            row = np.char.add(np.char.add(row, ","), column)
        self._write_all(("\n".join(row.tolist()) + "\n").encode())
        now = time.monotonic()
        if now - self._synced_at >= _FSYNC_EVERY_S:
            assert self._fd is not None
            os.fsync(self._fd)
            self._synced_at = now

    def close(self) -> None:
        """Flush to disk and close the file."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


class ParquetFrameWriter:
    """Writes frames to one Parquet file, a row group per :data:`ROW_GROUP_ROWS` samples.

    Parquet's footer is written by :meth:`close`: a recording killed before that leaves
    a file no reader can open (CSV is the crash-safe format).
    """

    ROW_GROUP_ROWS = 65536

    def __init__(self, path: Path, columns: list[str], dtype: np.dtype) -> None:
        self.path, self.columns, self.dtype = path, columns, dtype
        self._file: Any = None
        self._writer: Any = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._rows = 0

    def open(self, overwrite: bool = False) -> None:
        """Create the file (refusing an existing one unless ``overwrite``)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise InvalidRequest(
                "recording Parquet needs pyarrow: pip install 'streaminghub-datamux[parquet]'"
            ) from exc
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open(self.path, "wb" if overwrite else "xb")  # noqa: SIM115
        except FileExistsError:
            raise InvalidRequest(
                f"{self.path} exists; pick other recording attrs, or replace it with "
                "--overwrite (overwrite=True in Python)"
            ) from None
        kind = pa.string() if self.dtype.kind == "U" else pa.from_numpy_dtype(self.dtype)
        schema = pa.schema([("t", pa.float64()), *((c, kind) for c in self.columns)])
        self._writer = pq.ParquetWriter(self._file, schema)

    def write(self, timestamps: np.ndarray, values: np.ndarray) -> None:
        """Append one frame's samples."""
        if len(timestamps):
            self._pending.append((timestamps, values))
            self._rows += len(timestamps)
        if self._rows >= self.ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        timestamps = np.concatenate([p[0] for p in self._pending]).astype(np.float64)
        values = np.concatenate([p[1] for p in self._pending])
        self._pending, self._rows = [], 0
        arrays = [pa.array(timestamps)]
        arrays += [pa.array(values[:, j].astype(self.dtype)) for j in range(len(self.columns))]
        self._writer.write_table(pa.table(arrays, names=["t", *self.columns]))

    def close(self) -> None:
        """Finish the file and close it."""
        if self._writer is not None:
            try:
                self._flush()
                self._writer.close()
            finally:
                self._writer = None
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


def _stream_metadata(stream: Stream, columns: list[str]) -> dict[str, Any]:
    fields = {}
    for column, field in zip(columns, stream.fields.values(), strict=True):
        fields[column] = {**field.to_dict(), "name": field.name or field.id}
        fields[column]["dtype"] = dtype_name(stream.dtype)
    return {
        "name": stream.name,
        "description": stream.description,
        "unit": stream.unit,
        "frequency": stream.frequency,
        "fields": fields,
        "index": {"t": {"name": "timestamp", "dtype": "f64", "unit": "s"}},
    }


@contextlib.contextmanager
def _metadata_for_update(
    meta_dir: Path, collection_id: str
) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """Hold an exclusive lock on a collection's metadata while it is read and rewritten.

    Two recordings into one collection (two shells, two streams) would otherwise both read
    the old file and the last writer would drop the other's stream. The lock is on the
    meta_dir folder itself, so no lock file is left behind in it (holding it is a
    metadata rewrite long, so other collections waiting on it do not matter).
    """
    meta_dir.mkdir(parents=True, exist_ok=True)
    path = meta_dir / f"{collection_id}.collection.json"
    folder = os.open(meta_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        meta = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        yield path, meta
    finally:
        os.close(folder)  # releases the lock


def _replace_json(path: Path, meta: dict[str, Any]) -> None:
    """Write ``path`` atomically (a unique temporary file, then a rename)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(json.dumps(meta, indent=2))
    os.replace(temporary, path)


def _write_metadata(
    meta_dir: Path,
    collection_id: str,
    stream: Stream,
    columns: list[str],
    attr_keys: list[str],
    file_format: str = "csv",
) -> None:
    """Create or extend ``<collection>.collection.json``, atomically and under a lock."""
    pattern = f"{file_format}://" + "/".join([*(f"{{{k}}}" for k in attr_keys), "{stream}"])
    with _metadata_for_update(meta_dir, collection_id) as (path, meta):
        if meta is not None and meta.get("pattern") != pattern:
            raise InvalidRequest(
                f"{path} has pattern {meta.get('pattern')!r}; recording with attrs "
                f"{attr_keys} needs {pattern!r}: record into another collection"
            )
        if meta is None:
            meta = {
                "name": collection_id,
                "description": "recorded by streaminghub-datamux",
                "keywords": [],
                "authors": [],
                "streams": {},
                "groups": {},
                "pattern": pattern,
            }
        new = _stream_metadata(stream, columns)
        old = meta["streams"].get(stream.id)
        if old is not None and (old.get("fields") != new["fields"]):
            raise InvalidRequest(
                f"{path}: stream {stream.id!r} is already recorded with other channels or dtype"
            )
        meta["streams"][stream.id] = new
        for key in attr_keys:
            meta["groups"].setdefault(key, {"description": "", "values": []})
        _replace_json(path, meta)


def _add_group_values(meta_dir: Path, collection_id: str, attrs: Mapping[str, str]) -> None:
    with _metadata_for_update(meta_dir, collection_id) as (path, meta):
        if meta is None:
            return
        for key, value in attrs.items():
            values = meta["groups"].setdefault(key, {"values": []}).setdefault("values", [])
            if value not in values:
                values.append(value)
        _replace_json(path, meta)


async def _find_stream(api: DatamuxAPI, mode: str, source_id: str, stream_id: str) -> Stream:
    streams = (
        await api.list_live_streams(source_id)
        if mode == "proxy"
        else await api.list_collection_streams(source_id)
    )
    for stream in streams:
        if stream.id == stream_id:
            return stream
    raise NotFound(f"{source_id!r} has no stream {stream_id!r}; streams: {[s.id for s in streams]}")


class _Limit:
    """Which samples ``duration`` keeps: the first ``duration`` seconds of the stream's time.

    A regular stream keeps exactly ``round(duration x frequency)`` samples (fewer if it
    drops some: a timestamp past the span ends it too); an irregular one keeps the
    samples whose timestamps fall within ``duration`` of the first.
    """

    def __init__(self, duration: float | None, frequency: float) -> None:
        self.duration = duration
        self.first: float | None = None
        self.count = round(duration * frequency) if duration and frequency > 0 else None
        # Half a period of slack, so rounding in t0 + k / f never drops sample k.
        self.span = (
            None if duration is None else duration - (0.5 / frequency if frequency > 0 else 0)
        )

    def keep(self, timestamps: np.ndarray, written: int) -> int:
        """How many samples at the start of this frame to write."""
        if self.duration is None or len(timestamps) == 0:
            return len(timestamps)
        if self.first is None:
            self.first = float(timestamps[0])
        assert self.span is not None
        # The first sample past the span ends it (live timestamps need not be sorted).
        beyond = np.flatnonzero(timestamps - self.first > self.span)
        within = int(beyond[0]) if len(beyond) else len(timestamps)
        if self.count is not None:
            within = min(within, self.count - written)
        return max(within, 0)

    def reached(self, written: int) -> bool:
        return self.count is not None and written >= self.count


def _head(frame: Frame, n: int) -> Frame:
    return dataclasses.replace(frame, timestamps=frame.timestamps[:n], values=frame.values[:n])


def _deadline(
    started: float, duration: float | None, mode: str, speed: float, frequency: float
) -> float | None:
    """A wall-clock bound, so a stream that stalls cannot keep a timed recording open."""
    if duration is None or (mode == "replay" and speed <= 0):
        return None
    wall = duration / speed if mode == "replay" else duration
    if frequency <= 0 and mode == "proxy":
        return started + wall  # irregular live events: no count to wait for
    return started + wall * 1.5 + 2.0


async def _reschedule_on(
    stop: asyncio.Event, timeout: asyncio.Timeout, loop: asyncio.AbstractEventLoop
) -> None:
    await stop.wait()
    timeout.reschedule(loop.time())


async def record(
    api: DatamuxAPI,
    *,
    mode: Literal["proxy", "replay"],
    source_id: str,
    stream_id: str,
    into: str,
    recording: Mapping[str, str],
    attrs: Mapping[str, Any] | None = None,
    config: Config | None = None,
    duration: float | None = None,
    speed: float = 0.0,
    overwrite: bool = False,
    on_frame: Callable[[Frame], None] | None = None,
    stop: asyncio.Event | None = None,
    file_format: Literal["csv", "parquet"] = "csv",
) -> RecordingSummary:
    """Record one stream into the collection ``into`` until it ends or ``duration`` passes.

    Works with any API object (``dm.API`` or ``dm.RemoteAPI``): it only uses the public
    methods. Set ``stop`` (or cancel the coroutine) to stop early; what was written stays
    replayable.

    Args:
        api: where the stream comes from.
        mode: ``"proxy"`` a live stream of node ``source_id``, or ``"replay"`` a stream of
            collection ``source_id``.
        source_id: the node or collection id.
        stream_id: the stream.
        into: the collection to record into (created if missing, extended otherwise).
        recording: the new recording's attrs, e.g. ``{"subject": "A", "session": "1"}``;
            they become folders and the collection's groups.
        attrs: passed to the proxy/replay request (for replay: which recording).
        config: where ``data_dir``/``meta_dir`` are; the usual layers by default.
        duration: record this many seconds of the stream, by its timestamps: a regular
            stream gives exactly ``duration x frequency`` samples (live streams run until
            stopped otherwise).
        speed: replay speed (0, the default, records a replay as fast as possible).
        overwrite: replace an existing recording with the same attrs.
        on_frame: called with every frame written (e.g. for progress).
        stop: set it to stop early and still get the summary (``datamux record`` sets it
            on Ctrl-C). Cancelling the coroutine stops too, without a summary.
        file_format: ``"csv"`` (crash-safe text) or ``"parquet"`` (typed columns,
            readable once the recording ends; needs the ``[parquet]`` extra).

    Raises:
        InvalidRequest: unsafe ids or attrs, an existing recording, a clash with the
            collection's existing pattern or channels.
        NotFound: unknown node, collection or stream.
    """
    config = config or load_config()
    if file_format not in ("csv", "parquet"):
        raise InvalidRequest(f"file_format must be 'csv' or 'parquet', not {file_format!r}")
    _check_segment(into, "collection id")
    _check_segment(stream_id, "stream id")
    attr_keys = list(recording)
    for key, value in recording.items():
        _check_segment(key, "attribute name")
        _check_segment(str(value), f"value of {key!r}")
    stream = await _find_stream(api, mode, source_id, stream_id)
    taken: set[str] = set()
    columns = [_column_id(channel, taken) for channel in stream.channels]

    meta_dir, data_dir = Path(config.meta_dir), Path(config.data_dir)
    folder = data_dir / into / Path(*(str(recording[k]) for k in attr_keys))
    path = folder / f"{stream_id}.{file_format}"
    await asyncio.to_thread(
        _write_metadata, meta_dir, into, stream, columns, attr_keys, file_format
    )
    writer: CsvFrameWriter | ParquetFrameWriter
    if file_format == "parquet":
        writer = ParquetFrameWriter(path, columns, stream.dtype)
    else:
        writer = CsvFrameWriter(path, columns)
    await asyncio.to_thread(writer.open, overwrite)

    sink: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
    if mode == "proxy":
        ack = await api.proxy_live_stream(source_id, stream_id, attrs or {}, sink)
    else:
        ack = await api.replay_collection_stream(
            source_id, stream_id, attrs or {}, sink, speed=speed, framing="throughput"
        )
    loop = asyncio.get_running_loop()
    started = loop.time()
    limit = _Limit(duration, stream.frequency)
    frames = samples = 0
    error = None
    writing: asyncio.Future[None] | None = None
    pending = 0  # samples of the frame being written
    watcher = None
    try:
        async with asyncio.timeout_at(
            _deadline(started, duration, mode, speed, stream.frequency)
        ) as timeout:
            if stop is not None:
                # Stopping early ends the loop like the deadline does: same cleanup, and
                # the summary still comes back.
                watcher = asyncio.ensure_future(_reschedule_on(stop, timeout, loop))
            while (item := await sink.get()) is not END_OF_STREAM:
                if isinstance(item, StreamError):
                    error = f"{item.code}: {item.reason}"
                if not isinstance(item, Frame):
                    continue
                if item.values.shape[1] != len(columns):
                    raise DataError(
                        f"stream {stream_id!r} sent {item.values.shape[1]} channels, "
                        f"its metadata declares {len(columns)}",
                        file=str(path),
                    )
                keep = limit.keep(item.timestamps, samples)
                if keep:
                    timestamps, values = item.timestamps[:keep], item.values[:keep]
                    # Shielded: a stop must not close the file under a write in progress.
                    pending = keep
                    writing = asyncio.ensure_future(
                        asyncio.to_thread(writer.write, timestamps, values)
                    )
                    await asyncio.shield(writing)
                    frames, samples, pending = frames + 1, samples + keep, 0
                    if on_frame is not None:
                        on_frame(item if keep == len(item) else _head(item, keep))
                if keep < len(item) or limit.reached(samples):
                    break
    except TimeoutError:
        pass  # the time is up (a stalled stream), or `stop` was set
    finally:
        if watcher is not None:
            watcher.cancel()
        if writing is not None and not writing.done():
            await asyncio.wait({writing})  # the frame being written is kept
            if pending and writing.exception() is None:
                frames, samples = frames + 1, samples + pending
        await asyncio.to_thread(writer.close)
        if ack.randseq is not None:  # both APIs always name the task
            await api.stop_task(ack.randseq)
        group_values = {k: str(v) for k, v in recording.items()}
        await asyncio.to_thread(_add_group_values, meta_dir, into, group_values)
    return RecordingSummary(path, frames, samples, loop.time() - started, error)
