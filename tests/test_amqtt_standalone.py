"""amqtt run as a standalone broker (its own ``amqtt`` command), not the embedded one.

A broker other than mosquitto that only speaks MQTT 3.1.1 and lets an MQTT 5 CONNECT go
unanswered: connecting in ``auto`` mode must work quietly, and the README's flow must
run through it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from broker import LOOPBACK, free_port, stop_process
from helpers import gaze_collection, run
from remote import AgentProcess, wait_until

import streaminghub_datamux as dm
from streaminghub_datamux.mqttio import BrokerSettings, MqttLink

AMQTT = shutil.which("amqtt", path=str(Path(sys.executable).parent)) or shutil.which("amqtt")
pytestmark = pytest.mark.skipif(AMQTT is None, reason="amqtt (the [embedded] extra) is missing")

CONFIG = """\
listeners:
  default:
    type: tcp
    bind: {host}:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[SimpleNamespace]:
    port = free_port()
    config = tmp_path / "amqtt.yaml"
    config.write_text(CONFIG.format(host=LOOPBACK, port=port))
    log = (tmp_path / "amqtt.log").open("wb")
    assert AMQTT is not None
    process = subprocess.Popen([AMQTT, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: b"bind to" in (tmp_path / "amqtt.log").read_bytes(), 30, "amqtt up")
        yield SimpleNamespace(host=LOOPBACK, port=port)
    finally:
        stop_process(process)
        log.close()


def test_connecting_to_a_3_1_1_only_broker_warns_nothing(amqtt_broker):
    """The MQTT 5 probe runs out, 3.1.1 connects: no WARNING about a silent broker."""
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    async def body() -> None:
        settings = BrokerSettings(host=amqtt_broker.host, port=amqtt_broker.port)
        for attempt in range(3):
            link = MqttLink(f"probe-{attempt}", settings, on_message=print)
            started = time.monotonic()
            try:
                await link.connect(timeout=20)
                assert link.connected
                assert time.monotonic() - started < 15
            finally:
                await link.close()

    handler = Keep(logging.WARNING)
    logging.getLogger("streaminghub_datamux.mqttio").addHandler(handler)
    try:
        run(body())
    finally:
        logging.getLogger("streaminghub_datamux.mqttio").removeHandler(handler)
    assert warnings == []


def test_the_readme_flow_through_a_standalone_amqtt(amqtt_broker, workspace):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=50)
    agent = AgentProcess(amqtt_broker, workspace.root, "amqtt-agent")
    try:

        async def body() -> None:
            api = dm.RemoteAPI(rpc_name="mqtt", codec_name="cbor")
            await api.connect(server_host=amqtt_broker.host, server_port=amqtt_broker.port)
            try:
                streams: list[dm.Stream] = []
                for _ in range(150):  # the agent may still be starting
                    collections = await api.list_collections()
                    if any(c.id == "amqtt-agent/study" for c in collections):
                        streams = await api.list_collection_streams("amqtt-agent/study")
                        break
                    await asyncio.sleep(0.1)
                assert streams, "the agent's collection never showed up"
                sink: asyncio.Queue = asyncio.Queue()
                ack = await api.replay_collection_stream(
                    "amqtt-agent/study", streams[0].attrs["id"], streams[0].attrs, sink,
                    rate_limit=False,
                )  # fmt: skip
                samples = 0
                while (item := await asyncio.wait_for(sink.get(), 20)) != dm.END_OF_STREAM:
                    assert isinstance(item, dm.Frame), item
                    samples += len(item.timestamps)
                await api.stop_task(ack.randseq)
                assert samples == 50
            finally:
                await api.close()

        run(body())
    finally:
        agent.terminate()
