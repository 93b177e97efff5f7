"""A real mosquitto broker on a free loopback port, started and stopped by its own pid."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def start_mosquitto(
    binary: str, conf: Path, log: Path, ports: list[int]
) -> subprocess.Popen[bytes]:
    """Start mosquitto on ``conf`` and wait (bounded) until every port in ``ports`` answers."""
    with log.open("ab") as log_file:
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(port_open(LOOPBACK, port) for port in ports):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"mosquitto did not start: {log.read_text()[-3000:]}")
        time.sleep(0.02)
    return process


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Stop one process by its own pid: SIGTERM (mosquitto saves its persistence), then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


class Mosquitto:
    """One mosquitto process with persistence in ``workdir``; restartable on the same port.

    Persistence is on, as in production (docs/agent.md): sessions and retained
    messages survive :meth:`restart`.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, extra_config: list[str] | None = None
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary = binary
        self.host = LOOPBACK
        self.port = port or free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self.conf_path.write_text(
            "\n".join(
                [
                    f"listener {self.port} {LOOPBACK}",
                    # As root, mosquitto drops to the "mosquitto" user, which cannot write
                    # the persistence file in a root-owned temporary folder.
                    *(["user root"] if os.geteuid() == 0 else []),
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {workdir}/",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "max_queued_messages 100000",
                    *(extra_config or []),
                    "",
                ]
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("mosquitto is already running")
        self.process = start_mosquitto(self.binary, self.conf_path, self.log_path, [self.port])

    def stop(self) -> None:
        """Stop this broker (SIGTERM, then SIGKILL), by its own pid."""
        process, self.process = self.process, None
        stop_process(process)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
