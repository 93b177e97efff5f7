"""Who serves the MQTT socket: paho's thread (RemoteAPI) or the asyncio loop (the agent).

Both on a real mosquitto; the loop's own paths (a full socket buffer, TLS records,
keepalive pings, reconnects, stopping while connecting) are driven for real.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from broker import LOOPBACK, Mosquitto, free_port
from helpers import run
from secure_broker import Certificates

from streaminghub_datamux.mqttio import BrokerSettings, Incoming, MqttLink

BIG = 256 * 1024  # bigger than a loopback socket's send buffer takes at once
COUNT = 120


def _paho_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")}


async def _burst(
    settings: BrokerSettings, sending: Any, receiving: Any, topic: str, size: int = BIG
) -> list[bytes]:
    """COUNT QoS 1 messages of ``size`` bytes from a link served by ``sending`` to one
    served by ``receiving``; what arrived, in order."""
    received: list[bytes] = []
    done = asyncio.Event()

    def on_message(message: Incoming) -> None:
        received.append(message.payload)
        if len(received) == COUNT:
            done.set()

    receiver = MqttLink(f"rx-{topic}", settings, on_message=on_message, network=receiving)
    sender = MqttLink(f"tx-{topic}", settings, on_message=print, network=sending)
    await receiver.connect(10)
    await sender.connect(10)
    try:
        await receiver.subscribe(topic, qos=1)
        for i in range(COUNT):
            body = i.to_bytes(4, "big") * (size // 4)
            assert await sender.publish(topic, body, qos=1)
        await asyncio.wait_for(done.wait(), 60)
        assert await sender.flush(10)
    finally:
        await sender.close()
        await receiver.close()
    return received


@pytest.mark.parametrize("network", ["loop", "thread"])
def test_a_burst_bigger_than_the_socket_buffer_arrives_whole_and_in_order(mosquitto, network):
    settings = BrokerSettings(host=LOOPBACK, port=mosquitto.port)
    received = run(_burst(settings, network, "thread", "b/1"))
    assert [len(p) for p in received] == [BIG] * COUNT
    assert [int.from_bytes(p[:4], "big") for p in received] == list(range(COUNT))
    assert all(p == p[:4] * (BIG // 4) for p in received)


def test_the_loop_serves_tls_records_both_ways(tmp_path: Path):
    """TLS: records epoll cannot see (decrypted, pending in the SSL object) are read."""
    certificates = Certificates(tmp_path / "certs")
    cert, key = certificates.server
    broker = Mosquitto(
        tmp_path / "broker",
        extra_config=[f"cafile {certificates.ca}", f"certfile {cert}", f"keyfile {key}"],
    )
    broker.start()
    try:
        settings = BrokerSettings(host=LOOPBACK, port=broker.port, ca_file=str(certificates.ca))

        async def both_ways() -> tuple[list[bytes], list[bytes]]:
            sent = await _burst(settings, "loop", "thread", "tls/1")
            got = await _burst(settings, "thread", "loop", "tls/2", 16 * 1024)
            return sent, got

        sent, got = run(both_ways())
    finally:
        broker.stop()
    assert [int.from_bytes(p[:4], "big") for p in sent] == list(range(COUNT))
    assert [int.from_bytes(p[:4], "big") for p in got] == list(range(COUNT))


def test_the_loop_pings_so_an_idle_link_stays_connected(mosquitto):
    """keepalive 2 s: mosquitto drops a client silent for 3 s; loop_misc pings."""

    async def idle() -> tuple[int, bool, set[str]]:
        settings = BrokerSettings(host=LOOPBACK, port=mosquitto.port, keepalive_s=2)
        link = MqttLink("idle", settings, on_message=print, network="loop")
        await link.connect(10)
        threads = _paho_threads()
        try:
            await asyncio.sleep(7.0)
            return link.disconnects, link.connected, threads
        finally:
            await link.close()

    disconnects, connected, threads = run(idle())
    assert (disconnects, connected) == (0, True)
    assert threads == set(), f"a paho thread serves a loop link: {threads}"


def test_the_loop_reconnects_after_a_broker_restart(tmp_path: Path):
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:

        async def across_restart() -> list[bytes]:
            got: list[bytes] = []
            arrived = asyncio.Event()

            def on_message(message: Incoming) -> None:
                got.append(message.payload)
                arrived.set()

            settings = BrokerSettings(host=LOOPBACK, port=broker.port)
            link = MqttLink("restart", settings, on_message=on_message, network="loop")
            await link.connect(10)
            try:
                await link.subscribe("r/1", qos=1)
                await asyncio.to_thread(broker.restart, 0.5)
                async with asyncio.timeout(20):
                    while not link.connected or link.disconnects == 0:
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)  # the SUBSCRIBE made again on reconnect
                assert link.publish_nowait("r/1", b"after", qos=1)
                await asyncio.wait_for(arrived.wait(), 10)
            finally:
                await link.close()
            return got

        assert run(across_restart()) == [b"after"]
    finally:
        broker.stop()


def test_closing_while_no_broker_answers_leaves_nothing_running():
    async def give_up() -> tuple[float, set[str], int]:
        settings = BrokerSettings(host=LOOPBACK, port=free_port())
        link = MqttLink("nobody", settings, on_message=print, network="loop")
        connecting = asyncio.create_task(link.connect(timeout=None))
        await asyncio.sleep(1.5)  # a few refused attempts, with backoff
        loop = asyncio.get_running_loop()
        began = loop.time()
        await link.close()
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        # The link's own tasks (serving the socket, reporting why it cannot connect).
        tasks = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]  # type: ignore[union-attr]
        left = [name for name in tasks if name.startswith(("LoopNetwork", "MqttLink"))]
        return loop.time() - began, _paho_threads(), left

    took, threads, tasks = run(give_up())
    assert took < 6.0
    assert threads == set()
    assert tasks == []


def test_a_remote_api_on_its_loop_streams_with_no_paho_thread(workspace, mosquitto, tmp_path):
    """RemoteAPI(network="loop"): the low-latency choice for a loop that never blocks."""
    from remote import running_agent, until_announced

    import streaminghub_datamux as dm

    async def body() -> tuple[int, set[str], set[str]]:
        config = workspace.config()
        async with running_agent(config, mosquitto, tmp_path / "state"):
            api = dm.RemoteAPI(agent_id="a1", config=config, timeout=10, network="loop")
            await api.connect(mosquitto.host, mosquitto.port)
            try:
                await until_announced(api)
                threads = _paho_threads()  # the agent's link has none either
                sink: asyncio.Queue[Any] = asyncio.Queue()
                ack = await api.proxy_live_stream("demo", "eeg", {}, sink, framing="low-latency")
                frames = []
                while len(frames) < 20:
                    item = await asyncio.wait_for(sink.get(), 10)
                    if isinstance(item, dm.Frame):
                        frames.append(item)
                await api.stop_task(ack.randseq)
                seqs = {f.seq for f in frames}
                return len(seqs), threads, _paho_threads()
            finally:
                await api.close()

    distinct, threads_before, threads_after = run(body())
    assert distinct == 20
    assert threads_before == set() and threads_after == set()


def test_an_unknown_network_is_refused():
    import streaminghub_datamux as dm
    from streaminghub_datamux.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="network must be 'thread' or 'loop'"):
        dm.RemoteAPI(network="threads")  # type: ignore[arg-type]
