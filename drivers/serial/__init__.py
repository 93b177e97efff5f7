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

from .driver import SerialDriver
from .formats import CHECKSUMS, FORMAT_TYPES, FormatSpec, parse_format, struct_dtype
from .options import CONFIG_PATH, DeviceSpec, parse_device, parse_options
from .parsers import (
    BinaryParser,
    KeyValueParser,
    LineParser,
    MarkerLineParser,
    Parser,
    ParseStats,
    make_parser,
)
from .pty import PtySerialWriter, encode_samples, serve_stream_on_pty
from .source import MAX_QUEUED_CHUNKS, SerialSource

__all__ = [
    "CHECKSUMS",
    "CONFIG_PATH",
    "FORMAT_TYPES",
    "MAX_QUEUED_CHUNKS",
    "BinaryParser",
    "DeviceSpec",
    "FormatSpec",
    "KeyValueParser",
    "LineParser",
    "MarkerLineParser",
    "ParseStats",
    "Parser",
    "PtySerialWriter",
    "SerialDriver",
    "SerialSource",
    "encode_samples",
    "make_parser",
    "parse_device",
    "parse_format",
    "parse_options",
    "serve_stream_on_pty",
    "struct_dtype",
]
