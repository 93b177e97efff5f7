"""The serial driver against real pseudo-terminals (drivers/serialport.py, serialframes.py).

A test device is a pty pair: a writer thread feeds the master end at 1 kHz (a batch every
few milliseconds) and the driver opens the slave end by its tty name, as it would open
/dev/ttyUSB0. Unplugging is closing the master end (the slave's reads then fail with
EIO on Linux); plugging back in is a new pty behind the same symlink.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import serial
from helpers import drain, run

import streaminghub_datamux as dm
from streaminghub_datamux.drivers import serialport
from streaminghub_datamux.drivers.serial import reader as serial_reader
from streaminghub_datamux.drivers.serialframes import (
    ParseStats,
    PtySerialWriter,
    SampleClock,
    make_parser,
    parse_format,
    serve_stream_on_pty,
)
from streaminghub_datamux.drivers.serialport import SerialDriver, parse_options
from streaminghub_datamux.errors import ConfigError, DeviceLost, NotFound
from streaminghub_datamux.model import StreamStatus
from streaminghub_datamux.sampleclock import CLOCK_MAX_LAG_S

RATE = 1000.0
CHANNELS = ["a", "b", "c"]


# -- a fake device ---------------------------------------------------------------------


def sample(k: np.ndarray | int) -> tuple[Any, Any, Any]:
    """The test signal: sample k is (k / 2, -k, (k % 100) / 4): exact in f32 and as text."""
    return np.multiply(k, 0.5), np.negative(k), np.mod(k, 100) * 0.25


def csv_lines(k0: int, k1: int, sep: str = ",") -> bytes:
    return "".join(f"{k * 0.5}{sep}{-k}{sep}{(k % 100) * 0.25}\n" for k in range(k0, k1)).encode()


def keyvalue_lines(k0: int, k1: int) -> bytes:
    # Key order varies and both separators appear, as with real firmware.
    return "".join(
        f"b={-k} a={k * 0.5} c={(k % 100) * 0.25}\n"
        if k % 2
        else f"a:{k * 0.5},c:{(k % 100) * 0.25},b:{-k}\n"
        for k in range(k0, k1)
    ).encode()


def packet(k: int, layout: str = "<fif", sync: bytes = b"\xa0") -> bytes:
    payload = struct.pack(layout, k * 0.5, -k, (k % 100) * 0.25)
    checksum = 0
    for byte in payload:
        checksum ^= byte
    return sync + payload + bytes([checksum])


def binary_packets(k0: int, k1: int) -> bytes:
    return b"".join(packet(k) for k in range(k0, k1))


class PtyDevice:
    """A pseudo-terminal whose master end a thread feeds with ``encode(k0, k1)`` at 1 kHz."""

    def __init__(self, encode: Callable[[int, int], bytes], rate: float = RATE) -> None:
        self.encode = encode
        self.rate = rate
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing: bytes pass unchanged
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.sent = 0  # samples written so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, first: int = 0) -> PtyDevice:
        self.sent = first
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic() - self.sent / self.rate
        while not self._stop.wait(0.003):
            due = int((time.monotonic() - t0) * self.rate)
            if due > self.sent:
                if not self._write(self.encode(self.sent, due)):
                    return
                self.sent = due

    def _write(self, data: bytes) -> bool:
        deadline = time.monotonic() + 1.0
        while data and time.monotonic() < deadline and not self._stop.is_set():
            try:
                data = data[os.write(self.master, data) :]
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return False
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def unplug(self) -> None:
        """Stop writing and close the master: the slave side's reads now fail (EIO)."""
        self.stop()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def close(self) -> None:
        self.unplug()
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1


@pytest.fixture
def devices():
    made: list[PtyDevice] = []

    def make(encode: Callable[[int, int], bytes], rate: float = RATE) -> PtyDevice:
        made.append(PtyDevice(encode, rate))
        return made[-1]

    yield make
    for device in made:
        device.close()


def serial_config(workspace: Any, devices: dict[str, Any], **options: Any) -> Any:
    section = {"devices": devices, "list_ports": False, **options}
    return workspace.config(**{"drivers.serial": section, "drivers.enabled": "serial"})


def device_entry(port: str, fmt: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"port": port, "channels": CHANNELS, "rate": RATE, **extra}
    if fmt is not None:
        entry["format"] = fmt
    return entry


async def proxy(
    api: dm.API | dm.RemoteAPI, node: str, samples: int, seconds: float = 8.0
) -> list[Any]:
    """Proxy ``node``'s stream until ``samples`` arrived (bounded); every item, in order."""
    sink: asyncio.Queue[Any] = asyncio.Queue()
    ack = await api.proxy_live_stream(node, "data", {}, sink, framing="low-latency")
    items: list[Any] = []
    got = 0
    deadline = time.monotonic() + seconds
    while got < samples and time.monotonic() < deadline:
        try:
            item = await asyncio.wait_for(sink.get(), 0.5)
        except TimeoutError:
            continue
        items.append(item)
        got += len(item) if isinstance(item, dm.Frame) else 0
    await api.stop_task(ack.randseq)
    return items


def stream_device(workspace: Any, entry: dict[str, Any], samples: int) -> tuple[list[Any], Any]:
    """Proxy ``samples`` samples of device ``dev`` (``entry``) through the local API: every
    item, and the device's parse stats after."""

    async def body() -> tuple[list[Any], Any]:
        driver = SerialDriver.from_config({"devices": {"dev": entry}})
        async with dm.API(serial_config(workspace, {}), drivers=[driver]) as api:
            items = await proxy(api, "dev", samples)
        return items, driver.stats("dev")

    return run(body())


def joined(items: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    frames = [i for i in items if isinstance(i, dm.Frame)]
    assert frames, f"no frames in {items[:5]}"
    return np.concatenate([f.timestamps for f in frames]), np.concatenate(
        [f.values for f in frames]
    )


def check_signal(values: np.ndarray) -> np.ndarray:
    """Check each row is exactly sample(k) for its k; return the ks."""
    k = -values[:, 1].astype(np.int64)
    a, b, c = sample(k)
    np.testing.assert_array_equal(values[:, 0], a)
    np.testing.assert_array_equal(values[:, 1], b)
    np.testing.assert_array_equal(values[:, 2], c)
    return k


def check_timing(ts: np.ndarray, rate: float = RATE) -> None:
    assert ts.dtype == np.float64
    dt = np.diff(ts)
    assert np.all(dt > 0), "timestamps must increase"
    assert np.median(dt) == pytest.approx(1 / rate, rel=0.05)
    # The mean step is one period: no drift. A loaded machine can hold the device thread
    # or the reader longer than CLOCK_MAX_LAG_S; the clock then re-anchors, as at any gap,
    # and that step is not part of the rate (it failed the mean of the whole span).
    steady = dt[dt < CLOCK_MAX_LAG_S]
    assert len(steady) >= len(dt) - 3, f"{len(dt) - len(steady)} re-anchors"
    assert steady.mean() == pytest.approx(1 / rate, rel=0.1)
    assert abs(ts[-1] - time.time()) < 5.0  # host wall-clock seconds


def no_reader_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("serial-") and t.is_alive()]


# -- through either API: the ``serve`` fixture (tests/conftest.py) runs a test against
# the local API and against a RemoteAPI served by an agent on the test's own loop.


# -- listing ---------------------------------------------------------------------------


def test_configured_device_is_listed(workspace, devices, serve):
    device = devices(csv_lines)
    entry = device_entry(
        device.path,
        name="Bench IMU",
        channels={"a": {"unit": "g"}, "b": {}, "c": {"unit": "deg", "name": "angle"}},
        baudrate=9600,
        stream="imu",
    )

    async def body():
        async with serve(dm.API(serial_config(workspace, {"imu1": entry}))) as api:
            return await api.list_live_nodes(), await api.list_live_streams("imu1")

    nodes, streams = run(body())
    assert [(n.id, n.kind, n.name) for n in nodes] == [("imu1", "serial", "Bench IMU")]
    assert nodes[0].device == {"port": device.path, "baudrate": 9600, "format": "lines"}
    (stream,) = streams
    assert stream.id == "imu" and stream.node_id == "imu1" and stream.frequency == RATE
    assert stream.channels == CHANNELS and stream.dtype == np.float32
    assert [f.unit for f in stream.fields.values()] == ["g", "", "deg"]
    assert stream.fields["c"].name == "angle" and stream.index["t"].unit == "s"


def test_unconfigured_ports_are_listed_without_streams():
    ports = serial.tools.list_ports.comports()
    if not ports:
        pytest.skip("the OS reports no serial ports here")
    driver = SerialDriver({}, list_ports=True)
    nodes = run(driver.list_nodes())
    assert {n.device["port"] for n in nodes} == {p.device for p in ports}
    for node in nodes:
        assert node.kind == "serial-port" and "drivers.serial.devices" in node.description
        assert run(driver.list_streams(node.id)) == []
        with pytest.raises(NotFound, match="no streams until it is configured"):
            driver.open_stream(node.id, "data", {}, dm.Framing())
    assert run(SerialDriver({}, list_ports=False).list_nodes()) == []


class FakePort:
    def __init__(self, device: str, description: str, hwid: str) -> None:
        self.device, self.name = device, os.path.basename(device)
        self.description, self.hwid = description, hwid
        self.vid, self.pid, self.serial_number = 0x2341, 0x0043, "A1"
        self.manufacturer, self.product = "Arduino", "Uno"


def test_port_listing_skips_configured_ports_and_describes_the_rest(monkeypatch, tmp_path):
    configured = tmp_path / "ttyACM0"
    configured.touch()
    fakes = [
        FakePort(str(configured), "Arduino Uno", "USB VID:PID=2341:0043"),
        FakePort("/dev/ttyUSB7", "CP2102 USB to UART", "USB VID:PID=10C4:EA60 SER=0001"),
    ]
    monkeypatch.setattr(serialport.list_ports, "comports", lambda: fakes)
    devices, _ = parse_options({"devices": {"uno": device_entry(str(configured))}})
    assert [n.id for n in run(SerialDriver(devices).list_nodes())] == ["uno"]  # by default
    nodes = run(SerialDriver(devices, list_ports=True).list_nodes())
    assert [(n.id, n.kind) for n in nodes] == [("uno", "serial"), ("ttyUSB7", "serial-port")]
    port = nodes[1]
    assert port.name == "CP2102 USB to UART" and port.device["port"] == "/dev/ttyUSB7"
    assert "10C4:EA60" in port.description and port.device["vid"] == 0x2341


# -- every format through the API ------------------------------------------------------


FORMATS = {
    "csv": (None, csv_lines),
    "semicolon": ({"type": "lines", "separator": ";"}, lambda k0, k1: csv_lines(k0, k1, ";")),
    "whitespace": (
        {"type": "lines", "separator": "whitespace"},
        lambda k0, k1: csv_lines(k0, k1, " \t"),
    ),
    "keyvalue": ({"type": "keyvalue"}, keyvalue_lines),
    "binary": (
        {"type": "binary", "sync": "a0", "layout": "<fif", "checksum": "xor8"},
        binary_packets,
    ),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_streams_exact_values_at_the_declared_rate(workspace, devices, name):
    fmt, encode = FORMATS[name]
    device = devices(encode).start()

    items, stats = stream_device(workspace, device_entry(device.path, fmt), 400)
    ts, values = joined(items)
    assert values.dtype == np.float32 and values.shape[1] == 3
    k = check_signal(values)
    np.testing.assert_array_equal(np.diff(k), 1)  # nothing lost, nothing repeated
    check_timing(ts)
    assert stats.bad == 0 and stats.missing == 0 and stats.resyncs == 0
    assert stats.samples >= len(k)
    assert no_reader_threads()


def test_counter_timestamps_follow_the_device_counter_across_wraps_and_gaps(workspace, devices):
    # An 8-bit counter wraps every 256 samples; samples 300..349 are never sent.
    def encode(k0: int, k1: int) -> bytes:
        ks = [k for k in range(k0, k1) if not 300 <= k < 350]
        return b"".join(b"\xa0" + struct.pack("<Bhh", k % 256, k % 30000, -(k % 30000)) for k in ks)

    device = devices(encode)
    fmt = {"type": "binary", "sync": "a0", "layout": "<Bhh", "counter": 0}

    async def body():
        entry = {"port": device.path, "channels": ["n", "x", "y"], "rate": RATE, "format": fmt}
        driver = SerialDriver.from_config({"devices": {"dev": entry}})
        async with dm.API(serial_config(workspace, {}), drivers=[driver]) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("dev", "data", {}, sink, framing="low-latency")
            # The port is open (its reader thread runs; pyserial flushed the input when
            # it opened): now the device starts at 0. Not a fixed 0.2 s: a loaded
            # machine may open it later, and the first counter cycle would be lost.
            async with asyncio.timeout(10):
                while no_reader_threads():
                    await asyncio.sleep(0.01)
            device.start()
            items = []
            while sum(len(i) for i in items if isinstance(i, dm.Frame)) < 800:
                items.append(await asyncio.wait_for(sink.get(), 5))
            await api.stop_task(ack.randseq)
            return items

    ts, values = joined(run(body()))
    k = values[:, 1].astype(np.int64)
    assert k[0] < 256  # we saw the first counter cycle
    np.testing.assert_array_equal(values[:, 0], k % 256)
    assert not np.isin(k, np.arange(300, 350)).any()
    dt = np.diff(ts)
    jump = np.flatnonzero(np.diff(k) > 1)
    assert len(jump) == 1 and k[jump[0]] == 299
    # Across the gap the clock steps 51 periods: 50 lost samples, seen through the counter.
    assert dt[jump[0]] == pytest.approx(51 / RATE, abs=0.6 / RATE)
    others = np.delete(dt, jump)
    assert np.all(others > 0.4 / RATE) and np.all(others < 1.6 / RATE)


def test_counter_column_in_lines(workspace, devices):
    def encode(k0: int, k1: int) -> bytes:
        return "".join(f"{k % 1024},{k}\n" for k in range(k0, k1) if k % 97).encode()

    device = devices(encode).start()
    fmt = {"type": "lines", "timestamp": "counter", "counter_channel": "n", "counter_bits": 10}
    entry = {"port": device.path, "channels": ["n", "k"], "rate": RATE, "format": fmt}

    async def body():
        driver = SerialDriver.from_config({"devices": {"dev": entry}})
        async with dm.API(serial_config(workspace, {}), drivers=[driver]) as api:
            return await proxy(api, "dev", 1500)

    ts, values = joined(run(body()))
    k = values[:, 1].astype(np.int64)
    np.testing.assert_array_equal(values[:, 0], k % 1024)
    # Timestamps follow the counter: the step is (k difference) periods, to half a period.
    steps = np.diff(ts) * RATE
    assert np.all(np.abs(steps - np.diff(k)) <= 0.6)
    assert (np.diff(k) == 2).any()  # a skipped sample (k % 97 == 0) was seen as a gap


def test_marker_lines_are_irregular_labels(workspace, devices):
    labels = ["stimulus", "response", "rest"]

    written: dict[int, float] = {}  # event -> when the device wrote it

    def encode(k0: int, k1: int) -> bytes:  # an event every 20 ms, at irregular reads
        events = [k for k in range(k0, k1) if k % 20 == 0]
        written.update((k, time.time()) for k in events)
        return "".join(f"{labels[k % 3]} {k}\n" for k in events).encode()

    device = devices(encode).start()
    entry = {"port": device.path, "channels": ["marker"], "dtype": "str"}

    async def body():
        driver = SerialDriver.from_config({"devices": {"ev": entry}})
        async with dm.API(serial_config(workspace, {}), drivers=[driver]) as api:
            (stream,) = await api.list_live_streams("ev")
            return stream, await proxy(api, "ev", 10)

    stream, items = run(body())
    ts, values = joined(items)
    assert stream.frequency == 0 and stream.dtype.kind == "U" and values.dtype.kind == "U"
    k = np.array([int(v.split()[1]) for v in values[:, 0]])
    assert [v.split()[0] for v in values[:, 0]] == [labels[i % 3] for i in k]
    np.testing.assert_array_equal(np.diff(k), 20)
    # Arrival times: each event is stamped after the device wrote it, and soon after. (Not
    # judged by the gaps between stamps: a loaded machine delays one write or read and not
    # the next, or reads two events at once.)
    lag = ts - np.array([written[i] for i in k])
    assert np.all(np.diff(ts) >= 0) and np.all(lag >= 0) and np.all(lag < 1.0), lag


def test_start_and_stop_commands_reach_the_device(devices):
    device = devices(csv_lines).start()
    entry = device_entry(device.path, start="b", stop="s")
    driver = SerialDriver.from_config({"devices": {"dev": entry}, "list_ports": False})

    async def body():
        async with driver.open_stream("dev", "data", {}, dm.Framing()) as source:
            await anext(source.chunks())

    run(body())
    received, deadline = b"", time.monotonic() + 2
    while received != b"bs" and time.monotonic() < deadline:
        try:
            received += os.read(device.master, 16)
        except BlockingIOError:
            time.sleep(0.01)
    assert received == b"bs"


# -- bad input -------------------------------------------------------------------------


BAD_LINES = ["1,2", "x,y,z", "1,,2", "1,2,3,4", "#" * 30, "nan,1e400.5,3"]


def test_malformed_lines_are_counted_and_skipped(workspace, devices, serve):
    def encode(k0: int, k1: int) -> bytes:
        out = []
        for k in range(k0, k1):
            if k % 50 == 25:
                out.append(BAD_LINES[(k // 50) % len(BAD_LINES)] + "\n")
            else:
                out.append(f"{k * 0.5},{-k},{(k % 100) * 0.25}\r\n")  # CRLF, as Serial.println
        return "".join(out).encode()

    device = devices(encode).start()

    async def body():
        driver = SerialDriver.from_config({"devices": {"dev": device_entry(device.path)}})
        async with serve(dm.API(serial_config(workspace, {}), drivers=[driver])) as api:
            items = await proxy(api, "dev", 700)
        return items, driver.stats("dev")

    items, stats = run(body())
    ts, values = joined(items)
    k = check_signal(values)
    check_timing(ts)
    expected = np.setdiff1d(np.arange(k[0], k[-1] + 1), np.arange(25, k[-1] + 1, 50))
    np.testing.assert_array_equal(k, expected)  # every good line, no bad one
    bad_in_view = int(np.sum((np.arange(k[0], k[-1] + 1) % 50) == 25))
    # Lines read after the last delivered frame may be counted too, never fewer.
    assert bad_in_view <= stats.bad <= bad_in_view + 3
    assert stats.last_bad


def test_keyvalue_missing_keys_become_nan_and_unknown_keys_are_ignored(workspace, devices):
    def encode(k0: int, k1: int) -> bytes:
        rows = []
        for k in range(k0, k1):
            if k % 10 == 3:
                rows.append(f"a={k * 0.5} b={-k} temp=21.5\n")  # c missing, temp unknown
            elif k % 10 == 7:
                rows.append("hello from the firmware\n")  # no known key: bad
            else:
                rows.append(f"a={k * 0.5} b={-k} c={(k % 100) * 0.25} temp=21.5\n")
        return "".join(rows).encode()

    device = devices(encode).start()

    entry = device_entry(device.path, {"type": "keyvalue"})
    items, stats = stream_device(workspace, entry, 500)
    _, values = joined(items)
    k = -values[:, 1].astype(np.int64)
    assert not np.isin(k % 10, [7]).any()
    partial = k % 10 == 3
    assert np.isnan(values[partial, 2]).all() and not np.isnan(values[~partial]).any()
    check_signal(values[~partial])
    assert stats.missing >= partial.sum() and stats.bad >= np.sum(np.diff(k) == 2)


def test_bad_packets_and_junk_are_counted_and_skipped(workspace, devices):
    def encode(k0: int, k1: int) -> bytes:
        out = []
        for k in range(k0, k1):
            data = packet(k)
            if k % 40 == 20:  # corrupt the payload: the checksum fails
                data = data[:3] + bytes([data[3] ^ 0xFF]) + data[4:]
            out.append(data)
            if k % 70 == 35:  # line noise between packets, with a sync byte in it
                out.append(b"\x00\xa0\x13\x37")
        return b"".join(out)

    device = devices(encode).start()
    fmt = {"type": "binary", "sync": "a0", "layout": "<fif", "checksum": "xor8"}

    items, stats = stream_device(workspace, device_entry(device.path, fmt), 700)
    _, values = joined(items)
    k = check_signal(values)
    span = np.arange(k[0], k[-1] + 1)
    np.testing.assert_array_equal(k, span[span % 40 != 20])
    corrupt, noisy = np.sum(span % 40 == 20), np.sum(span % 70 == 35)
    # A bad packet per broken packet and per burst of noise with a sync byte in it.
    assert corrupt + noisy <= stats.bad <= corrupt + noisy + 3
    assert corrupt + noisy <= stats.resyncs <= corrupt + noisy + 3
    assert stats.skipped_bytes >= len(packet(0)) * corrupt + 4 * noisy


# -- device loss and return ------------------------------------------------------------


def test_unplugged_device_is_reported_and_comes_back(workspace, devices, tmp_path, serve):
    link = tmp_path / "ttyUSB-bench"
    first = devices(csv_lines).start()
    link.symlink_to(first.path)
    events: list[str] = []

    async def body():
        driver = SerialDriver.from_config({"devices": {"dev": device_entry(str(link))}})
        async with serve(dm.API(serial_config(workspace, {}), drivers=[driver])) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("dev", "data", {}, sink, framing="low-latency")
            items: list[Any] = []

            async def until(predicate: Callable[[], bool]) -> None:
                while not predicate():
                    items.append(await asyncio.wait_for(sink.get(), 5))

            def frames() -> list[dm.Frame]:
                return [i for i in items if isinstance(i, dm.Frame)]

            def statuses() -> list[str]:
                return [i.status for i in items if isinstance(i, StreamStatus)]

            await until(lambda: sum(map(len, frames())) >= 200)
            first.unplug()
            events.append("unplugged")
            await until(lambda: "disconnected" in statuses())
            await asyncio.sleep(0.4)  # reopening fails meanwhile: the node is gone
            second = devices(csv_lines)
            second.start(first=first.sent + 500)  # the device went on counting
            replacement = tmp_path / "ttyUSB-new"
            replacement.symlink_to(second.path)
            os.replace(replacement, link)  # re-point atomically, as udev would
            await until(lambda: "reconnected" in statuses())
            seen = len(frames())
            await until(lambda: sum(map(len, frames()[seen:])) >= 200)
            await api.stop_task(ack.randseq)
            return items, driver.stats("dev")

    items, stats = run(body())
    statuses = [i for i in items if isinstance(i, StreamStatus)]
    assert [s.status for s in statuses] == ["disconnected", "reconnected"]
    assert "lost" in statuses[0].reason and str(link) in statuses[0].reason
    frames = [i for i in items if isinstance(i, dm.Frame)]
    assert [f.seq for f in frames] == list(range(len(frames)))  # the task lived through it
    ts, values = joined(items)
    k = check_signal(values)
    assert np.all(np.diff(ts) > 0)
    gap = np.flatnonzero(np.diff(k) != 1)
    assert len(gap) == 1 and k[gap[0] + 1] - k[gap[0]] > 500
    # The clock re-anchored after the gap: the pause shows in the timestamps.
    assert ts[gap[0] + 1] - ts[gap[0]] > 0.3
    assert stats.bad <= 1  # at most one line cut by the unplug
    assert no_reader_threads()


def test_stop_ends_the_stream_and_releases_the_port(workspace, devices, serve):
    device = devices(csv_lines).start()
    entry = device_entry(device.path)

    async def body():
        driver = SerialDriver.from_config({"devices": {"dev": entry}})
        async with serve(dm.API(serial_config(workspace, {}), drivers=[driver])) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("dev", "data", {}, sink, framing="low-latency")
            first = await asyncio.wait_for(sink.get(), 5)
            await api.stop_task(ack.randseq)
            async with asyncio.timeout(5):
                rest = await drain(sink)
            stopped = no_reader_threads()
            again = await api.stop_task(ack.randseq)
        return first, rest, stopped, again

    first, rest, stopped, again = run(body())
    assert isinstance(first, dm.Frame)
    assert rest[-1] is dm.END_OF_STREAM
    assert all(isinstance(i, dm.Frame) for i in rest[:-1])  # no error, no status
    assert stopped  # the reader ended with the task...
    serialport._open_port(serialport.parse_device("dev", entry)).close()  # ...and let go
    assert again.status  # a second stop is a no-op


def test_a_missing_port_is_device_lost_at_open(tmp_path):
    driver = SerialDriver.from_config(
        {"devices": {"dev": device_entry(str(tmp_path / "nothing"))}, "list_ports": False}
    )

    async def body():
        source = driver.open_stream("dev", "data", {}, dm.Framing())
        with pytest.raises(DeviceLost, match="not available"):
            await source.open()
        await source.aclose()

    run(body())
    assert no_reader_threads()


def test_aclose_stops_the_reader_and_closes_the_port(devices):
    device = devices(csv_lines).start()
    driver = SerialDriver.from_config({"devices": {"dev": device_entry(device.path)}})

    async def body():
        one = driver.open_stream("dev", "data", {}, dm.Framing())
        two = driver.open_stream("dev", "data", {}, dm.Framing())
        async with one, two:  # two sources share one reader and get the same samples
            first_one = await anext(one.chunks())
            first_two = await anext(two.chunks())
            assert len([t for t in threading.enumerate() if t.name == "serial-dev"]) == 1
        assert no_reader_threads()
        # The port was closed: it opens again, and driver.aclose() ends a running source.
        three = driver.open_stream("dev", "data", {}, dm.Framing())
        await three.open()
        chunks = three.chunks()
        await anext(chunks)
        await driver.aclose()
        rest = [c async for c in chunks]
        await three.aclose()
        return first_one, first_two, rest

    (_, v1), (_, v2), rest = run(body())
    check_signal(v1)
    check_signal(v2)
    assert isinstance(rest, list)  # the chunks ended when the driver closed
    assert no_reader_threads()


def test_reads_are_batched_for_the_shortest_period_of_the_sources_framing(devices):
    """A 1 kHz device reaches the loop every source period of the tightest framing.

    Balanced framing batches reads for 10 ms (MAX_BATCH_S); a low-latency source on the
    same port makes the shared reader batch 1 ms for both, and its detach restores 10.
    """
    device = devices(csv_lines).start()
    driver = SerialDriver.from_config({"devices": {"dev": device_entry(device.path)}})
    balanced, low = dm.Framing.coerce("balanced"), dm.Framing.coerce("low-latency")

    async def sizes(source: Any, seconds: float) -> list[int]:
        got: list[int] = []
        end = time.monotonic() + seconds
        async for timestamps, _ in source.chunks():
            got.append(len(timestamps))
            if time.monotonic() > end:
                return got
        raise AssertionError("the chunks ended")

    async def body() -> tuple[list[int], list[int], list[float]]:
        batches = []
        reader = driver._reader("dev")
        async with driver.open_stream("dev", "data", {}, balanced) as slow:
            await slow.open()
            batches.append(reader._batch_s)
            alone = await sizes(slow, 0.6)
            async with driver.open_stream("dev", "data", {}, low) as fast:
                await fast.open()
                batches.append(reader._batch_s)
                shared = await sizes(fast, 0.6)
            batches.append(reader._batch_s)
        return alone, shared, batches

    alone, shared, batches = run(body())
    assert batches == [0.01, 0.001, 0.01]
    # The device writes every 3 ms: a 10 ms batch holds about 10 samples, 1 ms about 3.
    assert sum(alone[1:]) / len(alone[1:]) >= 7, alone
    assert sum(shared[1:]) / len(shared[1:]) <= 6, shared
    assert no_reader_threads()


class StuckPort:
    """A port whose reads ignore cancel_read and block until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = False
        self.in_waiting = 0

    def read(self, n: int) -> bytes:
        self.release.wait(5.0)
        return b""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_reader_that_does_not_stop_is_not_doubled_and_cannot_end_the_next(monkeypatch):
    monkeypatch.setattr(serial_reader, "JOIN_TIMEOUT_S", 0.1)
    ports: list[StuckPort] = []

    def open_port(spec: Any) -> StuckPort:
        ports.append(StuckPort())
        return ports[-1]

    monkeypatch.setattr(serial_reader, "_open_port", open_port)
    driver = SerialDriver.from_config({"devices": {"dev": device_entry("/dev/null")}})

    async def body():
        one = driver.open_stream("dev", "data", {}, dm.Framing())
        await one.open()
        await one.aclose()  # the reader is stuck in a read: the join times out
        two = driver.open_stream("dev", "data", {}, dm.Framing())
        with pytest.raises(DeviceLost, match="not stopped"):
            await two.open()  # no second reader on the same port: retry later
        assert len(ports) == 1
        ports[0].release.set()  # the old reader ends now...
        for _ in range(1000):  # bounded at 10 s: a loaded machine may need over 1 s
            if no_reader_threads():
                break
            await asyncio.sleep(0.01)
        await two.open()  # ...and the port opens again
        assert len(ports) == 2 and ports[0].closed and driver._reader("dev").running
        ports[1].release.set()
        await driver.aclose()
        assert [c async for c in two.chunks()] == []
        await two.aclose()

    run(body())
    assert no_reader_threads()


def test_finish_of_an_old_reader_leaves_the_current_one_alone():
    driver = SerialDriver.from_config({"devices": {"dev": device_entry("/dev/null")}})
    reader = driver._reader("dev")
    old, current = StuckPort(), StuckPort()
    source = driver.open_stream("dev", "data", {}, dm.Framing())
    reader._port, reader._subscribers = current, [source]
    reader._finish(old, threading.Event(), None)
    assert old.closed and not current.closed
    assert reader._port is current and reader._subscribers == [source]


@pytest.mark.skipif(os.name != "posix", reason="exclusive opens are POSIX locks")
def test_ports_are_opened_exclusively(devices):
    device = devices(csv_lines)
    spec = serialport.parse_device("dev", device_entry(device.path))
    port = serialport._open_port(spec)
    try:
        with pytest.raises(DeviceLost):
            serialport._open_port(spec)  # another reader would split the byte stream
    finally:
        port.close()
    serialport._open_port(spec).close()


def test_chunks_a_slow_consumer_loses_are_counted_on_the_source_and_leave_a_gap():
    driver = SerialDriver.from_config({"devices": {"dev": device_entry("/dev/null")}})
    source = driver.open_stream("dev", "data", {}, dm.Framing())
    values = np.zeros((2, len(CHANNELS)))
    for i in range(serialport.MAX_QUEUED_CHUNKS + 3):
        source.post((np.array([2.0 * i, 2.0 * i + 1]), values))
    assert source.dropped == 6 and driver.stats("dev").dropped == 6
    first = source._channel.get_nowait()
    assert first[0][0] == 6.0  # the timestamps show where the samples went missing


# -- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"devcies": {}}, "drivers.serial.devcies"),
        ({"list_ports": "yes"}, "drivers.serial.list_ports"),
        ({"devices": []}, "drivers.serial.devices"),
        ({"devices": {"bad id": {}}}, "drivers.serial.devices.bad id"),
        ({"devices": {"d": {"channels": ["a"]}}}, "drivers.serial.devices.d.port"),
        ({"devices": {"d": {"port": "/dev/x"}}}, "drivers.serial.devices.d.channels"),
        ({"devices": {"d": {"port": "/x", "channels": ["a", "a"]}}}, "devices.d.channels"),
        ({"devices": {"d": {"port": "/x", "channels": ["a"], "baud": 9600}}}, "d.baud"),
        ({"devices": {"d": {"port": "/x", "channels": ["a"], "baudrate": 0}}}, "d.baudrate"),
        ({"devices": {"d": {"port": "/x", "channels": ["a"], "dtype": "f33"}}}, "d.dtype"),
        ({"devices": {"d": {"port": "/x", "channels": ["a"], "rate": -1}}}, "d.rate"),
        ({"devices": {"d": {"port": "/x", "channels": ["a"], "stream": "a/b"}}}, "d.stream"),
        ({"devices": {"d": {"port": "/x", "channels": {"a": {"units": "g"}}}}}, "channels.a.units"),
        (
            {"devices": {"d": {"port": "/x", "channels": ["a"], "format": {"type": "csv"}}}},
            "d.format.type",
        ),
        (
            {"devices": {"d": {"port": "/x", "channels": ["a"], "format": {"separator": "ab"}}}},
            "d.format.separator",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["a"],
                        "format": {"timestamp": "counter", "counter_channel": "n"},
                    }
                }
            },
            "d.format.counter_channel",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["n"],
                        "format": {"timestamp": "counter", "counter_channel": "n"},
                    }
                }
            },
            "d.rate",
        ),
        (
            {"devices": {"d": {"port": "/x", "channels": ["a"], "format": {"type": "binary"}}}},
            "d.format.sync",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["a"],
                        "format": {"type": "binary", "sync": "zz"},
                    }
                }
            },
            "d.format.sync",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["a"],
                        "format": {"type": "binary", "sync": "a0", "layout": "hh"},
                    }
                }
            },
            "d.format.layout",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["a"],
                        "format": {"type": "binary", "sync": "a0", "layout": "<hh"},
                    }
                }
            },
            "d.format.layout",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["a"],
                        "format": {
                            "type": "binary",
                            "sync": "a0",
                            "layout": "<h",
                            "checksum": "crc",
                        },
                    }
                }
            },
            "d.format.checksum",
        ),
        (
            {
                "devices": {
                    "d": {
                        "port": "/x",
                        "channels": ["a"],
                        "format": {"type": "binary", "sync": "a0", "layout": "<f", "counter": 0},
                    }
                }
            },
            "d.format.counter",
        ),
        (
            {
                "devices": {
                    "a": {"port": "/dev/ttyX", "channels": ["a"]},
                    "b": {"port": "/dev/ttyX", "channels": ["a"]},
                }
            },
            "drivers.serial.devices.b.port",
        ),
    ],
)
def test_config_errors_name_the_key(options, key):
    with pytest.raises(ConfigError) as caught:
        SerialDriver.from_config(options)
    assert caught.value.key.endswith(key) and caught.value.fix


def test_config_errors_surface_through_the_api(workspace):
    config = workspace.config(
        **{"drivers.serial": {"devices": {"d": {"port": "/x"}}}, "drivers.enabled": "serial"}
    )
    with pytest.raises(ConfigError, match=r"drivers\.serial\.devices\.d\.channels"):
        dm.API(config)


def test_unknown_ids_are_not_found():
    driver = SerialDriver.from_config({"devices": {"d": device_entry("/x")}, "list_ports": False})
    with pytest.raises(NotFound):
        run(driver.list_streams("nope"))
    with pytest.raises(NotFound):
        driver.open_stream("d", "nope", {}, dm.Framing())
    with pytest.raises(NotFound):
        driver.open_stream("nope", "data", {}, dm.Framing())


# -- parsing and clock units -----------------------------------------------------------


def feed_all(parser: Any, data: bytes, step: int) -> np.ndarray:
    parts = [parser.feed(data[i : i + step])[0] for i in range(0, len(data), step)]
    return np.concatenate(parts)


@pytest.mark.parametrize("step", [1, 7, 64, 100_000])
@pytest.mark.parametrize("name", list(FORMATS))
def test_parsers_do_not_depend_on_how_reads_cut_the_bytes(name, step):
    fmt, encode = FORMATS[name]
    data = encode(0, 300)
    spec = parse_format(fmt, "format", CHANNELS)
    stats = ParseStats()
    values = feed_all(make_parser(spec, CHANNELS, np.dtype(np.float64), stats), data, step)
    k = check_signal(values)
    # Text formats skip the first (possibly cut) line; packets resynchronise on their own.
    np.testing.assert_array_equal(k, np.arange(0 if name == "binary" else 1, 300))
    assert stats.bad == 0 and stats.resyncs == 0


def test_binary_payload_bytes_equal_to_the_sync_byte_are_not_packets():
    # Every payload is full of 0xa0: only checksums and spacing tell packets apart.
    spec = parse_format(
        {"type": "binary", "sync": "a0", "layout": "<BBB", "checksum": "sum8", "end": "c0"},
        "format",
        ["x", "y", "z"],
    )
    rows = [bytes([0xA0, 0xA0, k, 0xA0, (0xA0 + k + 0xA0) & 0xFF, 0xC0]) for k in range(200)]
    stats = ParseStats()
    parser = make_parser(spec, ["x", "y", "z"], np.dtype(np.int16), stats)
    values = feed_all(parser, b"\x13" + b"".join(rows), 5)
    np.testing.assert_array_equal(values[:, 1], np.arange(200))
    assert values.dtype == np.int16 and stats.bad == 0 and stats.resyncs == 0


def test_clock_is_monotonic_under_read_jitter_and_reanchors_after_a_pause():
    clock = SampleClock(RATE)
    rng = np.random.default_rng(1)
    stamps, t = [], 1000.0
    for i in range(400):
        t += 0.004
        late = rng.uniform(0, 0.003)  # reads come late, by up to 3 ms
        pause = 0.5 if i == 200 else 0.0
        t += pause
        stamps.append(clock.stamp(4, t + late))
    ts = np.concatenate(stamps)
    dt = np.diff(ts)
    assert np.all(dt > 0)
    assert clock.reanchors == 1
    big = np.flatnonzero(dt > 0.1)
    assert len(big) == 1 and dt[big[0]] == pytest.approx(0.501, abs=0.006)
    assert np.median(dt) == pytest.approx(1 / RATE, rel=0.01)


def test_clock_reanchors_when_a_wrapping_counter_is_reset_mid_stream():
    # A u16 counter at 1 kHz reset to 0 reads as a wrap, i.e. a jump ~35 s forward: the
    # stamps must not run ahead of arrival while the model catches up half a period a time.
    clock = SampleClock(1000.0, counter_bits=16)
    counter, t, stamps, arrivals = 30000, 1000.0, [], []
    for i in range(500):
        if i == 250:
            counter = 0  # the device was reset
        t += 0.004
        batch = clock.stamp(4, t, np.arange(counter, counter + 4, dtype=np.float64) % 65536)
        counter += 4
        stamps.append(batch)
        arrivals.append(np.full(4, t))
    ts, arrived = np.concatenate(stamps), np.concatenate(arrivals)
    assert np.all(np.diff(ts) > 0)
    assert np.max(ts - arrived) < 0.2
    assert clock.reanchors == 1
    assert np.median(np.diff(ts)) == pytest.approx(0.001, rel=0.01)


def test_clock_unwraps_counters_and_irregular_streams_use_arrival():
    clock = SampleClock(100.0, counter_bits=8)
    first = clock.stamp(3, 10.0, np.array([254.0, 255.0, 0.0]))
    np.testing.assert_allclose(first, [9.98, 9.99, 10.0])
    later = clock.stamp(2, 10.11, np.array([10.0, 11.0]))
    np.testing.assert_allclose(np.diff(np.concatenate([first, later])), [0.01, 0.01, 0.1, 0.01])
    irregular = SampleClock(0.0)
    np.testing.assert_array_equal(irregular.stamp(2, 5.0), [5.0, 5.0])
    assert irregular.stamp(1, 4.0)[0] == 5.0  # never backwards, even if the wall clock is


# -- presenting frames as a serial device ----------------------------------------------


def frames_of_signal(n_frames: int, size: int) -> list[dm.Frame]:
    frames = []
    for i in range(n_frames):
        k = np.arange(i * size, (i + 1) * size)
        values = np.column_stack(sample(k)).astype(np.float32)
        frames.append(dm.Frame("data", i, k / RATE, values, CHANNELS))
    return frames


def read_with_pyserial(
    path: str, done: Callable[[bytes], bool], opened: threading.Event | None = None
) -> bytes:
    with serial.Serial(path, 115200, timeout=0.2) as port:
        if opened is not None:
            opened.set()  # pyserial flushed the input as it opened: write from now on
        data = b""
        deadline = time.monotonic() + 10
        while not done(data) and time.monotonic() < deadline:
            data += port.read(max(1, port.in_waiting))
        return data


@pytest.mark.parametrize("fmt", [None, FORMATS["binary"][0], FORMATS["keyvalue"][0]])
def test_pty_writer_sends_frames_that_pyserial_reads(fmt):
    frames = frames_of_signal(4, 25)
    if fmt is None:
        expected = csv_lines(0, 100)
    elif fmt["type"] == "binary":
        expected = binary_packets(0, 100)
    else:
        expected = "".join(
            f"a={k * 0.5:.9g} b={-k} c={(k % 100) * 0.25:.9g}\n" for k in range(100)
        ).encode()
    binary = fmt is not None and fmt["type"] == "binary"

    def done(data: bytes) -> bool:
        return len(data) >= len(expected) if binary else data.count(b"\n") >= 100

    got: list[bytes] = []
    opened = threading.Event()
    with PtySerialWriter(fmt) as writer:
        reader = threading.Thread(
            target=lambda: got.append(read_with_pyserial(writer.path, done, opened))
        )
        reader.start()
        # pyserial flushes input when it opens: write after that (not after a fixed 0.1 s,
        # which a loaded machine can take to open the port).
        assert opened.wait(10), "pyserial did not open the pty"
        for frame in frames:
            writer.write_frame(frame)
        reader.join(12)
    if fmt is None:  # "%.9g" prints 0.0 as 0 and 1.0 as 1: compare numbers, not text
        got_rows = np.loadtxt(got[0].decode().splitlines(), delimiter=",")
        np.testing.assert_array_equal(got_rows, np.column_stack(sample(np.arange(100))))
    else:
        assert got[0] == expected
    assert writer.frames_written == 4 and writer.bytes_dropped == 0


def test_simulated_stream_served_on_a_pty_reads_back_through_the_driver(workspace):
    frames = frames_of_signal(40, 25)

    async def body():
        queue: asyncio.Queue[Any] = asyncio.Queue()
        opened: list[PtySerialWriter] = []
        serving = asyncio.create_task(serve_stream_on_pty(queue, None, on_open=opened.append))
        while not opened:
            await asyncio.sleep(0.01)
        entry = opened[0].device_config(CHANNELS, rate=RATE)
        assert entry["format"] == {"type": "lines", "separator": ","}
        driver = SerialDriver.from_config({"devices": {"sim": entry}})
        async with dm.API(serial_config(workspace, {}), drivers=[driver]) as api:
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("sim", "data", {}, sink, framing="low-latency")
            # Write once the port is open (its reader runs), not after a fixed 0.2 s: on a
            # loaded machine lines written before the open were flushed and lost.
            async with asyncio.timeout(10):
                while no_reader_threads():
                    await asyncio.sleep(0.01)
            for frame in frames:
                queue.put_nowait(frame)
                await asyncio.sleep(0.005)
            queue.put_nowait(dm.END_OF_STREAM)
            writer = await serving
            got = []
            while sum(map(len, got)) < 999:
                got.append(await asyncio.wait_for(sink.get(), 5))
            await api.stop_task(ack.randseq)
            return writer, got

    writer, got = run(body())
    _, values = joined(got)
    k = check_signal(values)
    np.testing.assert_array_equal(k, np.arange(1, 1000))  # the first line is skipped
    assert writer.frames_written == 40


def test_the_writer_drains_to_its_reader_before_the_end():
    """Closing the terminal discards what the reader has not read yet: serve() drains
    first. (Without it a reader a little behind lost the tail, with an I/O error.)"""
    data = b"".join(f"{k},{-k},{k % 7}\n".encode() for k in range(20_000))
    got: list[bytes] = []

    def slow_reader(path: str, opened: threading.Event) -> None:
        with serial.Serial(path, 115200, timeout=0.2) as port:
            opened.set()
            received = b""
            deadline = time.monotonic() + 20
            while len(received) < len(data) and time.monotonic() < deadline:
                received += port.read(min(512, max(1, port.in_waiting)))
                time.sleep(0.002)  # a reader a little slower than the writer
            got.append(received)

    async def body() -> tuple[bool, float, bool]:
        with PtySerialWriter(max_pending=1 << 22) as writer:
            opened = threading.Event()
            reader = threading.Thread(target=slow_reader, args=(writer.path, opened))
            reader.start()
            assert await asyncio.to_thread(opened.wait, 10)
            writer.write_bytes(data)
            drained = await writer.drain()
        await asyncio.to_thread(reader.join, 20)  # closed now: it must have had it all
        # With no reader at all it gives up once nothing is taken for idle_s.
        with PtySerialWriter() as lonely:
            lonely.write_bytes(b"x" * 100)
            began = time.monotonic()
            alone = await lonely.drain(idle_s=0.3)
            return drained, time.monotonic() - began, alone

    drained, waited, alone = run(body())
    assert drained and got == [data]
    assert alone is False and 0.3 <= waited < 5.0


def test_writer_never_blocks_without_a_reader(tmp_path: Path):
    with PtySerialWriter(max_pending=4096) as writer:
        for frame in frames_of_signal(200, 50):
            writer.write_frame(frame)
    assert writer.bytes_dropped > 0 and writer.bytes_written > 0


def test_a_configured_port_that_is_missing_degrades_the_driver(tmp_path, devices):
    device = devices(csv_lines).start()
    missing = str(tmp_path / "ttyUSB9")
    entries = {"here": device_entry(device.path), "gone": device_entry(missing)}
    driver = SerialDriver.from_config({"devices": entries, "list_ports": False})
    status = driver.status()
    assert (status.state, status.reason) == ("degraded", f"missing ports: {missing}")
    assert "plug the device in" in status.fix
    ok = SerialDriver.from_config({"devices": {"here": entries["here"]}, "list_ports": False})
    assert ok.status().state == "ok"
