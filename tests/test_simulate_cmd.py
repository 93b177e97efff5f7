"""``datamux simulate``: simulated nodes published as real LSL outlets.

The outlets are read back through the API's own LSL driver, so these tests also check
that what the command publishes is a well-described LSL stream. Every node id is unique
per test, so outlet names never collide with other tests or runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from typing import Any

import numpy as np
import pytest
from helpers import collect, frames_of, run

import streaminghub_datamux as dm
from streaminghub_datamux.errors import InvalidRequest, NotFound

pylsl = pytest.importorskip("pylsl")
lsl = pytest.importorskip("streaminghub_datamux.drivers.lsl")
simulate_cmd = pytest.importorskip("streaminghub_datamux.cli.simulate_cmd")

FAST_LSL = {"wait_s": 0.2, "forget_after_s": 1.0}
FIND_TIMEOUT_S = 20.0  # a bound, not a delay: room for a loaded machine


def sim_node(faults: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": "simulate_cmd test node",
        "streams": {
            "sig": {
                "frequency": 200,
                "dtype": "f32",
                "unit": "mV",
                "channels": {
                    "a": {"signal": "sine", "freq_hz": 2},
                    "b": {"signal": "noise", "unit": "uV"},
                },
                "faults": faults or {},
            },
            "events": {
                "channels": {"label": {"signal": "marker", "labels": ["go"], "rate_hz": 20}}
            },
        },
    }


def make_api(workspace, node_id: str, faults: dict[str, Any] | None = None) -> dm.API:
    config = workspace.config(
        **{
            "simulate.nodes": {node_id: sim_node(faults)},
            "drivers.enabled": "sim,lsl",
            "drivers.lsl": FAST_LSL,
        }
    )
    return dm.API(config)


async def find_lsl_stream(api: dm.API, name: str) -> dm.Stream:
    deadline = time.monotonic() + FIND_TIMEOUT_S
    while time.monotonic() < deadline:
        for node in await api.list_live_nodes():
            if node.kind == "lsl":
                for stream in await api.list_live_streams(node.id):
                    if stream.name == name:
                        return stream
        await asyncio.sleep(0.1)
    raise AssertionError(f"no LSL outlet {name!r}")


def test_lsl_formats_cover_every_dtype():
    def stream(dtype: str) -> dm.Stream:
        return dm.Stream(id="s", fields={"c": dm.Field("c", dtype=dtype)})

    assert simulate_cmd.lsl_format(stream("f32")) == ("float32", np.dtype("float32"))
    assert simulate_cmd.lsl_format(stream("f64"))[0] == "double64"
    assert simulate_cmd.lsl_format(stream("u8")) == ("int16", np.dtype("int16"))
    assert simulate_cmd.lsl_format(stream("bool"))[0] == "int8"
    assert simulate_cmd.lsl_format(stream("str")) == ("string", None)


def test_published_outlets_carry_the_metadata_and_the_faulty_timestamps(workspace, capsys):
    node_id = f"simcmd-{uuid.uuid4().hex[:8]}"

    async def body():
        api = make_api(workspace, node_id, faults={"drop_rate": 0.2})
        stop = asyncio.Event()
        publishing = asyncio.create_task(simulate_cmd.publish_lsl(api, node_id, None, stop))
        try:
            sig = await find_lsl_stream(api, f"{node_id}-sig")
            events = await find_lsl_stream(api, f"{node_id}-events")
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream(sig.node_id, sig.id, {}, sink)
            items = await collect(sink, 100)
            now = pylsl.local_clock()
            await api.stop_task(ack.randseq)
        finally:
            stop.set()
            published = await publishing
            await api.aclose()
        return sig, events, items, now, published

    sig, events, items, now, published = run(body())
    assert sig.channels == ["a", "b"] and [f.unit for f in sig.fields.values()] == ["mV", "uV"]
    assert sig.frequency == 200 and sig.dtype == np.float32
    assert sig.attrs["source_id"] == f"datamux-sim-{node_id}-sig"
    assert events.attrs["type"] == "Markers" and events.dtype.kind == "U"
    assert events.frequency == 0 and events.channels == ["label"]
    timestamps = np.concatenate([f.timestamps for f in frames_of(items)])
    steps = np.diff(timestamps) * 200
    # Dropped samples stay gaps on the grid: LSL got each sample's own stamp.
    np.testing.assert_allclose(steps, np.round(steps), atol=0.01)
    # Stamps are float64 seconds near the LSL clock's value, so a whole step is 1 +- 1e-4.
    assert np.round(steps).max() >= 2 and np.round(steps).min() >= 1
    assert abs(timestamps[-1] - now) < 2  # moved from the wall clock to the LSL clock
    assert {p.stream_id for p in published} == {"sig", "events"}
    assert all(p.samples > 0 and not p.error for p in published)
    out = capsys.readouterr().out
    assert f"publishing {node_id}/sig as LSL outlet '{node_id}-sig'" in out
    assert "2 x float32, 200 Hz" in out and "1 x string, irregular" in out


def test_a_simulated_disconnect_takes_the_outlet_off_the_network(workspace):
    node_id = f"simcmd-{uuid.uuid4().hex[:8]}"
    # Up long enough for discovery (up to ~1 s) and the first time correction (~0.7 s).
    faults = {"disconnect_every_s": 3.0, "disconnect_for_s": 0.5}

    async def body():
        api = make_api(workspace, node_id, faults=faults)
        stop = asyncio.Event()
        publishing = asyncio.create_task(simulate_cmd.publish_lsl(api, node_id, ["sig"], stop))
        try:
            sig = await find_lsl_stream(api, f"{node_id}-sig")
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream(sig.node_id, sig.id, {}, sink)
            statuses: list[dm.StreamStatus] = []

            def back_after_loss() -> bool:
                seen = [s.status for s in statuses]
                return (
                    "disconnected" in seen and "reconnected" in seen[seen.index("disconnected") :]
                )

            # Bounded, and generous: on a loaded box a reconnect may miss an up window
            # (discovery takes up to ~1 s, the outlet is back 2.5 s of every 3 s).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while not back_after_loss():
                        item = await sink.get()
                        if isinstance(item, dm.StreamStatus):
                            statuses.append(item)
            assert back_after_loss(), f"no loss then return in 30 s: {statuses}"
            after = await collect(sink, 20)
            await api.stop_task(ack.randseq)
        finally:
            stop.set()
            await publishing
            await api.aclose()
        return statuses, after

    statuses, after = run(body(), timeout=60)
    lost = next(s for s in statuses if s.status == "disconnected")
    assert "vanished" in lost.reason
    assert sum(len(f) for f in frames_of(after)) >= 20


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="datamux")
    simulate_cmd.register(parser.add_subparsers())
    return parser.parse_args(["simulate", *argv])


def test_command_line_options():
    args = _parse("--lsl")
    assert args.lsl == "demo" and args.streams is None and args.seconds is None
    args = _parse("--lsl", "lab1", "--streams", "eeg,imu", "--seconds", "2.5")
    assert (args.lsl, args.streams, args.seconds) == ("lab1", "eeg,imu", 2.5)
    with pytest.raises(SystemExit):
        _parse()  # a target is required
    with pytest.raises(InvalidRequest, match="--seconds"):
        args = _parse("--lsl", "--seconds", "0")
        args.handler(args)


def test_unknown_streams_and_nodes_are_not_found(workspace):
    async def body():
        api = dm.API(workspace.config(**{"drivers.enabled": "sim"}))
        try:
            with pytest.raises(NotFound, match="no stream 'nope'"):
                await simulate_cmd.publish_lsl(api, "demo", ["eeg", "nope"], asyncio.Event())
            with pytest.raises(NotFound, match="no live node"):
                await simulate_cmd.publish_lsl(api, "nowhere", None, asyncio.Event())
        finally:
            await api.aclose()

    run(body())


def test_simulate_serial_is_read_back_by_the_serial_driver(workspace):
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("serial")
    command = [
        sys.executable,
        "-m",
        "streaminghub_datamux",
        "simulate",
        "--serial",
        "demo",
        "--streams",
        "imu",
        "--seconds",
        "6",
        "--data_dir",
        str(workspace.data_dir),
        "--meta_dir",
        str(workspace.meta_dir),
    ]
    env = {**os.environ, "HOME": str(workspace.root)}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        assert first.startswith("demo/imu on /dev/")
        devices = json.loads("{" + second.strip() + "}")["drivers"]["serial"]["devices"]

        async def body():
            config = workspace.config(
                **{"drivers.enabled": "sim,serial", "drivers.serial": {"devices": devices}}
            )
            api = dm.API(config)
            sink = asyncio.Queue()
            ack = await api.proxy_live_stream("demo-imu", "imu", {}, sink)
            frames = await collect(sink, 50)
            await api.stop_task(ack.randseq)
            return frames_of(frames)

        frames = run(body(), timeout=20)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    values = np.concatenate([f.values for f in frames])
    assert values.shape[1] == 6 and frames[0].channels == ["ax", "ay", "az", "gx", "gy", "gz"]
    assert abs(float(np.median(values[:, 2])) - 9.81) < 1.0  # az: gravity
