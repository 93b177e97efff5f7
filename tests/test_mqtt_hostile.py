"""Hostile checks of the agent's MQTT socket on its own loop (mqttnet.LoopNetwork).

A real mosquitto killed, stopped (SIGSTOP: a half-open peer and a full socket buffer)
and shared by two clients with one id; a real ``datamux serve`` told to stop while it
cannot connect. Written by the review of mqttnet.py: each test says what it once broke
or what held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from broker import LOOPBACK, Mosquitto, free_port
from helpers import run

from streaminghub_datamux.mqttio import BrokerSettings, Incoming, MqttLink


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def broker(tmp_path: Path):
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        if broker.process is not None and broker.process.poll() is None:
            os.kill(broker.process.pid, signal.SIGCONT)  # a test that failed while stopped
        broker.stop()


async def _wait_for(condition, seconds: float) -> float:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    began = loop.time()
    while not condition():
        if loop.time() - began > seconds:
            raise TimeoutError(f"not within {seconds} s")
        await asyncio.sleep(0.02)
    return loop.time() - began


@pytest.mark.parametrize("network", ["loop", "thread"])
def test_two_links_with_one_client_id_back_off_and_say_why(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture, network: str
):
    """Found: two clients with one id (two agents given the same --id) took the session
    from each other every 0.5 s for ever, since each CONNACK reset the backoff, and the
    WARNING said only "Unspecified error". paho's thread (the RemoteAPI's default) did
    the same with paho's own backoff."""

    async def fight() -> tuple[int, int]:
        settings = BrokerSettings(host=LOOPBACK, port=broker.port)
        one = MqttLink("twin", settings, on_message=print, network=network)
        two = MqttLink("twin", settings, on_message=print, network=network)
        await one.connect(10)
        await two.connect(10)
        try:
            await asyncio.sleep(8)
            return one.disconnects, two.disconnects
        finally:
            await one.close()
            await two.close()

    with caplog.at_level(logging.WARNING, logger="streaminghub_datamux.mqttio"):
        one, two = run(fight())
    # 0.5 s each way was 8 drops each in 8 s; backing off (0.5, 1, 2, 2 s) about 4.
    assert 1 <= one <= 5 and 1 <= two <= 5, (one, two)
    lost = [r.getMessage() for r in caplog.records if "lost the broker" in r.getMessage()]
    assert lost and "client id 'twin'" in lost[-1], lost
    assert "client id" not in lost[0], "a single drop (a broker restart) is no repeat"


def test_an_idle_connected_link_uses_almost_no_cpu(broker: Mosquitto):
    """Held: 10 s idle on the loop (a wake a second for paho's keepalive) costs ~5 ms."""

    async def idle() -> float:
        settings = BrokerSettings(host=LOOPBACK, port=broker.port, keepalive_s=2)
        link = MqttLink("idle-cpu", settings, on_message=print, network="loop")
        await link.connect(10)
        try:
            before = _cpu_s()
            await asyncio.sleep(10)
            assert link.connected and link.disconnects == 0
            return _cpu_s() - before
        finally:
            await link.close()

    assert run(idle()) < 0.3


def test_kill_9_of_the_broker_leaks_no_descriptor_and_reconnects_promptly(broker: Mosquitto):
    """Held: each kill -9 costs a reconnect within the backoff and no descriptor, and
    nothing spins while the broker is gone."""

    async def kills() -> tuple[list[float], list[float], int]:
        settings = BrokerSettings(host=LOOPBACK, port=broker.port)
        link = MqttLink("kill9", settings, on_message=print, network="loop")
        await link.connect(10)
        before = _open_fds()
        reconnects, down_cpu = [], []
        try:
            for _ in range(5):
                assert broker.process is not None
                broker.process.kill()
                broker.process.wait(5)
                broker.process = None
                cpu = _cpu_s()
                await _wait_for(lambda: not link.connected, 5)
                await asyncio.sleep(1.0)
                down_cpu.append(_cpu_s() - cpu)
                await asyncio.to_thread(broker.start)
                reconnects.append(await _wait_for(lambda: link.connected, 10))
            await asyncio.sleep(0.2)
            return reconnects, down_cpu, _open_fds() - before
        finally:
            await link.close()

    reconnects, down_cpu, leaked = run(kills(), 90)
    assert leaked <= 0, f"{leaked} descriptors more after 5 reconnects"
    assert max(reconnects) < 3.5, reconnects  # the backoff tops at 2 s
    assert max(down_cpu) < 0.2, down_cpu


def test_a_stopped_broker_is_noticed_by_keepalive_and_rejoined_after_it_resumes(
    broker: Mosquitto,
):
    """Held: SIGSTOP (a half-open peer: TCP still accepts) while frames flow; paho's
    keepalive (2 s) drops it, reconnect attempts wait, and SIGCONT brings the link back."""

    async def half_open() -> tuple[float, float, list[bytes]]:
        got: list[bytes] = []
        settings = BrokerSettings(host=LOOPBACK, port=broker.port, keepalive_s=2)
        link = MqttLink(
            "half", settings, on_message=lambda m: got.append(m.payload), network="loop"
        )
        await link.connect(10)
        await link.subscribe("h/1", qos=1)

        async def frames() -> None:
            while True:
                link.publish_nowait("h/0", b"x" * 10_000)
                await asyncio.sleep(0.002)

        sender = asyncio.create_task(frames())
        try:
            await asyncio.sleep(0.3)
            assert broker.process is not None
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                noticed = await _wait_for(lambda: not link.connected, 15)
                await asyncio.sleep(max(0.0, 6 - noticed))  # > 1.5 x keepalive stopped
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            back = await _wait_for(lambda: link.connected, 15)
            sender.cancel()
            await asyncio.sleep(0.3)  # the SUBSCRIBE made again
            assert link.publish_nowait("h/1", b"after", qos=1)
            await _wait_for(lambda: bool(got), 10)
            return noticed, back, got
        finally:
            sender.cancel()
            await link.close()

    noticed, back, got = run(half_open(), 60)
    assert noticed < 2 * 2 + 2, noticed  # keepalive: a ping after 2 s, dropped 2 s later
    assert back < 5, back
    assert got == [b"after"]


def test_a_full_socket_buffer_while_the_broker_is_stopped_loses_nothing_and_idles(
    broker: Mosquitto,
):
    """Held: big QoS 1 frames fill the socket buffer while mosquitto is stopped (shorter
    than keepalive); the loop waits for room without spinning, and every frame arrives,
    once and in order, after SIGCONT."""
    count, size = 120, 256 * 1024

    async def stalled() -> tuple[float, list[int]]:
        got: list[int] = []
        done = asyncio.Event()

        def on_message(message: Incoming) -> None:
            got.append(int.from_bytes(message.payload[:4], "big"))
            if len(got) == count:
                done.set()

        settings = BrokerSettings(host=LOOPBACK, port=broker.port, keepalive_s=10)
        rx = MqttLink("full-rx", settings, on_message=on_message, network="thread")
        tx = MqttLink("full-tx", settings, on_message=print, network="loop")
        await rx.connect(10)
        await tx.connect(10)
        try:
            await rx.subscribe("full/1", qos=1)

            async def send() -> None:
                for i in range(count):
                    await tx.publish("full/1", i.to_bytes(4, "big") * (size // 4), qos=1)

            sending = asyncio.create_task(send())
            await asyncio.sleep(0.3)
            assert broker.process is not None
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                cpu = _cpu_s()
                await asyncio.sleep(3)
                stopped_cpu = _cpu_s() - cpu
                assert tx.connected
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            await asyncio.wait_for(sending, 60)
            await asyncio.wait_for(done.wait(), 60)
            await asyncio.sleep(0.3)  # a duplicate would arrive now
            return stopped_cpu, got
        finally:
            await tx.close()
            await rx.close()

    stopped_cpu, got = run(stalled(), 120)
    assert stopped_cpu < 0.2, f"{stopped_cpu:.2f} s of CPU in 3 s with the buffer full"
    assert got == list(range(count))


def _silent_listener() -> tuple[socket.socket, list[socket.socket]]:
    """Accepts TCP and never answers (not an MQTT broker, or a wedged one)."""
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


@pytest.mark.parametrize("broker_state", ["refusing", "silent", "stopped"])
def test_serve_exits_promptly_and_cleanly_on_sigterm(tmp_path: Path, broker_state: str):
    """Held: SIGTERM while reconnects back off (nobody listens), while a CONNECT waits for
    a CONNACK that never comes, or with a stopped broker and frames unsent: exit 0 within
    the close's 3 s flush bound."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMINGHUB_")}
    env["HOME"] = str(tmp_path)
    server, accepted, mosquitto = None, [], None
    if broker_state == "refusing":
        port = free_port()
    elif broker_state == "silent":
        server, accepted = _silent_listener()
        port = server.getsockname()[1]
    else:
        mosquitto = Mosquitto(tmp_path / "broker")
        mosquitto.start()
        port = mosquitto.port
    agent = subprocess.Popen(
        [sys.executable, "-m", "streaminghub_datamux", "serve", "--port", str(port),
         "--embedded", "never", "--drivers", "sim", "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(5)  # a few attempts, or connected
        if mosquitto is not None:
            assert mosquitto.process is not None
            os.kill(mosquitto.process.pid, signal.SIGSTOP)
            time.sleep(0.5)
        began = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=20)
        took = time.monotonic() - began
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        if mosquitto is not None:
            if mosquitto.process is not None:
                os.kill(mosquitto.process.pid, signal.SIGCONT)
            mosquitto.stop()
        if server is not None:
            server.close()
        for connection in accepted:
            connection.close()
        assert agent.stderr is not None
        errors = agent.stderr.read().decode(errors="replace")
        agent.stderr.close()
    assert code == 0, errors[-2000:]
    assert took < 5, f"{took:.1f} s to exit"


_FLOODER = """
import sys, paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder")
client.connect(sys.argv[1], int(sys.argv[2]))
client.loop_start()
for i in range(int(sys.argv[3])):
    client.publish("flood/x", b"x" * 40, qos=0)
client.disconnect()
client.loop_stop()
"""


def test_a_message_flood_does_not_hold_the_loops_timers(broker: Mosquitto):
    """Once broke: the loop read up to 64 packets per wake-up (about 6 ms of paho's parsing
    under a flood), so 10 ms timers beside a flood of requests ran 6 ms late (median).
    A wake-up now reads for at most READ_BUDGET_S."""

    async def beside_a_flood() -> tuple[float, int]:
        received = 0

        def on_message(message: Incoming) -> None:
            nonlocal received
            received += 1

        settings = BrokerSettings(host=LOOPBACK, port=broker.port)
        link = MqttLink("flooded", settings, on_message=on_message, network="loop")
        await link.connect(10)
        await link.subscribe("flood/#", qos=0)
        flooder = subprocess.Popen(
            [sys.executable, "-c", _FLOODER, LOOPBACK, str(broker.port), "60000"]
        )
        try:
            await _wait_for(lambda: received > 500, 20)  # the flood has begun
            loop = asyncio.get_running_loop()
            late, during = [], received
            for _ in range(100):
                due = loop.time() + 0.010
                await asyncio.sleep(0.010)
                late.append(loop.time() - due)
            during = received - during
        finally:
            flooder.wait(60)
            await link.close()
        late.sort()
        return late[len(late) // 2] * 1e3, during

    median_ms, during = run(beside_a_flood())
    assert during > 2000, f"only {during} messages arrived while timing: no flood to test"
    assert median_ms < 3.0, f"10 ms timers ran {median_ms:.1f} ms late (median) in a flood"
