"""The datamux command line, run as a real subprocess against real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import gaze_collection


def datamux(workspace, *args, timeout=60, env_extra=None):
    env = {**os.environ, "HOME": str(workspace.root), **(env_extra or {})}
    env.pop("STREAMINGHUB_DATA_DIR", None)
    env.pop("STREAMINGHUB_META_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "streaminghub_datamux", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workspace.root,
        env=env,
    )


def dirs(workspace):
    return ["--data_dir", str(workspace.data_dir), "--meta_dir", str(workspace.meta_dir)]


def test_help_everywhere(workspace):
    for command in ([], ["init"], ["config"], ["ls"], ["replay"], ["tail"]):
        result = datamux(workspace, *command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: datamux" in result.stdout


def test_ls_lists_collections_nodes_streams_and_recordings(workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=5)
    workspace.add_gaze_recording("B", "2", n=5)
    out = datamux(workspace, "ls", *dirs(workspace))
    assert out.returncode == 0, out.stderr
    assert "study" in out.stdout and "2 streams" in out.stdout and "demo" in out.stdout
    out = datamux(workspace, "ls", "study", *dirs(workspace))
    assert (
        "gaze" in out.stdout
        and "subject=A session=1" in out.stdout
        and "subject=B session=2" in out.stdout
    )
    out = datamux(workspace, "ls", "demo", "--json", *dirs(workspace))
    assert set(json.loads(out.stdout)["streams"]) == {"eeg", "imu", "markers"}


def test_replay_prints_rows_that_match_the_file(workspace):
    workspace.add_collection("study", gaze_collection())
    timestamps, values = workspace.add_gaze_recording("A", "1", n=40)
    out = datamux(
        workspace,
        "replay",
        "study",
        "gaze",
        "-a",
        "subject=A",
        "--speed",
        "0",
        "--rows",
        *dirs(workspace),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "t,x,y" and len(lines) == 41
    t, x, y = lines[5].split(",")
    # printed in the shortest form that reads back to the same float32 / float64
    assert float(t) == timestamps[4]
    assert np.float32(x) == values[4, 0] and np.float32(y) == values[4, 1]


def test_replay_progress_bar_on_request(workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=300)
    out = datamux(
        workspace,
        "replay",
        "study",
        "gaze",
        "-a",
        "subject=A",
        "--speed",
        "0",
        "--progress",
        "on",
        *dirs(workspace),
    )
    assert out.returncode == 0, out.stderr
    assert "100.0% 300/300 samples" in out.stderr


def test_errors_have_clear_messages_and_exit_codes(workspace):
    workspace.add_collection("study", gaze_collection())
    out = datamux(workspace, "replay", "nope", "gaze", *dirs(workspace))
    assert out.returncode == 1 and "no collection 'nope'" in out.stderr
    out = datamux(workspace, "replay", "study", "gaze", "-a", "oops", *dirs(workspace))
    assert out.returncode == 1 and "KEY=VALUE" in out.stderr
    out = datamux(workspace, "tail", "demo", "nope", *dirs(workspace))
    assert out.returncode == 1 and "no stream 'nope'" in out.stderr
    out = datamux(workspace, "frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    (workspace.root / ".streaminghubrc").write_text('{"data_dri": "/x"}')
    out = datamux(workspace, "ls")
    assert out.returncode == 2 and "data_dri" in out.stderr and "data_dir" in out.stderr
    assert "Traceback" not in out.stderr


def test_tail_demo_prints_frames_and_stops(workspace):
    out = datamux(workspace, "tail", "demo", "eeg", "--frames", "3", *dirs(workspace))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("#0") and "Fp1=" in lines[0]
    out = datamux(
        workspace, "tail", "demo", "markers", "--seconds", "2.5", "--rows", *dirs(workspace)
    )
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()
    assert rows[0] == "t,marker" and len(rows) >= 2


def test_init_then_config_shows_sources(workspace):
    data, meta = workspace.root / "d", workspace.root / "m"
    out = datamux(workspace, "init", "--data_dir", str(data), "--meta_dir", str(meta))
    assert out.returncode == 0, out.stderr
    assert data.is_dir() and meta.is_dir()
    out = datamux(workspace, "config", env_extra={"STREAMINGHUB_FRAMING__MAX_SAMPLES": "64"})
    assert out.returncode == 0, out.stderr
    rc = str(workspace.root / ".streaminghubrc")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("framing.max_samples"))
    assert "64" in line and "STREAMINGHUB_FRAMING__MAX_SAMPLES" in line
    out = datamux(workspace, "config", "--json")
    shown = json.loads(out.stdout)
    assert shown["data_dir"] == {"value": str(data), "source": rc}
    assert shown["meta_dir"] == {"value": str(meta), "source": rc}


SIM_ONLY = {"STREAMINGHUB_DRIVERS__ENABLED": "sim"}  # no LSL peers or serial ports of this box


def test_init_example_writes_the_sample_collection_once(workspace):
    home = workspace.root
    data, meta = home / "streaminghub" / "data", home / "streaminghub" / "meta"
    out = datamux(workspace, "init", "--example")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == [
        f"Sample collection 'n_back': wrote 5 files ({meta}/n_back.collection.json, "
        f"{data}/n_back/).",
        "Try: datamux ls n_back",
    ]
    out = datamux(workspace, "ls", "n_back", env_extra=SIM_ONLY)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "streams:",
        "  gaze               100 Hz  2 x float32  [x, y]",
        "  pupil              100 Hz  1 x float32  [d]",
        "recordings (4):",
        "  subject=1 task=1",
        "  subject=1 task=2",
        "  subject=2 task=1",
        "  subject=2 task=2",
    ]
    (data / "n_back" / "S1" / "task1.csv").write_text("t,x,y,d\n0,1,2,3\n")
    out = datamux(workspace, "init", "--example")
    assert "wrote 0 files, kept 5 that existed" in out.stdout
    assert (data / "n_back" / "S1" / "task1.csv").read_text() == "t,x,y,d\n0,1,2,3\n"


def test_ls_of_an_unknown_id_names_collections_nodes_and_the_closest(workspace):
    workspace.add_collection("n_back", {**gaze_collection(), "name": "N-back study"})
    expected_lists = "collections: ['n_back']; live nodes: ['demo']"
    out = datamux(workspace, "ls", "n_bak", *dirs(workspace), env_extra=SIM_ONLY)
    assert out.returncode == 1
    assert out.stderr == (
        f"datamux: error: no collection or live node 'n_bak'; did you mean 'n_back'? "
        f"{expected_lists}\n"
    )
    out = datamux(workspace, "ls", "N-back study", *dirs(workspace), env_extra=SIM_ONLY)
    assert out.returncode == 1
    assert out.stderr == (
        "datamux: error: no collection or live node 'N-back study'; 'N-back study' is the "
        f"name of collection 'n_back': use its id. {expected_lists}\n"
    )
    out = datamux(workspace, "ls", "zzz", *dirs(workspace), env_extra=SIM_ONLY)
    assert out.stderr == f"datamux: error: no collection or live node 'zzz'; {expected_lists}\n"


def test_ls_names_both_folders_and_counts_in_words(workspace):
    one = gaze_collection()
    del one["streams"]["pupil"]
    workspace.add_collection("study", one)
    out = datamux(workspace, "ls", *dirs(workspace), env_extra=SIM_ONLY)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == [
        f"collections in {workspace.meta_dir} and {workspace.data_dir}:",
        "  study                1 stream    Gaze study",
    ]
    assert out.stdout.splitlines()[-2:] == [
        "live nodes:",
        "  demo                 sim         Demo device",
    ]


def test_unconfigured_serial_ports_are_listed_by_ls_all_only(workspace):
    from serial.tools import list_ports

    ports = list_ports.comports()
    if not ports:
        pytest.skip("this machine reports no serial ports to list")
    with_serial = {"STREAMINGHUB_DRIVERS__ENABLED": "sim,serial"}
    out = datamux(workspace, "ls", *dirs(workspace), env_extra=with_serial)
    assert out.returncode == 0, out.stderr
    assert "serial-port" not in out.stdout
    out = datamux(workspace, "ls", "--all", *dirs(workspace), env_extra=with_serial)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" serial-port ") == len(ports)
    assert any(p.device in out.stdout for p in ports)


def test_frames_and_seconds_must_be_positive(workspace):
    for flag, value, why in [
        ("--frames", "0", "must be a whole number >= 1, not '0'"),
        ("--frames", "-2", "must be a whole number >= 1, not '-2'"),
        ("--frames", "1.5", "must be a whole number >= 1, not '1.5'"),
        ("--seconds", "0", "must be a number > 0, not '0'"),
        ("--seconds", "-1", "must be a number > 0, not '-1'"),
    ]:
        out = datamux(workspace, "tail", "demo", "eeg", f"{flag}={value}")
        assert out.returncode == 2
        assert out.stderr.splitlines()[-1] == f"datamux tail: error: argument {flag}: {why}"


def test_bad_csv_lines_are_reported_once_by_line_and_column(workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=40)
    path = workspace.data_dir / "study" / "A" / "1_gaze.csv"
    lines = path.read_text().splitlines()
    for bad, message in [
        ("10.3,abc,1,2", "could not convert 'abc' to float32 in column 2 (x)"),
        ("10.3,12", "expected 4 columns, got 2"),
        ("10.3,12,1,2,3", "expected 4 columns, got 5"),
        ("ten,1,2,3", "could not convert 'ten' to float64 in column 1 (t)"),
    ]:
        path.write_text("\n".join([*lines[:31], bad, *lines[32:]]) + "\n")
        args = ("replay", "study", "gaze", "-a", "subject=A", "--speed", "0")
        out = datamux(workspace, *args, *dirs(workspace))
        assert out.returncode == 1
        assert out.stderr == f"datamux: stream failed (data): {path}, line 32: {message}\n"
        # every good row before the bad line was delivered
        assert sum(int(ln.split()[1]) for ln in out.stdout.splitlines()) == 30


def test_an_empty_csv_file_is_an_error_not_an_empty_replay(workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=20)
    path = workspace.data_dir / "study" / "A" / "1_gaze.csv"
    path.write_bytes(b"")
    args = ("replay", "study", "gaze", "-a", "subject=A", "--speed", "0")
    out = datamux(workspace, *args, *dirs(workspace))
    assert out.returncode == 1, out.stdout
    assert out.stderr == (
        f"datamux: stream failed (data): {path}, line 1: the file is empty: no header row "
        "(a recording has a header naming its columns, then one row per sample)\n"
    )
    path.write_text("t,x,y,d\n")  # a header and no rows: an empty recording, no error
    out = datamux(workspace, *args, *dirs(workspace))
    assert out.returncode == 0, out.stderr


def test_a_misspelt_attribute_is_named_when_the_selection_fails(workspace):
    """Keys that are not placeholders select nothing (upstream's id, mode, ...), so a typo
    of one is ignored too: the error must point at it, not only list the recordings."""
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=20)
    workspace.add_gaze_recording("B", "1", n=20)
    out = datamux(workspace, "replay", "study", "gaze", "-a", "subjcet=A", *dirs(workspace))
    assert out.returncode == 1
    assert out.stderr == (
        "datamux: error: 2 recordings of 'study' match {}; add attributes (['session', "
        "'subject']) to pick one ('subjcet' is not an attribute: did you mean 'subject'?): "
        "{'subject': 'A', 'session': '1'}, {'subject': 'B', 'session': '1'}\n"
    )
    # upstream's own keys are not typos, and select nothing
    args = ("-a", "subject=A", "-a", "id=gaze", "-a", "mode=replay", "--frames", "1")
    out = datamux(workspace, "replay", "study", "gaze", *args, *dirs(workspace))
    assert out.returncode == 0, out.stderr


def test_rows_print_timestamps_as_the_file_has_them(workspace):
    collection = gaze_collection(index_unit="ms")
    workspace.add_collection("study", collection)
    path = workspace.data_dir / "study" / "A" / "1_gaze.csv"
    path.parent.mkdir(parents=True)
    path.write_text("t,x,y,d\n1000,0.5,1.25,3\n1001,0.1,0.2,3\n1002,0.3,0.7,3\n")
    args = ("replay", "study", "gaze", "-a", "subject=A", "--speed", "0", "--rows")
    out = datamux(workspace, *args, *dirs(workspace))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["t,x,y", "1.0,0.5,1.25", "1.001,0.1,0.2", "1.002,0.3,0.7"]


def test_record_clash_names_the_overwrite_flag(workspace):
    args = ("record", "--node", "demo", "eeg", "--into", "lab", "-r", "subject=A")
    out = datamux(workspace, *args, "--seconds", "0.2", *dirs(workspace))
    assert out.returncode == 0, out.stderr
    out = datamux(workspace, *args, "--seconds", "0.2", *dirs(workspace))
    path = workspace.data_dir / "lab" / "A" / "eeg.csv"
    assert out.returncode == 1
    assert out.stderr == (
        f"datamux: error: {path} exists; pick other recording attrs, or replace it with "
        "--overwrite (overwrite=True in Python)\n"
    )


def test_ordinary_commands_keep_stderr_clean(workspace):
    """No liblsl INFO line ("Loaded default config") or other noise on a plain command."""
    with_lsl = {"STREAMINGHUB_DRIVERS__ENABLED": "sim,lsl"}
    out = datamux(workspace, "ls", *dirs(workspace), env_extra=with_lsl)
    assert out.returncode == 0, out.stderr
    # liblsl's warnings and errors stay (e.g. an outlet of another process vanishing
    # during discovery, which tests running beside this one cause): only INFO goes.
    assert "Loaded default config" not in out.stderr
    assert not [line for line in out.stderr.splitlines() if " INFO| " in line]
    out = datamux(
        workspace, "simulate", "--lsl", "demo", "--streams", "markers", "--seconds", "0.5"
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
