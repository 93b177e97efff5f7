"""One client's request flood beside another client's live stream, with and without the
agent's per-client request budget (agent/ratelimit.py).

A ``datamux serve`` process (sim driver) on a local mosquitto; a victim RemoteAPI in this
process streams the 1 kHz 64-channel ``lat`` node with low-latency framing and calls
``list_live_nodes`` six times during the flood; a flooder of plain paho in its own
process publishes FLOOD ``list_live_nodes`` requests on its own request topic as fast as
it can (QoS 0). Baseline: the same agent with the budget lifted (``budget off``),
alternating with the defaults, in the same run.

    python bench/request_flood.py              # 5 runs per condition (~2 min)
    python bench/request_flood.py --quick      # 1 run each
    python bench/request_flood.py --write-doc  # also update docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import code_version, log, median_range, n_runs, write_doc  # bench/common.py
from replay import load_average, machine_facts  # bench/replay.py
from transport import LATENCY_NODE, LOOPBACK, Broker, sim_workspace, with_fresh_agent

import streaminghub_datamux as dm

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Request flood"
AGENT_ID = "floodbench"
FLOOD = 3000
CONDITIONS = {
    "budget off": {
        "STREAMINGHUB_AGENT__MAX_REQUESTS_PER_S": "1e9",
        "STREAMINGHUB_AGENT__REQUEST_BURST": str(10**9),
    },
    "budget on (defaults)": {},
}

FLOODER = """
import sys, threading, time
import cbor2, paho.mqtt.client as mqtt
host, port, agent, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rpc = f"streaminghub/v2/agents/{agent}/rpc/flooder"
replies = []
subscribed = threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood-conn",
                     protocol=mqtt.MQTTv5)
client.on_message = lambda c, u, m: replies.append(time.monotonic())
client.on_subscribe = lambda *a: subscribed.set()
client.connect(host, port)
client.loop_start()
client.subscribe(f"streaminghub/v2/agents/{agent}/reply/flooder", 1)
assert subscribed.wait(30)
payloads = [cbor2.dumps({"id": f"f{i}", "method": "list_live_nodes", "params": {}})
            for i in range(count)]
print("ready", flush=True)
sys.stdin.readline()
for payload in payloads:
    client.publish(rpc, payload, qos=0)
began = time.monotonic()
while time.monotonic() - began < 30:
    time.sleep(0.1)
    if (replies and time.monotonic() - replies[-1] > 2.0) or time.monotonic() - began > 5:
        break
print(len(replies), flush=True)
client.disconnect()
client.loop_stop()
"""


async def one_run(config: Any, broker: Broker) -> dict[str, Any]:
    """The victim's side of one flood: frame gaps, call times, failed calls."""
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, LOOPBACK, str(broker.port), AGENT_ID, str(FLOOD)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    api = dm.RemoteAPI("mqtt", "cbor", agent_id=AGENT_ID, config=config, timeout=20)
    try:
        await api.connect(LOOPBACK, broker.port)
        for _ in range(300):  # the last run's agent left an "offline" state behind
            if api.agents().get(AGENT_ID, {}).get("state") == "online":
                break
            await asyncio.sleep(0.05)
        sink: asyncio.Queue[Any] = asyncio.Queue()
        ack = await api.proxy_live_stream(LATENCY_NODE, "sig", {}, sink, framing="low-latency")
        arrivals: list[float] = []

        async def consume() -> None:
            while (item := await sink.get()) is not dm.END_OF_STREAM:
                if isinstance(item, dm.Frame):
                    arrivals.append(time.monotonic())

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(1.5)
        quiet_from = time.monotonic()
        await asyncio.sleep(1.5)
        assert flooder.stdin is not None and flooder.stdout is not None
        ready = await asyncio.to_thread(flooder.stdout.readline)
        assert ready.strip() == "ready", ready
        flood_from = time.monotonic()
        flooder.stdin.write("go\n")
        flooder.stdin.flush()
        calls, failed = [], 0
        for _ in range(6):
            await asyncio.sleep(0.15)
            began = time.monotonic()
            try:
                await api.list_live_nodes()
                calls.append(time.monotonic() - began)
            except dm.errors.DatamuxError:
                failed += 1
        await asyncio.sleep(max(0.0, flood_from + 3.0 - time.monotonic()))
        flood_to = time.monotonic()
        await api.stop_task(ack.randseq)
        await asyncio.wait_for(consumer, 10)
        out, _ = await asyncio.to_thread(flooder.communicate, None, 60)
    finally:
        await api.close()
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(10)

    def max_gap_ms(since: float, until: float) -> float:
        times = [t for t in arrivals if since <= t <= until]
        return max(b - a for a, b in itertools.pairwise(times)) * 1e3

    return {
        "quiet_gap_ms": max_gap_ms(quiet_from, flood_from),
        "flood_gap_ms": max_gap_ms(flood_from, flood_to),
        "call_ms": statistics.median(calls) * 1e3 if calls else float("nan"),
        "call_max_ms": max(calls) * 1e3 if calls else float("nan"),
        "failed": failed,
        "replies": int(out.strip().splitlines()[-1]),
    }


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    facts = "; ".join(f"{k}: {v}" for k, v in machine_facts().items())
    runs = len(next(iter(results.values())))
    lines = [
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with `python bench/"
        f"request_flood.py{' --quick' if args.quick else ''}` ({n_runs(runs)} per condition, "
        f"alternating; a flood of {FLOOD:,} `list_live_nodes` at QoS 0 from one client "
        "beside another client's 1 kHz 64-channel low-latency live stream).",
        "",
        f"Machine: {facts}; load average at start -> end: {args.load_start} -> "
        f"{load_average()}; code: {code_version()}.",
        "",
        "| condition | largest frame gap, quiet (ms) | largest frame gap, flood (ms) | "
        "victim call, median (ms) | victim calls failed (of 6) | replies to the flooder |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs_of in results.items():
        column = {k: [r[k] for r in runs_of] for k in runs_of[0]}
        lines.append(
            f"| {name} | {median_range(column['quiet_gap_ms'])} | "
            f"{median_range(column['flood_gap_ms'])} | {median_range(column['call_ms'])} | "
            f"{median_range(column['failed'])} | {median_range(column['replies'])} |"
        )
    off, on = (statistics.median(r["flood_gap_ms"] for r in v) for v in results.values())
    lines += [
        "",
        f"The budget cuts the largest frame gap in a flood {off / on:.1f}x (median of runs).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    args.load_start = load_average()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONDITIONS}
    with sim_workspace() as (root, config, broker):
        for run in range(args.runs):
            for name, env in CONDITIONS.items():
                flood = functools.partial(one_run, config, broker)
                results[name].append(with_fresh_agent(broker, root, AGENT_ID, env, flood))
                log(f"run {run + 1}/{args.runs} {name}: {results[name][-1]}")
    generated = report(results, args)
    print(generated)
    if args.write_doc:
        write_doc(args.doc, generated, __file__, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
