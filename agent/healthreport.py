"""The agent's health message and the loop that publishes it (docs/agent.md, "Health").

Counters, tasks, drivers, CPU, memory and the box's readings (agent/health.py), as JSON
(readable in ``mosquitto_sub``), retained, every ``agent.health_interval_s``, and cleared
(an empty retained message) on a clean shutdown. The same loop feeds the systemd
watchdog and keeps ``systemctl status`` saying whether the broker is there.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..api import API
from ..codec import encode
from ..mqttio import MqttLink
from ..protocol import Topics
from . import sdnotify
from .counters import Counters
from .health import system_readings
from .remotetasks import RemoteTask, RemoteTasks
from .spool import Spool

__all__ = ["HEALTH_CODEC", "HealthReporter", "rss_bytes"]

# Health is for people and scripts as much as for clients: JSON, whatever agent.codec says.
HEALTH_CODEC = "json"


@dataclass(eq=False, kw_only=True)
class HealthReporter:
    """Builds and publishes the agent's health.

    Args:
        agent_id: this agent.
        boot: this run of it.
        started: when it started (unix time).
        address: the broker's address, for systemd's STATUS=.
        topics: builds the health topic.
        link: the broker connection.
        spool: its depth and folder (the disk it is on) are reported; synced every tick.
        counters: what the agent has done.
        api: its tasks' drops.
        tasks: the remote tasks.
        drivers: the drivers' states now.
        interval_s: ``agent.health_interval_s``.
        on_tick: called every tick (about once a second or more often).
        on_drivers_changed: a driver came up or went down since the last message.
    """

    agent_id: str
    boot: str
    started: float
    address: str
    topics: Topics
    link: MqttLink
    spool: Spool
    counters: Counters
    api: API
    tasks: RemoteTasks
    drivers: Callable[[], list[dict[str, Any]]]
    interval_s: float
    on_tick: Callable[[], None]
    on_drivers_changed: Callable[[], None]
    _cpu_mark: tuple[float, float] = field(
        default_factory=lambda: (time.monotonic(), time.process_time()), init=False, repr=False
    )

    def message(self, system: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The health message; ``system``: the box's readings, read here when omitted."""
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._cpu_mark[0]
        cpu_percent = 100.0 * (cpu - self._cpu_mark[1]) / wall if wall > 0 else 0.0
        self._cpu_mark = (now, cpu)
        counters = self.counters
        return {
            "agent": self.agent_id,
            "boot": self.boot,
            "version": __version__,
            "time": time.time(),
            "uptime_s": time.time() - self.started,
            "tasks": len(self.tasks),
            "frames": counters.frames,
            "samples": counters.samples,
            "frames_dropped": counters.frames_dropped,
            "samples_dropped": sum(t.samples_dropped for t in self.api.tasks()),
            "requests": counters.requests,
            "bad_requests": counters.bad_requests,
            "unidentified_requests": counters.unidentified_requests,
            "v1_requests": counters.v1_requests,
            "requests_rate_limited": counters.requests_rate_limited,
            "spool_messages": len(self.spool),
            "spool_bytes": self.spool.depth_bytes,
            "spool_dropped": self.spool.dropped,
            "broker_disconnects": self.link.disconnects,
            "cpu_percent": round(cpu_percent, 1),
            "rss_mb": round(rss_bytes() / (1 << 20), 1),
            "drivers": self.drivers(),
            "task_list": [self._task_health(t) for t in self.tasks.all()],
            **(system if system is not None else system_readings(self.spool.directory)),
        }

    def _task_health(self, remote: RemoteTask) -> dict[str, Any]:
        elapsed = max(time.time() - remote.started, 1e-3)
        local = next((t for t in self.api.tasks() if t.id == remote.id), None)
        return {
            **remote.describe(),
            "stream": remote.stream_id,
            "rate_hz": round(remote.samples / elapsed, 1),
            "samples_dropped": local.samples_dropped if local is not None else 0,
        }

    def cleared(self) -> tuple[str, bytes, int, bool]:
        """An empty retained message deletes the retained health: no stale readings."""
        return (self.topics.agent_health(self.agent_id), b"", 1, True)

    async def run(self) -> None:
        """Publish the health every ``interval_s``; tick (and feed the watchdog) meanwhile."""
        watchdog = sdnotify.watchdog_interval()
        interval = min(self.interval_s, watchdog) if watchdog else self.interval_s
        next_health = 0.0
        announced = self.drivers()
        shown = f"serving as {self.agent_id} on {self.address}"  # what READY=1 said
        while True:
            if watchdog:
                sdnotify.watchdog_ping()
            self.on_tick()
            # The spool syncs on its own calls only; this bounds what a power cut can take.
            self.spool.sync()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + self.interval_s
                system = await asyncio.to_thread(system_readings, self.spool.directory)
                health = self.message(system)
                payload = encode(health, HEALTH_CODEC)
                self.link.publish_nowait(
                    self.topics.agent_health(self.agent_id), payload, qos=0, retain=True
                )
                if _changed(announced, health["drivers"]):
                    # A driver that came up (or went down) shows in the birth message too.
                    self.on_drivers_changed()
                announced = health["drivers"]
                shown = self._show_status(shown)
            await asyncio.sleep(interval)

    def _show_status(self, shown: str) -> str:
        """systemd's STATUS= (``systemctl status``): serving, or why the broker is away."""
        text = f"serving as {self.agent_id} on {self.address}"
        if not self.link.connected:
            text = f"broker {self.address} away: {self.link.problem or 'reconnecting'}"
        if text != shown:
            sdnotify.status(text)
        return text


def _changed(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> bool:
    return [(d["name"], d["state"]) for d in before] != [(d["name"], d["state"]) for d in now]


def rss_bytes() -> int:
    """Resident memory now (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
