"""The datamux command line, run as a real subprocess against real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
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
