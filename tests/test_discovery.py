"""Discovery on any broker: agents answer discovery requests, so a broker that keeps no
retained messages (mosquitto ``retain_available false``, like RabbitMQ's wildcard
subscriptions) still finds every agent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Mosquitto
from helpers import drain, frames_of, gaze_collection, run
from remote import remote_api, running_agent, settings_for

from streaminghub_datamux.codec import decode
from streaminghub_datamux.mqttio import Incoming, MqttLink
from streaminghub_datamux.protocol import Topics


@pytest.fixture(params=[True, False], ids=["retain", "no-retain"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    extra = [] if request.param else ["retain_available false"]
    mosquitto = Mosquitto(tmp_path / "mosquitto", extra_config=extra)
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


def test_fleet_client_finds_every_agent_and_streams(workspace, broker, tmp_path):
    workspace.add_collection("study", gaze_collection())
    _, values = workspace.add_gaze_recording("A", "1", n=300)
    config = workspace.config()

    async def body() -> tuple[Any, ...]:
        async with (
            running_agent(config, broker, tmp_path / "s1", agent_id="pi-1"),
            running_agent(config, broker, tmp_path / "s2", agent_id="pi-2"),
            remote_api(config, broker, agent_id=None) as api,
        ):
            agents = sorted(api.agents())
            nodes = sorted(n.id for n in await api.list_live_nodes())
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.replay_collection_stream(
                "pi-2/study", "gaze", {"subject": "A"}, sink, speed=0
            )
            items = await drain(sink)
            retain = api.link.retain_available if api.link else None
        return agents, nodes, items, retain

    agents, nodes, items, retain = run(body())
    assert agents == ["pi-1", "pi-2"]
    assert nodes == ["pi-1/demo", "pi-2/demo"]
    frames = frames_of(items)
    np.testing.assert_array_equal(np.concatenate([f.values for f in frames]), values[:, :2])
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert retain is (broker.conf_path.read_text().find("retain_available false") < 0)


def test_single_agent_client_finds_its_agent_without_retained_birth(workspace, tmp_path):
    broker = Mosquitto(tmp_path / "mq", extra_config=["retain_available false"])
    broker.start()
    config = workspace.config()

    async def body() -> list[str]:
        async with (
            running_agent(config, broker, tmp_path / "s", agent_id="pi-1"),
            remote_api(config, broker, agent_id="pi-1") as api,
        ):
            return [n.id for n in await api.list_live_nodes()]

    try:
        assert run(body()) == ["demo"]
    finally:
        broker.stop()


def test_a_flood_of_discovery_requests_costs_few_answers(workspace, tmp_path):
    broker = Mosquitto(tmp_path / "mq")
    broker.start()
    config = workspace.config()
    topics = Topics()

    async def body() -> int:
        answers: list[Any] = []

        def on_message(message: Incoming) -> None:
            if not message.retain:
                answers.append(decode(message.payload))

        link = MqttLink("watcher", settings_for(broker), on_message=on_message)
        async with running_agent(config, broker, tmp_path / "s", agent_id="pi-1"):
            await link.connect(timeout=10)
            await link.subscribe(topics.agent_state("pi-1"))
            for _ in range(200):
                await link.publish(topics.discover("watcher"), b"\xa0", qos=0)

            def online() -> int:
                return len([a for a in list(answers) if a.get("state") == "online"])

            # The first answer (bounded: a loaded machine may take over the 1 s this
            # used to wait in all), then 1 s in which any flood of answers would show.
            async with asyncio.timeout(10):
                while not online():
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            await link.close()
        return online()

    try:
        online = run(body())
    finally:
        broker.stop()
    assert 1 <= online <= 25
