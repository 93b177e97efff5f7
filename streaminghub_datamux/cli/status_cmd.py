"""``datamux status``: every agent behind the broker, from its retained state and health.

Reads only what agents publish retained (docs/protocol.md): the state message (online
or offline, version, nodes, drivers) and the health message (counters, tasks, spool,
disk, CPU, memory, temperature, clock). No request is sent, so it also shows agents
that are offline and works with a read-only broker login. ``--watch`` keeps the
subscription and redraws like ``top`` (with rich when installed:
``pip install 'streaminghub-datamux[status]'``; else a plain redraw).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import load_config
from ..errors import InvalidRequest
from ..mqttio import BrokerSettings, Incoming, MqttLink
from ..protocol import Topics
from .serve_cmd import broker_flags, broker_overrides

__all__ = ["AgentView", "Fleet", "register", "render_plain"]

SETTLE_S = 0.5  # retained messages arrive right after the SUBACK; then quiet
SETTLE_MAX_S = 3.0
CLEAR = "\x1b[H\x1b[2J"


@dataclass
class AgentView:
    """What the broker holds about one agent."""

    id: str
    state: Mapping[str, Any] = field(default_factory=dict)
    health: Mapping[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        return self.state.get("state") == "online"

    def since(self) -> float | None:
        """Online: when it started. Offline: when it said so, else its last health."""
        if self.online:
            return _number(self.state.get("since"))
        return _number(self.state.get("since")) or _number(self.health.get("time"))

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.id,
            "state": self.state.get("state", "unknown"),
            "since": self.since(),
            "version": self.state.get("version") or self.health.get("version"),
            "nodes": list(self.state.get("nodes") or []),
            "drivers": list(self.health.get("drivers") or self.state.get("drivers") or []),
            "health": dict(self.health),
        }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Fleet:
    """Agents seen on the broker, kept up to date from their retained messages."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.agents: dict[str, AgentView] = {}
        self.changed = asyncio.Event()
        self.last_message = 0.0

    def on_message(self, message: Incoming) -> None:
        root, agent, kind = self.topics.levels(message.topic, 3)
        if root != "agents" or kind not in ("state", "health"):
            return
        self.last_message = time.monotonic()
        view = self.agents.setdefault(agent, AgentView(agent))
        decoded = _decode(message.payload)
        if kind == "state":
            if not message.payload:  # the retained state was deleted: forget the agent
                self.agents.pop(agent, None)
            elif decoded is not None:
                view.state = decoded
        else:
            view.health = decoded or {}  # empty: cleared by a clean shutdown
        self.changed.set()

    def to_json(self) -> list[dict[str, Any]]:
        return [self.agents[a].to_json() for a in sorted(self.agents)]


def _decode(payload: bytes) -> Mapping[str, Any] | None:
    from ..codec import decode

    if not payload:
        return None
    try:
        value = decode(payload)
    except InvalidRequest:
        return None  # nothing from the network is trusted: an unreadable message is skipped
    return value if isinstance(value, Mapping) else None


# -- rendering ---------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _clock(health: Mapping[str, Any]) -> str:
    synced = health.get("clock_synced")
    return {True: "synced", False: "NOT SYNCED"}.get(synced, "unknown")  # type: ignore[arg-type]


def summary_row(view: AgentView, now: float) -> list[str]:
    """One table row: agent, state, since, version, uptime, cpu, mem, temp, disk, spool, clock."""
    health = view.health
    since = view.since()
    state = "online" if view.online else view.state.get("state", "unknown")
    temp = health.get("cpu_temp_c")
    disk = health.get("disk_free_mb")
    return [
        view.id,
        f"{state} {_ago(now - since) if since else ''}".strip(),
        _when(since),
        str(view.state.get("version") or health.get("version") or "?"),
        _ago(health.get("uptime_s")) if view.online and health else "-",
        f"{health['cpu_percent']:.1f}" if "cpu_percent" in health else "-",
        f"{health['rss_mb']:.0f}" if "rss_mb" in health else "-",
        f"{temp:.1f}" if isinstance(temp, int | float) else "-",
        f"{disk / 1024:.1f}G" if isinstance(disk, int | float) else "-",
        str(health.get("spool_messages", "-")),
        _clock(health) if health else "-",
    ]


HEADER = [
    *("AGENT", "STATE", "SINCE", "VERSION", "UPTIME", "CPU%"),
    *("RSS MB", "TEMP C", "DISK", "SPOOL", "CLOCK"),
]


def detail_lines(view: AgentView) -> list[str]:
    """Drivers, nodes, tasks and warnings of one agent, one per line."""
    health, lines = view.health, []
    drivers = health.get("drivers") or view.state.get("drivers") or []
    if drivers:
        shown = []
        for driver in drivers:
            if not isinstance(driver, Mapping):
                continue
            text = f"{driver.get('name')} {driver.get('state')}"
            if driver.get("state") != "ok":
                text = f"{driver.get('name')} {str(driver.get('state')).upper()}"
                text += f" ({driver.get('reason', '')}; fix: {driver.get('fix', '')})"
            shown.append(text)
        lines.append("drivers: " + ", ".join(shown))
    nodes = view.state.get("nodes") or []
    if nodes:
        lines.append("nodes: " + ", ".join(map(str, nodes)))
    for task in health.get("task_list") or []:
        if isinstance(task, Mapping):
            lines.append(
                f"task {task.get('task_id')}: owner {task.get('owner')}, stream "
                f"{task.get('stream')}, {task.get('rate_hz', 0)} Hz, frames "
                f"{task.get('frames', 0)}, dropped {task.get('samples_dropped', 0)}"
            )
    if health.get("throttled_now"):
        lines.append("THROTTLED: " + ", ".join(map(str, health["throttled_now"])))
    if health.get("spool_dropped"):
        lines.append(f"spool dropped {health['spool_dropped']} messages (disk limit)")
    return lines


def render_plain(fleet: Fleet, address: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if not fleet.agents:
        return f"no agents on {address} (none has announced itself there)"
    rows = [HEADER] + [summary_row(fleet.agents[a], now) for a in sorted(fleet.agents)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    out = [f"agents on {address} at {_when(now)}"]
    for index, row in enumerate(rows):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index:
            view = fleet.agents[row[0]]
            out.extend("    " + line for line in detail_lines(view))
    return "\n".join(line.rstrip() for line in out)


def render_rich(fleet: Fleet, address: str) -> Any:
    """The same as :func:`render_plain`, as a rich renderable (a table per agent)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    if not fleet.agents:
        return Text(f"no agents on {address} (none has announced itself there)")
    table = Table(title=f"agents on {address} at {_when(now)}", title_justify="left")
    for name in HEADER:
        table.add_column(name, no_wrap=True)
    details = []
    for agent in sorted(fleet.agents):
        view = fleet.agents[agent]
        row = summary_row(view, now)
        style = "green" if view.online else "red"
        table.add_row(*row, style=style)
        lines = detail_lines(view)
        if lines:
            details.append(Text(agent + ":\n  " + "\n  ".join(lines)))
    return Group(table, *details)


# -- the command -------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    status = subparsers.add_parser(
        "status",
        help="every agent behind the broker: online or not, drivers, tasks, health",
        description="Show every agent behind the broker from its retained state and health "
        "messages: online or offline and since when, version, uptime, drivers and their "
        "state, nodes, tasks, spool, disk, CPU, memory, temperature and clock sync.",
    )
    broker_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--watch", action="store_true", help="keep redrawing, like top")
    status.add_argument(
        "--interval", type=float, default=1.0, help="seconds between redraws (default 1)"
    )
    status.add_argument(
        "--plain", action="store_true", help="with --watch: plain text, even if rich is there"
    )
    status.set_defaults(handler=lambda args: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_status(args))
    except KeyboardInterrupt:
        return 0  # Ctrl-C ends --watch: not a failure


async def _status(args: argparse.Namespace) -> int:
    flags = dict(getattr(args, "config_flags", None) or {})
    flags.update(broker_overrides(args))
    config = load_config(flags={k: v for k, v in flags.items() if v is not None})
    settings = BrokerSettings.from_config(config)
    topics = Topics(settings.prefix)
    fleet = Fleet(topics)
    link = MqttLink(
        f"dm-status-{int(time.time() * 1000) % 10**9}", settings, on_message=fleet.on_message
    )
    await link.connect(timeout=float(config.get("client.timeout_s")))
    try:
        await link.subscribe(topics.every_agent_state, qos=1)
        await link.subscribe(topics.every_agent_health, qos=1)
        await _settle(fleet)
        if args.watch:
            await _watch(fleet, settings.address, args)
            return 0
        if args.json:
            print(json.dumps({"broker": settings.address, "agents": fleet.to_json()}, indent=2))
        else:
            print(render_plain(fleet, settings.address))
        return 0
    finally:
        await link.close()


async def _settle(fleet: Fleet) -> None:
    """Wait until the retained messages have arrived (quiet for SETTLE_S, at most SETTLE_MAX_S)."""
    began = time.monotonic()
    while time.monotonic() - began < SETTLE_MAX_S:
        quiet_since = max(fleet.last_message, began)
        if time.monotonic() - quiet_since >= SETTLE_S:
            return
        await asyncio.sleep(0.05)


async def _watch(fleet: Fleet, address: str, args: argparse.Namespace) -> None:
    interval = max(0.2, float(args.interval))
    use_rich = not args.plain
    if use_rich:
        try:
            from rich.live import Live
        except ImportError:
            use_rich = False
    if not use_rich:
        while True:
            sys.stdout.write(CLEAR + render_plain(fleet, address) + "\n")
            sys.stdout.flush()
            await _next_change(fleet, interval)
    with Live(render_rich(fleet, address), auto_refresh=False, screen=True) as live:
        while True:
            await _next_change(fleet, interval)
            live.update(render_rich(fleet, address), refresh=True)


async def _next_change(fleet: Fleet, interval: float) -> None:
    """Sleep one interval (uptimes move on), sooner when a message changed something."""
    fleet.changed.clear()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(interval):
            await fleet.changed.wait()
