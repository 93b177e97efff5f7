"""The agent: serves one box's collections and live nodes to every client behind a broker.

It answers RPC requests with the local :class:`~streaminghub_datamux.API`, so remote
tasks run through exactly the same task code as local ones, and publishes each task's
frames and control messages (docs/protocol.md). This module holds the agent's lifecycle
and wires its parts, one job each:

- ``requests``: RPC requests in, one reply each out (limits, parsing, v1 answers);
- ``remotetasks``: the tasks clients started (ownership, start, stop, steering);
- ``publish``: a task's frames and control messages on its topics;
- ``outbox`` and ``spool``: store-and-forward while the broker is away;
- ``presence``: a retained birth message, with a last will for when it vanishes;
- ``leases``: a client that disappears has its tasks stopped (docs/agent.md, "Leases");
- ``healthreport``: counters, driver states, CPU, memory, disk, temperature and clock
  sync, as retained JSON, cleared on a clean shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from ..api import API
from ..clocks import injected_offset, read_clocks
from ..codec import CODECS
from ..config import Config
from ..dirs import state_dir as default_state_dir
from ..errors import ConfigError
from ..host import default_agent_id
from ..mqttio import BrokerSettings, Incoming, MqttLink, Will
from ..paging import Pager
from ..protocol import ID_PATTERN, TABLE, Request, Topics
from . import sdnotify
from .counters import Counters
from .healthreport import HealthReporter
from .leases import LeaseBook
from .outbox import Outbox
from .presence import Presence, state_message
from .publish import TaskPublisher
from .ratelimit import RequestBudget
from .remotetasks import PUBLISHER_STOP_S, RemoteTasks
from .requests import RequestServer
from .spool import Spool

__all__ = ["Agent", "default_agent_id", "default_state_dir"]

log = logging.getLogger(__name__)


class Agent:
    """One agent process.

    Args:
        config: the effective configuration (``broker.*`` and ``agent.*`` keys).
        api: the local API to serve; built from ``config`` when omitted.
        settings: broker settings; from ``config`` when omitted.
        agent_id: overrides ``agent.id``.
        codec: overrides ``agent.codec`` (for the agent's own messages).
    """

    def __init__(
        self,
        config: Config,
        *,
        api: API | None = None,
        settings: BrokerSettings | None = None,
        agent_id: str | None = None,
        codec: str | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.api = api if api is not None else API(config)
        self.settings = settings or BrokerSettings.from_config(config)
        self.id = _checked_agent_id(agent_id or config.get("agent.id") or default_agent_id())
        self.codec = codec or config.get("agent.codec")
        if self.codec not in CODECS:
            raise ConfigError(
                f"unknown codec {self.codec!r}", key="agent.codec", fix="use cbor or json"
            )
        self.topics = Topics(self.settings.prefix)
        self.boot = secrets.token_hex(8)
        # The test hook DATAMUX_TEST_CLOCK_OFFSET: act as if this host's clock were off.
        self.clock_shift = injected_offset()
        self.started = time.time()
        self.max_request_bytes = int(config.get("agent.max_request_bytes"))
        self.pager = Pager()  # listings larger than one message go out in pages
        folder = state_dir or config.get("agent.state_dir") or default_state_dir()
        self.spool = Spool(
            Path(folder) / "spool" / self.id,
            max_bytes=int(float(config.get("agent.spool_max_mb")) * (1 << 20)),
        )
        self.counters = Counters()
        offline = state_message(self.id, self.boot, self.codec, "offline")
        self.link = MqttLink(
            f"dm-agent-{self.id}",
            self.settings,
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=Will(self.topics.agent_state(self.id), offline),
            network="loop",  # the agent's loop never blocks: no thread hop per frame
        )
        budget = RequestBudget(
            float(config.get("agent.max_requests_per_s")), int(config.get("agent.request_burst"))
        )
        self.presence = Presence(
            agent_id=self.id,
            boot=self.boot,
            codec=self.codec,
            started=self.started,
            topics=self.topics,
            link=self.link,
            api=self.api,
            request_budget={"per_s": budget.rate_per_s, "burst": budget.burst},
        )
        self.outbox = Outbox(
            self.link, self.spool, self.counters, float(config.get("agent.spool_drain_per_s"))
        )
        publisher = TaskPublisher(
            agent_id=self.id,
            topics=self.topics,
            link=self.link,
            outbox=self.outbox,
            counters=self.counters,
            stop_task=self.api.stop_task,
            max_frame_bytes=int(config.get("agent.max_frame_bytes")),
            clock_shift=self.clock_shift,
        )
        self.remote_tasks = RemoteTasks(
            agent_id=self.id,
            api=self.api,
            publisher=publisher,
            renew=lambda lease: self.leases.renew(lease),
            spawn=self._spawn,
            max_tasks=int(config.get("agent.max_tasks")),
        )
        self.leases = LeaseBook(
            self.remote_tasks.owns,
            lambda: self.link.connected,
            self.remote_tasks.release,
            default_keepalive_s=self.settings.keepalive_s,
            will_grace_s=float(config.get("agent.will_grace_s")),
            max_state_bytes=self.max_request_bytes,
        )
        self.requests = RequestServer(
            agent_id=self.id,
            topics=self.topics,
            link=self.link,
            counters=self.counters,
            pager=self.pager,
            call=self._call,
            touch=self.leases.touch,
            max_request_bytes=self.max_request_bytes,
            budget=budget,
        )
        self.health_reporter = HealthReporter(
            agent_id=self.id,
            boot=self.boot,
            started=self.started,
            address=self.settings.address,
            topics=self.topics,
            link=self.link,
            spool=self.spool,
            counters=self.counters,
            api=self.api,
            tasks=self.remote_tasks,
            drivers=self.presence.driver_states,
            interval_s=float(config.get("agent.health_interval_s")),
            on_tick=self.requests.flush_logs,
            on_drivers_changed=lambda: self._spawn(self.presence.announce_nodes(), "announce"),
        )
        self._v1_rpc: list[str] = []
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._starting: asyncio.Task[Any] | None = None
        self._shutdown_job: asyncio.Task[None] | None = None
        self._subscribed = False  # the birth waits for the subscriptions

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, connect_timeout: float | None = None) -> None:
        """Connect, subscribe, announce; returns once the agent serves requests.

        :meth:`stop` during a start (a broker that is not up yet) cancels it.
        """
        self._starting = asyncio.current_task()
        try:
            await self._start(connect_timeout)
        finally:
            self._starting = None

    async def _start(self, connect_timeout: float | None) -> None:
        # READY=1 means "serving" (the unit's comment, docs/operations.md): it comes after
        # the broker connect. Meanwhile the watchdog is fed and STATUS= says what we wait
        # for, with the broker's problem once there is one.
        sdnotify.status(f"connecting to {self.settings.address}")
        watchdog = asyncio.get_running_loop().create_task(self._feed_watchdog_while_connecting())
        try:
            await self.link.connect(timeout=connect_timeout)
        finally:
            watchdog.cancel()
        await self.link.subscribe(self.topics.rpc_of(self.id), qos=1)
        self._v1_rpc = self.topics.v1_rpc(self.id)
        for topic in self._v1_rpc:
            await self.link.subscribe(topic, qos=1)
        await self.link.subscribe(self.topics.every_client_state, qos=1)
        await self.link.subscribe(self.topics.every_discover, qos=1)
        self._subscribed = True
        self.presence.announce()
        self._spawn(self.health_reporter.run(), "health")
        self._spawn(self.outbox.drain(), "spool")
        self._spawn(self.presence.announce_nodes(), "announce")
        if len(self.spool):
            log.info("%d spooled messages from before; sending them", len(self.spool))
            self.outbox.resume()
        # Serving means findable: the broker holds the retained birth before READY=1.
        if not await self.link.flush(timeout=10.0):
            log.warning("the broker has not acknowledged the birth message; serving anyway")
        sdnotify.ready(f"serving as {self.id} on {self.settings.address}")
        log.info(
            "agent %s serving on %s (prefix %s)", self.id, self.settings.address, self.topics.prefix
        )

    async def _feed_watchdog_while_connecting(self) -> None:
        period = sdnotify.watchdog_interval()
        shown = ""
        while True:
            if period:
                sdnotify.watchdog_ping()
            problem = self.link.problem
            if problem and problem != shown:
                shown = problem
                sdnotify.status(f"waiting for the broker {self.settings.address}: {problem}")
            await asyncio.sleep(min(period or 1.0, 1.0))

    async def run(self) -> None:
        """Serve until :meth:`request_stop` or :meth:`stop` (SIGTERM in ``datamux serve``)."""
        starting = asyncio.get_running_loop().create_task(self.start())
        stopping = asyncio.get_running_loop().create_task(self._stopping.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start that failed raises here
                await stopping
            else:  # stopped while still waiting for the broker
                starting.cancel()
                await asyncio.wait({starting})
        finally:
            stopping.cancel()
            await self._shutdown()

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (safe from a signal handler)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Shut down now: end every task (consumers get END_OF_STREAM), go offline."""
        self._stopping.set()
        starting = self._starting
        if starting is not None and starting is not asyncio.current_task():
            starting.cancel()
        await self._shutdown()

    async def _shutdown(self) -> None:
        # Once, however many callers: each returns when it is complete.
        if self._shutdown_job is None:
            self._shutdown_job = asyncio.get_running_loop().create_task(self._shut_down())
        await asyncio.shield(self._shutdown_job)

    async def _shut_down(self) -> None:
        sdnotify.stopping()
        log.info("agent %s stopping: ending %d tasks", self.id, len(self.remote_tasks))
        self.requests.cancel_all()
        await self.api.aclose()  # every task ends; its publisher sends the end message
        publishers = self.remote_tasks.publishers()
        if publishers:
            await asyncio.wait(publishers, timeout=PUBLISHER_STOP_S)
        for job in list(self._background):
            job.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.leases.close()
        final = [*self.presence.last_words(), self.health_reporter.cleared()]
        await self.link.close(final=final)
        self.spool.close()
        log.info("agent %s stopped", self.id)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        job = asyncio.get_running_loop().create_task(coro, name=f"agent-{name}")
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    def _on_connect(self, session_present: bool) -> None:
        # After every (re)connect: the will may have said "offline" meanwhile. Not before
        # the first subscriptions (see _start): a client that sees the birth may send a
        # request at once, and a request to a topic nobody subscribes to is lost.
        if self._subscribed:
            self.presence.announce()
        self.outbox.resume()
        # Leases: whoever owns a task must show up again (or still be there).
        for lease in self.remote_tasks.leases():
            self.leases.renew(lease)

    def _on_message(self, message: Incoming) -> None:
        if message.topic in self._v1_rpc:
            self.requests.answer_v1(message)
            return
        root, agent, kind, client = self.topics.levels(message.topic, 4)
        if root == "agents" and agent == self.id and kind == "rpc":
            self.requests.on_request(client, message, stopping=self._stopping.is_set())
        elif root == "clients" and kind == "state" and client == "":
            # levels: clients/{client}/state
            self.leases.on_state_message(agent, message.payload, message.retain)
        elif root == "clients" and kind == "discover" and client == "":
            self.presence.on_discover(stopping=self._stopping.is_set())

    # -- methods -------------------------------------------------------------------------

    async def _call(self, request: Request, codec: str) -> Any:
        """Serve a request as protocol.TABLE declares its method."""
        method = TABLE[request.method]  # parse_request allows declared methods only
        if method.served_by == "agent":
            return await getattr(self, f"_serve_{method.name}")(request, codec)
        # The API's method of the same name; the paging parameters are the agent's.
        params = {k: v for k, v in request.params.items() if k in method.params}
        result = await getattr(self.api, method.name)(**params)
        assert method.result is not None
        return method.result.to_wire(result)

    # The methods the agent serves itself (served_by="agent" in protocol.TABLE): they
    # involve the asking client (ownership) or the agent's own state.

    async def _serve_replay_collection_stream(self, request: Request, codec: str) -> Any:
        return await self.remote_tasks.start(request, codec)

    async def _serve_proxy_live_stream(self, request: Request, codec: str) -> Any:
        return await self.remote_tasks.start(request, codec)

    async def _serve_stop_task(self, request: Request, codec: str) -> Any:
        return await self.remote_tasks.stop(request.params["task_id"], request.client)

    async def _serve_list_tasks(self, request: Request, codec: str) -> Any:
        return self.remote_tasks.of_client(request.client)

    async def _serve_control_task(self, request: Request, codec: str) -> Any:
        return await self.remote_tasks.control(request)

    async def _serve_clock(self, request: Request, codec: str) -> Any:
        return read_clocks(self.clock_shift)

    # -- health --------------------------------------------------------------------------

    def health(self, system: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The health message (published as JSON, retained, on the health topic).

        Args:
            system: the box's readings (:func:`.health.system_readings`); read here
                when omitted. The health loop reads them in a thread (files in /sys).
        """
        return self.health_reporter.message(system)


def _checked_agent_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"agent id {value!r} cannot be used in topics",
            key="agent.id",
            fix="use 1 to 64 letters, digits, '_', '.' or '-'",
        )
    return value
