"""Upstream DataMux drop-in: its five example collections, its layout, its calls.

The collection files are upstream's own (copied unchanged); recordings are written in
upstream's layout (CSV, HDF5, Parquet; index units left to be inferred). The flow is
upstream's README: list_collections -> list_collection_streams -> stream.attrs ->
replay_collection_stream -> read to END_OF_STREAM -> stop_task, through the local API
and through the RemoteAPI on a real mosquitto, values bit-exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import drain, frames_of, run, write_csv
from upstream_data import COLLECTIONS, RECORDINGS, copy_collections, metadata, write_recordings

import streaminghub_datamux as dm
from streaminghub_datamux.errors import InvalidRequest, NotFound


@pytest.fixture
def upstream(workspace):
    copy_collections(workspace.meta_dir)
    expected = write_recordings(workspace.data_dir)
    return workspace, expected


def _selector(collection_id: str, attrs: dict) -> tuple:
    names = RECORDINGS[collection_id][0].keys()
    return tuple(sorted((k, v) for k, v in attrs.items() if k in names))


def test_readme_flow_replays_every_recording_bit_exact(upstream, serve):
    workspace, expected = upstream

    async def body():
        async with serve(dm.API(workspace.config())) as api:
            collections = {c.id: c for c in await api.list_collections()}
            assert set(COLLECTIONS) <= set(collections)
            replayed = set()
            for collection_id in COLLECTIONS:
                streams = await api.list_collection_streams(collection_id)
                # One stream per recording and declared stream (battleship keeps each
                # stream in its own file, {stream_name}: one per file).
                declared = list(metadata(collection_id)["streams"])
                assert len(streams) == len(RECORDINGS[collection_id]) * len(declared)
                for stream in streams:
                    attrs = stream.attrs
                    assert attrs["collection"] == metadata(collection_id)["name"]
                    assert attrs["id"] == stream.id
                    sink: asyncio.Queue = asyncio.Queue()
                    ack = await api.replay_collection_stream(
                        collection_id, attrs["id"], attrs, sink, rate_limit=False
                    )
                    items = await drain(sink)
                    await api.stop_task(ack.randseq)
                    assert items[-1] is dm.END_OF_STREAM
                    frames = frames_of(items)
                    assert len(frames) == len(items) - 1, items[-2:]
                    key = (collection_id, stream.id, _selector(collection_id, attrs))
                    want = expected[key]
                    got_t = np.concatenate([f.timestamps for f in frames])
                    got_v = np.concatenate([f.values for f in frames])
                    assert got_v.dtype == want.values.dtype
                    assert got_t.tobytes() == want.timestamps.tobytes(), key
                    assert got_v.tobytes() == want.values.tobytes(), key
                    # Every attr passed is echoed on the frames, upstream's included.
                    assert all(f.attrs[k] == v for f in frames for k, v in attrs.items())
                    replayed.add(key)
            assert replayed == set(expected)

    run(body(), timeout=120)


def test_listed_attrs_follow_upstream_in_a_stable_order(upstream):
    workspace, _ = upstream

    async def body():
        async with dm.API(workspace.config()) as api:
            first = await api.list_collection_streams("n_back")
            again = await api.list_collection_streams("n_back")
            assert [list(s.attrs.items()) for s in first] == [list(s.attrs.items()) for s in again]
            gaze = next(s for s in first if s.id == "gaze")
            # The recording's own "mode" placeholder wins over upstream's "replay", so
            # the attrs select the recording they came from.
            assert list(gaze.attrs) == ["subject", "mode", "task", "position", "collection", "id"]
            assert gaze.attrs == {
                "subject": "1",
                "mode": "baseline",
                "task": "1",
                "position": "top_left",
                "collection": "n_back",
                "id": "gaze",
            }
            eeg = next(s for s in await api.list_collection_streams("tdbrain") if s.id == "eeg")
            assert eeg.attrs["mode"] == "replay" and eeg.collection_id == "tdbrain"
            adhd = (await api.list_collection_streams("adhd_sin"))[0]
            assert adhd.attrs["collection"] == "adhd_sin_csv"  # the name, not the id
            pupil = [s for s in await api.list_collection_streams("battleship_gaze")]
            assert {(s.id, s.attrs["stream_name"]) for s in pupil} == {
                ("gaze", "gaze"),
                ("pupil", "pupil"),
            }
            # list_collection_recordings stays: one entry per recording.
            assert await api.list_collection_recordings("n_back") == RECORDINGS["n_back"]

    run(body())


def test_readme_attrs_with_extra_keys_select_and_are_echoed(upstream):
    workspace, expected = upstream
    attrs = {"subject": "12", "task": "2", "note": "anything", "mode": "task"}

    async def body():
        async with dm.API(workspace.config()) as api:
            sink: asyncio.Queue = asyncio.Queue()
            await api.replay_collection_stream("n_back", "pupil", attrs, sink, speed=0)
            frames = frames_of(await drain(sink))
            assert frames and all(f.attrs["note"] == "anything" for f in frames)
            want = expected[("n_back", "pupil", _selector("n_back", RECORDINGS["n_back"][1]))]
            assert np.concatenate([f.values for f in frames]).tobytes() == want.values.tobytes()
            # Attrs that match several recordings, or none, stay clear errors.
            with pytest.raises(InvalidRequest, match=r"2 recordings of 'n_back'.*subject"):
                await api.replay_collection_stream("n_back", "gaze", {"x": "1"}, sink)
            with pytest.raises(NotFound, match=r"no recording of 'n_back' matches.*'7'"):
                await api.replay_collection_stream("n_back", "gaze", {"subject": "7"}, sink)

    run(body())


def test_replay_keywords_relative_timestamps_pacing_and_transform(upstream):
    workspace, expected = upstream
    attrs = RECORDINGS["n_back"][0]
    want = expected[("n_back", "gaze", _selector("n_back", attrs))]

    async def body():
        async with dm.API(workspace.config()) as api:
            sink: asyncio.Queue = asyncio.Queue()
            await api.replay_collection_stream(
                "n_back", "gaze", attrs, sink, rate_limit=False, use_relative_ts=True
            )
            frames = frames_of(await drain(sink))
            got = np.concatenate([f.timestamps for f in frames])
            assert got[0] == 0.0
            np.testing.assert_array_equal(got, want.timestamps - want.timestamps[0])

            # transform: applied to each frame; END_OF_STREAM passes unchanged.
            await api.replay_collection_stream(
                "n_back", "gaze", attrs, sink, rate_limit=False, transform=lambda f: len(f)
            )
            items = await drain(sink)
            assert sum(items[:-1]) == len(want.timestamps) and items[-1] is dm.END_OF_STREAM

            # strict_time=False paces by sample count at the nominal rate, ignoring a gap.
            path = workspace.data_dir / "gaps" / "A.csv"
            write_csv(path, ["t", "x"], np.array([[0.0, 1.0], [0.01, 2.0], [1.5, 3.0]]))
            meta = {
                "name": "gaps",
                "streams": {
                    "s": {
                        "frequency": 100,
                        "fields": {"x": {"dtype": "f64"}},
                        "index": {"t": {"unit": "s"}},
                    }
                },
                "pattern": "csv://{subject}",
            }
            workspace.add_collection("gaps", meta)
            # A 1.5 s gap, so a loaded machine's start-up time (up to 1 s allowed) cannot
            # make the count-paced replay look like the gap was kept.
            for strict, low, high in ((True, 1.45, 4.0), (False, 0.0, 1.0)):
                started = time.monotonic()
                await api.replay_collection_stream(
                    "gaps", "s", {}, sink, strict_time=strict, framing="low-latency"
                )
                await drain(sink)
                assert low <= time.monotonic() - started <= high, strict
            with pytest.raises(InvalidRequest, match="transform must be callable"):
                await api.replay_collection_stream("gaps", "s", {}, sink, transform=3)

    run(body())


def test_recordings_in_a_folder_named_by_id_keep_working(upstream):
    workspace, expected = upstream
    (workspace.data_dir / "adhd_sin_csv").rename(workspace.data_dir / "adhd_sin")

    async def body():
        async with dm.API(workspace.config()) as api:
            streams = await api.list_collection_streams("adhd_sin")
            assert len(streams) == 2
            sink: asyncio.Queue = asyncio.Queue()
            await api.replay_collection_stream("adhd_sin", "gaze", streams[1].attrs, sink, speed=0)
            frames = frames_of(await drain(sink))
            want = expected[("adhd_sin", "gaze", _selector("adhd_sin", streams[1].attrs))]
            assert np.concatenate([f.values for f in frames]).tobytes() == want.values.tobytes()

    run(body())


def test_the_name_folder_wins_when_both_hold_recordings(upstream):
    workspace, _ = upstream
    other = workspace.data_dir / "adhd_sin"
    other.mkdir()
    (workspace.data_dir / "adhd_sin_csv" / "003_0_1.csv").rename(other / "003_0_1.csv")

    async def body():
        async with dm.API(workspace.config()) as api:
            recordings = await api.list_collection_recordings("adhd_sin")
            assert recordings == [RECORDINGS["adhd_sin"][1]]  # only the name folder's

    run(body())


def test_no_recordings_names_every_folder_searched_and_the_pattern(upstream):
    workspace, _ = upstream
    data = workspace.data_dir
    for path in (data / "n_back" / "data.h5", *(data / "adhd_sin_csv").iterdir()):
        path.unlink()
    (data / "adhd_sin_csv" / "unrelated.csv").write_text("a,b\n1,2\n")

    async def body():
        async with dm.API(workspace.config()) as api:
            for call in (api.list_collection_streams, api.list_collection_recordings):
                with pytest.raises(NotFound) as caught:
                    await call("adhd_sin")
                message = str(caught.value)
                assert f"{data / 'adhd_sin_csv'}/ (nothing matches)" in message
                assert f"{data / 'adhd_sin'}/ (no such folder)" in message
                assert "csv://{participant}_{noise}_{question}.csv" in message
            with pytest.raises(NotFound, match=r"n_back/ \(no file data.h5\).*h5://S\{subject\}"):
                await api.list_collection_streams("n_back")
            with pytest.raises(NotFound, match=r"no file data.h5"):
                await api.replay_collection_stream(
                    "n_back", "gaze", RECORDINGS["n_back"][0], asyncio.Queue()
                )

    run(body())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    flags = ["--data_dir", str(data), "--meta_dir", str(workspace.meta_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "streaminghub_datamux", "ls", "adhd_sin", *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=workspace.root,
        timeout=60,
    )
    assert result.returncode == 1
    assert "recordings (0)" not in result.stdout and "none" not in result.stdout
    assert f"{data / 'adhd_sin_csv'}/ (nothing matches)" in result.stderr
    assert "csv://{participant}_{noise}_{question}.csv" in result.stderr


def test_the_schema_url_is_never_fetched(upstream):
    workspace, _ = upstream
    # Refs and $schema URLs are never followed: loading works with no network at all.
    for collection_id in COLLECTIONS:
        raw = json.loads((workspace.meta_dir / f"{collection_id}.collection.json").read_text())
        assert raw["$schema"].startswith("https://")

    async def body():
        async with dm.API(workspace.config()) as api:
            assert {c.id for c in await api.list_collections()} >= set(COLLECTIONS)

    run(body())


def test_a_missing_extra_is_an_error_naming_it(upstream, monkeypatch):
    from streaminghub_datamux.drivers import formats

    workspace, _ = upstream
    monkeypatch.setattr(formats, "_loaded", {})
    for module in ("h5py", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of it now fails
    for name in ("streaminghub_datamux.drivers.hdf5", "streaminghub_datamux.drivers.parquet"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    async def body():
        async with dm.API(workspace.config()) as api:
            with pytest.raises(InvalidRequest, match=r"pip install 'streaminghub-datamux\[hdf5\]'"):
                await api.list_collection_streams("n_back")
            with pytest.raises(
                InvalidRequest, match=r"pip install 'streaminghub-datamux\[parquet\]'"
            ):
                await api.replay_collection_stream(
                    "tdbrain", "eeg", RECORDINGS["tdbrain"][0], asyncio.Queue()
                )
            # The others still work.
            assert await api.list_collection_recordings("adhd_sin")

    run(body())


def _age(*paths):
    """Date folders back, as data on disk is: fresh changes are never cached (racy)."""
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))


def test_the_folder_scan_is_cached_and_follows_every_change(workspace):
    from helpers import gaze_collection

    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=5)
    workspace.add_gaze_recording("B", "1", n=5)
    study = workspace.data_dir / "study"

    async def body():
        async with dm.API(workspace.config()) as api:
            scans = api.catalog.scans

            async def listed():
                return [tuple(r.values()) for r in await api.list_collection_recordings("study")]

            _age(workspace.data_dir, study, study / "A", study / "B")
            assert await listed() == [("A", "1"), ("B", "1")]
            assert await listed() == [("A", "1"), ("B", "1")]
            assert (scans.misses, scans.hits) == (1, 1)
            workspace.add_gaze_recording("A", "2", n=5)  # a new file in a nested folder
            assert await listed() == [("A", "1"), ("A", "2"), ("B", "1")]
            (study / "B" / "1_gaze.csv").unlink()  # a file removed
            assert await listed() == [("A", "1"), ("A", "2")]
            _age(study / "A", study / "B")
            await listed()
            hits = scans.hits
            assert await listed() == [("A", "1"), ("A", "2")] and scans.hits == hits + 1

    run(body())


def test_hdf5_recording_errors_name_file_dataset_and_columns(upstream):
    import h5py

    workspace, _ = upstream
    path = workspace.data_dir / "n_back" / "data.h5"
    with h5py.File(path, "a") as handle:
        handle.create_dataset("S2_task_1back_center", data=np.zeros(4, [("t", "f4"), ("x", "f4")]))
        handle.create_dataset("S3_task_1back_center", data=np.zeros((4, 2), "f4"))
    (workspace.data_dir / "pg_weather" / "data.h5").write_text("not hdf5")

    async def failure(api, collection, stream, attrs):
        sink: asyncio.Queue = asyncio.Queue()
        await api.replay_collection_stream(collection, stream, attrs, sink, speed=0)
        items = await drain(sink)
        return items[-2]

    async def body():
        async with dm.API(workspace.config()) as api:
            error = await failure(api, "n_back", "gaze", {"subject": "2"})
            assert error.code == "data"
            assert f"{path}:S2_task_1back_center" in error.reason
            assert "columns ['y'] of stream 'gaze'" in error.reason and "'t', 'x'" in error.reason
            error = await failure(api, "n_back", "gaze", {"subject": "3"})
            assert "must be a 1-D structured array" in error.reason
            with pytest.raises(dm.errors.DataError, match="not a readable HDF5 file"):
                await api.list_collection_streams("pg_weather")

    run(body())
