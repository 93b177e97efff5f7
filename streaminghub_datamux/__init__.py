"""streaminghub-datamux: stream sensor data as numpy frames, locally or over MQTT.

Quick start::

    import asyncio, streaminghub_datamux as dm

    async def main():
        api = dm.API()
        sink = asyncio.Queue()
        ack = await api.proxy_live_stream("demo", "eeg", {}, sink)
        async for frame in dm.frames(sink):
            print(frame.seq, frame.values.shape)
"""

from . import errors, util
from .api import API
from .client import RemoteAPI
from .framing import Framing
from .model import (
    Collection,
    Field,
    Frame,
    Group,
    Node,
    Stream,
    StreamAck,
    StreamError,
    StreamStatus,
)
from .recording import record
from .util import END_OF_STREAM, frames

__version__ = "0.1.0"

__all__ = [
    "API",
    "END_OF_STREAM",
    "Collection",
    "Field",
    "Frame",
    "Framing",
    "Group",
    "Node",
    "RemoteAPI",
    "Stream",
    "StreamAck",
    "StreamError",
    "StreamStatus",
    "__version__",
    "errors",
    "frames",
    "record",
    "util",
]
