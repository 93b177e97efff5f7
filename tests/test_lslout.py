"""LSL out: streams re-published as LSL outlets, read back with real pylsl inlets."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import pytest
from broker import Mosquitto
from helpers import gaze_collection, run
from remote import remote_api, running_agent

import streaminghub_datamux as dm
from streaminghub_datamux.cli import main as cli_main
from streaminghub_datamux.clocks import TEST_OFFSET_ENV
from streaminghub_datamux.model import Field, Frame, Stream

pylsl = pytest.importorskip("pylsl")
lslout = pytest.importorskip("streaminghub_datamux.lslout")

RESOLVE_S = 10.0
TOLERANCE_S = 1e-3


def unique() -> str:
    return f"dmtest-{uuid.uuid4().hex[:12]}"


def connect_inlet(source_id: str) -> Any:
    """A real inlet on the outlet with this source id, subscribed (blocking)."""
    found = pylsl.resolve_byprop("source_id", source_id, 1, RESOLVE_S)
    assert found, f"no outlet with source_id {source_id} within {RESOLVE_S} s"
    # recover=False: a closed outlet ends pulls with LostError instead of a reconnect.
    inlet = pylsl.StreamInlet(found[0], max_buflen=60, recover=False)
    inlet.open_stream(timeout=RESOLVE_S)
    return inlet


def pull(inlet: Any, count: int, timeout: float = 20.0) -> tuple[list[Any], np.ndarray]:
    """Exactly ``count`` samples and their timestamps, as the outlet stamped them."""
    samples: list[Any] = []
    stamps: list[float] = []
    deadline = time.monotonic() + timeout
    while len(samples) < count and time.monotonic() < deadline:
        try:
            chunk, ts = inlet.pull_chunk(timeout=0.2)
        except pylsl.util.LostError:
            break
        samples.extend(chunk)
        stamps.extend(ts)
    return samples, np.asarray(stamps, dtype=np.float64)


def full_info(inlet: Any) -> ET.Element:
    return ET.fromstring(inlet.info(timeout=RESOLVE_S).as_xml())


async def publish_and_read(api: Any, count: int, source_id: str, **options: Any) -> Any:
    """Publish study/gaze of subject A through ``api``, read it with an inlet."""
    reading: dict[str, Any] = {}

    def reader() -> None:
        inlet = connect_inlet(source_id)
        reading["info"] = full_info(inlet)
        reading["data"] = pull(inlet, count)

    thread = asyncio.create_task(asyncio.to_thread(reader))
    publication = await lslout.publish_collection_stream(
        api,
        "study",
        "gaze",
        {"subject": "A"},
        source_id=source_id,
        wait_consumer_s=RESOLVE_S,
        **options,
    )
    samples = await publication.wait()
    await thread
    return publication, samples, reading


@pytest.mark.parametrize("speed", [0.0, 4.0])
def test_replay_as_lsl_outlet_values_exact_timestamps_mapped(workspace, serve, speed):
    workspace.add_collection("study", gaze_collection())
    timestamps, values = workspace.add_gaze_recording("A", "1", n=200)
    source_id = unique()

    async def body() -> Any:
        async with serve(dm.API(workspace.config())) as api:
            before = pylsl.local_clock()
            result = await publish_and_read(
                api, len(timestamps), source_id, speed=speed, framing={"max_samples": 16}
            )
            return before, pylsl.local_clock(), *result

    before, after, publication, pushed, reading = run(body())
    got, stamps = reading["data"]
    assert pushed == len(timestamps)
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), values[:, :2])
    # Recording time mapped onto this LSL clock: spacing scaled by the speed (0 keeps
    # it), anchored while the replay ran.
    scale = 1.0 / speed if speed else 1.0
    clock = publication.outlet.clock
    assert clock.scale == pytest.approx(scale)
    expected = clock.lsl0 + (timestamps - clock.t0) * scale
    assert np.max(np.abs(stamps - expected)) < TOLERANCE_S
    np.testing.assert_allclose(np.diff(stamps), np.diff(timestamps) * scale, atol=1e-9)
    assert before - 1.0 <= stamps[0] and stamps[-1] <= after + 60.0 * scale

    info = reading["info"]
    assert info.findtext("name") == "Gaze"
    assert info.findtext("channel_count") == "2"
    assert float(info.findtext("nominal_srate")) == 100.0
    assert info.findtext("channel_format") == "float32"
    channels = info.findall("desc/channels/channel")
    assert [c.findtext("label") for c in channels] == ["gaze x", "gaze y"]
    assert [c.findtext("unit") for c in channels] == ["px", "px"]
    assert info.findtext("desc/datamux/clock") == "recording"
    assert info.findtext("desc/datamux/attrs/subject") == "A"


def test_wall_clock_stream_is_shifted_onto_the_lsl_clock():
    """A live (unix-time) stream: LSL time = source time + (local_clock() - time())."""
    stream = Stream(
        id="eeg",
        name="EEG",
        frequency=250.0,
        fields={f"c{i}": Field(f"c{i}", dtype="f64", unit="uV") for i in range(3)},
        node_id="demo",
        attrs={"mode": "simulate", "type": "EEG"},
    )
    source_id = unique()
    rng = np.random.default_rng(1)
    ts = time.time() + np.arange(500) / 250.0
    values = rng.standard_normal((500, 3))

    async def body() -> Any:
        outlet = lslout.LslOutlet(stream, source_id=source_id)
        inlet = await asyncio.to_thread(connect_inlet, source_id)
        assert await outlet.wait_for_consumer(RESOLVE_S)
        sink: asyncio.Queue[Any] = asyncio.Queue()
        for seq, start in enumerate(range(0, 500, 50)):
            part = slice(start, start + 50)
            sink.put_nowait(Frame("eeg", seq, ts[part], values[part], list(stream.fields)))
        sink.put_nowait(dm.END_OF_STREAM)
        reading = asyncio.create_task(asyncio.to_thread(pull, inlet, 500))
        await outlet.run(sink)
        return await reading

    offset = pylsl.local_clock() - time.time()
    got, stamps = run(body())
    np.testing.assert_array_equal(np.asarray(got), values)
    assert np.max(np.abs(stamps - (ts + offset))) < TOLERANCE_S


def test_string_stream_becomes_a_markers_outlet():
    stream = Stream(
        id="events",
        name="Events",
        fields={"label": Field("label", dtype="str")},
        collection_id="study",
    )
    source_id = unique()
    labels = np.array([["start"], ["blink"], ["ünïcode ✓"], ["stop"]])
    ts = np.array([1.0, 1.5, 2.25, 4.0])

    async def body() -> Any:
        outlet = lslout.LslOutlet(stream, source_id=source_id)
        inlet = await asyncio.to_thread(connect_inlet, source_id)
        info = await asyncio.to_thread(full_info, inlet)
        await outlet.wait_for_consumer(RESOLVE_S)
        sink: asyncio.Queue[Any] = asyncio.Queue()
        sink.put_nowait(Frame("events", 0, ts, labels, ["label"]))
        sink.put_nowait(dm.END_OF_STREAM)
        reading = asyncio.create_task(asyncio.to_thread(pull, inlet, 4))
        await outlet.run(sink)
        return info, outlet.clock, await reading

    info, clock, (got, stamps) = run(body())
    assert info.findtext("type") == "Markers"
    assert info.findtext("channel_format") == "string"
    assert float(info.findtext("nominal_srate")) == 0.0
    assert got == labels.tolist()
    assert np.max(np.abs(stamps - (clock.lsl0 + ts - clock.t0))) < TOLERANCE_S


def test_api_publish_collection_stream_and_stop(workspace):
    """Upstream's method: returns a task id; stop_task takes the outlet off the network."""
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=100_000)
    source_id = unique()

    async def body() -> Any:
        async with dm.API(workspace.config()) as api:
            ack = await api.publish_collection_stream(
                "study", "gaze", {"subject": "A"}, source_id=source_id, speed=1.0
            )
            inlet = await asyncio.to_thread(connect_inlet, source_id)
            got, _ = await asyncio.to_thread(pull, inlet, 20)
            await api.stop_task(ack.randseq)
            for _ in range(10):  # the outlet lingers LINGER_S for its inlet, then goes
                gone = await asyncio.to_thread(pylsl.resolve_byprop, "source_id", source_id, 1, 0.5)
                if not gone:
                    break
                await asyncio.sleep(0.5)
            return ack, got, gone

    ack, got, gone = run(body())
    assert ack.status and ack.randseq
    assert len(got) >= 20
    assert gone == []


def test_unsupported_dtype_is_refused_with_the_list():
    with pytest.raises(dm.errors.InvalidRequest, match="uint64"):
        lslout.lsl_format(np.dtype("uint64"))


def test_cli_lsl_out_replays_into_an_outlet(workspace):
    workspace.add_collection("study", gaze_collection())
    _, values = workspace.add_gaze_recording("A", "1", n=300)
    source_id = unique()
    result: dict[str, Any] = {}
    argv = [
        "lsl-out",
        "--collection",
        "study",
        "gaze",
        "-a",
        "subject=A",
        "--speed",
        "0",
        "--source-id",
        source_id,
        "--wait-consumer",
        "10",
        "--data-dir",
        str(workspace.data_dir),
        "--meta-dir",
        str(workspace.meta_dir),
    ]
    cli = threading.Thread(target=lambda: result.setdefault("rc", cli_main(argv)))
    cli.start()
    try:
        inlet = connect_inlet(source_id)
        got, _ = pull(inlet, 300)
    finally:
        cli.join(30)
    assert result.get("rc") == 0
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), values[:, :2])


def test_remote_live_stream_of_a_shifted_agent_lands_on_this_lsl_clock(
    workspace, tmp_path, monkeypatch
):
    """Through the RemoteAPI, live timestamps are corrected by the agent's clock offset
    (clock="client") before they are mapped onto the local LSL clock."""
    monkeypatch.setenv(TEST_OFFSET_ENV, "2.5")
    broker = Mosquitto(tmp_path / "mq", extra_config=["set_tcp_nodelay true"])
    broker.start()
    config = workspace.config()
    source_id = unique()

    async def body() -> tuple[np.ndarray, float]:
        async with (
            running_agent(config, broker, tmp_path / "s"),
            remote_api(config, broker) as api,
        ):
            publication = await lslout.publish_stream(
                api, "eeg", {}, node_id="demo", source_id=source_id
            )
            inlet = await asyncio.to_thread(connect_inlet, source_id)
            _, stamps = await asyncio.to_thread(pull, inlet, 200)
            now = pylsl.local_clock()
            await publication.stop()
            return stamps, now

    try:
        stamps, now = run(body())
    finally:
        broker.stop()
    assert len(stamps) >= 200
    # Without the correction the stamps would be 2.5 s in the future. (The latency is
    # well under 0.5 s on an idle machine; 1.5 s leaves a loaded one room.)
    assert 0 <= now - stamps[-1] < 1.5


def test_a_steered_replay_stays_monotonic_on_the_lsl_clock():
    """After a seek back and a new speed, LSL time goes on from now, at the new pace."""
    stream = Stream(
        id="gaze", fields={"x": Field("x", dtype="f32")}, frequency=100.0, collection_id="c"
    )
    source_id = unique()
    first = np.arange(50) / 100.0 + 10.0  # 10.00 .. 10.49
    again = np.arange(50) / 100.0 + 10.0  # a seek back to the start

    async def body() -> Any:
        outlet = lslout.LslOutlet(stream, source_id=source_id)
        inlet = await asyncio.to_thread(connect_inlet, source_id)
        await outlet.wait_for_consumer(RESOLVE_S)
        sink: asyncio.Queue[Any] = asyncio.Queue()
        reading = asyncio.create_task(asyncio.to_thread(pull, inlet, 100))
        runner = asyncio.create_task(outlet.run(sink))
        sink.put_nowait(Frame("gaze", 0, first, np.zeros((50, 1), np.float32), ["x"]))
        await asyncio.sleep(0.3)
        sink.put_nowait(dm.StreamStatus("gaze", "seek", "to 0", {"position": 0.0}))
        sink.put_nowait(dm.StreamStatus("gaze", "speed", "speed 2", {"speed": 2.0}))
        sink.put_nowait(Frame("gaze", 1, again, np.ones((50, 1), np.float32), ["x"]))
        sink.put_nowait(dm.END_OF_STREAM)
        await runner
        return await reading, outlet.clock

    (got, stamps), clock = run(body())
    assert len(stamps) == 100
    np.testing.assert_array_equal(np.asarray(got)[:, 0], [0.0] * 50 + [1.0] * 50)
    assert np.all(np.diff(stamps) > 0), "LSL time ran backwards at the jump"
    assert clock.scale == 0.5
    np.testing.assert_allclose(np.diff(stamps[50:]), 0.005, atol=1e-9)
    # Re-anchored when the frame after the jump was pushed, 0.3 s after the first.
    assert stamps[99] - stamps[49] > 0.25
