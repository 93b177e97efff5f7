"""Regression tests for transport bugs found in review: hangs, races, leaks and abuse.

Each one failed before its fix. Real mosquitto on loopback (tests/broker.py), bounded
waits, processes stopped by their own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import cbor2
import pytest
from broker import free_port
from helpers import drain, gaze_collection, run
from remote import (
    AGENT_ID,
    AgentProcess,
    RawPeer,
    agent_and_client,
    remote_api,
    running_agent,
    streaming_demo,
    wait_until,
)

import streaminghub_datamux as dm
from streaminghub_datamux.agent import Agent
from streaminghub_datamux.client.taskstream import INBOX_FRAMES
from streaminghub_datamux.errors import InvalidRequest, Timeout, Unavailable
from streaminghub_datamux.mqttio import MAX_OUTSTANDING, BrokerSettings
from streaminghub_datamux.protocol import Topics

TOPICS = Topics()


def _decode(payload: bytes):
    return json.loads(payload) if payload[:1] == b"{" else cbor2.loads(payload)


async def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# -- agent lifecycle ----------------------------------------------------------------------


def test_sigterm_while_waiting_for_the_broker_exits(tmp_path):
    """agent/service.py Agent.run -> start -> MqttLink.connect(timeout=None) never looks
    at the stop request, so `datamux serve` ignores SIGTERM until a broker answers."""
    nobody = SimpleNamespace(host="127.0.0.1", port=free_port())  # no broker listens here
    agent = AgentProcess(nobody, tmp_path)
    try:
        # Started and retrying the connection (its SIGTERM handler is in place by then):
        # its log says so. Not a fixed 2 s: a loaded machine can take longer to start
        # Python, and a SIGTERM before the handler kills it with -15.
        wait_until(
            lambda: "still trying" in agent.log() or agent.process.poll() is not None,
            30,
            "the agent's 'still trying' report",
        )
        assert agent.process.poll() is None, agent.log()
        agent.process.send_signal(signal.SIGTERM)
        try:
            code = agent.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"SIGTERM ignored while waiting for the broker:\n{agent.log()}"
    finally:
        agent.kill()


def test_stop_during_start_ends_the_connect_loop(workspace, tmp_path):
    """Agent.stop() while start() waits for a broker: start() keeps retrying forever (and
    would connect and serve with a closed spool once a broker appears)."""

    async def body():
        settings = BrokerSettings(host="127.0.0.1", port=free_port())
        agent = Agent(workspace.config(), settings=settings, agent_id=AGENT_ID,
                      state_dir=tmp_path / "state")  # fmt: skip
        start = asyncio.create_task(agent.start(connect_timeout=None))
        await asyncio.sleep(1.0)
        await asyncio.wait_for(agent.stop(), 10)
        done, _ = await asyncio.wait({start}, timeout=5)
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        left = agent.link._client
        await agent.link._stop_client()  # do not leave a retrying paho thread behind
        return bool(done), left

    finished, client = run(body())
    assert finished, "start() still connecting 5 s after stop()"
    assert client is None, "a paho client (and its thread) is left running after stop()"


class SlowAPI(dm.API):
    """The local API with one slow method, to have a request in flight."""

    async def list_collection_recordings(self, collection_id):
        await asyncio.sleep(5)
        return await super().list_collection_recordings(collection_id)


def test_agent_stop_answers_requests_in_flight(workspace, mosquitto, tmp_path):
    """Agent._shutdown cancels request tasks without a reply: the client waits its whole
    timeout and gets Timeout, although docs/protocol.md promises one reply per request
    ("unavailable: the agent is stopping")."""
    workspace.add_collection("study", gaze_collection())

    async def body():
        config = workspace.config()
        async with (
            running_agent(config, mosquitto, tmp_path / "state", api=SlowAPI(config)) as agent,
            remote_api(config, mosquitto, timeout=8.0) as api,
        ):
            call = asyncio.create_task(api.list_collection_recordings("study"))
            await asyncio.sleep(0.5)
            began = time.monotonic()
            await agent.stop()
            done, _ = await asyncio.wait({call}, timeout=3)
            if not done:
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                return None, time.monotonic() - began
            return call.exception(), time.monotonic() - began

    error, waited = run(body())
    assert error is not None, f"no answer {waited:.1f} s after the agent stopped"
    assert isinstance(error, Unavailable), repr(error)


# -- requests and deadlines ---------------------------------------------------------------


def test_request_deadline_holds_while_the_broker_stalls(workspace, mosquitto, tmp_path):
    """RemoteAPI._call awaits link.publish() outside asyncio.timeout(): once MAX_OUTSTANDING
    requests are unacknowledged (a stalled broker), later requests wait for room with
    no deadline at all."""

    async def body():
        config = workspace.config()
        async with (
            running_agent(config, mosquitto, tmp_path / "state"),
            remote_api(config, mosquitto, timeout=0.5, keepalive_s=60) as api,
        ):
            mosquitto.process.send_signal(signal.SIGSTOP)  # by its own pid
            try:
                calls = [
                    asyncio.create_task(api.list_collections()) for _ in range(MAX_OUTSTANDING + 2)
                ]
                done, pending = await asyncio.wait(calls, timeout=3.0)
                for call in pending:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
                return len(done), len(pending)
            finally:
                mosquitto.process.send_signal(signal.SIGCONT)

    _done, pending = run(body())
    assert pending == 0, f"{pending} requests outlived their 0.5 s deadline by 2.5 s"


def test_close_does_not_strand_a_request_waiting_for_room(workspace, mosquitto, tmp_path):
    """MqttLink._stop_client forgets the paho client before paho's on_disconnect arrives
    (so _disconnected_on_loop returns early) and never sets _room: a publish() waiting
    for room when close() runs waits forever."""

    async def body():
        config = workspace.config()
        async with running_agent(config, mosquitto, tmp_path / "state"):
            api = dm.RemoteAPI("mqtt", "cbor", agent_id=AGENT_ID, config=config, timeout=0.5)
            await api.connect(mosquitto.host, mosquitto.port, keepalive_s=60)
            mosquitto.process.send_signal(signal.SIGSTOP)
            try:
                calls = [
                    asyncio.create_task(api.list_collections()) for _ in range(MAX_OUTSTANDING + 1)
                ]
                await asyncio.sleep(1.0)  # 64 timed out; one waits for room
                await asyncio.wait_for(api.close(), 10)
                _done, pending = await asyncio.wait(calls, timeout=3.0)
                for call in pending:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
                return len(pending)
            finally:
                mosquitto.process.send_signal(signal.SIGCONT)

    stranded = run(body())
    assert stranded == 0, f"{stranded} request(s) still waiting 3 s after close()"


# -- protocol and security ----------------------------------------------------------------


def test_reply_to_cannot_target_another_clients_state(workspace, mosquitto, tmp_path):
    """v1 let a request's reply_to name {p}/clients/<victim>/state: the agent published
    its reply there, read it back as the victim's presence and stopped the victim's
    tasks. In v2 a request has no reply address: whatever it names, the answer goes to
    the requester's own reply topic."""

    async def body():
        async with agent_and_client(workspace.config(), mosquitto, tmp_path) as (agent, victim):
            await streaming_demo(victim)  # the victim holds a live task
            attacker = RawPeer(mosquitto, "attacker")
            attacker.subscribe(f"{TOPICS.prefix}/#")
            try:
                request = {"id": "x", "method": "list_collections", "params": {},
                           "reply_to": TOPICS.client_state(victim.client_id),
                           "client": "attacker"}  # fmt: skip
                attacker.publish(TOPICS.rpc(AGENT_ID, "attacker"), cbor2.dumps(request))

                def published_replies() -> list[str]:
                    return [
                        m.topic
                        for m in list(attacker.messages)
                        if not m.topic.endswith("/data") and _is_reply_to(m.payload, "x")
                    ]

                # Until the reply came (bounded; a fixed 2 s could miss it on a loaded
                # machine), then 2 s for what must not happen: a second reply, the
                # victim's task ending.
                await _wait_for(lambda: published_replies(), 10)
                await asyncio.sleep(2.0)
                published = published_replies()
                return len(agent.api.tasks()), published
            finally:
                attacker.close()

    tasks, published = run(body())
    assert tasks == 1, "another client's reply_to ended the victim's task"
    assert published == [TOPICS.reply(AGENT_ID, "attacker")]


def _is_reply_to(payload: bytes, request_id: str) -> bool:
    try:
        message = _decode(payload)
    except Exception:
        return False
    return isinstance(message, dict) and message.get("id") == request_id and "ok" in message


def test_a_frame_that_cannot_be_encoded_still_ends_the_task(workspace, mosquitto, tmp_path):
    """JSON requests may carry NaN (Python's json accepts it) and protocol._attrs accepts
    non-finite floats. encode_frame(..., "json") then raises on every frame; the
    publisher (TaskPublisher.publish) logs, stops the task and returns without the `end`
    message, so the consumer waits forever."""
    peer = RawPeer(mosquitto, "rawjson")

    async def body():
        async with running_agent(workspace.config(), mosquitto, tmp_path / "state"):
            peer.subscribe(TOPICS.reply(AGENT_ID, "rawjson"))
            peer.subscribe(TOPICS.task_any(AGENT_ID, "rawjson", "t1"))
            request = (
                '{"id": "r1", "method": "proxy_live_stream", '
                '"params": {"node_id": "demo", "stream_id": "eeg", "task_id": "t1", '
                '"attrs": {"gain": NaN}}}'
            )
            peer.publish(TOPICS.rpc(AGENT_ID, "rawjson"), request.encode())
            await _wait_for(lambda: peer.messages, 5)
            await asyncio.sleep(3.0)
            return [(m.topic, _decode(m.payload)) for m in peer.messages]

    try:
        received = run(body())
    finally:
        peer.close()
    replies = [p for t, p in received if t == TOPICS.reply(AGENT_ID, "rawjson")]
    assert replies, "no reply"
    if replies[0]["ok"] is False:
        assert replies[0]["error"]["code"] == "invalid_request"  # refused up front: fine
        return
    ctrl = [p for t, p in received if t.endswith("/ctrl")]
    data = [p for t, p in received if t.endswith("/data")]
    assert data or any(c["kind"] == "end" for c in ctrl), (
        "task accepted, but neither a frame nor an `end` was ever published"
    )


def test_framing_without_bounds_is_refused_or_capped(workspace, mosquitto, tmp_path):
    """protocol._framing and Framing accept any max_samples / max_latency_ms. A live task
    with max_samples=2**40 and max_latency_ms=1e9 never flushes, and the Framer's
    capacity (max_samples * BUFFER_FRAMES) never drops: the agent buffers every sample
    of the stream for as long as the task runs. (Fails at HEAD; the uncommitted
    TaskPublisher.fit_framing in the working tree caps max_samples and makes it pass.)"""

    async def body():
        async with agent_and_client(workspace.config(), mosquitto, tmp_path) as (agent, api):
            sink = asyncio.Queue()
            framing = {"max_samples": 2**40, "max_latency_ms": 1e9}
            try:
                ack = await api.proxy_live_stream("demo", "eeg", {}, sink, framing=framing)
            except InvalidRequest:
                return None
            (task,) = agent.api.tasks()
            await api.stop_task(ack.randseq)
            return task.framing

    framing = run(body())
    assert framing is None or framing.max_samples <= 1 << 20, f"accepted as {framing}"


# -- client memory and leaks --------------------------------------------------------------


def _many_frames(workspace, n: int) -> None:
    workspace.add_collection("study", gaze_collection(frequency=100))
    workspace.add_gaze_recording("A", "1", n=n, frequency=100)


def test_a_slow_consumer_with_an_unbounded_sink_stays_bounded(workspace, mosquitto, tmp_path):
    """A consumer that does not read its unbounded sink (the documented asyncio.Queue())
    holds at most INBOX_FRAMES frames, as the local API stops at SINK_HIGH_WATER. (The
    client used to move every frame into such a sink at once.)"""
    _many_frames(workspace, 4000)

    async def body():
        async with agent_and_client(workspace.config(), mosquitto, tmp_path) as (_, api):
            sink = asyncio.Queue()
            await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=0, framing={"max_samples": 1}
            )
            await asyncio.sleep(4.0)  # the consumer is busy elsewhere
            held = sink.qsize()
            await drain(sink)
            return held

    held = run(body())
    assert held <= INBOX_FRAMES + 64, f"{held} items held for a consumer that is not reading"


def test_the_inbox_of_a_stalled_bounded_sink_stays_bounded(workspace, mosquitto, tmp_path):
    """A stalled bounded sink: the inbox stays near INBOX_FRAMES, with one merged
    `dropped` status. (It used to add one status per dropped frame, without bound.)"""
    _many_frames(workspace, 4000)

    async def body():
        async with agent_and_client(workspace.config(), mosquitto, tmp_path) as (_, api):
            sink = asyncio.Queue(maxsize=8)
            ack = await api.replay_collection_stream(
                "study", "gaze", {"subject": "A"}, sink, speed=0, framing={"max_samples": 1}
            )
            stream = api._streams[(AGENT_ID, ack.randseq)]  # the client's end of the task
            await asyncio.sleep(4.0)
            held = len(stream.inbox)
            await drain(sink)
            return held

    held = run(body())
    assert held <= INBOX_FRAMES + 64, f"the inbox holds {held} items"


class SlowStartAPI(dm.API):
    """Starting a live task takes longer than the client's timeout."""

    async def proxy_live_stream(self, *args, **kwargs):
        await asyncio.sleep(1.5)
        try:
            return await super().proxy_live_stream(*args, **kwargs)
        finally:
            self.started_late = True


def test_a_start_that_times_out_leaves_no_orphan_task(workspace, mosquitto, tmp_path):
    """RemoteAPI._start forgets the task on Timeout but never tells the agent, which starts
    it anyway and streams to nobody, holding a task slot (and a device) until the lease
    runs out, or for as long as the client has other tasks (its heartbeat)."""

    async def body():
        config = workspace.config()
        async with (
            running_agent(config, mosquitto, tmp_path / "state", api=SlowStartAPI(config)) as agent,
            remote_api(config, mosquitto, timeout=1.0) as api,
        ):
            with pytest.raises(Timeout):
                await api.proxy_live_stream("demo", "eeg", {}, asyncio.Queue())
            # Until the late start happened and its task is gone, within 8 s: an orphan
            # lives until the lease runs out, 12.5 s after the request (keepalive 10 s).
            # Not a fixed 3 s: a loaded machine can take longer to start and stop it.
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and (
                not getattr(agent.api, "started_late", False) or agent.api.tasks()
            ):
                await asyncio.sleep(0.05)
            assert getattr(agent.api, "started_late", False), "the slow start never ran"
            return [t.id for t in agent.api.tasks()]

    left = run(body())
    assert left == [], f"orphan task(s) on the agent: {left}"


def test_leases_are_forgotten_when_clients_leave(workspace, mosquitto, tmp_path):
    """The agent knows clients while they are online, and forgets them when they leave
    (it used to keep an entry per client id ever seen)."""

    async def body():
        config = workspace.config()
        async with running_agent(config, mosquitto, tmp_path / "state") as agent:
            ids = []
            for _ in range(3):
                async with remote_api(config, mosquitto) as api:
                    ids.append(api.client_id)

            def kept() -> list[str]:
                return [i for i in ids if any(k.startswith(f"{i}#") for k in agent.leases._leases)]

            # Until forgotten (an entry used to stay forever), not a fixed 1 s: a loaded
            # machine can take longer to pass the clients' goodbyes on.
            deadline = time.monotonic() + 10
            while kept() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return kept()

    kept = run(body())
    assert kept == [], f"leases kept for clients that closed: {kept}"


def test_ids_with_wildcards_are_refused_before_they_reach_a_topic(workspace, mosquitto, tmp_path):
    """RemoteAPI._route splits 'agent/local' but never checks the agent part, and _start
    subscribes before _call looks the agent up: "#/demo" sends an invalid SUBSCRIBE, the
    broker drops the connection (every task of this client with it) and the caller gets
    a ValueError instead of InvalidRequest."""

    async def body():
        config = workspace.config()
        async with (
            running_agent(config, mosquitto, tmp_path / "state"),
            remote_api(config, mosquitto, agent_id=None, timeout=2.0) as api,
        ):
            outcomes = []
            for node in ("#/demo", "a+b/demo"):
                try:
                    await api.proxy_live_stream(node, "eeg", {}, asyncio.Queue())
                    outcomes.append("started")
                except Exception as exc:  # the exception's type is the finding
                    outcomes.append(type(exc).__name__)
            await asyncio.sleep(0.5)
            return outcomes, api.link.disconnects

    outcomes, disconnects = run(body())
    assert outcomes == ["InvalidRequest", "InvalidRequest"], outcomes
    assert disconnects == 0, f"the broker dropped the client {disconnects} time(s)"


def test_connecting_twice_leaks_no_paho_thread(workspace, mosquitto, tmp_path):
    """RemoteAPI.connect() on a connected instance builds a second MqttLink and heartbeat
    thread and forgets the first: close() stops only the second, and the first keeps
    running (its on_connect then fails on `assert self.link is not None`)."""

    async def body():
        config = workspace.config()
        async with running_agent(config, mosquitto, tmp_path / "state"):
            api = dm.RemoteAPI("mqtt", "cbor", agent_id=AGENT_ID, config=config, timeout=5)
            await api.connect(mosquitto.host, mosquitto.port)
            first_link, first_heartbeat = api.link, api._heartbeat_stop
            # Refusing to connect again is a fine fix too.
            with contextlib.suppress(dm.errors.DatamuxError):
                await api.connect(mosquitto.host, mosquitto.port)
            await api.close()

            def left_running() -> list[str]:
                return [t.name for t in threading.enumerate() if api.client_id in t.name]

            # A leaked thread runs forever; give the closed ones up to 10 s to end, not a
            # fixed 0.5 s (a loaded machine is slower to let them go).
            deadline = time.monotonic() + 10
            while left_running() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left = left_running()
            first_heartbeat.set()  # clean up what close() left behind
            await first_link.close()
            return left

    left = run(body())
    assert left == [], f"threads left after close(): {left}"


def test_a_reply_that_cannot_be_encoded_is_still_answered(workspace, mosquitto, tmp_path):
    """RequestServer._serve encodes the reply outside its try block. A JSON request whose
    result holds NaN (a DFDS file with "frequency": NaN loads fine) raises in encode();
    the request task dies ("Task exception was never retrieved") and the client waits
    for its timeout instead of getting an error reply."""
    metadata = gaze_collection()
    metadata["streams"]["gaze"]["frequency"] = float("nan")
    workspace.add_collection("study", metadata)

    async def body():
        config = workspace.config()
        async with (
            running_agent(config, mosquitto, tmp_path / "state"),
            remote_api(config, mosquitto, codec="json", timeout=3.0) as api,
        ):
            try:
                await api.list_collection_streams("study")
            except dm.errors.DatamuxError as exc:
                return exc
            return None

    outcome = run(body())
    assert not isinstance(outcome, Timeout), "no reply at all: the client timed out"


def test_keepalive_zero_does_not_flood_the_broker(workspace, mosquitto, tmp_path):
    """connect(keepalive_s=0) (MQTT's "no keepalive"; connect options bypass the config's
    check) makes RemoteAPI._start_heartbeat wait 0 s between presence messages: while a
    task is registered, the heartbeat thread publishes thousands a second, and the
    agent, which reads every one, cannot even answer the request that starts the task."""

    async def body():
        config = workspace.config()
        async with running_agent(config, mosquitto, tmp_path / "state"):
            api = dm.RemoteAPI("mqtt", "cbor", agent_id=AGENT_ID, config=config, timeout=3)
            try:
                await api.connect(mosquitto.host, mosquitto.port, keepalive_s=0)
            except (InvalidRequest, dm.errors.ConfigError):
                return "refused"
            peer = RawPeer(mosquitto, "watcher")
            try:
                peer.subscribe(TOPICS.client_state(api.client_id))
                peer.messages.clear()
                start = asyncio.create_task(
                    api.proxy_live_stream("demo", "eeg", {}, asyncio.Queue())
                )
                await asyncio.sleep(1.0)
                presence = len(peer.messages)
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
                return presence
            finally:
                await api.close()
                peer.close()

    outcome = run(body())
    assert outcome == "refused" or outcome < 20, f"{outcome} presence messages in 1 s"
