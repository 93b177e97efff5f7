"""The embedded broker (amqtt) with real paho clients on a free loopback port."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import LOOPBACK, free_port
from helpers import run
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from streaminghub_datamux.agent.embedded import EmbeddedBroker, broker_reachable, is_loopback
from streaminghub_datamux.errors import ConfigError

WAIT_S = 15.0  # bound on every single wait below; the whole test is bounded by helpers.run

# A will client in its own process, so that killing it by pid drops its TCP connection
# without an MQTT DISCONNECT, as a crash or a power cut would.
WILL_CLIENT = """
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, topic, will = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="will-client")
client.will_set(topic, will, qos=1, retain=True)
client.connect("127.0.0.1", port, keepalive=30)
client.loop_start()
client.publish(topic, b"online", qos=1, retain=True).wait_for_publish(5)
print("online", flush=True)
time.sleep(60)
"""

needs_amqtt = pytest.mark.skipif(
    importlib.util.find_spec("amqtt") is None,
    reason="amqtt is not installed (pip install 'streaminghub-datamux[embedded]')",
)


class Client:
    """A real paho MQTT 3.1.1 client whose callbacks land on the test's event loop.

    The broker runs on that loop too, so nothing here may block it: paho runs in its
    own thread (``loop_start``) and hands every event over with ``call_soon_threadsafe``.
    """

    def __init__(self, port: int, client_id: str, protocol: int = mqtt.MQTTv311) -> None:
        self.port = port
        self.client_id = client_id
        self.loop = asyncio.get_running_loop()
        self.messages: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self.connected: asyncio.Future[ReasonCode] = self.loop.create_future()
        self.disconnected = asyncio.Event()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._lock = threading.Lock()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_ack
        self.paho.on_publish = self._on_ack

    async def connect(self) -> ReasonCode:
        """Connect; return the CONNACK's reason code."""
        self.paho.connect_async(LOOPBACK, self.port, keepalive=30)
        self.paho.loop_start()
        return await asyncio.wait_for(asyncio.shield(self.connected), WAIT_S)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:  # the SUBACK may arrive before subscribe() returns the mid
            _, mid = self.paho.subscribe(topic, qos)
            ack = self._acks.setdefault(mid, self.loop.create_future())
        await asyncio.wait_for(ack, WAIT_S)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK."""
        with self._lock:
            info = self.paho.publish(topic, payload, qos=qos, retain=retain)
            ack = self._acks.setdefault(info.mid, self.loop.create_future())
        await asyncio.wait_for(ack, WAIT_S)

    async def receive(self) -> mqtt.MQTTMessage:
        return await asyncio.wait_for(self.messages.get(), WAIT_S)

    async def retained(self, topic: str) -> list[mqtt.MQTTMessage]:
        """Subscribe to ``topic`` and return what the broker had retained there.

        amqtt sends the retained messages of one SUBSCRIBE before it handles the next
        one, so everything that arrives before the marker of a second subscription
        was retained.
        """
        marker = f"marker/{self.client_id}"
        await self.subscribe(topic)
        await self.subscribe(marker)
        await self.publish(marker, b"marker", qos=0)
        got = []
        while (message := await self.receive()).topic != marker:
            got.append(message)
        return got

    async def aclose(self) -> None:
        self.paho.disconnect()
        await asyncio.to_thread(self.paho.loop_stop)

    # paho's thread -> the test's loop

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        def resolve() -> None:
            if not self.connected.done():
                self.connected.set_result(reason)

        self.loop.call_soon_threadsafe(resolve)

    def _on_disconnect(self, *_args: Any) -> None:
        self.loop.call_soon_threadsafe(self.disconnected.set)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, message)

    def _on_ack(self, _c: Any, _u: Any, mid: int, *_rest: Any) -> None:
        def resolve() -> None:
            with self._lock:
                ack = self._acks.setdefault(mid, self.loop.create_future())
            if not ack.done():
                ack.set_result(None)

        self.loop.call_soon_threadsafe(resolve)


@asynccontextmanager
async def clients(port: int, *client_ids: str) -> AsyncIterator[list[Client]]:
    made = [Client(port, client_id) for client_id in client_ids]
    try:
        for client in made:
            reason = await client.connect()
            assert not reason.is_failure, reason
        yield made
    finally:
        for client in made:
            await client.aclose()


@asynccontextmanager
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    async with await EmbeddedBroker.start(LOOPBACK, free_port()) as broker:
        yield broker


@needs_amqtt
def test_qos1_publish_subscribe_in_order_including_a_1_mib_payload() -> None:
    big = os.urandom(1 << 20)

    async def body() -> None:
        async with embedded_broker() as broker, clients(broker.port, "pub", "sub") as (pub, sub):
            await sub.subscribe("data/#", qos=1)
            for i in range(20):
                await pub.publish("data/small", str(i).encode(), qos=1)
            await pub.publish("data/big", big, qos=1)
            got = [await sub.receive() for _ in range(21)]
            assert [m.payload for m in got[:20]] == [str(i).encode() for i in range(20)]
            assert {m.qos for m in got} == {1}
            assert got[20].topic == "data/big" and got[20].payload == big

    run(body())


@needs_amqtt
def test_retained_message_reaches_late_subscribers_and_empty_payload_clears_it() -> None:
    async def body() -> None:
        async with embedded_broker() as broker, clients(broker.port, "pub") as (pub,):
            await pub.publish("a/state", b"up", retain=True)
            async with clients(broker.port, "late") as (late,):
                [message] = await late.retained("a/state")
                assert (message.payload, message.retain) == (b"up", True)
            await pub.publish("a/state", b"", retain=True)
            async with clients(broker.port, "later") as (later,):
                assert await later.retained("a/state") == []

    run(body())


@needs_amqtt
def test_a_client_gets_only_the_retained_messages_of_its_own_subscriptions() -> None:
    # amqtt 0.12.1 alone also sends those matching anyone else's subscriptions.
    async def body() -> None:
        async with embedded_broker() as broker, clients(broker.port, "pub", "other") as pair:
            pub, other = pair
            await other.subscribe("a/#")
            await pub.publish("a/state", b"up", retain=True)
            assert (await other.receive()).payload == b"up"
            async with clients(broker.port, "newcomer") as (newcomer,):
                assert await newcomer.retained("b/#") == []
                [message] = await newcomer.retained("a/state")  # once, not twice
                assert message.payload == b"up"

    run(body())


@needs_amqtt
@pytest.mark.parametrize(("will", "retained_after"), [(b"offline", [b"offline"]), (b"", [])])
def test_will_is_published_and_retained_when_a_client_dies(
    will: bytes, retained_after: list[bytes]
) -> None:
    async def body() -> None:
        async with embedded_broker() as broker, clients(broker.port, "watcher") as (watcher,):
            await watcher.subscribe("agents/+/state")
            topic = "agents/a1/state"
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WILL_CLIENT,
                str(broker.port),
                topic,
                will.decode(),
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert process.stdout is not None
                line = await asyncio.wait_for(process.stdout.readline(), WAIT_S)
                assert line.strip() == b"online"
                assert (await watcher.receive()).payload == b"online"
            finally:
                process.kill()  # SIGKILL to its own pid: no DISCONNECT packet
                await asyncio.wait_for(process.communicate(), WAIT_S)
            message = await watcher.receive()
            assert (message.topic, message.payload) == (topic, will)
            async with clients(broker.port, "late") as (late,):
                assert [m.payload for m in await late.retained(topic)] == retained_after

    run(body())


@needs_amqtt
def test_mqtt5_clients_are_refused_with_unsupported_protocol_version() -> None:
    # What a client with broker.protocol = "auto" sees before it falls back to 3.1.1.
    async def body() -> None:
        async with embedded_broker() as broker:
            client = Client(broker.port, "v5", protocol=mqtt.MQTTv5)
            try:
                reason = await client.connect()
            finally:
                await client.aclose()  # also stops paho retrying MQTT 5
            assert reason == 132 and reason.is_failure  # "Unsupported protocol version"

    run(body())


@needs_amqtt
def test_broker_reachable_follows_the_broker() -> None:
    async def body() -> None:
        broker = await EmbeddedBroker.start(LOOPBACK, free_port())
        assert broker.running
        assert await asyncio.to_thread(broker_reachable, broker.host, broker.port)
        await broker.aclose()
        assert not broker.running
        assert not await asyncio.to_thread(broker_reachable, broker.host, broker.port)
        await broker.aclose()  # idempotent

    run(body())
    # amqtt 0.12.1 alone leaks the socket of a probe; collected here, that would be a
    # ResourceWarning, which filterwarnings = ["error"] turns into a failure.
    gc.collect()


def test_broker_reachable_is_false_when_nothing_listens() -> None:
    assert not broker_reachable(LOOPBACK, free_port(), timeout=0.5)


@needs_amqtt
def test_closing_the_broker_disconnects_its_clients() -> None:
    async def body() -> None:
        broker = await EmbeddedBroker.start(LOOPBACK, free_port())
        try:
            async with clients(broker.port, "c") as (client,):
                await broker.aclose()
                await asyncio.wait_for(client.disconnected.wait(), WAIT_S)
        finally:
            await broker.aclose()

    run(body())


@needs_amqtt
def test_port_in_use_is_a_config_error_naming_the_address() -> None:
    async def body() -> None:
        async with embedded_broker() as first:
            with pytest.raises(ConfigError) as caught:
                await EmbeddedBroker.start(LOOPBACK, first.port)
            assert f"{LOOPBACK}:{first.port}" in str(caught.value)
            assert "already in use" in str(caught.value)
            assert caught.value.key == "broker.port"
            assert await asyncio.to_thread(broker_reachable, LOOPBACK, first.port)

    run(body())


def test_missing_amqtt_is_a_config_error_saying_what_to_install(mocker: Any) -> None:
    # None in sys.modules makes "import amqtt..." raise ImportError, as if not installed.
    mocker.patch.dict(sys.modules, {"amqtt": None, "amqtt.broker": None, "amqtt.errors": None})
    with pytest.raises(ConfigError) as caught:
        run(EmbeddedBroker.start(LOOPBACK, free_port()))
    assert "pip install 'streaminghub-datamux[embedded]'" in caught.value.fix
    assert "mosquitto" in caught.value.fix
    assert caught.value.key == "broker.embedded"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "broker.example"])
def test_non_loopback_hosts_need_allow_remote(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError) as caught:
        run(EmbeddedBroker.start(host, free_port()))
    assert caught.value.key == "broker.host"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@needs_amqtt
def test_amqtt_logging_is_quiet_even_for_probes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body() -> None:
        async with embedded_broker() as broker, clients(broker.port, "c") as (client,):
            await client.subscribe("x")
            # amqtt logs an ERROR for a connection that closes before CONNECT.
            assert await asyncio.to_thread(broker_reachable, broker.host, broker.port)
            await asyncio.sleep(0.2)  # the broker notices the probe's EOF meanwhile

    run(body())
    noisy = [r for r in caplog.records if r.name.startswith(("amqtt", "transitions"))]
    assert noisy == []
    assert "listening on" in caplog.text  # our own INFO lines stay
