"""`datamux status --watch` in a real terminal: tmux runs it, capture-pane reads the screen."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from remote import AgentProcess

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
WAIT_S = 30.0


def _tmux(*args: str) -> str:
    assert TMUX is not None
    done = subprocess.run([TMUX, *args], capture_output=True, text=True, timeout=10)
    return done.stdout


@pytest.mark.parametrize("plain", [False, True], ids=["rich", "plain"])
def test_watch_redraws_as_agents_come_and_go(mosquitto, tmp_path, plain):
    if not plain:
        pytest.importorskip("rich")
    session = f"dm-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable, "-m", "streaminghub_datamux", "status", "--watch", "--interval", "0.5",
        "-p", str(mosquitto.port), *(["--plain"] if plain else []),
    ]  # fmt: skip
    env = f"HOME={shlex.quote(str(tmp_path))} TERM=xterm-256color COLUMNS=200 LINES=50"
    # A wide pane, so the table fits; the server and its session are ours alone (-L).
    socket_name = f"dmtest-{os.getpid()}"
    _tmux("-L", socket_name, "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
          f"env {env} {shlex.join(command)}")  # fmt: skip
    agent = None

    def screen(wanted: str) -> str:
        deadline = time.monotonic() + WAIT_S
        text = ""
        while time.monotonic() < deadline:
            text = _tmux("-L", socket_name, "capture-pane", "-p", "-t", session)
            if wanted in text:
                return text
            time.sleep(0.2)
        raise AssertionError(f"{wanted!r} never showed; the screen:\n{text}")

    try:
        screen("no agents on")
        agent = AgentProcess(mosquitto, tmp_path, "pi-7", "--drivers", "sim")
        shown = screen("pi-7")
        assert "online" in screen("sim ok")
        assert "AGENT" in shown and "CLOCK" in shown
        assert agent.terminate() == 0
        agent = None
        screen("offline")
        _tmux("-L", socket_name, "send-keys", "-t", session, "C-c")
        deadline = time.monotonic() + WAIT_S
        while session in _tmux("-L", socket_name, "list-sessions", "-F", "#S"):
            assert time.monotonic() < deadline, "Ctrl-C did not end --watch"
            time.sleep(0.2)
    finally:
        if agent is not None:
            agent.kill()
        _tmux("-L", socket_name, "kill-server")
