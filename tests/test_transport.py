"""The MQTT transport on a real mosquitto: bad input, leases, broker restarts, fleets,
agent shutdown and restarts. Agents run in the test's event loop (real MQTT all the same)
or, where a process must die, in their own process, stopped by their own pid.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import cbor2
import numpy as np
import pytest
from helpers import drain, frames_of, gaze_collection, run
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from remote import (
    AGENT_ID,
    AgentProcess,
    RawPeer,
    agent_and_client,
    leasing_client,
    remote_api,
    running_agent,
    streaming_demo,
    tasks_released,
    until_announced,
    wait_until,
)

import streaminghub_datamux as dm
from streaminghub_datamux.errors import Forbidden, InvalidRequest, Timeout, Unavailable
from streaminghub_datamux.protocol import Topics

TOPICS = Topics()


async def wait_for_messages(peer, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(peer.messages) < count:
        assert time.monotonic() < deadline, f"got {len(peer.messages)} of {count} messages"
        await asyncio.sleep(0.02)


def test_bad_requests_get_error_replies_and_the_agent_keeps_serving(workspace, mosquitto, tmp_path):
    reply_topic = TOPICS.reply(AGENT_ID, "raw")
    rpc = TOPICS.rpc(AGENT_ID, "raw")

    def request(method, params, **extra):
        return {"id": "r1", "method": method, "params": params, **extra}

    async def body():
        config = workspace.config(**{"agent.max_request_bytes": 2048})
        async with running_agent(config, mosquitto, tmp_path / "state") as agent:
            peer = RawPeer(mosquitto)
            peer.subscribe(f"{TOPICS.prefix}/#")
            try:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = TOPICS.reply(AGENT_ID, "someone-else")  # ignored
                props.CorrelationData = b"c-1"
                sent = [
                    (b"\xff\x00garbage", props),  # not CBOR: the topic still says who asked
                    (json.dumps(request("format_disk", {})).encode(), None),
                    (cbor2.dumps(request("list_collection_streams", {"collection_id": 7})), None),
                    (cbor2.dumps(request("list_live_streams", {"node_id": "x", "extra": 1})), None),
                    (cbor2.dumps(request("list_collections", {}, client="raw",
                                         reply_to=reply_topic)), None),  # a v1 request
                    (cbor2.dumps(request("list_live_streams", {"node_id": "no"})), None),
                    (cbor2.dumps(request("stop_task", {"task_id": "f" * 16})), None),
                    (cbor2.dumps(request("list_collections", {"pad": "x" * 4000})), None),
                    (cbor2.dumps([1, 2, 3]), props),
                ]  # fmt: skip
                for payload, properties in sent:
                    peer.publish(rpc, payload, properties)
                await _wait_for(lambda: len(_on(peer, reply_topic)) >= len(sent))
                # Still serving everyone else:
                async with remote_api(workspace.config(), mosquitto) as api:
                    assert await api.list_collections() == []
                await asyncio.sleep(0.3)
                return list(peer.messages), agent.counters.bad_requests
            finally:
                peer.close()

    messages, bad = run(body())
    replies = _on_messages(messages, reply_topic)
    # Nothing went anywhere else: no reply on another client's topic (the MQTT 5
    # Response Topic named one), none on a payload-named topic.
    assert not _on_messages(messages, TOPICS.reply(AGENT_ID, "someone-else"))
    decoded = []
    for message in replies:
        payload = message.payload
        decoded.append(json.loads(payload) if payload[:1] == b"{" else cbor2.loads(payload))
    by_text = [(d["ok"], d["error"]["code"], d["error"]["message"]) for d in decoded]
    assert len(by_text) == 9 and all(ok is False for ok, _, _ in by_text)
    codes = sorted(code for _, code, _ in by_text)
    assert codes.count("invalid_request") == 7 and codes.count("not_found") == 2
    messages_text = " | ".join(text for _, _, text in by_text)
    for expected in ("malformed payload", "unknown method 'format_disk'", "collection_id must be",
                     "unknown parameters 'extra'", "takes the client from the request's topic",
                     "exceeds the limit", "a request must be a map", "no task"):  # fmt: skip
        assert expected in messages_text
    # The JSON request got a JSON reply; the garbage got its correlation data back.
    assert any(m.payload[:1] == b"{" for m in replies)
    assert replies[0].properties.CorrelationData == b"c-1"
    assert bad >= 7


def _on(peer, topic):
    return _on_messages(peer.messages, topic)


def _on_messages(messages, topic):
    return [m for m in messages if m.topic == topic]


async def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_another_client_cannot_stop_my_task(workspace, mosquitto, tmp_path):
    async def body():
        async with (
            running_agent(workspace.config(), mosquitto, tmp_path / "state"),
            remote_api(workspace.config(), mosquitto) as owner,
            remote_api(workspace.config(), mosquitto) as intruder,
        ):
            sink = asyncio.Queue()
            ack = await owner.proxy_live_stream("demo", "imu", {}, sink)
            with pytest.raises(Forbidden, match="another client"):
                await intruder.stop_task(ack.randseq)
            await asyncio.sleep(0.3)
            assert not sink.empty() and dm.END_OF_STREAM not in list(sink._queue)
            await owner.stop_task(ack.randseq)
            return await drain(sink)

    items = run(body())
    assert items[-1] is dm.END_OF_STREAM and frames_of(items)


def test_closing_a_client_ends_its_tasks(workspace, mosquitto, tmp_path):
    async def body():
        async with running_agent(workspace.config(), mosquitto, tmp_path / "state") as agent:
            async with remote_api(workspace.config(), mosquitto) as api:
                sink = await streaming_demo(api)
                assert len(agent.api.tasks()) == 1
            items = await drain(sink)
            for _ in range(100):
                if not agent.api.tasks():
                    break
                await asyncio.sleep(0.05)
            return items, agent.api.tasks()

    items, left = run(body())
    assert items[-1] is dm.END_OF_STREAM and left == []


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_client_that_dies_loses_its_tasks_within_its_lease(how, workspace, mosquitto, tmp_path):
    keepalive = 2

    async def body():
        async with (
            running_agent(workspace.config(), mosquitto, tmp_path / "state") as agent,
            leasing_client(mosquitto, tmp_path) as client,
        ):
            assert len(agent.api.tasks()) == 1
            client.send_signal(getattr(signal, how))  # by its own pid
            return await tasks_released(agent, 4 * keepalive)

    released_after, left = run(body())
    assert left == []
    # A killed process's socket closes at once; a frozen one is noticed by the broker
    # after 1.5 x keepalive. Generous margin for a loaded machine.
    assert released_after <= 1.5 * keepalive + 1.0


def test_a_broker_restart_mid_stream_loses_nothing(workspace, mosquitto, tmp_path):
    workspace.add_collection("study", gaze_collection(frequency=100))
    timestamps, values = workspace.add_gaze_recording("A", "1", n=600, frequency=100)  # 6 s

    async def body():
        async with agent_and_client(workspace.config(), mosquitto, tmp_path) as (agent, api):
            sink = asyncio.Queue()
            await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=1.0, framing={"max_samples": 20}
            )
            await asyncio.sleep(1.5)
            await asyncio.to_thread(mosquitto.stop)
            await asyncio.sleep(2.0)  # frames keep coming: they go to the spool
            spooled = len(agent.spool)
            await asyncio.to_thread(mosquitto.start)
            items = await asyncio.wait_for(drain(sink), 25)
            return items, spooled, agent.link.disconnects

    items, spooled, disconnects = run(body(), timeout=40)
    assert disconnects >= 1 and spooled > 0
    assert items[-1] is dm.END_OF_STREAM
    dropped = [i for i in items if isinstance(i, dm.StreamStatus) and i.status == "dropped"]
    assert dropped == []
    assert not [i for i in items if isinstance(i, dm.StreamError)]
    frames = frames_of(items)
    assert [f.seq for f in frames] == list(range(len(frames)))
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), timestamps)
    np.testing.assert_array_equal(np.concatenate([f.values for f in frames]), values[:, :2])


def test_two_agents_behind_one_broker(workspace, mosquitto, tmp_path):
    workspace.add_collection("study", gaze_collection())
    workspace.add_gaze_recording("A", "1", n=50)
    second = {"simulate.nodes": {"ward": {"streams": {"ecg": {"frequency": 200,
              "channels": {"lead1": {"signal": "sine"}}}}}}}  # fmt: skip

    async def body():
        async with (
            running_agent(workspace.config(), mosquitto, tmp_path / "s1", agent_id="pi-1"),
            running_agent(workspace.config(**second), mosquitto, tmp_path / "s2", agent_id="pi-2"),
            remote_api(workspace.config(), mosquitto, agent_id=None) as fleet,
        ):
            nodes = sorted(n.id for n in await fleet.list_live_nodes())
            collections = sorted(c.id for c in await fleet.list_collections())
            streams = await fleet.list_live_streams("pi-2/ward")
            sink = asyncio.Queue()
            ack = await fleet.proxy_live_stream("pi-2/ward", "ecg", {}, sink)
            frame = await asyncio.wait_for(sink.get(), 10)
            await fleet.stop_task(ack.randseq)
            await drain(sink)
            with pytest.raises(InvalidRequest, match="names no agent"):
                await fleet.list_live_streams("demo")
            replay_sink = asyncio.Queue()
            await fleet.replay_collection_stream(
                "pi-1/study", "gaze", {"subject": "A"}, replay_sink, speed=0
            )
            replayed = frames_of(await drain(replay_sink))
            return nodes, collections, streams, ack, frame, replayed, sorted(fleet.agents())

    nodes, collections, streams, ack, frame, replayed, agents = run(body())
    assert agents == ["pi-1", "pi-2"]
    assert nodes == ["pi-1/demo", "pi-2/demo", "pi-2/ward"]
    assert collections == ["pi-1/study", "pi-2/study"]
    assert [s.id for s in streams] == ["ecg"] and streams[0].node_id == "pi-2/ward"
    assert ack.randseq.startswith("pi-2/")
    assert isinstance(frame, dm.Frame) and frame.channels == ["lead1"]
    assert sum(len(f) for f in replayed) == 50


def test_sigterm_ends_every_consumer_and_leaves_the_agent_offline(workspace, mosquitto, tmp_path):
    agent = AgentProcess(mosquitto, tmp_path)
    peer = RawPeer(mosquitto, client_id="watcher")

    async def body():
        async with remote_api(workspace.config(), mosquitto, agent_id=None, timeout=20) as api:
            await until_announced(api)
            sink = await streaming_demo(api, f"{AGENT_ID}/demo")
            code = await asyncio.to_thread(agent.terminate)
            items = await asyncio.wait_for(drain(sink), 10)
            return code, items

    try:
        code, items = run(body())
        peer.subscribe(TOPICS.agent_state(AGENT_ID))
        wait_until(lambda: peer.messages, 5, "the retained state")
    finally:
        agent.kill()
        peer.close()
    assert code == 0, agent.log()
    assert items[-1] is dm.END_OF_STREAM
    assert not [i for i in items if isinstance(i, dm.StreamError)]  # a clean end
    state = cbor2.loads(peer.messages[-1].payload)
    assert state["state"] == "offline" and state["agent"] == AGENT_ID


def test_a_restarted_agent_ends_the_old_tasks_with_an_error(workspace, mosquitto, tmp_path):
    first = AgentProcess(mosquitto, tmp_path)
    second = None

    async def body():
        nonlocal second
        async with remote_api(workspace.config(), mosquitto, agent_id=None, timeout=20) as api:
            await until_announced(api)
            sink = await streaming_demo(api, f"{AGENT_ID}/demo")
            first.kill()  # no goodbye: the broker's last will says offline
            second = AgentProcess(mosquitto, tmp_path)
            return await asyncio.wait_for(drain(sink), 20)

    try:
        items = run(body(), timeout=40)
    finally:
        first.kill()
        if second is not None:
            second.terminate()
    statuses = [i.status for i in items if isinstance(i, dm.StreamStatus)]
    assert "disconnected" in statuses
    error = items[-2]
    assert isinstance(error, dm.StreamError) and error.code == "unavailable"
    assert "restarted" in error.reason
    assert items[-1] is dm.END_OF_STREAM


def test_requests_to_a_frozen_agent_time_out(workspace, mosquitto, tmp_path):
    agent = AgentProcess(mosquitto, tmp_path)

    async def body():
        async with remote_api(workspace.config(), mosquitto, agent_id=None, timeout=20) as api:
            await until_announced(api)
            agent.process.send_signal(signal.SIGSTOP)
            api.timeout = 1.0
            began = time.monotonic()
            with pytest.raises(Timeout, match="no answer"):
                await api.list_live_nodes()
            return time.monotonic() - began

    try:
        waited = run(body())
    finally:
        agent.process.send_signal(signal.SIGCONT)
        agent.kill()
    assert 0.9 <= waited < 5


def test_connect_errors_are_clear(workspace, mosquitto, tmp_path):
    from broker import free_port

    async def body():
        config = workspace.config()
        api = dm.RemoteAPI("mqtt", "cbor", config=config, timeout=1.5)
        with pytest.raises(Unavailable, match=r"127\.0\.0\.1"):
            await api.connect("127.0.0.1", free_port())
        with pytest.raises(dm.errors.NotFound, match="never announced"):
            await dm.RemoteAPI("mqtt", agent_id="ghost", config=config, timeout=3).connect(
                mosquitto.host, mosquitto.port
            )
        with pytest.raises(InvalidRequest):
            dm.RemoteAPI("grpc")
        with pytest.raises(InvalidRequest):
            dm.RemoteAPI("mqtt", "pickle")
        with pytest.raises(Unavailable, match="connect"):
            await dm.RemoteAPI(config=config).list_collections()

    run(body())


def test_birth_and_health_messages(workspace, mosquitto, tmp_path):
    workspace.add_collection("study", gaze_collection())
    peer = RawPeer(mosquitto, client_id="watcher")
    peer.subscribe(f"{TOPICS.prefix}/agents/{AGENT_ID}/#")

    async def body():
        config = workspace.config(**{"agent.health_interval_s": 0.2, "agent.codec": "json"})
        async with running_agent(config, mosquitto, tmp_path / "state"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                topics = {m.topic for m in peer.messages}
                states = [json.loads(m.payload) for m in peer.messages if m.topic.endswith("state")]
                if TOPICS.agent_health(AGENT_ID) in topics and any(s["nodes"] for s in states):
                    break
                await asyncio.sleep(0.05)

    def shutdown_seen() -> bool:  # the offline state and the cleared health
        messages = list(peer.messages)
        cleared = any(m.topic == TOPICS.agent_health(AGENT_ID) and not m.payload for m in messages)
        offline = any(
            m.topic == TOPICS.agent_state(AGENT_ID) and b'"offline"' in m.payload for m in messages
        )
        return cleared and offline

    try:
        run(body())
        # What the agent sends as it stops reaches the peer a little later: wait for it
        # (bounded) rather than close the peer at once (lost on a loaded machine).
        wait_until(shutdown_seen, 15, "the agent's shutdown messages")
    finally:
        peer.close()
    by_topic: dict[str, list] = {}
    for message in peer.messages:
        # An empty payload deletes a retained message (the health, at a clean shutdown).
        decoded = json.loads(message.payload) if message.payload else None
        by_topic.setdefault(message.topic, []).append(decoded)
    states = by_topic[TOPICS.agent_state(AGENT_ID)]
    birth = next(s for s in states if s["nodes"])
    assert birth["state"] == "online" and birth["protocol"] == 2 and birth["agent"] == AGENT_ID
    assert birth["nodes"] == ["demo"] and birth["collections"] == ["study"]
    assert birth["drivers"] == [{"name": "sim", "state": "ok"}]
    offline = states[-1]
    assert offline.pop("since") >= birth["since"]
    assert offline == {"state": "offline", "agent": AGENT_ID, "boot": birth["boot"]}
    *healths, cleared = by_topic[TOPICS.agent_health(AGENT_ID)]
    assert cleared is None  # a clean shutdown leaves no stale health retained
    health = healths[-1]
    assert health["tasks"] == 0 and health["spool_messages"] == 0
    assert 1 < health["rss_mb"] < 1000 and health["cpu_percent"] >= 0
    assert health["drivers"] == [{"name": "sim", "state": "ok"}] and health["task_list"] == []


def test_what_was_spooled_survives_an_agent_restart(workspace, mosquitto, tmp_path):
    """Broker down, frames spooled, agent stopped; the next agent sends them."""
    workspace.add_collection("study", gaze_collection(frequency=100))
    workspace.add_gaze_recording("A", "1", n=300, frequency=100)
    state_dir = tmp_path / "state"

    async def first_life():
        config = workspace.config()
        async with (
            running_agent(config, mosquitto, state_dir) as agent,
            remote_api(config, mosquitto) as api,
        ):
            sink = asyncio.Queue()
            ack = await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=1.0, framing={"max_samples": 10}
            )
            await asyncio.wait_for(sink.get(), 10)
            await asyncio.to_thread(mosquitto.stop)
            await asyncio.sleep(1.0)
            # The agent stops with the broker away: frames and the end stay in the spool.
            await agent.stop()
            return ack.randseq, len(agent.spool)

    task_id, spooled = run(first_life())
    assert spooled > 5

    mosquitto.start()
    peer = RawPeer(mosquitto, client_id="late-reader")
    peer.subscribe(f"{TOPICS.prefix}/agents/{AGENT_ID}/tasks/+/{task_id}/#")

    async def second_life():
        async with running_agent(workspace.config(), mosquitto, state_dir) as agent:
            # Until every record arrived and was acknowledged (the spool empties on the
            # broker's PUBACK, a moment after the peer has the message), bounded.
            deadline = time.monotonic() + 15
            while (len(peer.messages) < spooled or len(agent.spool)) and (
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            return len(agent.spool)

    try:
        left = run(second_life())
    finally:
        peer.close()
    assert left == 0
    data = [cbor2.loads(m.payload) for m in peer.messages if m.topic.endswith("/data")]
    ctrl = [cbor2.loads(m.payload) for m in peer.messages if m.topic.endswith("/ctrl")]
    assert len(data) + len(ctrl) == spooled
    seqs = [d["seq"] for d in data]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, none missing
    assert ctrl[-1]["kind"] == "end" and ctrl[-1]["frames"] == seqs[-1] + 1


def test_wide_frames_are_cut_to_fit_one_message(workspace, mosquitto, tmp_path):
    timestamps, values = None, None
    workspace.add_collection("study", gaze_collection())
    timestamps, values = workspace.add_gaze_recording("A", "1", n=5000)
    limit = 20_000

    async def body():
        config = workspace.config(**{"agent.max_frame_bytes": limit})
        async with (
            running_agent(config, mosquitto, tmp_path / "state"),
            remote_api(config, mosquitto) as api,
        ):
            sink = asyncio.Queue()
            await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=0, framing="throughput"
            )
            return frames_of(await drain(sink))

    frames = run(body())
    per_sample = 8 + 2 * 4  # a float64 timestamp and two float32 channels
    assert len(frames) > 4 and max(len(f) for f in frames) * per_sample < limit
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), timestamps)
    np.testing.assert_array_equal(np.concatenate([f.values for f in frames]), values[:, :2])


def test_a_silent_client_is_told_why_its_task_ended(workspace, mosquitto, tmp_path):
    async def body():
        async with (
            running_agent(workspace.config(), mosquitto, tmp_path / "state"),
            remote_api(workspace.config(), mosquitto, keepalive_s=2) as api,
        ):
            api._heartbeat_stop.set()  # alive, but no longer showing it
            sink = asyncio.Queue()
            # Timed from before the request (the last sign of life): timed from its
            # answer, a loaded machine's slow answer ate into the 2.5 s.
            began = time.monotonic()
            await api.proxy_live_stream("demo", "imu", {}, sink)
            items = await asyncio.wait_for(drain(sink), 10)
            return items, time.monotonic() - began

    items, lasted = run(body())
    # 1.25 x keepalive after the last sign of life (2.5 s); room for a loaded machine.
    assert 2.0 <= lasted <= 5.0, lasted
    error = items[-2]
    assert isinstance(error, dm.StreamError) and error.code == "unavailable"
    assert "no sign of life" in error.reason


def test_a_new_task_gets_a_fresh_lease(workspace, mosquitto, tmp_path):
    """A lease countdown left from an earlier task must not end a new one early."""

    async def body():
        async with (
            running_agent(workspace.config(), mosquitto, tmp_path / "state"),
            remote_api(workspace.config(), mosquitto, keepalive_s=2) as api,
        ):
            first = asyncio.Queue()
            ack = await api.proxy_live_stream("demo", "imu", {}, first)
            await api.stop_task(ack.randseq)
            await drain(first)
            await asyncio.sleep(2.0)  # the countdown of the first task nearly ran out
            second = asyncio.Queue()
            ack = await api.proxy_live_stream("demo", "imu", {}, second)
            await asyncio.sleep(3.0)  # longer than one lease period
            alive = dm.END_OF_STREAM not in list(second._queue)
            await api.stop_task(ack.randseq)
            await drain(second)
            return alive

    assert run(body())


def test_small_frames_are_not_held_back_by_nagle(workspace, mosquitto, tmp_path):
    import socket

    async def body():
        async with remote_api(workspace.config(), mosquitto, agent_id=None) as api:
            sock = api.link._client.socket()
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    assert run(body()) != 0


def _certificate(folder):
    """A self-signed certificate for 127.0.0.1 (its own CA)."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for a TLS listener")
    cert, key = folder / "broker.crt", folder / "broker.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_and_passwords(workspace, tmp_path):
    """Agent and RemoteAPI through a TLS listener that wants a user name and password."""
    import shutil
    import subprocess

    from broker import Mosquitto

    passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    broker = Mosquitto(tmp_path / "tls-broker")
    cert, key = _certificate(broker.workdir)
    passwd = broker.workdir / "passwd"
    for i, user in enumerate(("pi-lab1", "ana")):
        create = ["-c"] if i == 0 else []
        subprocess.run([passwd_tool, *create, "-b", str(passwd), user, f"secret-{user}"],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
    lines = broker.conf_path.read_text().splitlines()
    lines = [ln for ln in lines if not ln.startswith("allow_anonymous")]
    lines += [f"cafile {cert}", f"certfile {cert}", f"keyfile {key}",
              "allow_anonymous false", f"password_file {passwd}"]  # fmt: skip
    broker.conf_path.write_text("\n".join(lines) + "\n")
    broker.start()

    def config(user):
        return workspace.config(**{
            "broker.tls.ca_file": str(cert), "broker.username": user,
            "broker.password": f"secret-{user}",
        })  # fmt: skip

    async def body():
        agent_config = config("pi-lab1")
        async with (
            running_agent(agent_config, broker, tmp_path / "state", ca_file=str(cert),
                          username="pi-lab1", password="secret-pi-lab1"),
            remote_api(config("ana"), broker) as api,
        ):  # fmt: skip
            nodes = [n.id for n in await api.list_live_nodes()]
            sink = asyncio.Queue()
            ack = await api.proxy_live_stream("demo", "eeg", {}, sink)
            frame = await asyncio.wait_for(sink.get(), 10)
            await api.stop_task(ack.randseq)
            await drain(sink)
        intruder = dm.RemoteAPI(config=workspace.config(**{"broker.tls.ca_file": str(cert),
                                "broker.username": "ana", "broker.password": "wrong"}),
                                timeout=15)  # fmt: skip
        began = time.monotonic()
        with pytest.raises(Unavailable, match=r"[Nn]ot authori[sz]ed|password"):
            await intruder.connect(broker.host, broker.port)
        assert time.monotonic() - began < 10  # the broker's "no" ends it, not the timeout
        plain = dm.RemoteAPI(config=workspace.config(), timeout=3)
        with pytest.raises(Unavailable):  # no TLS: the TLS listener never answers MQTT
            await plain.connect(broker.host, broker.port)
        return nodes, frame

    try:
        nodes, frame = run(body())
    finally:
        broker.stop()
    assert nodes == ["demo"] and isinstance(frame, dm.Frame)
