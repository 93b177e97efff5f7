"""Agents and RemoteAPI clients for tests, on a real mosquitto (tests/broker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from broker import Mosquitto

from streaminghub_datamux import API, RemoteAPI
from streaminghub_datamux.agent import Agent
from streaminghub_datamux.config import Config
from streaminghub_datamux.mqttio import BrokerSettings

AGENT_ID = "a1"


def settings_for(broker: Mosquitto, **overrides: Any) -> BrokerSettings:
    return BrokerSettings(host=broker.host, port=broker.port, **overrides)


@contextlib.asynccontextmanager
async def running_agent(
    config: Config,
    broker: Mosquitto,
    state_dir: Path,
    *,
    agent_id: str = AGENT_ID,
    api: API | None = None,
    **settings: Any,
) -> AsyncIterator[Agent]:
    """An agent on this loop, connected to ``broker``; stopped on exit."""
    agent = Agent(
        config,
        api=api,
        settings=settings_for(broker, **settings),
        agent_id=agent_id,
        state_dir=state_dir,
    )
    await agent.start(connect_timeout=10)
    try:
        yield agent
    finally:
        await agent.stop()


@contextlib.asynccontextmanager
async def remote_api(
    config: Config,
    broker: Mosquitto,
    *,
    agent_id: str | None = AGENT_ID,
    codec: str = "cbor",
    **options: Any,
) -> AsyncIterator[RemoteAPI]:
    timeout = options.pop("timeout", 10.0)
    client_id = options.pop("client_id", None)
    api = RemoteAPI(
        "mqtt", codec, agent_id=agent_id, config=config, timeout=timeout, client_id=client_id
    )
    await api.connect(broker.host, broker.port, **options)
    try:
        yield api
    finally:
        await api.close()


@contextlib.asynccontextmanager
async def agent_and_client(
    config: Config, broker: Mosquitto, workdir: Path
) -> AsyncIterator[tuple[Agent, RemoteAPI]]:
    """An agent (state in ``workdir/state``) and a RemoteAPI client of it, on one broker."""
    async with (
        running_agent(config, broker, workdir / "state") as agent,
        remote_api(config, broker) as api,
    ):
        yield agent, api


async def until_announced(api: RemoteAPI, agent_id: str = AGENT_ID) -> None:
    """Wait (up to 10 s) until an agent process has announced itself to ``api``."""
    for _ in range(200):
        if agent_id in api.agents():
            return
        await asyncio.sleep(0.05)


async def streaming_demo(api: Any, node_id: str = "demo") -> asyncio.Queue[Any]:
    """Proxy the simulated ``demo`` node's eeg stream to a new sink; return once it delivers."""
    sink: asyncio.Queue[Any] = asyncio.Queue()
    await api.proxy_live_stream(node_id, "eeg", {}, sink)
    await asyncio.wait_for(sink.get(), 10)
    return sink


# A RemoteAPI client in its own process holding one live task. Its lease (keepalive 2 s,
# then the broker's last will) is what ends the task when the process dies.
CLIENT_SCRIPT = """
import asyncio, sys
import streaminghub_datamux as dm
from streaminghub_datamux.config import load_config

async def main():
    config = load_config(flags={"broker.keepalive_s": 2}, env={})
    api = dm.RemoteAPI("mqtt", "cbor", agent_id=sys.argv[3], config=config, timeout=10)
    await api.connect(sys.argv[1], int(sys.argv[2]))
    sink = asyncio.Queue()
    ack = await api.proxy_live_stream("demo", "eeg", {}, sink)
    print("started", ack.randseq, flush=True)
    while True:
        await sink.get()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def leasing_client(
    broker: Mosquitto, cwd: Path, *, agent_id: str = AGENT_ID, timeout: float = 20
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start that client, wait until its task runs; killed by its own pid on exit."""
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT_SCRIPT, broker.host, str(broker.port), agent_id,
        stdout=asyncio.subprocess.PIPE, cwd=cwd,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), timeout)
        assert line.startswith(b"started"), line
        yield client
    finally:
        if client.returncode is None:
            client.kill()
            with contextlib.suppress(ProcessLookupError):
                client.send_signal(signal.SIGCONT)  # a stopped process dies once resumed
        await client.wait()


async def tasks_released(agent: Agent, limit: float) -> tuple[float, list[Any]]:
    """Seconds until ``agent`` runs no task (waiting at most ``limit``), and those left."""
    since = time.monotonic()
    while agent.api.tasks() and time.monotonic() - since < limit:
        await asyncio.sleep(0.05)
    return time.monotonic() - since, agent.api.tasks()


def api_factory(kind: str, broker: Mosquitto | None, state_dir: Path) -> Callable[..., Any]:
    """``make(config)``: an async context manager giving the API of this kind."""

    @contextlib.asynccontextmanager
    async def make(config: Config) -> AsyncIterator[Any]:
        if kind == "local":
            async with API(config) as api:
                yield api
            return
        assert broker is not None
        codec = kind.split("-", 1)[1]
        async with (
            running_agent(config, broker, state_dir),
            remote_api(config, broker, codec=codec) as api,
        ):
            yield api

    return make


# -- a raw MQTT peer, for what a RemoteAPI would never send ---------------------------


class RawPeer:
    """A bare paho client that records every message it receives."""

    def __init__(self, broker, client_id="raw", protocol=mqtt.MQTTv5):
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self._subacks: set[int] = set()
        self.client.on_subscribe = lambda c, u, mid, *rest: self._subacks.add(mid)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def subscribe(self, topic):
        """Subscribe and wait for the broker's SUBACK (a fixed 0.3 s was too short for a
        loaded machine: messages sent right after went unseen)."""
        _, mid = self.client.subscribe(topic, 1)
        wait_until(lambda: mid in self._subacks, 30, f"the SUBACK for {topic}")

    def publish(self, topic, payload, properties=None, retain=False):
        self.client.publish(topic, payload, qos=1, properties=properties, retain=retain)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


# -- processes ---------------------------------------------------------------------------


class AgentProcess:
    """``datamux serve`` in its own process, stopped by its own pid."""

    def __init__(
        self,
        broker: Mosquitto,
        workdir: Path,
        agent_id: str = AGENT_ID,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = workdir / f"agent-{agent_id}.log"
        self.command = [
            sys.executable,
            "-m",
            "streaminghub_datamux",
            "-v",
            "serve",
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--id",
            agent_id,
            "--embedded",
            "never",
            "--drivers",
            "sim",
            "--state-dir",
            str(workdir / "state"),
            "--data_dir",
            str(workdir / "data"),
            "--meta_dir",
            str(workdir / "meta"),
            *extra,
        ]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
        environ["HOME"] = str(workdir)  # no user rc file leaks in
        environ.update(env or {})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=workdir
            )

    def rss_bytes(self) -> int:
        """The agent process's resident memory now (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError(f"agent ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition (bounded), for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
