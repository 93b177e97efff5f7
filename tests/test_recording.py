"""Recording streams into DFDS collections, and replaying them back bit-exact."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import drain, frames_of, gaze_collection, run

import streaminghub_datamux as dm
from streaminghub_datamux.errors import InvalidRequest
from streaminghub_datamux.recording import record

TRICKY_MARKERS = ["a,b", 'say "hi"', "two\nlines", "plain", "ünïcödé"]
NODES = {
    "bench": {
        "streams": {
            "big": {
                "frequency": 200,
                "dtype": "i64",
                "seed": 3,
                "channels": {"v": {"signal": "sine", "freq_hz": 2, "amplitude": 4e18}},
            },
            "flags": {
                "frequency": 200,
                "dtype": "bool",
                "seed": 4,
                "channels": {"on": {"signal": "square", "freq_hz": 5}},
            },
            "events": {
                "channels": {"label": {"signal": "marker", "labels": TRICKY_MARKERS, "rate_hz": 40}}
            },
        }
    }
}


async def replay_all(api, collection, stream, attrs):
    sink = asyncio.Queue()
    await api.replay_collection_stream(collection, stream, attrs, sink, speed=0)
    return frames_of(await drain(sink))


def concat(frames):
    return np.concatenate([f.timestamps for f in frames]), np.concatenate(
        [f.values for f in frames]
    )


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_replay_recorded_into_a_collection_replays_bit_exact(workspace, file_format):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=3000)

    async def body():
        api = dm.API(workspace.config())
        summary = await record(
            api,
            mode="replay",
            source_id="study",
            stream_id="gaze",
            attrs={"subject": "A"},
            into="copy",
            recording={"subject": "A", "session": "1"},
            config=api.config,
            file_format=file_format,
        )
        original = await replay_all(api, "study", "gaze", {"subject": "A"})
        copied = await replay_all(api, "copy", "gaze", {"subject": "A", "session": "1"})
        streams = await api.list_collection_streams("copy")
        return summary, original, copied, streams

    summary, original, copied, streams = run(body())
    assert summary.samples == 3000 and summary.error is None
    assert summary.path == workspace.data_dir / "copy" / "A" / "1" / f"gaze.{file_format}"
    ts0, v0 = concat(original)
    ts1, v1 = concat(copied)
    assert v1.dtype == v0.dtype == np.float32
    np.testing.assert_array_equal(ts1, ts0)
    np.testing.assert_array_equal(v1, v0)
    (stream,) = streams  # one recording of one stream
    assert stream.channels == ["x", "y"] and stream.frequency == 100
    assert [f.name for f in stream.fields.values()] == ["gaze x", "gaze y"]


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_live_streams_of_every_dtype_round_trip(workspace, file_format):
    async def body():
        api = dm.API(workspace.config(**{"simulate.nodes": NODES}))
        results = {}
        for stream_id in ("big", "flags", "events"):
            seen = []
            summary = await record(
                api,
                mode="proxy",
                source_id="bench",
                stream_id=stream_id,
                into="live",
                recording={"take": "1"},
                config=api.config,
                duration=1.0,
                on_frame=seen.append,
                file_format=file_format,
            )
            back = await replay_all(api, "live", stream_id, {"take": "1"})
            results[stream_id] = (summary, seen, back)
        return results

    for stream_id, (summary, seen, back) in run(body()).items():
        assert summary.samples > 0, stream_id
        ts0, v0 = concat(seen)
        ts1, v1 = concat(back)
        if v0.dtype.kind == "U":  # a str array's width is not part of its content
            assert v1.dtype.kind == "U"
        else:
            assert v1.dtype == v0.dtype, stream_id
        if stream_id == "big":  # beyond float64's exact integers: must not pass through it
            assert np.abs(v0).max() > 2**53
        np.testing.assert_array_equal(ts1, ts0)
        np.testing.assert_array_equal(v1, v0)


def test_recording_refuses_unsafe_names_and_existing_recordings(workspace):
    async def body():
        api = dm.API(workspace.config())
        common = dict(
            mode="proxy", source_id="demo", stream_id="eeg", config=api.config, duration=0.2
        )
        with pytest.raises(InvalidRequest, match="cannot name a file"):
            await record(api, into="ok", recording={"subject": "../etc"}, **common)
        with pytest.raises(InvalidRequest, match="cannot name a file"):
            await record(api, into="a/b", recording={"subject": "A"}, **common)
        await record(api, into="ok", recording={"subject": "A"}, **common)
        with pytest.raises(InvalidRequest, match="exists"):
            await record(api, into="ok", recording={"subject": "A"}, **common)
        with pytest.raises(InvalidRequest, match="pattern"):
            await record(api, into="ok", recording={"subject": "B", "day": "2"}, **common)
        again = await record(api, into="ok", recording={"subject": "A"}, overwrite=True, **common)
        return again, await api.list_collection_recordings("ok")

    again, recordings = run(body())
    assert again.samples > 0 and recordings == [{"subject": "A"}]


def test_a_recording_killed_mid_way_stays_replayable(workspace):
    env = {**os.environ, "HOME": str(workspace.root)}
    command = [
        sys.executable,
        "-m",
        "streaminghub_datamux",
        "record",
        "--node",
        "demo",
        "eeg",
        "--into",
        "crash",
        "-r",
        "subject=A",
        "--data_dir",
        str(workspace.data_dir),
        "--meta_dir",
        str(workspace.meta_dir),
    ]
    log = workspace.root / "record.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
    try:
        path = workspace.data_dir / "crash" / "A" / "eeg.csv"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 20_000):
            time.sleep(0.05)
        assert path.exists(), log.read_text()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    async def body():
        api = dm.API(workspace.config())
        return await replay_all(api, "crash", "eeg", {"subject": "A"})

    timestamps, values = concat(run(body()))
    assert len(timestamps) > 50 and values.shape[1] == 8
    assert np.all(np.diff(timestamps) > 0)


def test_two_recordings_into_one_collection_at_once_keep_both_streams(workspace):
    async def body():
        api = dm.API(workspace.config())
        common = dict(
            mode="proxy",
            source_id="demo",
            into="lab",
            recording={"subject": "A"},
            config=api.config,
            duration=0.5,
        )
        await asyncio.gather(
            record(api, stream_id="eeg", **common), record(api, stream_id="imu", **common)
        )
        return {s.id for s in await api.list_collection_streams("lab")}

    assert run(body()) == {"eeg", "imu"}


def test_a_timed_recording_keeps_exactly_duration_times_rate_samples(workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=300)

    async def body():
        api = dm.API(workspace.config())
        common = dict(into="lab", recording={"subject": "A"}, config=api.config)
        live = await record(
            api, mode="proxy", source_id="demo", stream_id="eeg", duration=2, **common
        )
        replayed = await record(
            api, mode="replay", source_id="study", stream_id="gaze", attrs={"subject": "A"},
            duration=0.5, **common,
        )  # fmt: skip
        back = await replay_all(api, "lab", "eeg", {"subject": "A"})
        return live, replayed, back

    live, replayed, back = run(body())
    assert (live.samples, replayed.samples) == (500, 50)  # 2 s x 250 Hz, 0.5 s x 100 Hz
    timestamps, _ = concat(back)
    assert len(timestamps) == 500 and timestamps[-1] - timestamps[0] < 2.0


def test_stop_ends_a_recording_with_its_summary(workspace):
    async def body():
        api = dm.API(workspace.config())
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        summary = await record(
            api, mode="proxy", source_id="demo", stream_id="eeg", into="lab",
            recording={"subject": "A"}, config=api.config, stop=stop,
        )  # fmt: skip
        return summary, await replay_all(api, "lab", "eeg", {"subject": "A"})

    summary, back = run(body())
    assert summary.samples > 0 and summary.samples == len(concat(back)[0])
    # only the collection's metadata in meta_dir: no lock or temporary files left behind
    assert sorted(p.name for p in workspace.meta_dir.iterdir()) == ["lab.collection.json"]


def test_ctrl_c_ends_datamux_record_with_a_summary(workspace):
    path = workspace.data_dir / "lab" / "A" / "eeg.csv"
    command = [
        sys.executable, "-m", "streaminghub_datamux", "record", "--node", "demo", "eeg",
        "--into", "lab", "-r", "subject=A", "--data_dir", str(workspace.data_dir),
        "--meta_dir", str(workspace.meta_dir),
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(workspace.root), "STREAMINGHUB_DRIVERS__ENABLED": "sim"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 5000):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, stderr
    rows = len(path.read_text().splitlines()) - 1
    assert stdout.decode().startswith(f"recorded {rows} samples in ")
    assert stdout.decode().endswith(f" to {path} (stopped by Ctrl-C)\n")
    assert stderr.decode() == ""


def test_datamux_record_format_parquet_from_the_shell(workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=500)
    env = {**os.environ, "HOME": str(workspace.root)}
    flags = ["--data_dir", str(workspace.data_dir), "--meta_dir", str(workspace.meta_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "streaminghub_datamux", "record", "--collection", "study",
         "gaze", "-a", "subject=A", "--into", "pq", "-r", "take=1", "--format", "parquet",
         *flags],
        capture_output=True, text=True, timeout=60, cwd=workspace.root, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = workspace.data_dir / "pq" / "1" / "gaze.parquet"
    assert "recorded 500 samples" in result.stdout and str(path) in result.stdout
    meta = (workspace.meta_dir / "pq.collection.json").read_text()
    assert '"pattern": "parquet://{take}/{stream}"' in meta

    async def body():
        api = dm.API(workspace.config())
        original = concat(await replay_all(api, "study", "gaze", {"subject": "A"}))
        copied = concat(await replay_all(api, "pq", "gaze", {"take": "1"}))
        return original, copied

    (ts0, v0), (ts1, v1) = run(body())
    assert ts1.tobytes() == ts0.tobytes() and v1.tobytes() == v0.tobytes()
