"""The command line over MQTT: ``datamux serve``, ``demo``, and ``ls/tail/replay/record
--broker``, each in its own process on loopback, stopped by its own pid."""

from __future__ import annotations

import json
import os
import signal
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
    assert missing.returncode == 1
    # as the local API says it: which streams there are
    assert missing.stderr == (
        "datamux: error: node 'demo' has no stream 'nope'; streams: eeg, imu, markers\n"
    )


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


def test_serve_checks_its_config_before_starting_a_broker(tmp_path):
    port = free_port()
    out = datamux(
        "serve", "--port", str(port), "--drivers", "sim,foo", "--embedded", "auto",
        "--state-dir", str(tmp_path / "state"), cwd=tmp_path, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == (
        "datamux: config error: key 'drivers.enabled': unknown driver 'foo' (fix: use some "
        "of ['ble', 'lsl', 'serial', 'sim'], or install the package that provides it)\n"
    )


def test_ctrl_c_on_demo_stops_it_quietly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(tmp_path)
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "streaminghub_datamux", "demo", "--port", str(port),
             "--seconds", "60"],
            cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    try:
        wait_until(lambda: out.read_text().count(" samples ") >= 5, 30, "the demo's frames")
        demo.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
        assert demo.wait(timeout=30) == 0, err.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=10)
    assert out.read_text().endswith("done: the client closed; stopping the agent\n")
    lines = err.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"WARNING streaminghub_datamux.cli.serve_cmd: no MQTT broker on 127.0.0.1:{port}: "
        "starting the embedded one"
    )  # nothing from amqtt, no "lost the broker"
    assert not port_open("127.0.0.1", port)


def test_ls_through_a_broker_says_when_no_agent_is_online(mosquitto, tmp_path):
    broker = f"{mosquitto.host}:{mosquitto.port}"
    hint = "start one with 'datamux serve' on the box with the data"
    out = datamux("ls", "--broker", broker, cwd=tmp_path)
    assert out.stdout.splitlines() == [
        f"agents on {broker}: none online (none has ever connected); {hint}",
        f"collections on {broker}:",
        "  (none)",
        "live nodes:",
        "  (none)",
    ]
    agent = AgentProcess(mosquitto, tmp_path)
    try:
        wait_until(lambda: "serving" in agent.log(), 20, "the agent")
        out = datamux("ls", "--broker", broker, cwd=tmp_path)
        assert out.stdout.splitlines()[0] == f"agents on {broker}: {AGENT_ID}"
    finally:
        assert agent.terminate() == 0, agent.log()
    out = datamux("ls", "--broker", broker, cwd=tmp_path)
    assert (
        out.stdout.splitlines()[0]
        == f"agents on {broker}: none online (offline: {AGENT_ID}); {hint}"
    )


def test_a_hangup_or_term_signal_on_demo_stops_its_agent_too(tmp_path):
    """The agent runs in its own session: the demo must stop it whatever ends the demo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(tmp_path)
    for signum in (signal.SIGHUP, signal.SIGTERM):
        port = free_port()
        demo = subprocess.Popen(
            [sys.executable, "-m", "streaminghub_datamux", "demo", "--port", str(port),
             "--seconds", "60"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: port_open("127.0.0.1", port), 30, "the demo's agent")  # noqa: B023
            demo.send_signal(signum)
            code = demo.wait(timeout=30)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait(timeout=10)
        assert code in (0, 130), (signum, code)  # printing ends like --seconds; startup: 130
        wait_until(lambda: not port_open("127.0.0.1", port), 10, "the agent to stop")  # noqa: B023
