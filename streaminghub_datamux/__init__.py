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

import os as _os


def _use_checkout_subpackages() -> None:
    """Let a source checkout's folder work as the package, whatever is installed.

    pyproject installs agent/, client/ and drivers/ (beside this folder in a checkout) as
    sub-packages. When Python imports this folder straight from a checkout, e.g.
    ``python -m streaminghub_datamux`` in the checkout's root with a regular (not
    editable) install, they are not inside it: look for them beside it as well.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isdir(_os.path.join(here, "drivers")):
        return  # an installed package: its sub-packages are inside it
    names = ("agent", "client", "drivers")
    if _os.path.isfile(_os.path.join(root, "pyproject.toml")) and all(
        _os.path.isfile(_os.path.join(root, name, "__init__.py")) for name in names
    ):
        __path__.append(root)


_use_checkout_subpackages()

from . import errors, util  # noqa: E402
from .api import API  # noqa: E402
from .client import RemoteAPI  # noqa: E402
from .framing import Framing  # noqa: E402
from .interface import DatamuxAPI  # noqa: E402
from .model import (  # noqa: E402
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
from .recording import record  # noqa: E402
from .util import END_OF_STREAM, frames  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "API",
    "END_OF_STREAM",
    "Collection",
    "DatamuxAPI",
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
