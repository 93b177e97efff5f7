"""One shared connection per device: connect once, subscribe and fan notifications out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakCharacteristicNotFoundError, BleakError

from ...errors import DeviceError, DeviceLost
from .decoders import HEART_RATE_SERVICE

if TYPE_CHECKING:  # the driver imports this module
    from .driver import BleDriver

log = logging.getLogger(__name__)

try:  # bleak >= 3.0
    from bleak.exc import BleakGATTProtocolError
except ImportError:  # pragma: no cover - older bleak
    _GATT_PROTOCOL_ERRORS: tuple[type[BaseException], ...] = ()
else:
    _GATT_PROTOCOL_ERRORS = (BleakGATTProtocolError,)

NOTIFY_TIMEOUT_S = 5.0  # start_notify / stop_notify
DISCONNECT_TIMEOUT_S = 5.0
# bleak's own timeouts (scan, connect) end their work; ours are a backstop a little
# later, for a backend that does not honour them.
BACKSTOP_S = 2.0
# -- the shared connection -----------------------------------------------------------------


class _Listener(Protocol):
    def deliver(self, data: bytes, arrival: float) -> None: ...

    def lost(self, reason: str) -> None: ...


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _scan_failure(exc: BaseException) -> str:
    """Why a scan failed, in words that point at the fix."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        # bleak's BlueZ backend talks to the D-Bus system bus socket; on a machine without
        # D-Bus (a container, a minimal install) connecting to it fails like this.
        return (
            "no BlueZ/D-Bus on this machine (the D-Bus system bus is not running); install "
            "and start bluez and dbus, or leave 'ble' out of drivers.enabled"
        )
    return _reason(exc)


async def _disconnect_quietly(client: BleakClient) -> None:
    """Disconnect, bounded; failures only matter to the log (the link is gone anyway)."""
    try:
        async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
            await client.disconnect()
    except (BleakError, TimeoutError, OSError) as exc:
        log.debug("BLE disconnect of %s: %s", client, _reason(exc))


@dataclass(frozen=True)
class _Seen:
    """A device heard by the last scan."""

    device: BLEDevice
    adv: AdvertisementData
    at: float  # monotonic time of the scan that heard it

    @property
    def heart_rate(self) -> bool:
        return HEART_RATE_SERVICE in (u.lower() for u in self.adv.service_uuids)


class _Link:
    """One device's connection, shared by every source on it.

    ``users`` counts the sources holding it; the last to leave disconnects. The notify
    callbacks fan out to every listener of their characteristic. A disconnect (bleak's
    callback, or a check that finds the client gone) tells every listener once and
    forgets the client; the next :meth:`acquire` connects again.
    """

    def __init__(self, driver: BleDriver, address: str) -> None:
        self.driver = driver
        self.address = address
        self.client: BleakClient | None = None
        self.users = 0
        self.generation = 0  # bumped whenever the client goes: stale callbacks are ignored
        self._listeners: dict[str, set[_Listener]] = {}
        self._notify_lock = asyncio.Lock()
        self._closing: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def acquire(self) -> None:
        """Count one more user and make sure the device is connected.

        Raises:
            DeviceLost: the device was not found or the connection failed.
        """
        self.users += 1
        try:
            await self._ensure_connected()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Count one user less; the last one disconnects (in the background)."""
        self.users = max(self.users - 1, 0)
        if self.users == 0 and (client := self.client) is not None:
            self._forget_client()
            self._closing = self.driver.spawn(_disconnect_quietly(client))

    async def _ensure_connected(self) -> None:
        if self._closing is not None:  # let the previous disconnect finish first
            await asyncio.wait({self._closing})
            self._closing = None
        async with self.driver.adapter_lock:
            if self.connected:
                return
            if self.client is not None:  # gone without telling us
                self._drop("connection lost")
            device = await self.driver.find(self.address)
            await self._connect(device)

    async def _connect(self, device: BLEDevice) -> None:
        timeout = self.driver.options.connect_timeout_s
        client: BleakClient | None = None
        try:
            client = BleakClient(device, disconnected_callback=self._on_disconnect, timeout=timeout)
            async with asyncio.timeout(timeout + BACKSTOP_S):
                await client.connect()
        except (BleakError, TimeoutError, OSError) as exc:
            if client is not None:
                await _disconnect_quietly(client)
            raise DeviceLost(
                f"cannot connect to BLE device {self.address}: {_reason(exc)}"
            ) from exc
        except BaseException:
            # Cancelled mid-connect (the task stopped): do not leave a half-open link.
            if client is not None:
                self.driver.spawn(_disconnect_quietly(client))
            raise
        self.client = client
        self.generation += 1
        log.info("BLE device %s connected", self.address)

    def _forget_client(self) -> BleakClient | None:
        client, self.client = self.client, None
        self.generation += 1
        self._listeners.clear()
        return client

    def _drop(self, reason: str, level: int = logging.WARNING) -> BleakClient | None:
        """The connection is gone: tell every listener once, forget the client."""
        listeners = [x for group in self._listeners.values() for x in group]
        client = self._forget_client()
        log.log(level, "BLE device %s: %s", self.address, reason)
        for listener in listeners:
            listener.lost(f"BLE device {self.address}: {reason}")
        return client

    def _on_disconnect(self, client: BleakClient) -> None:
        # bleak calls this on the event loop, also after our own disconnect(): only the
        # current client's loss matters.
        if client is self.client:
            self._drop("disconnected")

    def check(self) -> None:
        """Notice a client that is gone without a disconnect event."""
        if self.client is not None and not self.client.is_connected:
            self._drop("connection lost")

    def _notifier(
        self, characteristic: str
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        generation = self.generation

        def on_notify(sender: BleakGATTCharacteristic, data: bytearray) -> None:
            # bleak runs this on the event loop. One arrival time for every listener, so
            # streams fed by one notification (hr and rr) agree.
            if generation != self.generation:
                return
            arrival = time.time()
            payload = bytes(data)
            for listener in list(self._listeners.get(characteristic, ())):
                listener.deliver(payload, arrival)

        return on_notify

    async def subscribe(self, characteristic: str, listener: _Listener) -> int:
        """Deliver the characteristic's notifications to ``listener`` (start_notify once).

        Returns:
            The link's generation the listener is subscribed under: once the link's
            generation differs (or it has no client), the listener has lost the device.

        Raises:
            DeviceLost: not connected, disconnected while subscribing, or start_notify
                failed or timed out.
            DeviceError: the device has no such characteristic, it can neither notify nor
                indicate, or the device refused (a GATT protocol error such as missing
                authentication): retrying will not help.
        """
        async with self._notify_lock:
            client = self.client
            generation = self.generation
            if client is None or not client.is_connected:
                raise DeviceLost(f"BLE device {self.address} disconnected")
            listeners = self._listeners.get(characteristic)
            if listeners is None:
                target = self._notify_target(client, characteristic)
                try:
                    async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                        await client.start_notify(target, self._notifier(characteristic))
                except BleakCharacteristicNotFoundError as exc:
                    raise DeviceError(
                        f"BLE device {self.address} has no characteristic {characteristic}"
                    ) from exc
                except _GATT_PROTOCOL_ERRORS as exc:
                    raise DeviceError(
                        f"BLE device {self.address} refused notifications of "
                        f"{characteristic}: {_reason(exc)}"
                    ) from exc
                except (BleakError, TimeoutError, OSError) as exc:
                    raise DeviceLost(
                        f"BLE device {self.address}: cannot subscribe to {characteristic}: "
                        f"{_reason(exc)}"
                    ) from exc
                # The disconnect callback may have run while start_notify was pending
                # (BlueZ can deliver both in one loop iteration): then the listeners were
                # already told and forgotten, and this one would wait forever.
                if self.client is not client or self.generation != generation:
                    raise DeviceLost(f"BLE device {self.address}: disconnected")
                if not client.is_connected:
                    self._drop("connection lost")
                    raise DeviceLost(f"BLE device {self.address}: connection lost")
                listeners = self._listeners[characteristic] = set()
            listeners.add(listener)
            return generation

    def _notify_target(self, client: BleakClient, characteristic: str) -> Any:
        """The characteristic to pass to start_notify, checked for notify or indicate.

        Raises:
            DeviceError: the device has no such characteristic (or several), or it can
                neither notify nor indicate.
        """
        try:
            services = client.services
        except BleakError:  # not discovered yet: let start_notify find it
            return characteristic
        try:
            found = services.get_characteristic(characteristic)
        except BleakError as exc:  # several with this UUID
            raise DeviceError(f"BLE device {self.address}: {_reason(exc)}") from exc
        if found is None:
            raise DeviceError(f"BLE device {self.address} has no characteristic {characteristic}")
        if not {"notify", "indicate"} & set(found.properties):
            raise DeviceError(
                f"BLE device {self.address}: characteristic {characteristic} can neither "
                f"notify nor indicate (properties: {', '.join(found.properties) or 'none'})"
            )
        return found

    def alive(self, generation: int) -> bool:
        """Whether a listener subscribed under ``generation`` still has its connection."""
        self.check()
        return self.client is not None and self.generation == generation

    async def unsubscribe(self, characteristic: str, listener: _Listener) -> None:
        """Stop delivering to ``listener``; the last listener stops notifications."""
        async with self._notify_lock:
            listeners = self._listeners.get(characteristic)
            if listeners is None or listener not in listeners:
                return  # after a disconnect: nothing is subscribed any more
            listeners.discard(listener)
            if listeners:
                return
            del self._listeners[characteristic]
            client = self.client
            if client is None or not client.is_connected:
                return
            try:
                async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                    await client.stop_notify(characteristic)
            except (BleakError, TimeoutError, OSError) as exc:
                log.debug("BLE device %s: stop_notify: %s", self.address, _reason(exc))

    def close(self) -> None:
        """Disconnect now, whoever still uses the link (the driver is closing)."""
        client = self._drop("driver closed", logging.INFO) if self.client is not None else None
        if client is not None:
            self._closing = self.driver.spawn(_disconnect_quietly(client))
