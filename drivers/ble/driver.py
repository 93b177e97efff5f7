"""The BLE driver: configured devices, heart-rate sensors found by scanning, links."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError

from ...errors import DeviceError, DeviceLost, NotFound
from ...framing import Framing
from ...model import Node, Stream
from ..base import Driver, DriverStatus, Source
from .link import BACKSTOP_S, DISCONNECT_TIMEOUT_S, _Link, _reason, _scan_failure, _Seen
from .options import BleOptions, DeviceSpec, _address_key, heart_rate_streams, scanned_node_id
from .source import BleSource

log = logging.getLogger(__name__)

# What to check when scanning fails (docs/operations.md, "Doctor").
BLE_FIX = (
    "check the adapter (bluetoothctl show; rfkill unblock bluetooth), that bluetoothd "
    "runs (systemctl status bluetooth) and that the agent's user is in group bluetooth"
)


# -- the driver ------------------------------------------------------------------------------


class BleDriver(Driver):
    """Configured BLE devices plus heart-rate sensors found by scanning.

    Args:
        options: the validated ``drivers.ble`` options.
    """

    name = "ble"

    def __init__(self, options: BleOptions | None = None) -> None:
        self.options = options or BleOptions()
        self.adapter_lock = asyncio.Lock()  # one scan or connect at a time
        self._links: dict[str, _Link] = {}  # by address key
        self._seen: dict[str, _Seen] = {}  # the last scan, by address key
        self._scanned_at: float | None = None  # monotonic start of the last finished scan
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_failed = False
        self._scan_problem = ""  # the last scan's failure, for status()
        self._known: dict[str, DeviceSpec] = {}  # every scanned device ever listed
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        configured = {_address_key(d.address) for d in self.options.devices.values()}
        self._configured_addresses = configured

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> BleDriver:
        """From the ``drivers.ble`` config section.

        Raises:
            ConfigError: an unknown key or a bad value (the message names the key).
        """
        return cls(BleOptions.parse(options))

    async def aclose(self) -> None:
        """Stop scanning, disconnect every device and wait (bounded) for the disconnects."""
        self._closed = True
        if self._scan_task is not None:
            self._scan_task.cancel()
            await asyncio.wait({self._scan_task})
        for link in self._links.values():
            link.close()
        if self._background:
            await asyncio.wait(set(self._background), timeout=DISCONNECT_TIMEOUT_S + BACKSTOP_S)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run background work (a disconnect) that aclose waits for."""
        # Keep a reference: the loop holds tasks weakly.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def link(self, address: str) -> _Link:
        """The shared connection to the device at ``address`` (made on first use)."""
        if self._closed:
            # Not DeviceLost: a task must end here, not reconnect behind a closed driver.
            raise DeviceError("the BLE driver is closed")
        key = _address_key(address)
        if key not in self._links:
            self._links[key] = _Link(self, address)
        return self._links[key]

    # -- scanning ------------------------------------------------------------------------

    async def _scan(self) -> None:
        started = time.monotonic()
        try:
            async with self.adapter_lock:
                started = time.monotonic()
                async with asyncio.timeout(self.options.scan_s + BACKSTOP_S):
                    found = await BleakScanner.discover(
                        timeout=self.options.listen_s, return_adv=True
                    )
            self._scan_failed, self._scan_problem = False, ""
        except Exception as exc:  # no adapter, BlueZ not running, no permission...
            # Say it once, not at every listing; loudly only if BLE devices are configured,
            # since with drivers.enabled "auto" BLE may simply not be part of this setup.
            loud = logging.WARNING if self.options.devices else logging.INFO
            level = logging.DEBUG if self._scan_failed else loud
            log.log(level, "BLE scan failed: %s", _scan_failure(exc))
            self._scan_failed, found = True, {}
            self._scan_problem = f"BLE scan failed: {_reason(exc)}"
        finally:
            self._scan_task = None
        self._seen = {
            _address_key(address): _Seen(device, adv, started)
            for address, (device, adv) in found.items()
        }
        self._scanned_at = started

    async def _scanned_devices(self) -> list[DeviceSpec]:
        """Heart-rate devices nearby, from a scan at most ``scan_s`` old when possible."""
        if not self.options.scan:
            return []
        now = time.monotonic()
        stale = self._scanned_at is None or now - self._scanned_at >= self.options.scan_s
        if stale and self._scan_task is None:
            self._scan_task = asyncio.get_running_loop().create_task(self._scan())
        if self._scanned_at is None and self._scan_task is not None:
            # Nothing to show yet: wait for the first scan, but never longer than scan_s.
            await asyncio.wait({self._scan_task}, timeout=self.options.scan_s)
        visible: dict[str, DeviceSpec] = {}
        for key, seen in self._seen.items():
            if seen.heart_rate and key not in self._configured_addresses:
                spec = self._remember(seen)
                visible[spec.id] = spec
        # A connected sensor stops advertising: keep it listed while we hold it.
        for key, link in self._links.items():
            held = next((d for d in self._known.values() if _address_key(d.address) == key), None)
            if held is not None and link.connected:
                visible[held.id] = held
        return [visible[k] for k in sorted(visible)]

    def _remember(self, seen: _Seen) -> DeviceSpec:
        address = seen.device.address
        spec = DeviceSpec(
            id=scanned_node_id(address),
            address=address,
            profile="heart_rate",
            streams=heart_rate_streams(),
            name=seen.adv.local_name or seen.device.name or address,
            scanned=True,
        )
        self._known[spec.id] = spec
        return spec

    async def find(self, address: str) -> BLEDevice:
        """The device to connect to: from the last scan if fresh, else a targeted scan.

        Called with the adapter lock held.

        Raises:
            DeviceLost: nothing with this address advertises within ``scan_s``.
        """
        seen = self._seen.get(_address_key(address))
        if seen is not None and time.monotonic() - seen.at < self.options.scan_s:
            return seen.device
        scan_s = self.options.scan_s
        try:
            async with asyncio.timeout(scan_s + BACKSTOP_S):
                device = await BleakScanner.find_device_by_address(address, timeout=scan_s)
        except (BleakError, TimeoutError, OSError) as exc:
            raise DeviceLost(f"cannot scan for BLE device {address}: {_reason(exc)}") from exc
        if device is None:
            raise DeviceLost(
                f"BLE device {address} not found: no advertisement within {scan_s:g} s "
                "(off, out of range, or connected to another host)"
            )
        return device

    # -- the Driver interface --------------------------------------------------------------

    def _device(self, node_id: str) -> DeviceSpec:
        device = self.options.devices.get(node_id) or self._known.get(node_id)
        if device is None:
            known = sorted([*self.options.devices, *self._known])
            raise NotFound(f"no BLE node {node_id!r}; BLE nodes: {known or 'none'}")
        return device

    def status(self) -> DriverStatus:
        # Scans repeat on every listing, so an adapter plugged in later clears this.
        if self._scan_problem:
            return DriverStatus(self.name, "degraded", self._scan_problem, BLE_FIX)
        return DriverStatus(self.name)

    async def list_nodes(self) -> list[Node]:
        scanned = await self._scanned_devices()
        return [d.to_node() for d in [*self.options.devices.values(), *scanned]]

    async def list_streams(self, node_id: str) -> list[Stream]:
        device = self._device(node_id)
        return [spec.to_stream(device) for spec in device.streams.values()]

    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        # Devices listed once stay openable: after a loss the task reopens them by id, and
        # the source raises DeviceLost until the device is back.
        device = self._device(node_id)
        spec = device.streams.get(stream_id)
        if spec is None:
            streams = sorted(device.streams)
            raise NotFound(f"BLE node {node_id!r} has no stream {stream_id!r}; streams: {streams}")
        return BleSource(self, device, spec)
