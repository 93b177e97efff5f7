"""Folders of self-describing recordings as collections, through the local API and CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyedflib
import pytest
from helpers import drain, frames_of, run
from test_edf import SIGNALS, reference, write_file

import streaminghub_datamux as dm
from streaminghub_datamux.errors import DataError, NotFound

SHARED_XDF = Path(__file__).resolve().parents[2] / "shared" / "data" / "xdf"
needs_xdf = pytest.mark.skipif(not SHARED_XDF.is_dir(), reason=f"no shared XDF files at {SHARED_XDF}")


async def replay_all(api, collection, stream, attrs):
    sink = asyncio.Queue()
    await api.replay_collection_stream(collection, stream, attrs, sink, speed=0)
    return await drain(sink)


def concat(frames):
    return np.concatenate([f.timestamps for f in frames]), np.concatenate([f.values for f in frames])


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
