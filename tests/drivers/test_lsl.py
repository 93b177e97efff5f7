"""The LSL driver against real outlets on loopback, and ``datamux simulate --lsl``.

Every test names its outlets with a fresh uuid so that tests (and other runs on the same
machine) never see each other's streams, and deletes every outlet and stops every
process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from helpers import collect, frames_of, run

import streaminghub_datamux as dm
from streaminghub_datamux.drivers.simulate import DEMO_NODE
from streaminghub_datamux.errors import ConfigError, DeviceError, NotFound

pylsl = pytest.importorskip("pylsl")
lsl = pytest.importorskip("streaminghub_datamux.drivers.lsl")

# Short waits: tests poll for their outlets instead of relying on the first wait.
FAST = {"wait_s": 0.2, "forget_after_s": 1.0}
FIND_TIMEOUT_S = 20.0  # a bound, not a delay: room for a loaded machine


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_outlet(
    name: str,
    channels: int = 1,
    rate: float = 0.0,
    fmt: str = "float32",
    source_id: str = "",
    labels: list[str] | None = None,
    units: list[str] | None = None,
    stream_type: str = "EEG",
) -> Any:
    info = pylsl.StreamInfo(name, stream_type, channels, rate, fmt, source_id)
    if labels is not None or units is not None:
        node = info.desc().append_child("channels")
        for i in range(len(labels or units or [])):
            channel = node.append_child("channel")
            if labels is not None:
                channel.append_child_value("label", labels[i])
            if units is not None:
                channel.append_child_value("unit", units[i])
    return pylsl.StreamOutlet(info)


@contextlib.contextmanager
def outlets(*made: Any) -> Iterator[list[Any]]:
    """Hold outlets for a block; each leaves the network when the block ends."""
    held = list(made)
    try:
        yield held
    finally:
        held.clear()  # the last references: liblsl destroys the outlets now


def node_of(outlet: Any) -> str:
    return lsl.safe_id(outlet.get_info().hostname(), prefix="lsl-")


def make_api(workspace, **options: Any) -> dm.API:
    return dm.API(
        workspace.config(**{"drivers.enabled": "sim,lsl", "drivers.lsl": {**FAST, **options}})
    )


async def find_stream(api: dm.API | dm.RemoteAPI, node_id: str, name: str) -> dm.Stream:
    """The listed stream of the outlet called ``name`` (polls until the resolver has it)."""
    deadline = time.monotonic() + FIND_TIMEOUT_S
    while True:
        if node_id in [n.id for n in await api.list_live_nodes()]:
            for stream in await api.list_live_streams(node_id):
                if stream.name == name:
                    return stream
        if time.monotonic() > deadline:
            raise AssertionError(f"LSL outlet {name!r} not listed on {node_id}")
        await asyncio.sleep(0.1)


async def next_item(sink: asyncio.Queue[Any], timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(sink.get(), timeout)


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lsl-")]


@contextlib.asynccontextmanager
async def one_outlet(
    workspace, name: str, rate: float = 50.0, **options: Any
) -> AsyncIterator[tuple[dm.API, Any, dm.Stream]]:
    """A 1-channel float32 outlet called ``name``, a local API, and the outlet's stream."""
    outlet = make_outlet(name, 1, rate, "float32", unique("src"))
    with outlets(outlet):
        api = make_api(workspace, **options)
        try:
            yield api, outlet, await find_stream(api, node_of(outlet), name)
        finally:
            await api.aclose()


@contextlib.asynccontextmanager
async def proxied(
    serve: Any, workspace, outlet: Any, name: str, framing: str | None = "low-latency"
) -> AsyncIterator[tuple[Any, dm.Stream, asyncio.Queue[Any], Any]]:
    """``outlet`` proxied through ``serve``'s API, once the outlet sees its consumer.

    Yields the API, the listed stream, the task's sink and its ack.
    """
    async with serve(make_api(workspace)) as api:
        stream = await find_stream(api, node_of(outlet), name)
        sink: asyncio.Queue[Any] = asyncio.Queue()
        options = {} if framing is None else {"framing": framing}
        ack = await api.proxy_live_stream(stream.node_id, stream.id, {}, sink, **options)
        assert await asyncio.to_thread(outlet.wait_for_consumers, 15.0)
        yield api, stream, sink, ack


async def until_end(sink: asyncio.Queue[Any], timeout: float) -> list[Any]:
    """The items before END_OF_STREAM, which must come within ``timeout``."""
    items = []
    async with asyncio.timeout(timeout):
        while (item := await sink.get()) is not dm.END_OF_STREAM:
            items.append(item)
    return items


# -- through either API: the ``serve`` fixture (tests/conftest.py) runs a test against
# the local API and against a RemoteAPI served by an agent on the test's own loop.


# -- options and metadata, no network --------------------------------------------------


def test_options_are_validated_and_errors_name_the_key():
    assert lsl.LslOptions.parse({}) == lsl.LslOptions(1.0, 5.0, 60.0)
    assert lsl.LslOptions.parse({"wait_s": 0}).wait_s == 0
    for options, key in (
        ({"wait": 1}, "drivers.lsl.wait"),
        ({"wait_s": -1}, "drivers.lsl.wait_s"),
        ({"forget_after_s": 0}, "drivers.lsl.forget_after_s"),
        ({"max_buffered_s": "big"}, "drivers.lsl.max_buffered_s"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            lsl.LslDriver.from_config(options)


def test_ids_are_made_safe():
    assert lsl.safe_id("EEG stream/1") == "EEG_stream_1"
    assert lsl.safe_id("-x") == "_-x"
    assert lsl.safe_id("") == "stream"
    assert lsl.safe_id("my host", prefix="lsl-") == "lsl-my_host"
    assert len(lsl.safe_id("a" * 200)) == 64


def _xml(channels: str) -> str:
    return f"<info><name>x</name><desc>{channels}</desc></info>"


def test_channel_labels_and_units_fall_back_on_odd_descriptions():
    good = _xml(
        "<channels><channel><label>Fz</label><unit>uV</unit></channel>"
        "<channel><label>Cz</label></channel></channels>"
    )
    described = lsl.describe_channels(good, 2)
    assert described.labels == ("Fz", "Cz") and described.units == ("uV", "")
    fallback = ("ch0", "ch1")
    for odd in (
        "",  # no XML at all
        "<info><desc/></info>",  # no channels
        _xml("<channels><channel><label>a</label></channel></channels>"),  # too few
        _xml("<channels><channel><label>a</label></channel>" * 1 + "<channel/></channels>"),
        _xml(
            "<channels><channel><label>a</label></channel><channel><label>a</label>"
            "</channel></channels>"
        ),
        "<info><desc><channels><channel>",  # broken XML
    ):
        assert lsl.describe_channels(odd, 2).labels == fallback, odd


# -- discovery ---------------------------------------------------------------------------


def test_discovery_lists_an_outlet_with_labels_units_rate_and_format(workspace, serve):
    name = unique("eeg")
    labels, units = ["Fp1", "Fp2", "C3", "C4"], ["uV", "uV", "uV", "mV"]
    source_id = unique("src")

    async def body():
        with outlets(make_outlet(name, 4, 1000, "float32", source_id, labels, units)) as held:
            node_id = node_of(held[0])
            async with serve(make_api(workspace)) as api:
                stream = await find_stream(api, node_id, name)
                nodes = {n.id: n for n in await api.list_live_nodes()}
            return node_id, stream, nodes, held[0].get_info().uid()

    node_id, stream, nodes, uid = run(body())
    assert nodes[node_id].kind == "lsl" and nodes[node_id].device["hostname"]
    assert stream.id == name and stream.node_id == node_id
    assert stream.channels == labels
    assert [f.unit for f in stream.fields.values()] == units
    assert stream.frequency == 1000 and stream.dtype == np.float32
    assert stream.attrs["type"] == "EEG"
    assert stream.attrs["source_id"] == source_id and stream.attrs["uid"] == uid


def test_outlets_with_odd_or_no_descriptions_and_clashing_names_are_listed(workspace):
    base = unique("odd")
    made = [
        make_outlet(base + " no/desc", 2, 0, "int16"),
        make_outlet(base + "-dup", 2, 10, "double64", labels=["a", "a"]),
        make_outlet(base + "-short", 3, 10, "int32", labels=["only-one"]),
        make_outlet(base + "-empty", 2, 10, "int8", labels=["", ""], units=["", ""]),
        make_outlet(base + "-str", 1, 0, "string", unique("m")),
        make_outlet(base + "-i64", 1, 5, "int64", unique("i")),
        make_outlet(base + "-same", 1, 10, "float32", source_id=unique("s")),
        make_outlet(base + "-same", 1, 10, "float32", source_id=unique("s")),
    ]

    async def body():
        with outlets(*made) as held:
            node_id = node_of(held[0])
            api = make_api(workspace)
            try:
                await find_stream(api, node_id, base + "-i64")
                deadline = time.monotonic() + FIND_TIMEOUT_S
                while True:  # until all eight are listed
                    mine = [s for s in await api.list_live_streams(node_id) if base in s.name]
                    if len(mine) == len(made) or time.monotonic() > deadline:
                        return mine
                    await asyncio.sleep(0.1)
            finally:
                await api.aclose()

    streams = {s.name + "/" + s.attrs["source_id"]: s for s in run(body())}
    by_name = {}
    for stream in streams.values():
        by_name.setdefault(stream.name, []).append(stream)
    assert len(streams) == len(made)
    (no_desc,) = by_name[base + " no/desc"]
    assert no_desc.id == base + "_no_desc" and no_desc.channels == ["ch0", "ch1"]
    assert no_desc.frequency == 0 and no_desc.dtype == np.int16
    assert by_name[base + "-dup"][0].channels == ["ch0", "ch1"]
    assert by_name[base + "-dup"][0].dtype == np.float64
    assert by_name[base + "-short"][0].channels == ["ch0", "ch1", "ch2"]
    assert by_name[base + "-empty"][0].dtype == np.int8
    assert by_name[base + "-str"][0].dtype.kind == "U"
    assert by_name[base + "-i64"][0].dtype == np.int64
    clashing = sorted(s.id for s in by_name[base + "-same"])
    assert len(set(clashing)) == 2 and base + "-same" in clashing


# -- proxying ----------------------------------------------------------------------------


def test_proxy_float32_at_1khz_delivers_the_pushed_values_in_order(workspace, serve):
    name, source_id = unique("f32"), unique("src")
    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal((100, 8)).astype(np.float32) for _ in range(10)]

    async def body():
        outlet = make_outlet(name, 8, 1000, "float32", source_id, [f"c{i}" for i in range(8)])
        with outlets(outlet):
            async with proxied(serve, workspace, outlet, name) as (api, _, sink, ack):
                ends = []
                for chunk in chunks:  # 1 kHz in chunks of 100 samples
                    ends.append(pylsl.local_clock())
                    outlet.push_chunk(chunk, ends[-1])
                    await asyncio.sleep(0.1)
                items = await collect(sink, 1000)
                received_at = pylsl.local_clock()
                await api.stop_task(ack.randseq)
            return items, ends, received_at

    items, ends, received_at = run(body())
    frames = frames_of(items)
    assert [f.seq for f in frames] == list(range(len(frames)))
    values = np.concatenate([f.values for f in frames])
    timestamps = np.concatenate([f.timestamps for f in frames])
    assert values.dtype == np.float32 and frames[0].channels == [f"c{i}" for i in range(8)]
    np.testing.assert_array_equal(values, np.concatenate(chunks))
    # Each chunk's last sample carries the stamp given at push; the rest step back 1 ms.
    expected = np.concatenate([end - np.arange(99, -1, -1) / 1000 for end in ends])
    np.testing.assert_allclose(timestamps, expected, rtol=0, atol=1e-3)
    assert timestamps.dtype == np.float64 and np.all(np.diff(timestamps) > 0)
    assert received_at - 5 < timestamps[-1] <= received_at  # on this host's LSL clock


@pytest.mark.parametrize("api_kind", ["local", "remote-cbor", "remote-json"])
def test_proxy_string_markers_arrive_as_str_arrays(workspace, serve):
    name, source_id = unique("markers"), unique("src")
    markers = ["stimulus", "response", "ünïcode ✓", "", "a,b;c"]

    async def body():
        outlet = make_outlet(name, 1, 0, "string", source_id, ["marker"], stream_type="Markers")
        with outlets(outlet):
            async with proxied(serve, workspace, outlet, name) as (api, stream, sink, ack):
                stamps = []
                for marker in markers:
                    stamps.append(pylsl.local_clock())
                    outlet.push_sample([marker], stamps[-1])
                    await asyncio.sleep(0.02)
                items = await collect(sink, len(markers))
                await api.stop_task(ack.randseq)
            return stream, items, stamps

    stream, items, stamps = run(body())
    assert stream.frequency == 0 and stream.channels == ["marker"]
    frames = frames_of(items)
    values = np.concatenate([f.values for f in frames])
    assert values.dtype.kind == "U" and values.shape == (len(markers), 1)
    assert values[:, 0].tolist() == markers
    timestamps = np.concatenate([f.timestamps for f in frames])
    np.testing.assert_allclose(timestamps, stamps, rtol=0, atol=1e-3)


def test_stop_ends_the_stream_and_its_reader_thread(workspace, api_kind, serve):
    name = unique("stop")

    async def body():
        outlet = make_outlet(name, 2, 100, "float32", unique("src"))
        with outlets(outlet):
            proxy = proxied(serve, workspace, outlet, name, framing=None)
            async with proxy as (api, stream, sink, ack):
                outlet.push_chunk(np.ones((10, 2), np.float32))
                await collect(sink, 10)
                running = reader_threads()
                await api.stop_task(ack.randseq)
                queued, after_stop = sink.qsize(), reader_threads()
                rest = [await next_item(sink)]
                while rest[-1] is not dm.END_OF_STREAM:
                    rest.append(await next_item(sink))
            return stream, running, queued, rest, after_stop

    stream, running, queued, rest, after_stop = run(body())
    assert f"lsl-{stream.id}" in running
    assert rest[-1] is dm.END_OF_STREAM
    # END_OF_STREAM is on the sink when stop_task returns, through either API.
    assert queued == len(rest)
    assert f"lsl-{stream.id}" not in after_stop
    assert f"lsl-{stream.id}" not in reader_threads()


def test_a_vanished_outlet_is_lost_and_resumes_when_its_source_id_returns(workspace, serve):
    name = unique("loss")
    source_id = "s1-" + name  # "s1", made unique per run

    async def body():
        async with serve(make_api(workspace)) as api:
            first = make_outlet(name, 2, 100, "float32", source_id, ["x", "y"])
            node_id = node_of(first)
            stream = await find_stream(api, node_id, name)
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream(node_id, stream.id, {}, sink, framing="low-latency")
            assert await asyncio.to_thread(first.wait_for_consumers, 15.0)
            first.push_chunk(np.full((20, 2), 1, np.float32))
            before = await collect(sink, 20)
            del first  # outlet A leaves the network
            lost = await next_item(sink)
            second = make_outlet(name, 2, 100, "float32", source_id, ["x", "y"])
            with outlets(second):
                assert await asyncio.to_thread(second.wait_for_consumers, 20.0)
                back = await next_item(sink)
                second.push_chunk(np.full((20, 2), 2, np.float32))
                after = await collect(sink, 20)
                await api.stop_task(ack.randseq)
        return before, lost, back, after

    before, lost, back, after = run(body())
    assert frames_of(before)[0].values[0].tolist() == [1, 1]
    assert isinstance(lost, dm.StreamStatus) and lost.status == "disconnected"
    assert source_id in lost.reason
    assert isinstance(back, dm.StreamStatus) and back.status == "reconnected"
    frames = frames_of(after)
    assert np.concatenate([f.values for f in frames]).tolist() == [[2, 2]] * 20
    seqs = [f.seq for f in frames_of(before) + frames]
    assert seqs == list(range(len(seqs)))  # the task lived on: seq continues


_FROZEN_OUTLET = textwrap.dedent(
    """
    import sys, time, numpy as np, pylsl
    info = pylsl.StreamInfo(sys.argv[1], "EEG", 1, 100, "float32", sys.argv[1])
    outlet = pylsl.StreamOutlet(info)
    print("ready", flush=True)
    while True:
        outlet.push_chunk(np.zeros((10, 1), np.float32))
        time.sleep(0.1)
    """
)


def test_an_outlet_that_stops_answering_without_closing_is_lost(workspace):
    """A frozen process keeps its TCP connection open: only the resolver notices."""
    name = unique("frozen")
    process = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_OUTLET, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    async def body():
        api = make_api(workspace)
        try:
            assert process.stdout is not None
            assert (await asyncio.to_thread(process.stdout.readline)).strip() == "ready"
            (info,) = await asyncio.to_thread(pylsl.resolve_byprop, "name", name, 1, 5.0)
            node_id = lsl.safe_id(info.hostname(), prefix="lsl-")
            stream = await find_stream(api, node_id, name)
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream(node_id, stream.id, {}, sink, framing="low-latency")
            await collect(sink, 10)
            os.kill(process.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            while not isinstance(item := await next_item(sink), dm.StreamStatus):
                pass  # what was in flight
            return item, time.monotonic() - frozen_at
        finally:
            await api.aclose()

    try:
        status, took = run(body())
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.communicate(timeout=10)  # also closes the pipe
    assert status.status == "disconnected" and "no longer answers" in status.reason
    assert took < FAST["forget_after_s"] + 4


def test_unknown_ids_are_not_found(workspace):
    name = unique("known")

    async def body():
        async with one_outlet(workspace, name, rate=10) as (api, _, stream):
            sink: asyncio.Queue[Any] = asyncio.Queue()
            with pytest.raises(NotFound, match="no live node"):
                await api.proxy_live_stream("lsl-no-such-host", "x", {}, sink)
            with pytest.raises(NotFound):
                await api.list_live_streams("lsl-no-such-host")
            with pytest.raises(NotFound, match="no stream 'nope'"):
                await api.proxy_live_stream(stream.node_id, "nope", {}, sink)
        driver = lsl.LslDriver(lsl.LslOptions(wait_s=0.2))
        try:
            with pytest.raises(NotFound, match="no LSL node"):
                await driver.list_streams("lsl-no-such-host")
            with pytest.raises(NotFound, match="no LSL node"):
                driver.open_stream("lsl-no-such-host", "x", {}, dm.Framing())
        finally:
            await driver.aclose()

    run(body())


# -- stops, driver close, raw pylsl errors -------------------------------------------------


@contextlib.asynccontextmanager
async def pushing(outlet: Any, value: float = 1.0):
    """Push a sample every 20 ms while the block runs."""

    async def push() -> None:
        while True:
            outlet.push_chunk(np.full((1, 1), value, np.float32))
            await asyncio.sleep(0.02)

    pusher = asyncio.create_task(push())
    try:
        yield
    finally:
        pusher.cancel()
        await asyncio.wait({pusher})


def lsl_driver(api: dm.API) -> Any:
    return next(d for d in api._drivers if isinstance(d, lsl.LslDriver))


def _chunk_arrivals(workspace, framing: dm.Framing, seconds: float) -> tuple[int, list[int]]:
    """Open a 1 kHz outlet's source under ``framing`` while a thread pushes sample by sample.

    Returns the samples received and the samples in each chunk the source delivered.
    """
    name = unique("period")
    stop = threading.Event()

    def push(outlet: Any) -> None:
        k = 0
        while not stop.is_set():
            outlet.push_sample([float(k)])
            k += 1
            time.sleep(0.001)

    async def body() -> list[int]:
        async with one_outlet(workspace, name, rate=1000.0) as (api, outlet, stream):
            source = lsl_driver(api).open_stream(stream.node_id, stream.id, {}, framing)
            await source.open()
            pusher = threading.Thread(target=push, args=(outlet,), daemon=True)
            pusher.start()
            sizes: list[int] = []
            try:
                end = time.monotonic() + seconds
                async for timestamps, _ in source.chunks():
                    sizes.append(len(timestamps))
                    if time.monotonic() > end:
                        break
            finally:
                stop.set()
                pusher.join(5)
                await source.aclose()
            return sizes

    sizes = run(body())
    return sum(sizes), sizes


def test_pulls_follow_the_framings_latency_budget(workspace):
    """An outlet pushing sample by sample reaches the loop once per source period.

    Balanced framing (50 ms) pulls every 10 ms (MAX_PULL_PERIOD_S), so about 10
    samples a chunk; low-latency (2 ms) every 1 ms. Without the period each pull would
    return as soon as one sample is there: one chunk, and one loop wake, per sample.
    """
    balanced, low = dm.Framing.coerce("balanced"), dm.Framing.coerce("low-latency")
    assert balanced.source_period_s(0.01) == 0.01 and low.source_period_s(0.01) == 0.001
    samples, sizes = _chunk_arrivals(workspace, balanced, 1.0)
    assert samples > 300, sizes  # the pusher ran (a loaded machine pushes < 1 kHz)
    assert samples / len(sizes) >= 4, sizes  # about 10 a chunk; 1 without the period
    samples, sizes = _chunk_arrivals(workspace, low, 1.0)
    assert samples > 300, sizes
    assert samples / len(sizes) < 3, sizes  # a chunk every 1 ms: 1-2 samples each


def test_a_stop_while_connecting_keeps_the_outlet_listed_and_leaves_no_thread(workspace):
    """A stop mid-connect is not the outlet's fault: it stays listed and opens at once."""
    name = unique("stopconn")

    async def body():
        async with one_outlet(workspace, name) as (api, outlet, stream):
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream(stream.node_id, stream.id, {}, sink)
            async with asyncio.timeout(5):
                while not reader_threads():  # the reader is connecting now
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)  # the first time correction takes ~0.65 s
            await api.stop_task(ack.randseq)
            threads_after_stop = reader_threads()
            assert await next_item(sink, 2) is dm.END_OF_STREAM
            listed = [s.name for s in await api.list_live_streams(stream.node_id)]
            again: asyncio.Queue[Any] = asyncio.Queue()
            async with pushing(outlet):
                await api.proxy_live_stream(
                    stream.node_id, stream.id, {}, again, framing="low-latency"
                )
                first = await next_item(again, 5)
        return threads_after_stop, listed, first

    threads_after_stop, listed, first = run(body())
    assert threads_after_stop == []
    assert name in listed
    assert isinstance(first, dm.Frame), first  # no "disconnected" first: opened at once
    assert reader_threads() == []


def test_closing_the_driver_ends_open_sources_and_discovery(workspace):
    name = unique("closed")

    async def body():
        async with one_outlet(workspace, name) as (api, outlet, stream):
            sink: asyncio.Queue[Any] = asyncio.Queue()
            async with pushing(outlet):
                await api.proxy_live_stream(
                    stream.node_id, stream.id, {}, sink, framing="low-latency"
                )
                await collect(sink, 5)
                driver = lsl_driver(api)
                await driver.aclose()  # under a running task
                items = await until_end(sink, 2)
            nodes = await driver.list_nodes()
            resolver = driver._resolver
            with pytest.raises(DeviceError, match="LSL driver closed"):
                await driver.open_stream(stream.node_id, stream.id, {}, dm.Framing()).open()
        return items, nodes, resolver

    items, nodes, resolver = run(body())
    errors = [i for i in items if isinstance(i, dm.StreamError)]
    assert [(e.code, e.reason) for e in errors] == [("device", "LSL driver closed")]
    assert not [i for i in items if isinstance(i, dm.StreamStatus)]  # no retry loop
    assert nodes == [] and resolver is None  # the resolver is not recreated
    assert reader_threads() == []


def _failing_inlet(method: str, failures: list[int]) -> type:
    """A StreamInlet whose ``method`` raises a raw pylsl error while ``failures`` lasts."""

    original = pylsl.StreamInlet

    class Failing(original):
        pass

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures:
            failures.pop()
            raise pylsl.util.InternalError(f"injected {method} failure")
        return getattr(original, method)(self, *args, **kwargs)

    setattr(Failing, method, failing)
    return Failing


def test_a_raw_pylsl_error_while_connecting_is_a_device_loss(workspace, monkeypatch):
    name = unique("connerr")
    monkeypatch.setattr(pylsl, "StreamInlet", _failing_inlet("open_stream", [1]))

    async def body():
        # forget_after_s=1 lets the resolver's list flicker; the retry must not hit a gap.
        async with one_outlet(workspace, name, forget_after_s=2.0) as (api, outlet, stream):
            sink: asyncio.Queue[Any] = asyncio.Queue()
            async with pushing(outlet):
                await api.proxy_live_stream(
                    stream.node_id, stream.id, {}, sink, framing="low-latency"
                )
                return await collect(sink, 5, timeout=10)

    items = run(body())
    lost, back = [i for i in items if isinstance(i, dm.StreamStatus)]
    assert lost.status == "disconnected" and "injected open_stream failure" in lost.reason
    assert back.status == "reconnected"


def test_a_raw_pylsl_error_while_pulling_is_a_typed_device_error(workspace, monkeypatch):
    name = unique("pullerr")
    monkeypatch.setattr(pylsl, "StreamInlet", _failing_inlet("pull_chunk", [1]))

    async def body():
        async with one_outlet(workspace, name) as (api, _, stream):
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.proxy_live_stream(stream.node_id, stream.id, {}, sink)
            return await until_end(sink, 5)

    (error,) = run(body())
    assert isinstance(error, dm.StreamError) and error.code == "device"
    assert "InternalError: injected pull_chunk failure" in error.reason
    assert name in error.reason


# -- datamux simulate --lsl --------------------------------------------------------------

# Until cli/__init__.py registers simulate_cmd, the test adds it the way it will be added.
_LAUNCHER = textwrap.dedent(
    """
    import sys
    from streaminghub_datamux import cli
    from streaminghub_datamux.cli import simulate_cmd, stream_cmds
    registered = stream_cmds.register
    def register(subparsers):
        registered(subparsers)
        simulate_cmd.register(subparsers)
    stream_cmds.register = register
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def datamux_command() -> list[str]:
    from streaminghub_datamux.cli import build_parser

    try:
        build_parser().parse_args(["simulate", "--lsl"])
    except SystemExit:
        return [sys.executable, "-c", _LAUNCHER]
    return [sys.executable, "-m", "streaminghub_datamux"]


def test_datamux_simulate_publishes_the_demo_eeg_as_an_lsl_outlet(workspace):
    # The demo node's streams under a fresh node id, so the outlet name and source_id are
    # this run's own: another run's (or a leftover) outlet can never answer.
    node_id = unique("demo")
    outlet_name, source_id = f"{node_id}-eeg", f"datamux-sim-{node_id}-eeg"
    rc = {"simulate": {"nodes": {node_id: DEMO_NODE}}}
    (workspace.root / ".streaminghubrc").write_text(json.dumps(rc))
    env = {**os.environ, "HOME": str(workspace.root)}
    process = subprocess.Popen(
        [*datamux_command(), "simulate", "--lsl", node_id, "--streams", "eeg", "--seconds", "3",
         "--data_dir", str(workspace.data_dir), "--meta_dir", str(workspace.meta_dir)],
        cwd=workspace.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        found = pylsl.resolve_byprop("source_id", source_id, timeout=10)
        assert found, f"no outlet with source_id {source_id}"
        inlet = pylsl.StreamInlet(found[0], processing_flags=pylsl.proc_clocksync)
        full = inlet.info(timeout=5)
        labels = lsl.describe_channels(full.as_xml(), full.channel_count()).labels
        values, timestamps = inlet.pull_chunk(timeout=1.0, max_samples=1000, as_numpy=True)
        now = pylsl.local_clock()
        del inlet
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0, err
    assert f"publishing {node_id}/eeg as LSL outlet '{outlet_name}'" in out
    assert f"stopped {node_id}/eeg:" in out
    assert full.name() == outlet_name and full.source_id() == source_id
    assert full.nominal_srate() == 250
    assert labels == ("Fp1", "Fp2", "C3", "C4", "P3", "P4", "O1", "O2")
    assert values.ndim == 2 and values.shape[1] == 8 and values.dtype == np.float32
    assert len(values) > 50
    assert np.all(np.abs(timestamps - now) < 5)  # sim stamps moved onto the LSL clock
