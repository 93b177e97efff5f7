"""Folders of self-describing recordings as collections, through the local API and CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyedflib
import pytest
from edf_files import SIGNALS, reference, write_file
from helpers import SHARED_DATA, drain, frames_of, needs_shared, run

import streaminghub_datamux as dm
from streaminghub_datamux.errors import DataError, NotFound

SHARED_XDF = SHARED_DATA / "xdf"
needs_xdf = needs_shared("xdf")


async def replay_all(api, collection, stream, attrs):
    sink = asyncio.Queue()
    await api.replay_collection_stream(collection, stream, attrs, sink, speed=0)
    return await drain(sink)


def concat(frames):
    return np.concatenate([f.timestamps for f in frames]), np.concatenate(
        [f.values for f in frames]
    )


def test_folder_of_edf_files_is_a_collection(workspace):
    folder = workspace.data_dir / "sleep"
    (folder / "night2").mkdir(parents=True)
    write_file(folder / "night1.edf", pyedflib.FILETYPE_EDF)
    write_file(folder / "night2" / "part.bdf", pyedflib.FILETYPE_BDF)
    (folder / "notes.txt").write_text("not a recording")

    async def body():
        api = dm.API(workspace.config())
        collections = {c.id: c for c in await api.list_collections()}
        recordings = await api.list_collection_recordings("sleep")
        items = await replay_all(api, "sleep", "signals_256hz", {"file": "night1"})
        return collections, recordings, items

    collections, recordings, items = run(body())
    sleep = collections["sleep"]
    assert set(sleep.streams) == {"signals_256hz", "signals_64hz"}
    assert sleep.streams["signals_256hz"].channels == ["Fp1", "Fp2"]
    assert recordings == [{"file": "night1"}, {"file": "night2/part"}]
    timestamps, values = concat(frames_of(items))
    np.testing.assert_array_equal(values, reference(folder / "night1.edf", [0, 1]))
    np.testing.assert_allclose(np.diff(timestamps), 1 / 256)
    assert frames_of(items)[0].attrs["file"] == "night1"


def test_metadata_with_an_edf_pattern_needs_no_streams(workspace):
    workspace.add_collection("psg", {"name": "PSG", "pattern": "edf://{subject}/night{night}"})
    for subject in ("A", "B"):
        (workspace.data_dir / "psg" / subject).mkdir(parents=True)
        write_file(workspace.data_dir / "psg" / subject / "night1.edf", pyedflib.FILETYPE_EDF)

    async def body():
        api = dm.API(workspace.config())
        streams = await api.list_collection_streams("psg")
        recordings = await api.list_collection_recordings("psg")
        items = await replay_all(api, "psg", "signals_64hz", {"subject": "B"})
        return streams, recordings, items

    streams, recordings, items = run(body())
    assert {s.id for s in streams} == {"signals_256hz", "signals_64hz"}
    assert recordings == [{"subject": "A", "night": "1"}, {"subject": "B", "night": "1"}]
    _, values = concat(frames_of(items))
    expected = reference(workspace.data_dir / "psg" / "B" / "night1.edf", [2])
    np.testing.assert_array_equal(values, expected)
    assert SIGNALS[2][2] == 64


def test_a_broken_file_in_a_folder_does_not_hide_the_others(workspace):
    folder = workspace.data_dir / "mixed"
    folder.mkdir()
    write_file(folder / "good.edf", pyedflib.FILETYPE_EDF)
    (folder / "bad.edf").write_text("this is not EDF")

    async def body():
        api = dm.API(workspace.config())
        streams = await api.list_collection_streams("mixed")
        with pytest.raises(DataError, match=r"bad\.edf: not a readable EDF"):
            await replay_all(api, "mixed", "signals_256hz", {"file": "bad"})
        return streams

    streams = run(body())
    assert {s.id for s in streams} == {"signals_256hz", "signals_64hz"}


@pytest.fixture
def xdf_folder(workspace):
    folder = workspace.data_dir / "lab"
    folder.mkdir()
    for name in ("minimal.xdf", "empty_streams.xdf", "clock_resets.xdf"):
        shutil.copy(SHARED_XDF / name, folder / name)
    return folder


@needs_xdf
def test_shared_xdf_files_replay_through_the_api(workspace, xdf_folder):
    import pyxdf

    async def body():
        api = dm.API(workspace.config())
        streams = {s.id: s for s in await api.list_collection_streams("lab")}
        numbers = await replay_all(api, "lab", "SendDataC", {"file": "minimal"})
        markers = await replay_all(api, "lab", "MyMarkerStream", {"file": "clock_resets"})
        empty = await replay_all(
            api, "lab", "Empty_marker_stream__test_stream_0_counter", {"file": "empty_streams"}
        )
        return streams, numbers, markers, empty

    streams, numbers, markers, empty = run(body())
    assert {"SendDataC", "SendDataString", "BioSemi", "MyMarkerStream"} <= set(streams)
    assert streams["SendDataC"].dtype == np.int16 and streams["SendDataC"].frequency == 10
    data, _ = pyxdf.load_xdf(
        str(xdf_folder / "minimal.xdf"),
        synchronize_clocks=True,
        handle_clock_resets=True,
        dejitter_timestamps=True,
    )
    expected = next(s for s in data if s["info"]["name"][0] == "SendDataC")
    timestamps, values = concat(frames_of(numbers))
    np.testing.assert_array_equal(values, expected["time_series"])
    np.testing.assert_array_equal(timestamps, expected["time_stamps"])
    _, labels = concat(frames_of(markers))
    assert labels.dtype.kind == "U" and labels.shape == (175, 1)
    assert empty == [dm.END_OF_STREAM]  # listed, and ends at once


@needs_xdf
def test_xdf_record_then_replay_is_bit_exact(workspace, xdf_folder):
    async def body():
        api = dm.API(workspace.config())
        out = {}
        for stream in ("SendDataC", "SendDataString"):
            await dm.record(
                api,
                mode="replay",
                source_id="lab",
                stream_id=stream,
                attrs={"file": "minimal"},
                into="copy",
                recording={"take": "1"},
                config=api.config,
            )
            original = frames_of(await replay_all(api, "lab", stream, {"file": "minimal"}))
            copied = frames_of(await replay_all(api, "copy", stream, {"take": "1"}))
            out[stream] = (concat(original), concat(copied))
        return out

    for stream, ((ts0, v0), (ts1, v1)) in run(body()).items():
        np.testing.assert_array_equal(ts1, ts0, err_msg=stream)
        np.testing.assert_array_equal(v1, v0, err_msg=stream)
        assert v1.dtype == v0.dtype or v1.dtype.kind == v0.dtype.kind == "U"


@needs_xdf
def test_ls_shows_folder_collections(workspace, xdf_folder):
    env = {**os.environ, "HOME": str(workspace.root)}
    dirs = ["--data_dir", str(workspace.data_dir), "--meta_dir", str(workspace.meta_dir)]
    command = [sys.executable, "-m", "streaminghub_datamux"]
    listing = subprocess.run(
        [*command, "ls", *dirs], capture_output=True, text=True, env=env, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert "lab" in listing.stdout
    detail = subprocess.run(
        [*command, "ls", "lab", "--json", *dirs],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    shown = json.loads(detail.stdout)
    assert {"file": "clock_resets"} in shown["recordings"]
    assert shown["streams"]["BioSemi"]["frequency"] == 100


def test_unknown_collection_ids_never_reach_the_filesystem(workspace):
    async def body():
        api = dm.API(workspace.config())
        for bad in ("../etc", "a/b", "", ".hidden"):
            with pytest.raises(NotFound):
                await api.list_collection_streams(bad)

    run(body())


@needs_xdf
def test_replay_progress_knows_the_length_of_xdf_and_edf_recordings(workspace, xdf_folder):
    write_file(xdf_folder / "sleep.edf", pyedflib.FILETYPE_EDF)
    env = {**os.environ, "HOME": str(workspace.root)}
    dirs = ["--data_dir", str(workspace.data_dir), "--meta_dir", str(workspace.meta_dir)]
    for stream, attr, total in (("BioSemi", "clock_resets", 27815), ("signals_64hz", "sleep", 640)):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "streaminghub_datamux",
                "replay",
                "lab",
                stream,
                "-a",
                f"file={attr}",
                "--speed",
                "0",
                "--progress",
                "on",
                "--frames",
                "100000",
                *dirs,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert f"100.0% {total}/{total} samples" in out.stderr
