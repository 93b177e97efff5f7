"""Store-and-forward spool: QoS 1 messages wait on disk while the broker is unreachable.

A spool is a directory (the agent's ``<state_dir>/spool/<agent id>``) of append-only
segment files plus a small cursor file (docs/spool.md, "Store-and-forward spool")::

    000001.spool   b"DMSPOOL1", then records, each:
                   u32 body length | u32 CRC32 of (length bytes + body) | body
                   body: u8 qos | u16 topic length | topic (UTF-8) | payload
    cursor         b"DMC1" | u64 segment | u64 offset | u32 CRC32: the oldest unsent record
    lock           flock(2)ed while a Spool has the directory open

Appends go to the newest segment; a new one starts once a segment would pass
``segment_bytes``. :meth:`Spool.commit` moves the cursor and deletes segments it has
passed. Past ``max_bytes`` whole segments are deleted oldest first and their unsent
messages counted in :attr:`Spool.dropped`.

On open every segment is read and checked. A partial last record (the process or the
power died in the middle of an append) is cut off. A record that fails its CRC anywhere
else is logged and counted as dropped, with the records behind it in the same segment;
reading goes on with the next segment.

Delivery is at least once: after a crash or a power loss, messages sent shortly before may
be sent again (the broker's QoS 1 already allows duplicates; frames carry sequence numbers).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from ..errors import ConfigError

__all__ = ["Spool", "SpooledMessage"]

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"DMSPOOL1"
CURSOR_MAGIC = b"DMC1"
SUFFIX = ".spool"
# MQTT's own limits: topics are at most 65535 bytes of UTF-8, payloads 268435455 bytes.
MAX_TOPIC_BYTES = 0xFFFF
MAX_PAYLOAD_BYTES = 268_435_455
# fsync policy. An SD card wears out and stalls (tens of ms) under an fsync per frame, so
# appends only write(2): the data is then in the page cache and survives the agent being
# killed or crashing. The newest segment is fdatasync()ed by an append or commit at most
# once per SYNC_INTERVAL_S, and when it is sealed, on sync() and on close(); so is the
# cursor. A power cut can lose the appends since the last sync (cut off on open as a torn
# record) and re-send messages committed since then; never older ones. Once calls stop,
# nothing syncs until the kernel's writeback (~30 s): the owner calls sync() on a timer.
SYNC_INTERVAL_S = 1.0

_RECORD = struct.Struct("<II")  # body length, CRC32 of (length bytes + body)
_BODY = struct.Struct("<BH")  # qos, topic length in bytes
_CURSOR = struct.Struct("<4sQQ")  # magic, segment number, offset; then u32 CRC32
_HEADER = len(SEGMENT_MAGIC)
_fdatasync = getattr(os, "fdatasync", os.fsync)


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One message as it went into the spool."""

    topic: str
    payload: bytes
    qos: int


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    size: int  # bytes on disk
    end: int  # readable records stop here (== size unless a corrupt tail was skipped)
    count: int  # unsent records (for the oldest segment: behind the cursor)


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages in ``directory``.

    Not thread-safe: use it from one thread (the agent's event loop). Nothing here touches
    the network, and appends never wait for the broker. A second Spool on the same
    directory, in this process or another, raises :class:`~streaminghub_datamux.errors.ConfigError`.

    Args:
        directory: Where the segment files live; created if missing.
        max_bytes: Bound on the segment files' total size (:attr:`depth_bytes`).
        segment_bytes: Size at which a new segment file starts; capped at a quarter of
            ``max_bytes``, so an overflow drops at most about a quarter of the spool.
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 4 << 20) -> None:
        if max_bytes <= _HEADER or segment_bytes <= 0:
            raise ValueError(f"spool sizes must be positive (max_bytes > {_HEADER})")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self._segments: deque[_Segment] = deque()
        self._pos = _HEADER  # read offset in the oldest segment
        self._count = 0
        self._depth = 0
        self._dropped = 0
        self._dropped_since_peek = 0  # oldest messages dropped by overflow after a peek
        self._tail: _Segment | None = None  # the segment appends go to
        self._fd: int | None = None
        self._next_seq = 1
        self._data_dirty = self._cursor_dirty = False
        self._synced_at = time.monotonic()
        self._write_failed = False
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise ConfigError(
                "another process (or Spool) already uses this spool",
                source=str(self.directory),
                fix="give each agent its own agent.id or agent.state_dir",
            ) from None
        try:
            self._load()
        except BaseException:
            self._close_tail(sync=False)
            os.close(self._lock)
            raise

    # -- public ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages held (not yet committed)."""
        return self._count

    @property
    def depth_bytes(self) -> int:
        """Bytes of segment files on disk: what ``max_bytes`` bounds.

        Includes committed records that share the oldest segment with unsent ones; it
        drops to 0 once everything is committed.
        """
        return self._depth

    @property
    def dropped(self) -> int:
        """Messages lost since this Spool was made (not persisted across restarts).

        Counts overflow (oldest first), messages bigger than ``max_bytes``, failed disk
        writes, and corrupt or torn records found on open or read.
        """
        return self._dropped

    def append(self, topic: str, payload: bytes, qos: int) -> None:
        """Add a message at the end; past ``max_bytes``, drop the oldest segments.

        Never raises for a full spool or a failed disk write: the message (or the oldest
        ones) is dropped, counted in :attr:`dropped` and logged.

        Raises:
            ValueError: The spool is closed, or the message is not a valid MQTT message
                (empty topic or one with NUL, topic or payload over MQTT's limits, qos
                not 0, 1 or 2).
        """
        self._check_open()
        raw = topic.encode("utf-8")
        if not raw or len(raw) > MAX_TOPIC_BYTES or "\0" in topic:
            raise ValueError(f"invalid topic for the spool: {topic[:80]!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes is over MQTT's limit")
        record = _encode(raw, bytes(payload), qos)
        if _HEADER + len(record) > self.max_bytes:
            self._dropped += 1
            log.warning(
                "spool %s: dropped a %d-byte message on %s, bigger than the spool (%d bytes)",
                self.directory,
                len(record),
                topic,
                self.max_bytes,
            )
            return
        try:
            self._write(record)
        except OSError as exc:
            self._dropped += 1
            if not self._write_failed:
                log.error("spool %s: cannot write, dropping messages: %s", self.directory, exc)
            self._write_failed = True
            return
        if self._write_failed:
            log.info("spool %s: writing again", self.directory)
            self._write_failed = False
        self._count += 1
        self._enforce_bound()
        self._sync_if_due()

    def peek(self, limit: int) -> list[SpooledMessage]:
        """Return up to ``limit`` messages, oldest first, without removing them.

        A record that fails its check here (the file changed after open) is logged and
        dropped with the rest of its segment, as on open.
        """
        self._check_open()
        if limit < 0:
            raise ValueError("limit must be >= 0")
        out: list[SpooledMessage] = []
        for index, seg in enumerate(list(self._segments)):
            if len(out) >= limit:
                break
            if not seg.count:
                continue
            pos = self._pos if index == 0 else _HEADER
            got = 0
            try:
                with open(seg.path, "rb") as file:
                    file.seek(pos)
                    while got < seg.count and len(out) < limit:
                        message, size = _read_record(file, seg.end - pos)
                        if message is None:
                            break
                        out.append(message)
                        pos += size
                        got += 1
            except OSError as exc:
                log.error("spool %s: %s", self.directory, exc)
            if got < seg.count and len(out) < limit:
                self._skip_rest(seg, pos, got)
        self._dropped_since_peek = 0
        return out

    def commit(self, count: int) -> None:
        """Remove the ``count`` oldest messages, once they were published.

        ``count`` refers to the messages the last :meth:`peek` returned: those that overflow
        dropped since (while they were being published) are not removed a second time.

        Raises:
            ValueError: ``count`` is negative or more than the messages held.
        """
        self._check_open()
        if count < 0:
            raise ValueError("count must be >= 0")
        todo = count - self._dropped_since_peek
        self._dropped_since_peek = 0
        if todo <= 0:
            return
        if todo > self._count:
            raise ValueError(f"cannot commit {todo} messages, the spool holds {self._count}")
        done: list[_Segment] = []
        while self._segments:
            seg = self._segments[0]
            if todo and seg.count:
                take = min(todo, seg.count)
                self._pos = _skip_records(seg.path, self._pos, take)
                seg.count -= take
                self._count -= take
                todo -= take
            if seg.count or seg is self._tail:
                break
            done.append(self._segments.popleft())
            self._pos = _HEADER
        if not self._count and self._tail is not None:
            # Empty: start afresh, so depth_bytes goes back to 0 and the file is not reused.
            self._close_tail(sync=False)
            done.extend(self._segments)
            self._segments.clear()
        # The cursor moves first: if we die before the unlinks, those segments are behind it.
        # If it cannot be written, the old one stays: messages may be sent twice, not lost.
        here = (self._segments[0].seq, self._pos) if self._segments else (self._next_seq, _HEADER)
        try:
            self._write_cursor(*here)
        except OSError as exc:
            log.error("spool %s: cannot write the cursor: %s", self.directory, exc)
        for seg in done:
            self._depth -= seg.size
            _unlink(seg.path)
        self._sync_if_due()

    def sync(self) -> None:
        """Force appended data and the cursor to disk (fdatasync/fsync) now.

        The spool does this by itself at most once per :data:`SYNC_INTERVAL_S`; call it when
        losing the last second of messages on a power cut matters more than the SD card.
        """
        self._check_open()
        if self._data_dirty and self._fd is not None:
            _fdatasync(self._fd)
        if self._cursor_dirty:
            fd = os.open(self.directory / "cursor", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.directory)
        self._data_dirty = self._cursor_dirty = False
        self._synced_at = time.monotonic()

    def close(self) -> None:
        """Sync and close the files and release the directory; idempotent.

        A failing sync is logged, not raised: closing always releases the directory.
        """
        if self._closed:
            return
        try:
            self.sync()
        except OSError as exc:
            log.error("spool %s: cannot sync on close: %s", self.directory, exc)
        finally:
            self._closed = True
            self._close_tail(sync=False)
            os.close(self._lock)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Spool {str(self.directory)!r} messages={self._count} "
            f"bytes={self._depth}/{self.max_bytes} dropped={self._dropped}>"
        )

    # -- opening ---------------------------------------------------------------------------

    def _load(self) -> None:
        cursor = self._read_cursor()
        cursor_seq, cursor_pos = cursor or (0, _HEADER)
        for stale in self.directory.glob("*.tmp"):
            _unlink(stale)
        seqs = sorted(
            int(p.name[: -len(SUFFIX)])
            for p in self.directory.glob(f"*{SUFFIX}")
            if p.name[: -len(SUFFIX)].isdigit()
        )
        self._next_seq = max([cursor_seq, *seqs]) + 1
        for seq in seqs:
            path = self._path(seq)
            if seq < cursor_seq:
                _unlink(path)  # sent; its unlink was cut short
                continue
            start = cursor_pos if seq == cursor_seq else _HEADER
            seg = self._open_segment(seq, path, start, last=seq == seqs[-1])
            if seg is None:
                continue
            if not self._segments:
                self._pos = min(max(start, _HEADER), seg.end)
            self._segments.append(seg)
            self._depth += seg.size
            self._count += seg.count
        # Segments with nothing left to send go (except the one appends continue in).
        for seg in [s for s in self._segments if not s.count and s is not self._tail]:
            if seg is self._segments[0]:
                self._pos = _HEADER
            self._segments.remove(seg)
            self._depth -= seg.size
            _unlink(seg.path)
        if not self._count and self._segments:
            self._close_tail(sync=False)  # empty: the next append starts a fresh segment
            for seg in self._segments:
                _unlink(seg.path)
            self._segments.clear()
            self._depth = 0
        here = (self._segments[0].seq, self._pos) if self._segments else None
        if here is not None and here != cursor:
            self._write_cursor(*here)
        if self._count:
            log.info(
                "spool %s: %d messages (%d bytes) waiting", self.directory, self._count, self._depth
            )

    def _open_segment(self, seq: int, path: Path, start: int, last: bool) -> _Segment | None:
        """Check one segment file; cut a torn tail; skip (and count) a corrupt part."""
        with open(path, "rb") as file:
            magic = file.read(_HEADER)
            # A cursor past the end: the tail was lost in a power cut after being sent.
            start = min(max(start, _HEADER), os.fstat(file.fileno()).st_size)
            file.seek(start)
            data = file.read() if len(magic) == _HEADER else b""
        if magic != SEGMENT_MAGIC:
            if last and SEGMENT_MAGIC.startswith(magic):
                _unlink(path)  # created just before a crash, before its header was written
            else:
                log.error("spool %s: %s is not a spool segment; set aside", self.directory, path)
                os.replace(path, path.with_name(path.name + ".bad"))
            return None
        end, count, lost, valid_after = _scan(data)
        size = start + len(data)
        if end < len(data):
            self._dropped += lost
            if last and not valid_after:
                log.warning(
                    "spool %s: cut off a torn record at the end of %s (%d bytes)",
                    self.directory,
                    path.name,
                    len(data) - end,
                )
                size = start + end
                os.truncate(path, size)
            else:
                log.error(
                    "spool %s: corrupt record in %s at offset %d: dropped %d messages (%d bytes), "
                    "going on with the next segment",
                    self.directory,
                    path.name,
                    start + end,
                    lost,
                    len(data) - end,
                )
                last = False  # never append behind garbage
        seg = _Segment(seq, path, size, start + end, count)
        if last and size < self.segment_bytes:
            self._tail = seg
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        return seg

    def _read_cursor(self) -> tuple[int, int] | None:
        try:
            raw = (self.directory / "cursor").read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) == _CURSOR.size + 4 and zlib.crc32(raw[:-4]) == _u32(raw[-4:]):
            magic, seq, pos = _CURSOR.unpack_from(raw)
            if magic == CURSOR_MAGIC:
                return seq, pos
        log.warning("spool %s: unreadable cursor; re-sending from the oldest", self.directory)
        return None

    # -- writing ---------------------------------------------------------------------------

    def _write(self, record: bytes) -> None:
        tail = self._tail
        if (
            tail is not None
            and tail.size > _HEADER  # a record bigger than a segment gets one of its own
            and tail.size + len(record) > self.segment_bytes
        ):
            self._close_tail(sync=True)  # sealed: make it durable once, now
            tail = None
        if tail is None or self._fd is None:
            tail = self._new_segment()
        fd = self._fd
        assert fd is not None  # _new_segment opened it
        try:
            _write_all(fd, record)
        except OSError:
            # Leave no partial record behind, or appends after it would be unreadable.
            try:
                os.ftruncate(fd, tail.size)
            except OSError:
                self._close_tail(sync=False)
            raise
        tail.size += len(record)
        tail.end = tail.size
        tail.count += 1
        self._depth += len(record)
        self._data_dirty = True

    def _new_segment(self) -> _Segment:
        seq = self._next_seq
        path = self._path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, SEGMENT_MAGIC)
            _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            _unlink(path)
            raise
        self._next_seq += 1
        seg = _Segment(seq, path, _HEADER, _HEADER, 0)
        if not self._segments:
            self._pos = _HEADER
        self._segments.append(seg)
        self._depth += _HEADER
        self._tail, self._fd = seg, fd
        return seg

    def _close_tail(self, sync: bool) -> None:
        if self._fd is not None:
            try:
                if sync and self._data_dirty:
                    _fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
                self._data_dirty = False
        self._tail = None

    def _enforce_bound(self) -> None:
        """Past max_bytes, delete whole segments, oldest first, counting what they held."""
        lost = 0
        while self._depth > self.max_bytes and len(self._segments) > 1:
            seg = self._segments.popleft()
            self._depth -= seg.size
            self._count -= seg.count
            lost += seg.count
            self._pos = _HEADER
            _unlink(seg.path)
        if lost:
            self._dropped += lost
            self._dropped_since_peek += lost
            log.warning(
                "spool %s full (%d bytes): dropped the %d oldest messages",
                self.directory,
                self.max_bytes,
                lost,
            )

    def _skip_rest(self, seg: _Segment, pos: int, got: int) -> None:
        lost = seg.count - got
        log.error(
            "spool %s: corrupt record in %s at offset %d: dropped %d messages, "
            "going on with the next segment",
            self.directory,
            seg.path.name,
            pos,
            lost,
        )
        seg.count, seg.end = got, pos
        self._count -= lost
        self._dropped += lost
        if seg is self._tail:
            self._close_tail(sync=False)

    def _write_cursor(self, seq: int, pos: int) -> None:
        """Replace the cursor atomically; fsync() comes with the next sync()."""
        raw = _CURSOR.pack(CURSOR_MAGIC, seq, pos)
        tmp = self.directory / "cursor.tmp"
        tmp.write_bytes(raw + zlib.crc32(raw).to_bytes(4, "little"))
        os.replace(tmp, self.directory / "cursor")
        self._cursor_dirty = True

    # -- helpers ---------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:06d}{SUFFIX}"

    def _sync_if_due(self) -> None:
        if time.monotonic() - self._synced_at < SYNC_INTERVAL_S:
            return
        try:
            self.sync()
        except OSError as exc:
            # Still dirty: tried again in SYNC_INTERVAL_S, not on every call meanwhile.
            log.error("spool %s: cannot sync: %s", self.directory, exc)
            self._synced_at = time.monotonic()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the spool is closed")


def _encode(topic: bytes, payload: bytes, qos: int) -> bytes:
    head = _BODY.pack(qos, len(topic)) + topic
    length = (len(head) + len(payload)).to_bytes(4, "little")
    crc = zlib.crc32(payload, zlib.crc32(head, zlib.crc32(length)))
    return b"".join((length, crc.to_bytes(4, "little"), head, payload))


def _scan(data: bytes) -> tuple[int, int, int, bool]:
    """Walk the records in ``data``.

    Returns the end of the valid prefix, the records in it, how many records the rest holds
    as far as its length fields chain (at least 1 if there is a rest), and whether any of
    those checks out (then the damage is not a torn end).
    """
    view = memoryview(data)
    pos = count = lost = 0
    bad_at: int | None = None
    valid_after = False
    while pos + _RECORD.size <= len(data):
        length, crc = _RECORD.unpack_from(data, pos)
        stop = pos + _RECORD.size + length
        if length < _BODY.size or stop > len(data):
            break
        ok = zlib.crc32(view[pos + _RECORD.size : stop], zlib.crc32(view[pos : pos + 4])) == crc
        if bad_at is None and ok:
            count += 1
        elif bad_at is None:
            bad_at, lost = pos, 1
        else:
            lost += 1
            valid_after = valid_after or ok
        pos = stop
    if bad_at is None:
        bad_at, lost = pos, int(pos < len(data))
    return bad_at, count, lost, valid_after


def _read_record(file: BinaryIO, room: int) -> tuple[SpooledMessage | None, int]:
    """Read one record at the file's position; (None, 0) if it is not intact."""
    head = file.read(_RECORD.size)
    if len(head) < _RECORD.size:
        return None, 0
    length, crc = _RECORD.unpack(head)
    size = _RECORD.size + length
    if length < _BODY.size or size > room:
        return None, 0
    body = file.read(length)
    if len(body) < length or zlib.crc32(body, zlib.crc32(head[:4])) != crc:
        return None, 0
    qos, topic_len = _BODY.unpack_from(body)
    topic_end = _BODY.size + topic_len
    if qos > 2 or topic_end > length:
        return None, 0
    try:
        topic = body[_BODY.size : topic_end].decode("utf-8")
    except UnicodeDecodeError:
        return None, 0
    return SpooledMessage(topic, body[topic_end:], qos), size


def _skip_records(path: Path, pos: int, count: int) -> int:
    """Offset after ``count`` records starting at ``pos`` (already checked by peek/open)."""
    if not count:
        return pos
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            pos += _RECORD.size + _u32(os.pread(fd, 4, pos))
    finally:
        os.close(fd)
    return pos


def _write_all(fd: int | None, data: bytes) -> None:
    assert fd is not None
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _u32(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def _fsync_dir(directory: Path) -> None:
    """Make a created, renamed or deleted directory entry durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
