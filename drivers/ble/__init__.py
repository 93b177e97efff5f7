"""Bluetooth Low Energy: heart-rate straps and custom GATT devices as live nodes.

Devices come from two places. Every device declared in ``drivers.ble.devices`` is a node
named after its config key. With ``scan`` on, listing also shows the devices a
:class:`bleak.BleakScanner` hears advertising the Heart Rate service (0x180D), as nodes
``ble-<address without colons, lower case>``.

Two profiles are built in:

- ``heart_rate``: the Bluetooth SIG Heart Rate Service. The Heart Rate Measurement
  characteristic (0x2A37) gives two irregular streams: ``hr`` (channel ``bpm``, f32) and
  ``rr`` (channel ``rr``, f64 seconds, one sample per RR interval).
- ``custom``: one notifying characteristic whose payload is a whole number of samples,
  each laid out as a :mod:`struct` format (``"<hhh"``), optionally scaled per channel.

This process owns the adapter: one :class:`bleak.BleakClient` per device, shared by every
source on that device (reference counted), so a second task on the same device reuses
the connection and both get every notification. One :class:`asyncio.Lock` serialises
scans and connects, which BlueZ handles badly when they overlap. Every await on bleak
has a timeout; a device that drops raises
:class:`~streaminghub_datamux.errors.DeviceLost` at the source's next wait, so the task
reports it and reconnects with backoff. See docs/drivers.md, section "BLE devices".
"""

from .decoders import (
    HEART_RATE_MEASUREMENT,
    HEART_RATE_SERVICE,
    HeartRate,
    StructDecoder,
    parse_heart_rate,
    rr_timestamps,
)
from .driver import BleDriver
from .options import (
    BleOptions,
    DeviceSpec,
    StreamSpec,
    heart_rate_streams,
    parse_device,
    scanned_node_id,
)
from .source import CLOCK_SLACK_S, MAX_PENDING_CHUNKS, BleSource

__all__ = [
    "CLOCK_SLACK_S",
    "HEART_RATE_MEASUREMENT",
    "HEART_RATE_SERVICE",
    "MAX_PENDING_CHUNKS",
    "BleDriver",
    "BleOptions",
    "BleSource",
    "DeviceSpec",
    "HeartRate",
    "StreamSpec",
    "StructDecoder",
    "heart_rate_streams",
    "parse_device",
    "parse_heart_rate",
    "rr_timestamps",
    "scanned_node_id",
]
