"""The examples the docs point to run as written, in a clean HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(tmp_path)
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=env)  # fmt: skip


def test_replay_example(tmp_path):
    out = run_example("replay_collection.py", tmp_path, str(tmp_path / "work"))
    assert out.returncode == 0, out.stderr
    assert "mycollection ['gaze']" in out.stdout
    assert "recordings: [{'subject': 'A'}]" in out.stdout
    frames = [ln for ln in out.stdout.splitlines() if ln[:1].isdigit()]
    assert frames and frames[0].startswith("0 0.0 ")
    assert sum(int(ln.split("(")[1].split(",")[0]) for ln in frames) == 120


def test_replay_example_without_a_workdir_leaves_nothing_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env.update(HOME=str(tmp_path), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    command = [sys.executable, str(EXAMPLES / "replay_collection.py")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "mycollection ['gaze']" in out.stdout
    assert list((tmp_path / "tmp").iterdir()) == []


def test_live_demo_example(tmp_path):
    out = run_example("live_demo.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "demo ['eeg', 'imu', 'markers']" in out.stdout
    samples = int(out.stdout.strip().splitlines()[-1].split()[0])
    assert 300 <= samples <= 700, samples  # 2 s at 250 Hz, generous bounds


def test_raw_mqtt_client_example_talks_to_an_agent(mosquitto, tmp_path):
    """docs/protocol.md's client, written with paho, cbor2 and numpy only."""
    from remote import AGENT_ID, AgentProcess, wait_until

    agent = AgentProcess(mosquitto, tmp_path)
    try:
        wait_until(lambda: "serving" in agent.log(), 20, "the agent")
        out = run_example(
            "raw_mqtt_client.py", tmp_path, mosquitto.host, str(mosquitto.port), AGENT_ID,
            "demo", "eeg", "2",
        )  # fmt: skip
    finally:
        assert agent.terminate() == 0, agent.log()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "nodes: ['demo']"
    assert lines[1].startswith("0 (") and ", 8) float32 ['Fp1', 'Fp2', 'C3']" in lines[1]
    assert lines[2].startswith("1 (")
    assert lines[-1].startswith("end after ")
