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

import pytest
from helpers import run
from remote import AGENT_ID, AgentProcess, RawPeer, remote_api, running_agent

import streaminghub_datamux as dm
from streaminghub_datamux.agent.ratelimit import RequestBudget, Verdict
from streaminghub_datamux.client.rpc import _error_of
from streaminghub_datamux.codec import decode
from streaminghub_datamux.config import load_config
from streaminghub_datamux.errors import ConfigError, RateLimited, Unavailable
from streaminghub_datamux.paging import fetch_all_pages
from streaminghub_datamux.protocol import Topics

TOPICS = Topics("streaminghub/v2")
RATE, BURST = 20.0, 60  # the defaults

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


def test_the_remote_api_raises_rate_limited_and_is_served_after_waiting(
    workspace, mosquitto, tmp_path
):
    """A RemoteAPI past a small budget (3 at once, 2 a second) gets RateLimited with when
    to retry; asking again sooner fails at once, and after waiting it is served again;
    another client of the same agent is not touched."""
    config = workspace.config(**{"agent.request_burst": "3", "agent.max_requests_per_s": "2"})

    async def body() -> None:
        async with (
            running_agent(config, mosquitto, tmp_path / "state") as agent,
            remote_api(config, mosquitto, client_id="eager") as eager,
            remote_api(config, mosquitto, client_id="calm") as calm,
        ):
            for _ in range(3):
                await eager.list_live_nodes()
            with pytest.raises(RateLimited) as caught:
                await eager.list_live_nodes()
            told = caught.value
            assert "agent.max_requests_per_s" in str(told) and "retry in" in str(told)
            assert told.retry_after_s is not None and 0 < told.retry_after_s <= 0.5
            # Asked again too early: refused by the client itself, at once, saying why
            # (the agent would not answer).
            with pytest.raises(RateLimited, match="not sent: agent 'a1' rate-limited") as again:
                await eager.list_live_nodes()
            assert again.value.retry_after_s is not None and again.value.retry_after_s <= 0.5
            assert [n.id for n in await calm.list_live_nodes()] == ["demo"]
            await asyncio.sleep(told.retry_after_s)
            assert [n.id for n in await eager.list_live_nodes()] == ["demo"]
            assert agent.counters.requests_rate_limited == 1

    run(body())


def test_a_listing_begun_waits_out_the_budget_between_its_pages():
    """The RemoteAPI's pages of one listing are paced as the agent says, not failed; a
    first page over budget, or a wait too long, is the caller's error."""
    served: list[int] = []
    refusals = {2: 2, 4: 1}  # page -> times it is refused first

    async def agent(agent_id, method, params):
        page = params["page"]
        if refusals.get(page):
            refusals[page] -= 1
            error = RateLimited("slow down")
            error.retry_after_s = 0.05
            raise error
        served.append(page)
        return {"items": [page], "page": page, "pages": 6, "token": "t"}

    began = time.monotonic()
    items = run(fetch_all_pages(agent, "a1", "list_collections", {}))
    assert items == [0, 1, 2, 3, 4, 5] and served == items
    assert time.monotonic() - began >= 0.15  # it waited as told, three times

    async def stern(agent_id, method, params):
        if params["page"] == 1:
            error = RateLimited("wait an hour")
            error.retry_after_s = 3600.0
            raise error
        return {"items": [0], "page": 0, "pages": 2, "token": "t"}

    with pytest.raises(RateLimited, match="wait an hour"):
        run(fetch_all_pages(stern, "a1", "list_collections", {}))


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
