"""The BLE driver against fakes of bleak's BleakScanner and BleakClient.

Only the two classes the driver looks up (``drivers.ble.driver.BleakScanner`` and
``drivers.ble.link.BleakClient``) are replaced; everything else is bleak's own: the fakes
hand out real ``BLEDevice``, ``AdvertisementData`` and ``BleakGATTCharacteristic``
objects and raise bleak's exceptions. The fakes follow bleak 3.x: ``discover(timeout,
return_adv=True)`` scans for ``timeout`` seconds, ``find_device_by_address`` returns None
after ``timeout``, notify callbacks get ``(characteristic, bytearray)``, and the
disconnected callback gets the client, also after a deliberate ``disconnect()``.

A :class:`FakeAir` holds the peripherals in range; tests power them on and off, drop
their connection, make connects fail and send notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from helpers import frames_of, run

import streaminghub_datamux as dm
from streaminghub_datamux.errors import ConfigError, DeviceError, NotFound
from streaminghub_datamux.model import StreamError, StreamStatus
from streaminghub_datamux.util import END_OF_STREAM

pytest.importorskip("bleak")
ble = pytest.importorskip("streaminghub_datamux.drivers.ble")

from bleak.backends.characteristic import BleakGATTCharacteristic  # noqa: E402
from bleak.backends.device import BLEDevice  # noqa: E402
from bleak.backends.scanner import AdvertisementData  # noqa: E402
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection  # noqa: E402
from bleak.exc import (  # noqa: E402
    BleakCharacteristicNotFoundError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)
from bleak.uuids import normalize_uuid_str  # noqa: E402

from streaminghub_datamux.drivers.ble import driver as ble_driver  # noqa: E402
from streaminghub_datamux.drivers.ble import link as ble_link  # noqa: E402
from streaminghub_datamux.drivers.ble import source as ble_source  # noqa: E402

HRS = ble.HEART_RATE_SERVICE
HRM = ble.HEART_RATE_MEASUREMENT
STRAP = "C0:FF:EE:00:00:01"
OTHER_STRAP = "C0:FF:EE:00:00:02"
THERMOMETER = "C0:FF:EE:00:00:03"
IMU = "C0:FF:EE:00:00:04"
IMU_SERVICE = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
IMU_DATA = "6e400003-b5a3-f393-e0a9-e50e24dcca9e"
WAIT_S = 15.0  # a bound on waits for what must come: room for a loaded machine


# -- the fakes -----------------------------------------------------------------------------


class FakePeripheral:
    """A device in range: its GATT table, and whether it is on."""

    def __init__(self, address: str, name: str, characteristics: dict[str, str]) -> None:
        self.address = address
        self.name = name
        self.characteristics = characteristics  # characteristic uuid -> service uuid
        self.powered = True
        self.fail_connects = 0  # this many next connects fail with a BleakError
        self.properties: dict[str, list[str]] = {}  # per characteristic; default ["notify"]
        self.notify_error: Exception | None = None  # start_notify raises this
        self.drop_on_subscribe = 0  # this many next start_notify calls lose the link

    @property
    def services(self) -> list[str]:
        return sorted(set(self.characteristics.values()))


class FakeAir:
    """Every peripheral in range and every client made, for one test."""

    def __init__(self) -> None:
        self.peripherals: dict[str, FakePeripheral] = {}
        self.clients: list[FakeClient] = []
        self.scans = 0
        self.finds = 0
        self.scan_error: Exception | None = None
        self.scan_startup_s = 0.0  # extra time a scan takes on top of its timeout

    def add(self, address: str, name: str, characteristics: dict[str, str]) -> FakePeripheral:
        self.peripherals[address] = FakePeripheral(address, name, characteristics)
        return self.peripherals[address]

    def connected(self, address: str) -> list[FakeClient]:
        return [c for c in self.clients if c.address == address and c.is_connected]

    def advertising(self, address: str) -> bool:
        # A connected sensor stops advertising, as heart-rate straps do.
        peripheral = self.peripherals.get(address)
        return bool(peripheral and peripheral.powered and not self.connected(address))

    def subscribed(self, address: str, characteristic: str) -> bool:
        return any(characteristic in c.notifying for c in self.connected(address))

    def notify(self, address: str, characteristic: str, data: bytes) -> None:
        for client in self.connected(address):
            client.receive(characteristic, data)

    def drop(self, address: str) -> None:
        for client in self.connected(address):
            client.lose()

    def advertisement(self, peripheral: FakePeripheral) -> tuple[BLEDevice, AdvertisementData]:
        device = BLEDevice(peripheral.address, peripheral.name, None)
        adv = AdvertisementData(
            local_name=peripheral.name,
            manufacturer_data={},
            service_data={},
            service_uuids=peripheral.services,
            tx_power=None,
            rssi=-60,
            platform_data=(),
        )
        return device, adv


class FakeScanner:
    """``bleak.BleakScanner``: the two class methods the driver uses."""

    air: FakeAir

    @classmethod
    async def discover(cls, timeout: float = 5.0, *, return_adv: bool = False, **kwargs: Any):
        cls.air.scans += 1
        if cls.air.scan_error is not None:
            raise cls.air.scan_error
        await asyncio.sleep(timeout + cls.air.scan_startup_s)
        found = {
            p.address: cls.air.advertisement(p)
            for p in cls.air.peripherals.values()
            if cls.air.advertising(p.address)
        }
        return found if return_adv else [d for d, _ in found.values()]

    @classmethod
    async def find_device_by_address(
        cls, device_identifier: str, timeout: float = 10.0, **kwargs: Any
    ) -> BLEDevice | None:
        cls.air.finds += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in cls.air.peripherals.values():
                if p.address.lower() == device_identifier.lower() and cls.air.advertising(
                    p.address
                ):
                    return cls.air.advertisement(p)[0]
            await asyncio.sleep(0.01)
        return None


class FakeClient:
    """``bleak.BleakClient``: connect/disconnect, context manager, notifications."""

    air: FakeAir

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        disconnected_callback: Callable[[Any], None] | None = None,
        services: Any = None,
        *,
        timeout: float = 30,
        **kwargs: Any,
    ) -> None:
        device = address_or_ble_device
        self.address = device.address if isinstance(device, BLEDevice) else device
        self.timeout = timeout
        self._disconnected_callback = disconnected_callback
        self._connected = False
        self.notifying: dict[str, Callable[[bytearray], None]] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.air.clients.append(self)

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def __aenter__(self) -> FakeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.disconnect()

    async def connect(self, **kwargs: Any) -> None:
        await asyncio.sleep(0.005)
        peripheral = self.air.peripherals.get(self.address)
        if peripheral is None or not peripheral.powered:
            raise BleakDeviceNotFoundError(
                self.address, f"Device with address {self.address} was not found."
            )
        if peripheral.fail_connects:
            peripheral.fail_connects -= 1
            raise BleakError("[org.bluez.Error.Failed] le-connection-abort-by-local")
        self._connected = True

    async def disconnect(self) -> None:
        await asyncio.sleep(0)
        if self._connected:
            self.lose()  # bleak reports our own disconnects too

    def lose(self) -> None:
        """The link drops: bleak calls the disconnected callback with the client."""
        self._connected = False
        self.notifying.clear()
        if self._disconnected_callback is not None:
            self._disconnected_callback(self)

    @property
    def services(self) -> BleakGATTServiceCollection:
        if not self._connected:
            raise BleakError("Service Discovery has not been performed yet")
        peripheral = self.air.peripherals[self.address]
        collection = BleakGATTServiceCollection()
        handles: dict[str, int] = {}
        for uuid, service_uuid in peripheral.characteristics.items():
            if service_uuid not in handles:
                handles[service_uuid] = 100 * (len(handles) + 1)
                collection.add_service(BleakGATTService(None, handles[service_uuid], service_uuid))
            service = collection.get_service(service_uuid)
            handle = handles[service_uuid] + len(service.characteristics) + 1
            properties = peripheral.properties.get(uuid, ["notify"])
            collection.add_characteristic(
                BleakGATTCharacteristic(None, handle, uuid, properties, lambda: 20, service)
            )
        return collection

    def _characteristic(self, specifier: Any) -> BleakGATTCharacteristic:
        uuid = normalize_uuid_str(str(getattr(specifier, "uuid", specifier)))
        peripheral = self.air.peripherals[self.address]
        if uuid not in peripheral.characteristics:
            raise BleakCharacteristicNotFoundError(specifier)
        service = BleakGATTService(None, 1, peripheral.characteristics[uuid])
        properties = peripheral.properties.get(uuid, ["notify"])
        return BleakGATTCharacteristic(None, 3, uuid, properties, lambda: 20, service)

    async def start_notify(self, char_specifier: Any, callback: Any, **kwargs: Any) -> None:
        if not self._connected:
            raise BleakError("Not connected")
        characteristic = self._characteristic(char_specifier)
        await asyncio.sleep(0)
        peripheral = self.air.peripherals[self.address]
        if peripheral.notify_error is not None:
            raise peripheral.notify_error
        if not {"notify", "indicate"} & set(characteristic.properties):
            # What BlueZ answers for a characteristic that cannot notify.
            raise BleakError("[org.bluez.Error.NotSupported] Operation is not supported")
        # Like bleak: the backend calls back with the data only; the characteristic is bound.
        self.notifying[characteristic.uuid] = functools.partial(callback, characteristic)
        self.started.append(characteristic.uuid)
        if peripheral.drop_on_subscribe:
            # BlueZ can deliver the disconnect in the same loop iteration as the reply
            # to StartNotify: the callback has run by the time start_notify returns.
            peripheral.drop_on_subscribe -= 1
            self.lose()

    async def stop_notify(self, char_specifier: str) -> None:
        characteristic = self._characteristic(char_specifier)
        await asyncio.sleep(0)
        self.notifying.pop(characteristic.uuid, None)
        self.stopped.append(characteristic.uuid)

    def receive(self, characteristic: str, data: bytes) -> None:
        callback = self.notifying.get(characteristic)
        if callback is not None:
            callback(bytearray(data))


@pytest.fixture
def air(mocker) -> FakeAir:
    """Replace bleak's scanner and client where the driver looks them up."""
    world = FakeAir()
    scanner = type("BleakScanner", (FakeScanner,), {"air": world})
    mocker.patch.object(ble_driver, "BleakScanner", scanner)
    mocker.patch.object(ble_link, "BleakClient", type("BleakClient", (FakeClient,), {"air": world}))
    # Notice silent losses fast (the real check runs every second).
    mocker.patch.object(ble_source, "LIVENESS_CHECK_S", 0.05)
    world.add(STRAP, "Polar H10 1", {HRM: HRS})
    return world


# -- helpers ---------------------------------------------------------------------------------


def hr_only(bpm: int) -> bytes:
    """Flags 0x00: 8-bit heart rate, nothing else."""
    return bytes([0x00, bpm])


def hr_with_rr(bpm: int, *rr_1024: int) -> bytes:
    """Flags 0x10: 8-bit heart rate followed by RR intervals (1/1024 s)."""
    return bytes([0x10, bpm]) + b"".join(v.to_bytes(2, "little") for v in rr_1024)


def make_api(workspace, **options: Any) -> dm.API:
    ble_options = {"scan": False, "scan_s": 0.3, **options}
    return dm.API(workspace.config(**{"drivers.enabled": "ble", "drivers.ble": ble_options}))


def strap_config(**extra: Any) -> dict[str, Any]:
    return {"devices": {"chest": {"address": STRAP, **extra}}}


async def until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def take(sink: asyncio.Queue[Any], predicate: Callable[[list[Any]], bool]) -> list[Any]:
    """Items from the sink until ``predicate(items)`` holds (bounded in time)."""
    items: list[Any] = []
    async with asyncio.timeout(WAIT_S):
        while not predicate(items):
            items.append(await sink.get())
    return items


def samples(count: int) -> Callable[[list[Any]], bool]:
    return lambda items: sum(len(f) for f in frames_of(items)) >= count


def values_of(items: list[Any]) -> np.ndarray:
    return np.concatenate([f.values for f in frames_of(items)])


def stamps_of(items: list[Any]) -> np.ndarray:
    return np.concatenate([f.timestamps for f in frames_of(items)])


def statuses(items: list[Any]) -> list[str]:
    return [i.status for i in items if isinstance(i, StreamStatus)]


def reconnected(items: list[Any]) -> bool:
    return "reconnected" in statuses(items)


@contextlib.asynccontextmanager
async def strap_hr(workspace, **options: Any) -> AsyncIterator[tuple[dm.API, asyncio.Queue[Any]]]:
    """A local API proxying the strap's heart rate at low latency, and the task's sink."""
    async with make_api(workspace, **options, **strap_config()) as api:
        sink: asyncio.Queue[Any] = asyncio.Queue()
        await api.proxy_live_stream("chest", "hr", {}, sink, framing="low-latency")
        yield api, sink


def listening(api: dm.API, address: str, characteristic: str) -> int:
    """How many sources of the BLE driver listen to a device's characteristic now."""
    [driver] = api._drivers
    link = driver._links.get(address)
    return len(link._listeners.get(characteristic, ())) if link is not None else 0


async def send(air: FakeAir, address: str, characteristic: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        air.notify(address, characteristic, payload)
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def strap_recovered(
    workspace: Any,
) -> AsyncIterator[tuple[dm.API, asyncio.Queue[Any], list[Any]]]:
    """The strap's hr task once it has lost its connection and is back: (api, sink, the
    items up to "reconnected")."""
    async with strap_hr(workspace) as (api, sink):
        yield api, sink, await take(sink, reconnected)


async def strap_reading(air: FakeAir, sink: asyncio.Queue[Any], bpm: int) -> list[Any]:
    """Once the strap's heart rate is subscribed (again), send one reading; the items up
    to its sample."""
    await until(lambda: air.subscribed(STRAP, HRM))
    await send(air, STRAP, HRM, [hr_only(bpm)])
    return await take(sink, samples(1))


# -- through either API: the ``serve`` fixture (tests/conftest.py) runs a test against
# the local API and against a RemoteAPI served by an agent on the test's own loop.


# -- the Heart Rate Measurement, as a pure function ------------------------------------------


def test_heart_rate_8_bit():
    # Flags 0x00: uint8 heart rate, no contact support, no energy, no RR.
    assert ble.parse_heart_rate(bytes([0x00, 0x48])) == ble.HeartRate(bpm=72)


def test_heart_rate_16_bit_with_contact():
    # Flags 0x07: uint16 heart rate (0x0148 = 328), contact supported (bit 2) and detected.
    assert ble.parse_heart_rate(bytearray([0x07, 0x48, 0x01])) == ble.HeartRate(328, True)
    # Flags 0x04: contact supported but not detected.
    assert ble.parse_heart_rate(bytes([0x04, 0x48])).contact is False


def test_heart_rate_energy_expended_is_skipped_over():
    # Flags 0x18: energy expended (0x0110 = 272 kJ) then one RR interval of 0x0400/1024 s.
    measured = ble.parse_heart_rate(bytes([0x18, 0x50, 0x10, 0x01, 0x00, 0x04]))
    assert measured == ble.HeartRate(bpm=80, energy_kj=272, rr_s=(1.0,))


def test_heart_rate_several_rr_intervals():
    # Flags 0x19: uint16 heart rate 0x003C, energy 0x0005, RR 0x0300, 0x0320, 0x0340.
    data = bytes([0x19, 0x3C, 0x00, 0x05, 0x00, 0x00, 0x03, 0x20, 0x03, 0x40, 0x03])
    measured = ble.parse_heart_rate(data)
    assert measured.bpm == 60 and measured.energy_kj == 5
    assert measured.rr_s == (768 / 1024, 800 / 1024, 832 / 1024)
    # RR flag with no intervals (a sensor that has seen no beat since the last value).
    assert ble.parse_heart_rate(bytes([0x10, 0x3C])).rr_s == ()


def test_heart_rate_rejects_truncated_values():
    for data in (b"", b"\x00", b"\x01\x48", b"\x08\x48\x01", b"\x10\x48\x00\x04\x01"):
        with pytest.raises(ValueError):
            ble.parse_heart_rate(data)
    # Reserved flag bits are ignored.
    assert ble.parse_heart_rate(bytes([0xE0, 0x48])).bpm == 72


def test_rr_intervals_are_stamped_backwards_from_arrival():
    stamps = ble.rr_timestamps([0.5, 0.75, 1.0], arrival=100.0)
    np.testing.assert_allclose(stamps, [98.25, 99.0, 100.0])
    assert ble.rr_timestamps([], 100.0).shape == (0,)


def test_struct_decoder_spaces_regular_samples_and_scales():
    decode = ble.StructDecoder("<hh", np.dtype("float32"), rate=100.0, scale=(0.5, 2.0))
    stamps, values = decode(bytes.fromhex("0200fdff0400ffff"), 10.0)
    np.testing.assert_allclose(stamps, [9.99, 10.0])
    np.testing.assert_array_equal(values, np.array([[1.0, -6.0], [2.0, -2.0]], np.float32))
    assert values.dtype == np.float32
    with pytest.raises(ValueError):
        decode(b"\x01\x02\x03", 10.0)


# -- config ----------------------------------------------------------------------------------


def test_defaults_and_a_valid_config():
    options = ble.BleOptions.parse({})
    assert (options.scan, options.scan_s, options.devices) == (True, 5.0, {})
    options = ble.BleOptions.parse(
        {
            "scan_s": 2,
            "devices": {
                "chest": {"address": STRAP.lower(), "name": "Chest strap"},
                "imu": {
                    "address": IMU,
                    "profile": "custom",
                    "characteristic": IMU_DATA.upper(),
                    "layout": "<hhh",
                    "channels": ["x", "y", "z"],
                    "rate": 50,
                    "scale": 0.001,
                },
            },
        }
    )
    chest, imu = options.devices["chest"], options.devices["imu"]
    assert chest.address == STRAP and set(chest.streams) == {"hr", "rr"}
    assert imu.streams["data"].characteristic == IMU_DATA
    assert imu.streams["data"].frequency == 50


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"scan_seconds": 1}, "drivers.ble.scan_seconds"),
        ({"scan_s": 0}, "drivers.ble.scan_s"),
        ({"scan": "yes"}, "drivers.ble.scan"),
        ({"connect_timeout_s": -1}, "drivers.ble.connect_timeout_s"),
        ({"devices": []}, "drivers.ble.devices"),
        ({"devices": {"bad id": {"address": STRAP}}}, "drivers.ble.devices.bad id"),
        ({"devices": {"d": {"address": "C0:FF:EE"}}}, "drivers.ble.devices.d.address"),
        ({"devices": {"d": {"address": STRAP, "profile": "ecg"}}}, "drivers.ble.devices.d.profile"),
        ({"devices": {"d": {"address": STRAP, "layout": "<h"}}}, "drivers.ble.devices.d.layout"),
        ({"devices": {"d": {"address": STRAP, "colour": 1}}}, "drivers.ble.devices.d.colour"),
    ],
)
def test_config_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ble.BleDriver.from_config(options)


@pytest.mark.parametrize(
    ("custom", "key"),
    [
        ({"characteristic": "not-a-uuid"}, "characteristic"),
        ({"layout": "hhh"}, "layout"),  # no byte order
        ({"layout": "<3s"}, "layout"),  # not numeric
        ({"layout": "<hh!"}, "layout"),
        ({"channels": ["x", "y"]}, "channels"),
        ({"channels": ["x", "x", "z"]}, "channels"),
        ({"dtype": "str"}, "dtype"),
        ({"dtype": "i16", "scale": 0.5}, "dtype"),  # scaled values would be truncated
        ({"scale": [1, 2]}, "scale"),
        ({"rate": -1}, "rate"),
        ({"stream": "a/b"}, "stream"),
    ],
)
def test_custom_profile_errors_name_the_key(custom, key):
    device = imu_device(**{"layout": "<hhh", "channels": ["x", "y", "z"], **custom})
    with pytest.raises(ConfigError, match=rf"drivers\.ble\.devices\.imu\.{key}"):
        ble.BleDriver.from_config({"devices": {"imu": device}})


# -- listing -----------------------------------------------------------------------------------


def test_listing_shows_configured_and_scanned_heart_rate_devices(workspace, air):
    air.add(OTHER_STRAP, "HRM-Pro", {HRM: HRS})
    air.add(THERMOMETER, "Thermo", {normalize_uuid_str("2a1c"): normalize_uuid_str("1809")})

    async def body():
        # scan_s 1 s (a scan listens 0.5 s of it): the cache stays fresh for 0.5 s after
        # the first listing, time enough on a loaded machine for the checks below before
        # the second listing (with the default 0.3 s it was 0.15 s).
        options = {"scan": True, "scan_s": 1.0, **strap_config(name="Chest")}
        async with make_api(workspace, **options) as api:
            nodes = {n.id: n for n in await api.list_live_nodes()}
            scanned = ble.scanned_node_id(OTHER_STRAP)
            assert scanned == "ble-c0ffee000002"
            # The configured strap is not listed twice; the thermometer has no HR service.
            assert set(nodes) == {"chest", scanned}
            assert nodes["chest"].kind == "ble" and nodes["chest"].name == "Chest"
            assert nodes["chest"].device == {"address": STRAP, "profile": "heart_rate"}
            assert nodes[scanned].name == "HRM-Pro"
            assert nodes[scanned].device == {"address": OTHER_STRAP, "profile": "heart_rate"}
            streams = {s.id: s for s in await api.list_live_streams(scanned)}
            assert streams["hr"].channels == ["bpm"] and streams["hr"].frequency == 0
            assert streams["hr"].dtype == np.float32 and streams["hr"].unit == "bpm"
            assert streams["rr"].channels == ["rr"] and streams["rr"].dtype == np.float64
            # The scan is cached: listing again within scan_s does not rescan.
            await api.list_live_nodes()
            assert air.scans == 1
            # Once stale, a listing answers from the cache and rescans in the background.
            await asyncio.sleep(1.05)
            assert {n.id for n in await api.list_live_nodes()} == {"chest", scanned}
            await until(lambda: air.scans == 2)

    run(body())


def test_listing_never_waits_longer_than_scan_s(workspace, air):
    air.scan_startup_s = 3.0  # an adapter that takes ages

    async def body():
        async with make_api(workspace, scan=True, scan_s=0.2, **strap_config()) as api:
            started = time.monotonic()
            nodes = await api.list_live_nodes()
            # 0.2 s on an idle machine; 2 s leaves a loaded one room, far below the 3 s scan.
            assert time.monotonic() - started < 2.0
            assert [n.id for n in nodes] == ["chest"]

    run(body())


def test_a_failing_scan_lists_configured_devices_only(workspace, air, caplog):
    air.scan_error = FileNotFoundError(2, "No such file or directory")  # no D-Bus socket

    async def body():
        async with make_api(workspace, scan=True, **strap_config()) as api:
            assert [n.id for n in await api.list_live_nodes()] == ["chest"]

    with caplog.at_level(logging.INFO, logger="streaminghub_datamux.drivers.ble"):
        run(body())
    assert [r.getMessage() for r in caplog.records if "scan" in r.getMessage()] == [
        "BLE scan failed: no BlueZ/D-Bus on this machine (the D-Bus system bus is not running); "
        "install and start bluez and dbus, or leave 'ble' out of drivers.enabled"
    ]


def test_configured_and_scanned_straps_are_listed_through_either_api(workspace, air, serve):
    air.add(OTHER_STRAP, "HRM-Pro", {HRM: HRS})

    async def body():
        async with serve(make_api(workspace, scan=True, **strap_config(name="Chest"))) as api:
            nodes = {n.id: n for n in await api.list_live_nodes()}
            streams = {s.id: s for s in await api.list_live_streams("chest")}
            return nodes, streams

    nodes, streams = run(body())
    scanned = ble.scanned_node_id(OTHER_STRAP)
    assert set(nodes) == {"chest", scanned}
    assert (nodes["chest"].kind, nodes["chest"].name) == ("ble", "Chest")
    assert nodes["chest"].device == {"address": STRAP, "profile": "heart_rate"}
    assert nodes[scanned].name == "HRM-Pro"
    assert nodes[scanned].device == {"address": OTHER_STRAP, "profile": "heart_rate"}
    assert streams["hr"].channels == ["bpm"] and streams["hr"].frequency == 0
    assert streams["hr"].dtype == np.float32 and streams["hr"].unit == "bpm"
    assert streams["rr"].channels == ["rr"] and streams["rr"].dtype == np.float64
    assert streams["hr"].node_id == "chest"


def test_unknown_nodes_and_streams_are_not_found(workspace, air):
    async def body():
        async with make_api(workspace, **strap_config()) as api:
            with pytest.raises(NotFound):
                await api.list_live_streams("ble-nope")
            with pytest.raises(NotFound, match="has no stream 'ecg'"):
                await api.proxy_live_stream("chest", "ecg", {}, asyncio.Queue())

    run(body())


# -- proxying ----------------------------------------------------------------------------------


def test_heart_rate_and_rr_through_the_api(workspace, air, serve):
    async def body():
        local = make_api(workspace, **strap_config())
        async with serve(local) as api:
            hr_sink: asyncio.Queue[Any] = asyncio.Queue()
            rr_sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream(
                "chest", "hr", {"subject": "s1"}, hr_sink, framing="low-latency"
            )
            await api.proxy_live_stream("chest", "rr", {}, rr_sink, framing="low-latency")
            await until(lambda: listening(local, STRAP, HRM) == 2)
            before = time.time()
            await send(air, STRAP, HRM, [
                hr_only(60),
                b"\x01\x48",  # malformed (16-bit flag, one byte): skipped
                hr_with_rr(61, 512, 768),  # two intervals: 0.5 s then 0.75 s
                bytes([0x19, 0x3E, 0x00, 0x05, 0x00, 0x00, 0x04]),  # 16-bit, energy, 1.0 s
            ])  # fmt: skip
            after = time.time()
            hr = await take(hr_sink, samples(3))
            rr = await take(rr_sink, samples(3))
            np.testing.assert_array_equal(values_of(hr), [[60], [61], [62]])
            assert values_of(hr).dtype == np.float32
            hr_stamps = stamps_of(hr)
            assert np.all(np.diff(hr_stamps) >= 0)
            assert before <= hr_stamps[0] and hr_stamps[-1] <= after
            frame = frames_of(hr)[0]
            assert frame.channels == ["bpm"] and frame.stream_id == "hr"
            assert frame.attrs["subject"] == "s1" and frame.attrs["address"] == STRAP
            assert len(air.clients) == 1 and air.clients[0].started == [HRM]  # one link
            np.testing.assert_allclose(values_of(rr)[:, 0], [0.5, 0.75, 1.0])
            rr_stamps = stamps_of(rr)
            # The two intervals of one notification end 0.75 s apart, the last on arrival.
            assert rr_stamps[1] - rr_stamps[0] == pytest.approx(0.75)
            assert rr_stamps[1] == pytest.approx(hr_stamps[1])  # same notification
            assert np.all(np.diff(rr_stamps) >= 0)

    run(body())


def test_custom_characteristic_with_a_struct_layout(workspace, air):
    air.add(IMU, "IMU", {IMU_DATA: IMU_SERVICE})
    device = imu_device(
        layout="<hhh",
        channels=["x", "y", "z"],
        dtype="f32",
        rate=100,
        scale=[0.5, 1, 2],
        stream="accel",
        unit="g",
    )

    async def body():
        async with make_api(workspace, devices={"imu": device}) as api:
            [stream] = await api.list_live_streams("imu")
            assert stream.id == "accel" and stream.channels == ["x", "y", "z"]
            assert stream.frequency == 100 and stream.unit == "g"
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream("imu", "accel", {}, sink, framing="low-latency")
            await until(lambda: air.subscribed(IMU, IMU_DATA))
            raw = np.array([[2, -4, 6], [8, 10, -12], [1, 1, 1]], dtype="<i2")
            await send(air, IMU, IMU_DATA, [raw[:2].tobytes(), raw[2:].tobytes()])
            items = await take(sink, samples(3))
            np.testing.assert_array_equal(values_of(items), raw * np.array([0.5, 1, 2]))
            assert values_of(items).dtype == np.float32
            stamps = stamps_of(items)
            assert stamps[1] - stamps[0] == pytest.approx(0.01)  # two samples at 100 Hz

    run(body())


def test_two_tasks_on_one_device_share_one_client(workspace, air):
    async def body():
        async with make_api(workspace, **strap_config()) as api:
            sinks: list[asyncio.Queue[Any]] = [asyncio.Queue(), asyncio.Queue()]
            acks = [
                await api.proxy_live_stream("chest", "hr", {}, sinks[0], framing="low-latency"),
                await api.proxy_live_stream("chest", "hr", {}, sinks[1], framing="low-latency"),
            ]
            await until(lambda: listening(api, STRAP, HRM) == 2)
            assert len(air.clients) == 1 and air.clients[0].started == [HRM]
            await send(air, STRAP, HRM, [hr_only(70), hr_only(71)])
            for sink in sinks:  # both got every notification
                np.testing.assert_array_equal(values_of(await take(sink, samples(2))), [[70], [71]])
            client = air.clients[0]
            await api.stop_task(acks[0].randseq)
            assert client.is_connected and client.stopped == []  # the other task still listens
            await send(air, STRAP, HRM, [hr_only(72)])
            np.testing.assert_array_equal(values_of(await take(sinks[1], samples(1))), [[72]])
            await api.stop_task(acks[1].randseq)
            await until(lambda: not client.is_connected)  # the last user disconnects
            assert client.stopped == [HRM]
            assert len(air.clients) == 1

    run(body())


def test_a_dropped_connection_is_reported_and_resumed(workspace, air, serve):
    async def body():
        async with serve(make_api(workspace, **strap_config())) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream("chest", "hr", {}, sink, framing="low-latency")
            items = await strap_reading(air, sink, 80)
            air.drop(STRAP)
            items += await take(sink, reconnected)
            lost = next(i for i in items if isinstance(i, StreamStatus))
            assert lost.status == "disconnected" and "disconnected" in lost.reason
            items += await strap_reading(air, sink, 81)
            assert statuses(items) == ["disconnected", "reconnected"]
            np.testing.assert_array_equal(values_of(items), [[80], [81]])
            assert [f.seq for f in frames_of(items)] == [0, 1]
            assert len(air.clients) == 2  # a fresh client for the new connection

    run(body())


def test_a_silent_loss_is_noticed_too(workspace, air):
    async def body():
        async with strap_hr(workspace) as (_api, sink):
            await until(lambda: air.subscribed(STRAP, HRM))
            air.clients[0]._connected = False  # gone, and no disconnected callback
            items = await take(sink, reconnected)
            assert statuses(items) == ["disconnected", "reconnected"]

    run(body())


def test_connect_failures_are_retried(workspace, air):
    air.peripherals[STRAP].fail_connects = 2

    async def body():
        async with strap_recovered(workspace) as (_api, sink, items):
            [lost] = [
                i for i in items if isinstance(i, StreamStatus) and i.status == "disconnected"
            ]
            assert "cannot connect" in lost.reason and "le-connection-abort" in lost.reason
            assert len(air.clients) == 3
            np.testing.assert_array_equal(values_of(await strap_reading(air, sink, 90)), [[90]])

    run(body())


def test_a_device_out_of_range_is_retried_until_it_is_back(workspace, air):
    air.peripherals[STRAP].powered = False

    async def body():
        async with strap_hr(workspace, scan_s=0.1) as (_api, sink):
            items = await take(sink, lambda got: "disconnected" in statuses(got))
            assert "not found" in items[-1].reason
            assert air.clients == []  # nothing to connect to
            air.peripherals[STRAP].powered = True
            items = await take(sink, reconnected)
            assert air.finds >= 2

    run(body())


def test_a_scanned_strap_streams_and_stays_listed_while_connected(workspace, air):
    async def body():
        # scan_s 0.6 s: the first listing waits up to 0.6 s for a 0.3 s scan (with 0.2 s
        # it had 0.1 s to spare, too little on a loaded machine).
        async with make_api(workspace, scan=True, scan_s=0.6) as api:
            node_id = ble.scanned_node_id(STRAP)
            assert [n.id for n in await api.list_live_nodes()] == [node_id]
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream(node_id, "hr", {}, sink, framing="low-latency")
            await until(lambda: air.subscribed(STRAP, HRM))
            assert air.finds == 0  # connected to the device the scan found
            await send(air, STRAP, HRM, [hr_only(75)])
            np.testing.assert_array_equal(values_of(await take(sink, samples(1))), [[75]])
            await asyncio.sleep(0.65)  # the cached scan is stale; the strap does not advertise
            assert [n.id for n in await api.list_live_nodes()] == [node_id]
            await until(lambda: air.scans == 2)
            await asyncio.sleep(0.5)  # that rescan did not hear it; it is listed all the same
            assert [n.id for n in await api.list_live_nodes()] == [node_id]

    run(body())


def test_stop_ends_the_stream_and_disconnects(workspace, air, serve):
    async def body():
        async with serve(make_api(workspace, **strap_config())) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("chest", "rr", {}, sink, framing="low-latency")
            await until(lambda: air.subscribed(STRAP, HRM))
            await api.stop_task(ack.randseq)
            items = await take(sink, lambda got: bool(got) and got[-1] is END_OF_STREAM)
            assert not any(isinstance(i, StreamError) for i in items)
            client = air.clients[0]
            await until(lambda: not client.is_connected)
            assert client.stopped == [HRM]

    run(body())


def test_closing_the_api_disconnects_every_device(workspace, air):
    async def body():
        api = make_api(workspace, **strap_config())
        sink: asyncio.Queue[Any] = asyncio.Queue()
        await api.proxy_live_stream("chest", "hr", {}, sink)
        await until(lambda: air.subscribed(STRAP, HRM))
        await api.aclose()
        assert not air.clients[0].is_connected
        assert await take(sink, lambda got: bool(got) and got[-1] is END_OF_STREAM)
        with pytest.raises(DeviceError, match="closed"):  # no reconnecting behind a closed driver
            await api._drivers[0].open_stream("chest", "hr", {}, api.framing).open()

    run(body())


def test_a_missing_characteristic_ends_the_task(workspace, air):
    air.add(IMU, "IMU", {normalize_uuid_str("2a19"): normalize_uuid_str("180f")})
    device = imu_device()

    async def body():
        async with make_api(workspace, devices={"imu": device}) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream("imu", "data", {}, sink)
            items = await take(sink, lambda got: bool(got) and got[-1] is END_OF_STREAM)
            [error] = [i for i in items if isinstance(i, StreamError)]
            assert error.code == "device" and IMU_DATA in error.reason
            await until(lambda: not air.connected(IMU))  # the link was released

    run(body())


def test_a_disconnect_during_start_notify_is_reported_and_resumed(workspace, air):
    air.peripherals[STRAP].drop_on_subscribe = 1

    async def body():
        async with strap_recovered(workspace) as (api, sink, items):
            assert statuses(items) == ["disconnected", "reconnected"]
            assert len(air.clients) == 2
            items += await strap_reading(air, sink, 66)
            np.testing.assert_array_equal(values_of(items), [[66]])
            assert listening(api, STRAP, HRM) == 1

    run(body())


def imu_device(**extra: Any) -> dict[str, Any]:
    return {
        "address": IMU,
        "profile": "custom",
        "characteristic": IMU_DATA,
        "layout": "<h",
        "channels": ["x"],
        **extra,
    }


def clocked_source(rate: float) -> ble.BleSource:
    options = ble.BleOptions.parse({"devices": {"imu": imu_device(rate=rate)}})
    device = options.devices["imu"]
    return ble.BleSource(ble.BleDriver(options), device, device.streams["data"])


def delivered(source: ble.BleSource, packets: list[tuple[int, float]]) -> np.ndarray:
    """Deliver (sample count, arrival) packets; the timestamps they got, in order."""
    for count, arrival in packets:
        source.deliver(bytes(2 * count), arrival)
    stamps = []
    while len(source._channel):
        stamps.append(source._channel.get_nowait()[0])
    return np.concatenate(stamps)


def test_packets_arriving_together_continue_the_sample_clock():
    # Two 5-sample packets at 100 Hz, 1 ms apart (one connection event).
    stamps = delivered(clocked_source(100), [(5, 100.0), (5, 100.001)])
    assert np.all(np.diff(stamps) > 0)
    np.testing.assert_allclose(np.diff(stamps), 0.01)
    assert stamps[4] == pytest.approx(100.0)  # the first is anchored on its arrival


def test_the_sample_clock_re_anchors_after_a_gap_and_never_runs_ahead():
    # A gap: the next packet is stamped from its own arrival again.
    stamps = delivered(clocked_source(100), [(5, 100.0), (5, 101.0)])
    assert stamps[-1] == pytest.approx(101.0)
    np.testing.assert_allclose(np.diff(stamps[5:]), 0.01)
    # A device faster than its rate: stamps stay increasing, at most the slack ahead.
    packets = [(5, 100.0 + i * 0.001) for i in range(20)]
    stamps = delivered(clocked_source(100), packets)
    assert np.all(np.diff(stamps) > 0)
    assert stamps[-1] <= packets[-1][1] + ble.CLOCK_SLACK_S + 1e-9


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ({"properties": {IMU_DATA: ["read", "write"]}}, "neither notify nor indicate"),
        ({"notify_error": BleakGATTProtocolError(0x05)}, "Authentication"),
    ],
)
def test_a_characteristic_that_cannot_notify_ends_the_task(workspace, air, problem, reason):
    imu = air.add(IMU, "IMU", {IMU_DATA: IMU_SERVICE})
    for name, value in problem.items():
        setattr(imu, name, value)

    async def body():
        async with make_api(workspace, devices={"imu": imu_device()}) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream("imu", "data", {}, sink)
            items = await take(sink, lambda got: bool(got) and got[-1] is END_OF_STREAM)
            [error] = [i for i in items if isinstance(i, StreamError)]
            assert error.code == "device" and reason in error.reason
            assert statuses(items) == []  # no retry loop
            assert len(air.clients) == 1
            await until(lambda: not air.connected(IMU))

    run(body())


def test_a_source_whose_link_forgot_it_notices_at_the_liveness_check(workspace, air):
    async def body():
        async with strap_hr(workspace) as (api, sink):
            await until(lambda: air.subscribed(STRAP, HRM))
            [driver] = api._drivers
            client = driver._links[STRAP]._forget_client()  # gone, and no listener told
            client._connected = False  # the strap is free to reconnect
            items = await take(sink, reconnected)
            assert statuses(items) == ["disconnected", "reconnected"]

    run(body())


def test_a_missing_adapter_degrades_the_driver_until_it_is_plugged_in(workspace, air):
    air.scan_error = BleakError("No Bluetooth adapters found.")

    async def body():
        async with make_api(workspace, scan=True, scan_s=0.2, **strap_config()) as api:
            assert [n.id for n in await api.list_live_nodes()] == ["chest"]  # still serves
            (state,) = api.driver_states()
            assert (state.name, state.state) == ("ble", "degraded")
            assert "No Bluetooth adapters found" in state.reason
            assert "rfkill" in state.fix and "group bluetooth" in state.fix
            air.scan_error = None  # the adapter is plugged in: the next scan clears it
            await asyncio.sleep(0.3)
            await api.list_live_nodes()
            await until(lambda: api.driver_states()[0].state == "ok")

    run(body())
