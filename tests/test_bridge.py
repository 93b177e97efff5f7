"""Fleets beyond one broker: the agent on an edge mosquitto bridged to a central one
(docs/operations.md, "Bridged brokers"), the client on the central broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import LOOPBACK, Mosquitto, free_port
from helpers import drain, frames_of, gaze_collection, run
from remote import leasing_client, remote_api, running_agent, tasks_released

import streaminghub_datamux as dm
from streaminghub_datamux.protocol import DEFAULT_PREFIX


def bridge_config(central_port: int, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The edge side of the bridge, as docs/operations.md shows it."""
    return [
        "connection central",
        f"address {LOOPBACK}:{central_port}",
        f"topic {prefix}/# both 1",
        "cleansession false",
        "local_clientid edge-bridge-local",
        "remote_clientid edge-bridge",
        "try_private true",
        "restart_timeout 3",
        "keepalive_interval 5",
    ]


@pytest.fixture
def brokers(tmp_path: Path) -> Any:
    central = Mosquitto(tmp_path / "central")
    edge = Mosquitto(tmp_path / "edge", extra_config=bridge_config(central.port))
    central.start()
    edge.start()
    try:
        yield edge, central
    finally:
        edge.stop()
        central.stop()


async def wait_online(api: dm.RemoteAPI, agent: str, timeout: float = 10.0) -> None:
    """The bridge connects in the background: wait for the agent's birth to cross it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while api.agents().get(agent, {}).get("state") != "online":
        assert loop.time() < deadline, f"agent {agent} not seen across the bridge"
        await asyncio.sleep(0.05)


def test_discovery_rpc_and_frames_across_the_bridge(workspace, brokers, tmp_path):
    edge, central = brokers
    workspace.add_collection("study", gaze_collection())
    timestamps, values = workspace.add_gaze_recording("A", "1", n=400)
    config = workspace.config()

    async def body() -> tuple[Any, ...]:
        async with (
            running_agent(config, edge, tmp_path / "s", agent_id="pi-1"),
            remote_api(config, central, agent_id=None, timeout=10) as api,
        ):
            await wait_online(api, "pi-1")
            nodes = [n.id for n in await api.list_live_nodes()]
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.replay_collection_stream(
                "pi-1/study", "gaze", {"subject": "A"}, sink, speed=0
            )
            items = await drain(sink)
            tasks_left = await api._call("pi-1", "list_tasks", {})
            return nodes, ack, items, tasks_left

    nodes, ack, items, tasks_left = run(body())
    assert nodes == ["pi-1/demo"]
    assert ack.randseq.startswith("pi-1/")
    frames = frames_of(items)
    assert [f.seq for f in frames] == list(range(len(frames)))
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), timestamps)
    np.testing.assert_array_equal(np.concatenate([f.values for f in frames]), values[:, :2])
    assert tasks_left == []


def test_central_broker_restart_mid_stream_loses_nothing(workspace, brokers, tmp_path):
    """The edge keeps the bridge's QoS 1 messages while the central broker is away; the
    client's persistent session on the central broker takes them when it is back."""
    edge, central = brokers
    workspace.add_collection("study", gaze_collection(frequency=100))
    timestamps, values = workspace.add_gaze_recording("A", "1", n=500, frequency=100)
    # The central broker's restart sends the client's will across the bridge; the agent
    # waits this long for the client to come back (docs/operations.md).
    config = workspace.config(**{"agent.will_grace_s": 10.0})

    async def body() -> list[Any]:
        async with (
            running_agent(config, edge, tmp_path / "s", agent_id="pi-1"),
            remote_api(config, central, agent_id=None, timeout=10) as api,
        ):
            await wait_online(api, "pi-1")
            sink: asyncio.Queue[Any] = asyncio.Queue()
            await api.replay_collection_stream(
                "pi-1/study", "gaze", {"subject": "A"}, sink, framing={"max_samples": 20}
            )
            await asyncio.sleep(1.5)
            await asyncio.to_thread(central.restart, 1.0)
            return await asyncio.wait_for(drain(sink), 30)

    items = run(body(), timeout=50)
    assert items[-1] is dm.END_OF_STREAM
    assert not [i for i in items if isinstance(i, dm.StreamError)]
    assert not [i for i in items if isinstance(i, dm.StreamStatus) and i.status == "dropped"]
    frames = frames_of(items)
    assert [f.seq for f in frames] == list(range(len(frames)))
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), timestamps)
    np.testing.assert_array_equal(np.concatenate([f.values for f in frames]), values[:, :2])


def test_bridge_config_in_the_docs_is_the_tested_one():
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    for line in bridge_config(free_port()):
        if not line.startswith("address"):
            assert line in text, f"docs/operations.md lacks the bridge line {line!r}"


def test_a_client_that_dies_on_the_central_broker_loses_its_tasks_on_the_edge(
    workspace, brokers, tmp_path
):
    """Leases across the bridge: the client's will crosses it, the agent ends the task."""
    edge, central = brokers
    config = workspace.config()

    async def body() -> tuple[float, list[Any]]:
        async with (
            running_agent(config, edge, tmp_path / "s", agent_id="pi-1") as agent,
            leasing_client(central, tmp_path, agent_id="pi-1", timeout=30) as client,
        ):
            assert len(agent.api.tasks()) == 1
            client.kill()  # by its own pid
            return await tasks_released(agent, 10)

    released_after, left = run(body(), timeout=60)
    assert left == []
    assert released_after < 5.0
