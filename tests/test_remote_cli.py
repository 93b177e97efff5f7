"""The command line over MQTT: ``datamux serve``, ``demo``, and ``ls/tail/replay/record
--broker``, each in its own process on loopback, stopped by its own pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from broker import free_port, port_open
from helpers import gaze_collection
from remote import AGENT_ID, AgentProcess, wait_until

CLI_TIMEOUT_S = 60


def datamux(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(cwd)
    done = subprocess.run(
        [sys.executable, "-m", "streaminghub_datamux", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=CLI_TIMEOUT_S,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def agent_process(mosquitto, tmp_path):
    agent = AgentProcess(mosquitto, tmp_path)
    yield agent
    code = agent.terminate()
    assert code == 0, agent.log()


def test_ls_tail_replay_and_record_through_the_broker(agent_process, mosquitto, tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir(exist_ok=True)
    (meta / "study.collection.json").write_text(json.dumps(gaze_collection()))
    rows = "\n".join(f"{i / 100},{i},{-i},1.5" for i in range(40))
    recording = tmp_path / "data" / "study" / "A" / "1_gaze.csv"
    recording.parent.mkdir(parents=True)
    recording.write_text("t,x,y,d\n" + rows + "\n")
    broker = f"{mosquitto.host}:{mosquitto.port}"
    remote = ["--broker", broker, "--agent", AGENT_ID]

    def announced() -> bool:
        return datamux("ls", *remote, cwd=tmp_path, check=False).returncode == 0

    wait_until(announced, 20, "the agent to announce itself")

    listing = datamux("ls", *remote, "--json", cwd=tmp_path)
    data = json.loads(listing.stdout)
    assert [c["id"] for c in data["collections"]] == ["study"]
    assert "demo" in [n["id"] for n in data["nodes"]]

    fleet = datamux("ls", "--broker", broker, cwd=tmp_path)
    assert f"{AGENT_ID}/demo" in fleet.stdout  # fleet ids are qualified by agent

    tail = datamux("tail", *remote, "demo", "eeg", "--frames", "3", "--codec", "json", cwd=tmp_path)
    assert tail.stdout.count("samples") == 3

    replay = datamux(
        "replay", *remote, "study", "gaze", "-a", "subject=A", "--speed", "0", "--rows",
        cwd=tmp_path,
    )  # fmt: skip
    lines = replay.stdout.strip().splitlines()
    assert lines[0] == "t,x,y" and len(lines) == 41 and lines[-1] == "0.39,39.0,-39.0"

    local = tmp_path / "here"
    local.mkdir()
    recorded = datamux(
        "record", *remote, "--node", "demo", "imu", "--into", "captured", "-r", "subject=S1",
        "--seconds", "1", "--data_dir", str(local / "data"), "--meta_dir", str(local / "meta"),
        cwd=tmp_path,
    )  # fmt: skip
    assert "recorded" in recorded.stdout
    assert (local / "meta" / "captured.collection.json").exists()

    missing = datamux("tail", *remote, "demo", "nope", "--frames", "1", cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_serve_runs_an_embedded_broker_when_none_answers(tmp_path):
    port = free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "streaminghub_datamux", "serve", "--port", str(port),
         "--id", "solo", "--drivers", "sim", "--state-dir", str(tmp_path / "state"),
         "--embedded", "auto"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "the embedded broker")
        tail = datamux(
            "tail", "--broker", f"127.0.0.1:{port}", "demo", "eeg", "--frames", "2",
            cwd=tmp_path,
        )  # fmt: skip
        assert tail.stdout.count("samples") == 2
    finally:
        agent.terminate()
        output, _ = agent.communicate(timeout=20)
    assert agent.returncode == 0, output
    assert b"starting the embedded one" in output


def test_demo_shows_remote_streaming_with_no_broker_installed(tmp_path):
    port = free_port()
    demo = datamux("demo", "--port", str(port), "--seconds", "1", cwd=tmp_path)
    assert "live nodes of demo-agent: demo" in demo.stdout
    assert "proxying demo/eeg over MQTT" in demo.stdout
    assert demo.stdout.count("samples") >= 5  # 250 Hz, balanced framing: ~20 frames/s
    assert not port_open("127.0.0.1", port)  # the agent and its broker are gone
