"""Guided simulation: a recording posing as a live device, looping at its native rate."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from helpers import gaze_collection, run

import streaminghub_datamux as dm
from streaminghub_datamux.catalog import Catalog
from streaminghub_datamux.drivers.replay import ReplayOpener
from streaminghub_datamux.drivers.simulate import SimDriver
from streaminghub_datamux.errors import ConfigError, NotFound

GUIDED_NODE = {
    "lab": {
        "name": "Replayed eye tracker",
        "streams": {
            "gaze": {"guided": {"collection": "study", "stream": "gaze", "attrs": {"subject": "A"}}}
        },
    }
}


def test_guided_stream_is_listed_and_streams_like_a_device(workspace):
    workspace.add_collection("study", gaze_collection(frequency=100))
    _, values = workspace.add_gaze_recording("A", "1", n=20, frequency=100)  # 0.2 s, loops

    async def body():
        api = dm.API(workspace.config(**{"simulate.nodes": GUIDED_NODE}))
        assert "lab" in [n.id for n in await api.list_live_nodes()]
        (stream,) = await api.list_live_streams("lab")
        sink = asyncio.Queue()
        ack = await api.proxy_live_stream("lab", "gaze", {}, sink, framing={"max_latency_ms": 20})
        frames = []
        started = time.time()
        while sum(len(f) for f in frames) < 50:
            item = await sink.get()
            assert isinstance(item, dm.Frame), item
            frames.append(item)
        await api.stop_task(ack.randseq)
        return stream, frames, started

    stream, frames, started = run(body())
    assert stream.channels == ["x", "y"] and stream.frequency == 100 and stream.node_id == "lab"
    assert stream.attrs["guided_by"] == "study/gaze"
    got = np.concatenate([f.values for f in frames])[:50]
    # loops: 20 recorded samples, then the same 20 again
    np.testing.assert_array_equal(got[:20], values[:, :2])
    np.testing.assert_array_equal(got[20:40], values[:, :2])
    ts = np.concatenate([f.timestamps for f in frames])[:50]
    np.testing.assert_allclose(np.diff(ts), 0.01, atol=1e-6)  # native rate, across the loop
    assert abs(ts[0] - started) < 5.0  # on the wall clock, like a device (not 0 or 10 s)


def test_guided_stream_needs_a_replay_opener_not_the_api(workspace):
    """The simulator is handed what opens recordings, never the API that runs it."""
    workspace.add_collection("study", gaze_collection(frequency=100))
    _, values = workspace.add_gaze_recording("A", "1", n=20, frequency=100)
    opener = ReplayOpener(Catalog(workspace.data_dir, workspace.meta_dir))
    driver = SimDriver(GUIDED_NODE, recordings=opener)

    async def body():
        (stream,) = await driver.list_streams("lab")
        source = driver.open_stream("lab", "gaze", {}, dm.Framing())
        await source.open()
        got = []
        try:
            async for _, chunk in source.chunks():
                got.append(chunk)
                if sum(len(c) for c in got) >= 20:
                    break
        finally:
            await source.aclose()
        return stream, np.concatenate(got)[:20]

    stream, got = run(body())
    assert stream.attrs["guided_by"] == "study/gaze" and stream.channels == ["x", "y"]
    np.testing.assert_array_equal(got, values[:, :2])


def test_guided_stream_with_missing_recording_is_not_listed_and_cannot_open(workspace):
    async def body():
        api = dm.API(workspace.config(**{"simulate.nodes": GUIDED_NODE}))
        assert await api.list_live_streams("lab") == []
        with pytest.raises(NotFound, match="study"):
            await api.proxy_live_stream("lab", "gaze", {}, asyncio.Queue())

    run(body())


def test_guided_stream_rejects_synthetic_options(workspace):
    bad = {
        "lab": {"streams": {"gaze": {"guided": {"collection": "c", "stream": "s"}, "frequency": 5}}}
    }
    with pytest.raises(ConfigError, match=r"simulate\.nodes\.lab\.streams\.gaze\.frequency"):
        dm.API(workspace.config(**{"simulate.nodes": bad}))


def test_guided_irregular_markers_loop_without_repeating_timestamps(workspace):
    meta = {
        "name": "events",
        "streams": {
            "ev": {
                "frequency": 0,
                "fields": {"label": {"dtype": "str"}},
                "index": {"t": {"dtype": "f64", "unit": "s"}},
            }
        },
        "pattern": "csv://{subject}",
    }
    workspace.add_collection("events", meta)
    path = workspace.data_dir / "events" / "A.csv"
    path.parent.mkdir(parents=True)
    path.write_text('t,label\n0.0,"go"\n0.1,"stop"\n0.2,"go"\n')
    nodes = {
        "lab": {
            "streams": {
                "ev": {
                    "guided": {"collection": "events", "stream": "ev", "attrs": {"subject": "A"}}
                }
            }
        }
    }

    async def body():
        api = dm.API(workspace.config(**{"simulate.nodes": nodes}))
        sink = asyncio.Queue()
        ack = await api.proxy_live_stream("lab", "ev", {}, sink, framing="low-latency")
        frames = []
        while sum(len(f) for f in frames) < 7:
            frames.append(await sink.get())
        await api.stop_task(ack.randseq)
        return frames

    frames = run(body())
    ts = np.concatenate([f.timestamps for f in frames])[:7]
    labels = np.concatenate([f.values[:, 0] for f in frames])[:7]
    assert list(labels) == ["go", "stop", "go", "go", "stop", "go", "go"]
    assert np.all(np.diff(ts) > 0.05)  # the loop continues at the mean spacing (0.1 s)
    assert abs(ts[0] - time.time()) < 10.0  # the wall clock, not the recording's times
