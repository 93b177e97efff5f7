"""Serial byte formats' former module: its names now live in :mod:`.serial` (a package).

Kept so that ``streaminghub_datamux.drivers.serialframes`` imports keep working.
"""

from ..sampleclock import SampleClock
from .serial import (
    CHECKSUMS,
    FORMAT_TYPES,
    BinaryParser,
    FormatSpec,
    KeyValueParser,
    LineParser,
    MarkerLineParser,
    Parser,
    ParseStats,
    PtySerialWriter,
    encode_samples,
    make_parser,
    parse_format,
    serve_stream_on_pty,
    struct_dtype,
)

__all__ = [
    "CHECKSUMS",
    "FORMAT_TYPES",
    "BinaryParser",
    "FormatSpec",
    "KeyValueParser",
    "LineParser",
    "MarkerLineParser",
    "ParseStats",
    "Parser",
    "PtySerialWriter",
    "SampleClock",
    "encode_samples",
    "make_parser",
    "parse_format",
    "serve_stream_on_pty",
    "struct_dtype",
]
