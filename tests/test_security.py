"""A hostile lab member on a shared broker (issue 10), with each shipped ACL profile.

mosquitto runs systemd/acl/lab.acl or private.acl, with passwords and with client
certificates (use_identity_as_username). Alice streams from agent pi-lab1 through the
RemoteAPI; bob, with his own account, tries every attack of the issue. Each attack must
fail, and alice's use beside it must go on untouched: every frame, every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from helpers import drain, frames_of, run
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from secure_broker import Certificates, Peer, SecureBroker

import streaminghub_datamux as dm
from streaminghub_datamux.agent import Agent
from streaminghub_datamux.codec import encode_frame
from streaminghub_datamux.model import Frame, StreamStatus
from streaminghub_datamux.mqttio import BrokerSettings
from streaminghub_datamux.protocol import Topics

AGENT, OTHER_AGENT = "pi-lab1", "pi-lab2"
USERS = (AGENT, OTHER_AGENT, "alice", "bob", "ops")
TOPICS = Topics()
REFUSED = "Not authorized"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def secure_broker(tmp_path: Path, certificates: Certificates, request: pytest.FixtureRequest):
    broker = SecureBroker(tmp_path / "broker", request.param, USERS, certificates)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _decoded(payload: bytes) -> Any:
    try:
        return json.loads(payload) if payload[:1] == b"{" else cbor2.loads(payload)
    except Exception:
        return None


def _connect_options(settings: BrokerSettings) -> dict[str, Any]:
    fields = ("username", "password", "ca_file", "cert_file", "key_file")
    return {name: getattr(settings, name) for name in fields}


@contextlib.asynccontextmanager
async def _alice(broker: SecureBroker, auth: str, config: Any) -> AsyncIterator[dm.RemoteAPI]:
    settings = broker.settings("alice", auth)
    # With a password the client id defaults to the user name; a certificate's CN is
    # given as client.id.
    client_id = "alice" if auth == "certificate" else None
    api = dm.RemoteAPI("mqtt", "cbor", agent_id=AGENT, config=config, client_id=client_id)
    await api.connect(broker.host, settings.port, **_connect_options(settings))
    try:
        yield api
    finally:
        await api.close()


def _request(request_id: str, method: Any, **params: Any) -> bytes:
    return cbor2.dumps({"id": request_id, "method": method, "params": params})


def _forged_frame(task_id: str, seq: int) -> bytes:
    frame = Frame("eeg", seq, np.zeros(1), np.zeros((1, 1), np.float32), ["forged"])
    return encode_frame(frame, task_id, "cbor")


@pytest.mark.parametrize("auth", ["password", "certificate"])
@pytest.mark.parametrize("secure_broker", ["lab", "private"], indirect=True)
def test_every_attack_fails_and_alice_is_untouched(workspace, tmp_path, secure_broker, auth):
    broker: SecureBroker = secure_broker
    profile = broker.profile
    config = workspace.config()
    bob = Peer.connect(broker.settings("bob", auth), "bob-raw")
    ops = Peer.connect(broker.settings("ops", auth), "ops-watch")
    # The agent's own account under another MQTT client id, and another agent's account.
    rogue_agent = Peer.connect(broker.settings(AGENT, auth), "rogue")
    other_agent = Peer.connect(broker.settings(OTHER_AGENT, auth), f"dm-agent-{OTHER_AGENT}")
    for peer, topic in ((bob, f"{TOPICS.prefix}/#"), (ops, f"{TOPICS.prefix}/#")):
        peer.subscribe(topic)
    verdicts: dict[str, str] = {}
    me_rpc = TOPICS.rpc(AGENT, "bob")

    async def body() -> dict[str, Any]:
        agent = Agent(
            config,
            settings=broker.settings(AGENT, auth),
            agent_id=AGENT,
            state_dir=tmp_path / "state",
        )
        await agent.start(connect_timeout=10)
        try:
            async with _alice(broker, auth, config) as alice:
                assert alice.client_id == "alice"
                sink: asyncio.Queue[Any] = asyncio.Queue()
                ack = await alice.proxy_live_stream("demo", "eeg", {}, sink)
                task = ack.randseq
                first = await asyncio.wait_for(sink.get(), 10)  # streaming
                # 1. bob stops alice's task: as alice (refused by the broker), and as
                #    himself with alice's id in the payload (the agent says forbidden).
                stop = _request("b-stop", "stop_task", task_id=task)
                verdicts["stop as alice"] = bob.publish(TOPICS.rpc(AGENT, "alice"), stop)
                v1_stop = cbor2.dumps({"id": "b-stop-v1", "method": "stop_task",
                                       "params": {"task_id": task}, "client": "alice"})  # fmt: skip
                verdicts["stop, v1 fields"] = bob.publish(me_rpc, v1_stop)
                stop_own = _request("b-stop2", "stop_task", task_id=task)
                verdicts["stop own topic"] = bob.publish(me_rpc, stop_own)
                verdicts["list tasks"] = bob.publish(me_rpc, _request("b-tasks", "list_tasks"))
                # 2. replies elsewhere: an MQTT 5 Response Topic and a payload reply_to
                #    naming alice.
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = TOPICS.reply(AGENT, "alice")
                props.CorrelationData = b"b-redirect"
                verdicts["redirect"] = bob.publish(
                    me_rpc, _request("b-redirect", "list_collections"), properties=props
                )
                # 3. forged replies to alice's calls, while she makes ten of them.
                calls = [asyncio.create_task(alice.list_live_nodes()) for _ in range(10)]
                error = {"code": "internal", "message": "forged"}
                forged = cbor2.dumps({"id": "x", "ok": False, "error": error})
                verdicts["forged reply"] = bob.publish(TOPICS.reply(AGENT, "alice"), forged)
                verdicts["forged reply, other agent"] = other_agent.publish(
                    TOPICS.reply(AGENT, "alice"), forged
                )
                answers = await asyncio.gather(*calls)
                # 4. a frame 1,000 ahead on alice's task topic: from another agent's
                #    account (refused), and from this agent's account under another
                #    MQTT client id (the broker cannot tell; the client copes).
                data = TOPICS.task_data(AGENT, "alice", task)
                verdicts["frame, other agent"] = other_agent.publish(data, _forged_frame(task, 5))
                ahead = alice._streams[(AGENT, task)].next_seq + 1000
                verdicts["frame, agent account"] = rogue_agent.publish(
                    data, _forged_frame(task, ahead)
                )
                # 5. alice's presence forged as offline.
                offline = cbor2.dumps({"state": "offline", "client": "alice"})
                verdicts["offline"] = bob.publish(
                    TOPICS.client_state("alice"), offline, retain=True
                )
                # 6. a method that is a list, and one that is a map.
                verdicts["method list"] = bob.publish(me_rpc, _request("b-list", [1, 2]))
                verdicts["method map"] = bob.publish(me_rpc, _request("b-map", {"a": 1}))
                # 7. bob poses as an agent.
                verdicts["agent state"] = bob.publish(TOPICS.agent_state(AGENT), b"{}")
                verdicts["agent reply"] = bob.publish(TOPICS.reply(AGENT, "bob"), b"{}")
                await asyncio.sleep(2.0)  # past the 0.5 s an offline presence waits
                running = [t.id for t in agent.api.tasks()]
                collections = await alice.list_collections()
                await alice.stop_task(task)
                items = [first, *await drain(sink)]
                return {
                    "task": task,
                    "answers": answers,
                    "running": running,
                    "collections": collections,
                    "items": items,
                    "health": agent.health(),
                }
        finally:
            await agent.stop()

    try:
        outcome = run(body(), timeout=90)
    finally:
        for peer in (bob, ops, rogue_agent, other_agent):
            peer.close()
    task = outcome["task"]

    # The broker refused everything bob may not do.
    for attack in ("stop as alice", "forged reply", "forged reply, other agent",
                   "frame, other agent", "offline", "agent state", "agent reply"):  # fmt: skip
        assert verdicts[attack] == REFUSED, (attack, verdicts)
    assert verdicts["frame, agent account"] == "ok"  # the agent's account: trusted

    # What the agent answered bob, and only on bob's own reply topic.
    bob_ids = {"b-stop", "b-stop-v1", "b-stop2", "b-tasks", "b-redirect", "b-list", "b-map"}
    answered: dict[str, list[tuple[str, Any]]] = {}
    for message in ops.received:
        decoded = _decoded(message.payload)
        if isinstance(decoded, dict) and decoded.get("id") in bob_ids and "ok" in decoded:
            answered.setdefault(decoded["id"], []).append((message.topic, decoded))
    assert "b-stop" not in answered  # refused by the broker, never reached the agent
    for request_id in bob_ids - {"b-stop"}:
        assert [topic for topic, _ in answered[request_id]] == [TOPICS.reply(AGENT, "bob")]
    code = {rid: replies[0][1].get("error", {}).get("code") for rid, replies in answered.items()}
    assert code["b-stop-v1"] == "invalid_request"  # v2 takes no client from the payload
    assert code["b-stop2"] == "forbidden"
    assert answered["b-tasks"][0][1]["result"] == []  # alice's task is not listed for bob
    assert answered["b-redirect"][0][1]["ok"] is True
    assert code["b-list"] == code["b-map"] == "invalid_request"

    # Alice: untouched. Every call answered by the agent, the task ran until she
    # stopped it, no frame lost.
    assert all(isinstance(a, list) and a and a[0].id == "demo" for a in outcome["answers"])
    assert task in outcome["running"]
    assert outcome["collections"] == []
    items = outcome["items"]
    assert items[-1] is dm.END_OF_STREAM
    real = [f.seq for f in frames_of(items) if f.channels != ["forged"]]
    assert real == list(range(len(real))) and len(real) > 5
    statuses = [i.reason for i in items if isinstance(i, StreamStatus)]
    assert any("seq went back" in s for s in statuses), statuses
    assert not [i for i in items if isinstance(i, dm.StreamError)]

    # What bob could read: agents' state; their health and alice's streams in "lab" only; never
    # her requests, replies or presence.
    bob_topics = {m.topic for m in bob.received}
    alice_task = f"{TOPICS.prefix}/agents/{AGENT}/tasks/alice/{task}/"
    saw_stream = any(t.startswith(alice_task) for t in bob_topics)
    assert saw_stream is (profile == "lab")
    assert not [t for t in bob_topics if "/rpc/" in t or t.endswith("/reply/alice")]
    assert TOPICS.client_state("alice") not in bob_topics
    assert TOPICS.agent_state(AGENT) in bob_topics
    # Health lists every task with its owner: readable in "lab" only (and by ops).
    assert (TOPICS.agent_health(AGENT) in bob_topics) is (profile == "lab")
    assert TOPICS.agent_health(AGENT) in {m.topic for m in ops.received}
    health = outcome["health"]
    assert health["bad_requests"] >= 3


def test_private_profile_differs_from_lab_by_two_lines():
    from secure_broker import ACL_PROFILES

    def rules(profile: str) -> list[str]:
        text = ACL_PROFILES[profile].read_text().splitlines()
        return [line for line in text if line and not line.startswith("#")]

    lab, private = rules("lab"), rules("private")
    assert [r for r in lab if r not in private] == [
        "pattern read streaminghub/v2/agents/+/health",
        "pattern read streaminghub/v2/agents/+/tasks/#",
    ]
    assert [r for r in private if r not in lab] == []


@pytest.mark.parametrize("secure_broker", ["private"], indirect=True)
def test_outsiders_cannot_connect(tmp_path, secure_broker):
    broker: SecureBroker = secure_broker
    anonymous = BrokerSettings(host=broker.host, port=broker.port)
    wrong = dataclasses.replace(broker.settings("bob", "password"), password="guess")
    stranger_ca = Certificates(tmp_path / "stranger")
    cert, key = stranger_ca.issue("alice")
    forged_cert = dataclasses.replace(
        broker.settings("alice", "certificate"), cert_file=str(cert), key_file=str(key)
    )
    no_cert = dataclasses.replace(forged_cert, cert_file=None, key_file=None)
    for what, settings in (("anonymous", anonymous), ("wrong password", wrong),
                           ("certificate of another CA", forged_cert),
                           ("TLS without a certificate", no_cert)):  # fmt: skip
        with pytest.raises((AssertionError, OSError, ssl.SSLError)):
            Peer.connect(settings, f"outsider-{what.replace(' ', '-')}", wait_s=2.0).close()
    Peer.connect(broker.settings("bob", "certificate"), "insider").close()  # the control
