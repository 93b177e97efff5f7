"""The serial driver's former module: its names now live in :mod:`.serial` (a package).

Kept so that ``streaminghub_datamux.drivers.serialport`` imports keep working.
"""

from .serial import (
    CONFIG_PATH,
    MAX_QUEUED_CHUNKS,
    DeviceSpec,
    PtySerialWriter,
    SerialDriver,
    SerialSource,
    parse_device,
    parse_options,
    serve_stream_on_pty,
)
from .serial.driver import list_ports
from .serial.reader import _open_port

__all__ = [
    "CONFIG_PATH",
    "MAX_QUEUED_CHUNKS",
    "DeviceSpec",
    "PtySerialWriter",
    "SerialDriver",
    "SerialSource",
    "_open_port",
    "list_ports",
    "parse_device",
    "parse_options",
    "serve_stream_on_pty",
]
