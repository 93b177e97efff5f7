"""The agent's request budget per client (agent/ratelimit.py, docs/protocol.md "Rate limit").

Found by a hostile client: 3,000 ``list_live_nodes`` published in a burst on its own
request topic (the ACL allows it) held a live 1 kHz low-latency stream's frames ~535 ms
and made other clients' requests wait. Here a real agent process, a real mosquitto, a
flooder of plain paho in its own process and a RemoteAPI victim.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from helpers import run
from remote import AGENT_ID, AgentProcess, RawPeer, remote_api, running_agent

import streaminghub_datamux as dm
from streaminghub_datamux.agent.ratelimit import RequestBudget, Verdict
from streaminghub_datamux.agent.requests import MAX_CONCURRENT_REQUESTS
from streaminghub_datamux.client import pacing
from streaminghub_datamux.client.pacing import RequestPacer, budget_of
from streaminghub_datamux.client.rpc import _error_of
from streaminghub_datamux.codec import decode
from streaminghub_datamux.config import load_config
from streaminghub_datamux.errors import ConfigError, RateLimited, Unavailable
from streaminghub_datamux.protocol import Topics

TOPICS = Topics("streaminghub/v2")
RATE, BURST = 20.0, 32  # the defaults

# -- the bucket, on a fake clock ---------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_served_then_a_notice_and_silence_until_the_time_told():
    clock = FakeClock()
    budget = RequestBudget(10, 5, clock=clock)
    assert [budget.take("c1") for _ in range(5)] == [Verdict.SERVE] * 5
    assert budget.take("c1") is Verdict.NOTICE  # told when to retry
    assert budget.retry_after_s("c1") == pytest.approx(0.1)
    assert [budget.take("c1") for _ in range(100)] == [Verdict.DROP] * 100
    assert budget.take("c2") is Verdict.SERVE  # another client has its own budget
    clock.now += 0.05  # too early: silence
    assert budget.take("c1") is Verdict.DROP
    clock.now += 0.05  # as told: served, then told again, then silence
    assert [budget.take("c1") for _ in range(50)] == [Verdict.SERVE, Verdict.NOTICE] + [
        Verdict.DROP
    ] * 48
    clock.now += 10  # refilled to the burst, not beyond
    assert [budget.take("c1") for _ in range(7)] == [Verdict.SERVE] * 5 + [
        Verdict.NOTICE,
        Verdict.DROP,
    ]
    # A flood is told at most once per request served.
    slow = RequestBudget(2, 1, clock=clock)
    verdicts = []
    for _ in range(1100):  # 1.1 s
        clock.now += 0.001
        verdicts += [slow.take("c3") for _ in range(10)]
    served = verdicts.count(Verdict.SERVE)
    assert served == 3  # the burst, then 2 a second
    assert verdicts.count(Verdict.NOTICE) <= served + 1


def test_the_budget_refills_at_the_rate_up_to_the_burst_only():
    clock = FakeClock()
    budget = RequestBudget(2, 3, clock=clock)
    for _ in range(3):
        budget.take("c1")
    clock.now += 3600  # an hour idle refills the burst, not 7,200 requests
    served = sum(budget.take("c1") is Verdict.SERVE for _ in range(10))
    assert served == 3
    # Sustained: 2 a second over 10 s, whatever is asked.
    served = 0
    for _ in range(100):
        clock.now += 0.1
        served += sum(budget.take("c1") is Verdict.SERVE for _ in range(5))
    assert served == 20


def test_buckets_are_bounded_and_the_least_recently_used_go_first():
    clock = FakeClock()
    budget = RequestBudget(1, 2, max_clients=100, clock=clock)
    budget.take("busy")
    budget.take("busy")
    for i in range(10_000):  # an id churn: every request from a new id
        budget.take(f"x{i}")
        if i % 50 == 0:
            assert budget.take("busy") is not Verdict.SERVE  # kept: it is in use
        assert len(budget) <= 100
    assert len(budget) == 100
    assert budget.retry_after_s("x0") == 0.0  # forgotten: a full bucket again


def test_bad_budget_values_are_refused():
    with pytest.raises(ValueError, match="rate_per_s must be > 0"):
        RequestBudget(0, 5)
    with pytest.raises(ValueError, match="burst >= 1"):
        RequestBudget(5, 0)


# -- config and the client's error ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("agent.max_requests_per_s", "0", "must be greater than 0"),
        ("agent.max_requests_per_s", "fast", "expected a number"),
        ("agent.request_burst", "-3", "must be greater than 0"),
        ("agent.request_burst", "2.5", "expected"),
    ],
)
def test_a_bad_budget_in_the_config_names_the_key_and_the_fix(key, value, problem):
    env = {"STREAMINGHUB_" + key.upper().replace(".", "__"): value}
    with pytest.raises(ConfigError) as caught:
        load_config(flags={}, env=env)
    text = str(caught.value)
    assert key in text and problem in text and "fix: write it like" in text, text


def test_the_defaults_and_a_valid_setting_load():
    config = load_config(flags={}, env={})
    assert config.get("agent.max_requests_per_s") == RATE
    assert config.get("agent.request_burst") == BURST
    env = {"STREAMINGHUB_AGENT__MAX_REQUESTS_PER_S": "2.5"}
    assert load_config(flags={}, env=env).get("agent.max_requests_per_s") == 2.5


def test_a_whole_burst_sent_at_once_is_served_in_full(workspace, mosquitto, tmp_path):
    """Found by a client written from docs/protocol.md: with the first default burst (60)
    requests sent all at once within the budget met "unavailable: too many requests at
    once" (an agent serves 32 at a time). The default burst is served in full."""
    assert BURST <= MAX_CONCURRENT_REQUESTS

    async def body() -> list[Any]:
        async with running_agent(workspace.config(), mosquitto, tmp_path / "state"):
            peer = RawPeer(mosquitto, "burster-conn")
            try:
                peer.subscribe(TOPICS.reply(AGENT_ID, "burster"))
                for i in range(BURST):
                    request = {"id": f"r{i}", "method": "list_live_nodes", "params": {}}
                    peer.publish(TOPICS.rpc(AGENT_ID, "burster"), cbor2.dumps(request))
                for _ in range(200):
                    if len(peer.messages) >= BURST:
                        break
                    await asyncio.sleep(0.05)
                return [decode(m.payload) for m in peer.messages]
            finally:
                peer.close()

    replies = run(body())
    assert len(replies) == BURST
    assert [r for r in replies if not r.get("ok")] == []


def test_a_rate_limited_reply_is_a_clear_error_with_when_to_retry():
    error = _error_of({"code": "rate_limited", "message": "slow down", "retry_after_s": 0.25})
    assert isinstance(error, RateLimited) and isinstance(error, Unavailable)
    assert error.code == "rate_limited" and str(error) == "slow down"
    assert error.retry_after_s == 0.25
    # Nothing from the network is trusted: a silly retry time is left out.
    for silly in (-1, 1e12, "soon", True, None, float("nan")):
        bad = _error_of({"code": "rate_limited", "message": "m", "retry_after_s": silly})
        assert isinstance(bad, RateLimited) and bad.retry_after_s is None, silly
    assert dm.errors.RateLimited is RateLimited


def test_a_remote_api_paces_itself_within_the_agents_budget(workspace, mosquitto, tmp_path):
    """The agent announces its budget (3 at once, 2 a second) in its birth; a RemoteAPI
    asking in a loop, or all at once, waits its turn: every call is answered and the
    agent refuses none (before, the 4th call raised and gathered ones timed out)."""
    config = workspace.config(**{"agent.request_burst": "3", "agent.max_requests_per_s": "2"})

    async def body() -> tuple[float, float, int]:
        async with (
            running_agent(config, mosquitto, tmp_path / "state") as agent,
            remote_api(config, mosquitto, client_id="eager") as eager,
        ):
            assert eager.agents()[AGENT_ID]["request_budget"] == {"per_s": 2.0, "burst": 3.0}
            began = time.monotonic()
            for _ in range(5):
                assert [n.id for n in await eager.list_live_nodes()] == ["demo"]
            in_a_loop = time.monotonic() - began
            began = time.monotonic()
            answers = await asyncio.gather(*(eager.list_live_nodes() for _ in range(4)))
            gathered = time.monotonic() - began
            assert all([n.id for n in nodes] == ["demo"] for nodes in answers)
            return in_a_loop, gathered, agent.counters.requests_rate_limited

    in_a_loop, gathered, refused = run(body())
    assert refused == 0
    # The client keeps a request of burst and 5 % of rate below the agent's: 2 at once,
    # then one every 0.53 s.
    assert in_a_loop >= 3 * 0.5, in_a_loop
    assert gathered >= 4 * 0.5, gathered


def test_a_refusal_moves_the_pace_and_the_request_is_sent_again(workspace, mosquitto, tmp_path):
    """Two RemoteAPIs under one client id share the agent's bucket, which each client's
    own pace cannot see: the agent refuses one request and says when to retry; that
    client waits as told and sends it again, so no call fails."""
    config = workspace.config(**{"agent.request_burst": "3", "agent.max_requests_per_s": "2"})

    async def body() -> int:
        async with (
            running_agent(config, mosquitto, tmp_path / "state") as agent,
            remote_api(config, mosquitto, client_id="twin") as one,
            remote_api(config, mosquitto, client_id="twin") as two,
        ):
            calls = [api.list_live_nodes() for api in (one, two, one, two)]
            answers = await asyncio.gather(*calls)
            assert all([n.id for n in nodes] == ["demo"] for nodes in answers)
            return agent.counters.requests_rate_limited

    assert run(body()) >= 1


def test_a_turn_after_the_timeout_is_a_clear_error_at_once(workspace, mosquitto, tmp_path):
    """No silent wait past the call's timeout: a call whose turn comes later fails at
    once with RateLimited naming the budget, the config keys and when to retry."""
    config = workspace.config(**{"agent.request_burst": "3", "agent.max_requests_per_s": "2"})

    async def body() -> None:
        async with (
            running_agent(config, mosquitto, tmp_path / "state"),
            remote_api(config, mosquitto, client_id="hasty", timeout=0.3) as hasty,
        ):
            await asyncio.gather(hasty.list_live_nodes(), hasty.list_live_nodes())
            began = time.monotonic()
            with pytest.raises(RateLimited) as caught:
                await hasty.list_live_nodes()
            assert time.monotonic() - began < 0.2  # not after a wait
            text = str(caught.value)
            assert "agent.max_requests_per_s" in text and "timeout" in text
            assert "3 requests at once and 2 a second" in text
            assert caught.value.retry_after_s is not None
            assert 0.3 < caught.value.retry_after_s <= 0.6

    run(body())


def test_the_pace_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reservation schedule: a burst (one below the agent's), then the rate; a
    refusal's retry time moves it; an advertised budget that makes no sense is ignored."""
    clock = FakeClock()
    budgets: dict[str, dict[str, Any]] = {"a1": {"request_budget": {"per_s": 10, "burst": 5}}}
    pacer = RequestPacer(lambda agent: budget_of(budgets.get(agent)), clock)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)  # the clock stands still: the waits add up

    monkeypatch.setattr(pacing.asyncio, "sleep", fake_sleep)

    def turn(agent: str = "a1", deadline: float | None = None) -> None:
        run(pacer.wait_turn(agent, "list_nodes", deadline))

    for _ in range(4):  # 5 - max(1, 10 %) = 4 at once
        turn()
    assert slept == []
    turn()
    assert slept == [pytest.approx(1 / 9.5)]  # then 95 % of the rate
    clock.now += 10.0  # idle: the burst is back
    slept.clear()
    for _ in range(4):
        turn()
    assert slept == []
    pacer.told("a1", 2.0)  # the agent's bucket is empty: nothing for 2 s, then the rate
    turn()
    turn()
    assert slept == [pytest.approx(2.0), pytest.approx(2.0 + 1 / 9.5)]
    with pytest.raises(RateLimited, match="after this call's timeout"):
        turn(deadline=clock.now + 1.0)
    # No budget announced: no pace, but a refusal's retry time is still honoured.
    slept.clear()
    for _ in range(10):
        turn("a2")
    pacer.told("a2", 0.5)
    turn("a2")
    assert slept == [pytest.approx(0.5)]
    for silly in (
        {"per_s": 0, "burst": 5}, {"per_s": 10, "burst": 0.5}, {"per_s": "10", "burst": 5},
        {"per_s": float("inf"), "burst": 5}, {"per_s": True, "burst": 5}, [10, 5], None,
    ):  # fmt: skip
        assert budget_of({"request_budget": silly}) is None, silly
    assert budget_of(None) is None and budget_of({}) is None


# -- a flood against a real agent --------------------------------------------------------

FLOOD = 3000
LIVE_HZ = 1000.0

# A hostile client of plain paho: its own request topic, as fast as it can (QoS 0), then
# what came back; then it waits as told and asks once more.
FLOODER = """
import json, sys, threading, time
import cbor2, paho.mqtt.client as mqtt
host, port, rpc, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count = int(sys.argv[5])
got = []
subscribed = threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood-conn",
                     protocol=mqtt.MQTTv5)
client.on_message = lambda c, u, m: got.append((time.monotonic(), cbor2.loads(m.payload)))
client.on_subscribe = lambda *a: subscribed.set()
client.connect(host, port)
client.loop_start()
client.subscribe(reply, 1)
assert subscribed.wait(30)
payloads = [cbor2.dumps({"id": f"f{i}", "method": "list_live_nodes", "params": {}})
            for i in range(count)]
print("ready", flush=True)
sys.stdin.readline()
began = time.monotonic()
for payload in payloads:
    client.publish(rpc, payload, qos=0)
sent_s = time.monotonic() - began
while time.monotonic() - began < 40:
    time.sleep(0.1)
    if got and time.monotonic() - got[-1][0] > 2.0:
        break
replies = [r for _, r in got]
limited = [r for r in replies if not r["ok"] and r["error"]["code"] == "rate_limited"]
after = None
if limited:
    time.sleep(limited[-1]["error"]["retry_after_s"] + 0.05)
    before = len(got)
    client.publish(rpc, cbor2.dumps({"id": "after", "method": "list_live_nodes",
                                     "params": {}}), qos=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not [r for _, r in got[before:] if r["id"] == "after"]:
        time.sleep(0.02)
    after = [r for _, r in got[before:] if r["id"] == "after"]
codes = {}
for r in replies:
    code = "ok" if r["ok"] else r["error"]["code"]
    codes[code] = codes.get(code, 0) + 1
print(json.dumps({"sent_s": sent_s, "replies": len(replies), "codes": codes,
                  "limited": limited[:3], "after": after}), flush=True)
client.disconnect()
client.loop_stop()
"""


def _write_rc(workdir: Path) -> None:
    channels = {
        f"c{i}": {"signal": "sine", "freq_hz": 1.0 + i, "amplitude": 10.0} for i in range(8)
    }
    nodes = {"lat": {"streams": {"sig": {"frequency": LIVE_HZ, "channels": channels}}}}
    (workdir / ".streaminghubrc").write_text(json.dumps({"simulate": {"nodes": nodes}}))


def flood_beside_a_live_stream(
    mosquitto: Any, workdir: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A victim streams ``lat`` (1 kHz, low-latency) and calls the agent while the flooder
    sends FLOOD requests: the largest gap between the victim's frames before and during
    the flood, its calls' times, the flooder's report and the agent's health."""
    _write_rc(workdir)
    env = {"STREAMINGHUB_AGENT__HEALTH_INTERVAL_S": "0.5", **(env or {})}
    agent = AgentProcess(mosquitto, workdir, env=env)
    watcher = RawPeer(mosquitto, "watcher")
    watcher.subscribe(TOPICS.agent_health(AGENT_ID))
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, mosquitto.host, str(mosquitto.port),
         TOPICS.rpc(AGENT_ID, "flooder"), TOPICS.reply(AGENT_ID, "flooder"), str(FLOOD)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    async def victim() -> dict[str, Any]:
        config = load_config(flags={}, env={}, cwd=workdir, home=workdir)
        async with remote_api(config, mosquitto, client_id="victim", timeout=20.0) as api:
            for _ in range(200):
                if AGENT_ID in api.agents():
                    break
                await asyncio.sleep(0.05)
            sink: asyncio.Queue[Any] = asyncio.Queue()
            ack = await api.proxy_live_stream("lat", "sig", {}, sink, framing="low-latency")
            arrivals: list[float] = []

            async def consume() -> None:
                while True:
                    item = await sink.get()
                    if isinstance(item, dm.Frame):
                        arrivals.append(time.monotonic())
                    elif item is dm.END_OF_STREAM:
                        return

            consumer = asyncio.create_task(consume())
            await asyncio.sleep(1.5)  # settled
            quiet_from = time.monotonic()
            await asyncio.sleep(1.5)
            assert flooder.stdout is not None and flooder.stdin is not None
            line = await asyncio.to_thread(flooder.stdout.readline)
            assert line.strip() == "ready", line
            flood_from = time.monotonic()
            flooder.stdin.write("go\n")
            flooder.stdin.flush()
            calls, failed = [], []
            for _ in range(6):  # the victim's own requests, during the flood
                await asyncio.sleep(0.15)
                began = time.monotonic()
                try:
                    nodes = await api.list_live_nodes()
                except dm.errors.DatamuxError as exc:  # the agent too busy for others
                    failed.append(f"{exc.code}: {exc}")
                    continue
                calls.append(time.monotonic() - began)
                assert [n.id for n in nodes if n.id == "lat"] == ["lat"]
            await asyncio.sleep(max(0.0, flood_from + 3.0 - time.monotonic()))
            flood_to = time.monotonic()
            await api.stop_task(ack.randseq)
            await asyncio.wait_for(consumer, 10)

        def max_gap(since: float, until: float) -> float:
            times = [t for t in arrivals if since <= t <= until]
            assert len(times) > 10, f"{len(times)} frames between {since} and {until}"
            return max(b - a for a, b in itertools.pairwise(times))

        return {
            "quiet_gap_ms": max_gap(quiet_from, flood_from) * 1e3,
            "flood_gap_ms": max_gap(flood_from, flood_to) * 1e3,
            "calls_ms": [c * 1e3 for c in calls],
            "calls_failed": failed,
        }

    try:
        measured = run(victim(), timeout=90)
        out, _ = flooder.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        time.sleep(1.0)  # one more health message
        health = [m for m in list(watcher.messages) if m.payload]
        alive = agent.process.poll() is None
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(10)
        watcher.close()
        agent.terminate()
    assert alive, agent.log()
    return {**measured, **report, "health": decode(health[-1].payload), "log": agent.log()}


def test_a_flood_of_one_client_is_refused_and_the_others_go_on(mosquitto, tmp_path):
    """With the default budget the flooder gets its burst served, one rate_limited error a
    second and no other reply; the victim's 1 kHz stream keeps flowing and its calls answer
    promptly; after waiting as told, the flooder is served again."""
    got = flood_beside_a_live_stream(mosquitto, tmp_path)
    print(
        f"rate limit on: largest frame gap {got['quiet_gap_ms']:.0f} ms quiet, "
        f"{got['flood_gap_ms']:.0f} ms in a flood of {FLOOD} (sent in {got['sent_s']:.2f} s); "
        f"victim calls {[round(c) for c in got['calls_ms']]} ms; flooder codes {got['codes']}"
    )
    codes = got["codes"]
    # Served: the burst and what refilled meanwhile (some of them answered "unavailable":
    # the agent serves 32 at once); told why after a served request or once a second;
    # the rest of the flood not answered at all.
    served = codes.get("ok", 0) + codes.get("unavailable", 0)
    assert BURST <= served <= BURST + RATE * 5, codes
    assert 1 <= codes.get("rate_limited", 0) <= served + 10, codes
    assert got["replies"] < 400, got["replies"]  # not FLOOD
    notice = got["limited"][0]
    assert notice["id"] is not None and notice["id"].startswith("f")  # addressed
    message = notice["error"]["message"]
    for words in ("rate limited", "agent.max_requests_per_s", "agent.request_burst", "retry in"):
        assert words in message, message
    assert 0 <= notice["error"]["retry_after_s"] <= 1.0
    assert got["after"] and got["after"][0]["ok"] is True, got["after"]  # served again
    health = got["health"]
    assert health["requests_rate_limited"] >= FLOOD - served, health
    assert health["requests_rate_limited"] + served <= FLOOD + 1, health
    # The victim: frames kept flowing, calls answered promptly (generous: a loaded box).
    assert got["flood_gap_ms"] < 300, got  # 520-1,500 ms without the budget
    assert not got["calls_failed"] and max(got["calls_ms"]) < 1000, got
    assert got["log"].count("over its budget") < 100  # the journal is not flooded
