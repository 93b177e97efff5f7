"""Samples back to bytes, and a pseudo-terminal that presents a stream as a serial device."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import struct
import sys
import termios
import tty
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ...model import Frame, StreamError
from ...util import END_OF_STREAM
from ..signals import cast_values
from .formats import FormatSpec, parse_format

# At the end of a stream, how long a reader may take nothing before we stop waiting for
# it to take the rest (then no one is reading), and how long the terminal must stay empty
# (the kernel moves written bytes to the reader's side a moment after the write).
DRAIN_IDLE_S = 1.0
DRAIN_SETTLE_S = 0.02

# -- encoding and the pseudo-terminal writer -----------------------------------------


def _number_format(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return "%.9g" if dtype.itemsize <= 4 else "%.17g"  # round-trips the dtype
    if dtype.kind in "iub":
        return "%d"
    return "%s"


def encode_samples(spec: FormatSpec, channels: Sequence[str], values: np.ndarray) -> bytes:
    """Encode samples ``(n, channels)`` the way a device of format ``spec`` sends them."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    if not len(values):
        return b""
    if spec.type == "binary":
        return _encode_binary(spec, values)
    number = _number_format(values.dtype)
    out = io.StringIO()
    if spec.type == "keyvalue":
        row = " ".join(f"{name.replace('%', '%%')}={number}" for name in channels)
        np.savetxt(out, values, fmt=row)
    else:
        delimiter = " " if spec.separator == "whitespace" else spec.separator
        np.savetxt(out, values, fmt=number, delimiter=delimiter)
    return out.getvalue().encode("utf-8")


def _encode_binary(spec: FormatSpec, values: np.ndarray) -> bytes:
    dtype = spec.payload_dtype
    records = np.zeros(len(values), dtype=dtype)
    fields: Mapping[str, Any] = dtype.fields or {}
    for i, name in enumerate(dtype.names or ()):
        records[name] = cast_values(values[:, i].astype(np.float64), fields[name][0])
    payload = records.view(np.uint8).reshape(len(values), dtype.itemsize)
    parts = [np.broadcast_to(np.frombuffer(spec.sync, np.uint8), (len(values), len(spec.sync)))]
    parts.append(payload)
    if spec.checksum == "xor8":
        parts.append(np.bitwise_xor.reduce(payload, axis=1).reshape(-1, 1))
    elif spec.checksum == "sum8":
        parts.append((payload.sum(axis=1, dtype=np.uint64) & 0xFF).astype(np.uint8)[:, None])
    if spec.end:
        parts.append(
            np.broadcast_to(np.frombuffer(spec.end, np.uint8), (len(values), len(spec.end)))
        )
    return np.concatenate(parts, axis=1).tobytes()


class PtySerialWriter:
    """A pseudo-terminal that looks like a serial device and sends frames' samples.

    Open it, point a serial reader (the serial driver, pyserial, a terminal program) at
    :attr:`path`, and write frames: they are encoded in ``fmt`` (the same ``format``
    object as a ``drivers.serial`` device; CSV lines by default). Writes never block:
    while no one reads, the terminal buffers a few KiB and the rest is dropped and
    counted in :attr:`bytes_dropped`, like a device that keeps sending into a closed port.

    Args:
        fmt: the format section (``{"type": "lines", "separator": ","}`` by default).
        max_pending: bytes held for a slow reader before they are dropped.
    """

    def __init__(self, fmt: Mapping[str, Any] | None = None, *, max_pending: int = 1 << 16):
        self.fmt = dict(fmt) if fmt is not None else {"type": "lines"}
        self.max_pending = max_pending
        self.path = ""
        self.bytes_written = 0
        self.bytes_dropped = 0
        self.frames_written = 0
        self._master = -1
        self._slave = -1
        self._pending = b""
        self._spec: FormatSpec | None = None
        self._channels: list[str] = []

    def __enter__(self) -> PtySerialWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> str:
        """Create the pseudo-terminal; returns the path to read from (its slave side)."""
        if self._master >= 0:
            return self.path
        master, slave = os.openpty()
        # Raw mode: no echo and no line editing, so bytes pass through unchanged, as on a
        # real serial line. The slave end stays open here so the terminal (and its raw
        # settings) outlives readers that come and go.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.path = os.ttyname(slave)
        return self.path

    def close(self) -> None:
        """Close both ends; readers then get an I/O error, as on an unplugged device."""
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def spec_for(self, channels: Sequence[str]) -> FormatSpec:
        """The validated format for these channels (checked once, then reused)."""
        if self._spec is None or list(channels) != self._channels:
            self._spec = parse_format(self.fmt, "format", list(channels))
            self._channels = list(channels)
        return self._spec

    def write(self, values: np.ndarray, channels: Sequence[str]) -> int:
        """Encode and send samples ``(n, channels)``; returns the bytes sent now."""
        return self.write_bytes(encode_samples(self.spec_for(channels), channels, values))

    def write_frame(self, frame: Frame) -> int:
        """Send one frame's samples."""
        sent = self.write(frame.values, frame.channels)
        self.frames_written += 1
        return sent

    def write_bytes(self, data: bytes) -> int:
        """Send raw bytes (after whatever is still pending); returns the bytes sent now."""
        if self._master < 0:
            raise RuntimeError("the pseudo-terminal is not open")
        self._pending += data
        sent = 0
        while self._pending:
            try:
                n = os.write(self._master, self._pending)
            except BlockingIOError:
                break
            sent += n
            self._pending = self._pending[n:]
        self.bytes_written += sent
        if len(self._pending) > self.max_pending:  # no one is reading: drop it all
            self.bytes_dropped += len(self._pending)
            self._pending = b""
        return sent

    def unread(self) -> int:
        """Bytes not yet taken by a reader: still pending here, or in the terminal."""
        if self._slave < 0:
            return len(self._pending)
        queued = fcntl.ioctl(self._slave, termios.FIONREAD, b"\0\0\0\0")
        return len(self._pending) + struct.unpack("i", queued)[0]

    async def drain(self, idle_s: float = DRAIN_IDLE_S) -> bool:
        """Wait until a reader has taken everything sent; returns whether it did.

        Closing the terminal discards what its reader has not read yet (the reader gets
        an I/O error instead), so the end of a stream waits for this first. Gives up once
        nothing is taken for ``idle_s``: no one is reading.
        """
        clock = asyncio.get_running_loop().time
        last, changed, empty_since = -1, clock(), None
        while self._master >= 0:
            if self._pending:
                self.write_bytes(b"")  # what did not fit the terminal before
            left, now = self.unread(), clock()
            if left:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since >= DRAIN_SETTLE_S:
                return True
            if left != last:
                last, changed = left, now
            elif left and now - changed >= idle_s:
                return False
            await asyncio.sleep(0.005)
        return False

    def device_config(
        self,
        channels: Sequence[str],
        *,
        rate: float = 0.0,
        dtype: str = "f32",
        stream: str = "data",
    ) -> dict[str, Any]:
        """A ``drivers.serial.devices.<id>`` entry that reads this pseudo-terminal."""
        spec = self.spec_for(channels)
        return {
            "port": self.path,
            "stream": stream,
            "channels": list(channels),
            "dtype": dtype,
            "rate": rate,
            "format": spec.to_dict(channels),
        }

    async def serve(self, frames: AsyncIterator[Frame] | asyncio.Queue[Any]) -> int:
        """Write frames until the iterator ends or the queue yields END_OF_STREAM.

        Non-frame items on a queue (status items) are skipped; an error item ends it.
        At the end, waits (:meth:`drain`) for the reader to take what was sent.
        Returns the number of frames written.
        """
        if isinstance(frames, asyncio.Queue):
            while True:
                item = await frames.get()
                if item is END_OF_STREAM or isinstance(item, StreamError):
                    break
                if isinstance(item, Frame):
                    self.write_frame(item)
        else:
            async for frame in frames:
                self.write_frame(frame)
        await self.drain()
        return self.frames_written


async def serve_stream_on_pty(
    frames: AsyncIterator[Frame] | asyncio.Queue[Any],
    fmt: Mapping[str, Any] | None = None,
    *,
    on_open: Callable[[PtySerialWriter], Any] | None = None,
) -> PtySerialWriter:
    """Present a stream of frames as a serial device on a new pseudo-terminal.

    Args:
        frames: frames to send: an async iterator, or a sink queue ending with
            END_OF_STREAM (what ``proxy_live_stream`` fills).
        fmt: the serial ``format`` to write (CSV lines by default).
        on_open: called with the writer once its :attr:`~PtySerialWriter.path` exists
            (e.g. to print it); by default the path is printed to stderr.

    Returns:
        The (closed) writer, with its byte and frame counts.
    """
    writer = PtySerialWriter(fmt)
    with writer:
        if on_open is None:
            print(f"serial device: {writer.path}", file=sys.stderr, flush=True)
        else:
            on_open(writer)
        await writer.serve(frames)
    return writer
