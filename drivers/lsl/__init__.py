"""LSL: every Lab Streaming Layer outlet on the network is a live stream.

Discovery runs in the background with a :class:`pylsl.ContinuousResolver`, started on
first use and closed by :meth:`LslDriver.aclose`. Outlets are grouped into one node per
host (``lsl-<hostname>``); each outlet is a stream named after the outlet. The channel
labels and units come from the outlet's full description (``desc/channels/channel``),
fetched once per outlet; odd or missing descriptions fall back to ``ch0, ch1, ...``.

Proxying opens a :class:`pylsl.StreamInlet` owned by one reader thread per source. The
thread pulls chunks into a preallocated numpy buffer and hands copies to the event loop
with ``loop.call_soon_threadsafe``. Timestamps are on this machine's LSL clock
(``pylsl.local_clock()``): the inlet applies the time correction (``proc_clocksync``).

An outlet that vanishes raises :class:`~streaminghub_datamux.errors.DeviceLost`; the task
retries and resumes when an outlet with the same ``source_id`` (or, without one, the same
name on the same host) is back. See docs/drivers.md, section "LSL".
"""

from .driver import LslDriver
from .liblsl import LSL_DTYPES, PROCESSING_FLAGS, pylsl
from .options import LslOptions, safe_id
from .outlets import describe_channels
from .source import LslSource

__all__ = [
    "LSL_DTYPES",
    "PROCESSING_FLAGS",
    "LslDriver",
    "LslOptions",
    "LslSource",
    "describe_channels",
    "pylsl",
    "safe_id",
]
