"""The agent: serves one box's collections and live nodes to every client behind a broker.

It answers RPC requests with the local :class:`~streaminghub_datamux.API`, so remote
tasks run through exactly the same task code as local ones, and publishes each task's
frames and control messages (docs/protocol.md). Around that it keeps:

- presence: a retained birth message, with a last will for when it vanishes;
- leases: a client that disappears has its tasks stopped (docs/agent.md, "Leases");
- store-and-forward: while the broker is away, QoS 1 messages wait in an on-disk spool;
- health: counters, driver states, CPU, memory, disk, temperature and clock sync, as
  JSON (readable in ``mosquitto_sub``), retained, every ``agent.health_interval_s``, and
  cleared (an empty retained message) on a clean shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..api import API
from ..clocks import CLOCKS, injected_offset, read_clocks
from ..codec import CODECS, codec_of, decode, encode, encode_frame
from ..config import Config
from ..dirs import state_dir as default_state_dir
from ..errors import (
    ConfigError,
    DatamuxError,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from ..framing import Framing
from ..host import default_agent_id
from ..model import Frame, Stream, StreamAck, StreamError, StreamStatus
from ..mqttio import BrokerSettings, Incoming, MqttLink, Will
from ..paging import Pager
from ..protocol import (
    ID_PATTERN,
    PROTOCOL_VERSION,
    TABLE,
    Request,
    Topics,
    ctrl_end,
    ctrl_error,
    ctrl_status,
    error_reply,
    is_id,
    ok_reply,
    parse_request,
    request_id_of,
)
from ..util import END_OF_STREAM, describe_error
from . import sdnotify
from .health import system_readings
from .leases import LeaseBook
from .spool import Spool

__all__ = ["Agent", "default_agent_id", "default_state_dir"]

log = logging.getLogger(__name__)

MAX_CONCURRENT_REQUESTS = 32
DISCOVER_COALESCE_S = 0.05
# Requests up to this many times the limit are still decoded, to address the error reply.
OVERSIZE_DECODE_FACTOR = 4
PUBLISHER_STOP_S = 5.0
CTRL_QOS = 1  # end, error and status messages are never dropped
# Health is for people and scripts as much as for clients: JSON, whatever agent.codec says.
HEALTH_CODEC = "json"
# Room for a frame's fields other than its arrays (task id, seq, dtype, tags, lengths).
FRAME_HEADER_BYTES = 512


@dataclass
class RemoteTask:
    """A task started over MQTT: where its messages go and who owns it."""

    id: str
    owner: str
    session: str  # the owner's connection that started it: its lease
    qos: int
    codec: str
    stream_id: str
    publisher: asyncio.Task[None] | None = None
    ended_by: str | None = None  # why the agent ended it (a lease), for the client
    stop_requested: bool = False  # a stop that came while the task was starting
    frames: int = 0
    samples: int = 0
    next_seq: int = 0  # of the next frame: status messages carry it to keep their place
    live: bool = False  # timestamps on this host's clocks (a replay's are the recording's)
    started: float = field(default_factory=time.time)


@dataclass
class Counters:
    """What the agent has done since it started (published in its health messages)."""

    frames: int = 0
    samples: int = 0
    frames_dropped: int = 0  # QoS 0 frames that met no connection
    requests: int = 0
    bad_requests: int = 0
    unidentified_requests: int = 0  # on a topic that names no valid client: not answered
    v1_requests: int = 0  # from protocol v1 peers: answered with an error


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
        self.max_tasks = int(config.get("agent.max_tasks"))
        self.max_frame_bytes = int(config.get("agent.max_frame_bytes"))
        self.pager = Pager()  # listings larger than one message go out in pages
        self.health_interval_s = float(config.get("agent.health_interval_s"))
        self.drain_per_s = float(config.get("agent.spool_drain_per_s"))
        folder = state_dir or config.get("agent.state_dir") or default_state_dir()
        self.spool = Spool(
            Path(folder) / "spool" / self.id,
            max_bytes=int(float(config.get("agent.spool_max_mb")) * (1 << 20)),
        )
        self.counters = Counters()
        self.link = MqttLink(
            f"dm-agent-{self.id}",
            self.settings,
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=Will(self.topics.agent_state(self.id), self._state("offline")),
        )
        self._tasks: dict[str, RemoteTask] = {}
        self._v1_rpc: list[str] = []
        # A flood of bad requests must not flood the journal (an SD card) too.
        self._bad_log = RateLimitedLog(log, per_window=20, window_s=10.0)
        self.leases = LeaseBook(
            self._owns_tasks,
            lambda: self.link.connected,
            self._release,
            default_keepalive_s=self.settings.keepalive_s,
            will_grace_s=float(config.get("agent.will_grace_s")),
        )
        self._requests: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._spool_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._starting: asyncio.Task[Any] | None = None
        self._shutdown_job: asyncio.Task[None] | None = None
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._summary: tuple[list[str], list[str]] = ([], [])  # node and collection ids
        self._discover_answer: asyncio.TimerHandle | None = None
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
        self._announce(self._birth(*self._summary))
        self._spawn(self._health_loop(), "health")
        self._spawn(self._drain_spool(), "spool")
        self._spawn(self._announce_nodes(), "announce")
        if len(self.spool):
            log.info("%d spooled messages from before; sending them", len(self.spool))
            self._spool_ready.set()
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
        log.info("agent %s stopping: ending %d tasks", self.id, len(self._tasks))
        for request in list(self._requests):
            request.cancel()
        await self.api.aclose()  # every task ends; its publisher sends the end message
        publishers = [t.publisher for t in self._tasks.values() if t.publisher is not None]
        if publishers:
            await asyncio.wait(publishers, timeout=PUBLISHER_STOP_S)
        for job in list(self._background):
            job.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.leases.close()
        if self._discover_answer is not None:
            self._discover_answer.cancel()
        # `since`: when it went offline (the will, made at start, cannot know).
        offline = self._state("offline", since=time.time())
        final = [
            (topic, offline, 1, True)
            for topic in (self.topics.agent_state(self.id), self.topics.v1_state(self.id))
            if topic
        ]
        # An empty retained message deletes the retained health: no stale readings.
        final.append((self.topics.agent_health(self.id), b"", 1, True))
        await self.link.close(final=final)
        self.spool.close()
        log.info("agent %s stopped", self.id)

    def _spawn(self, coro: Any, name: str) -> None:
        job = asyncio.get_running_loop().create_task(coro, name=f"agent-{name}")
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    # -- presence ------------------------------------------------------------------------

    def _state(self, state: str, **extra: Any) -> bytes:
        message = {"state": state, "agent": self.id, "boot": self.boot, **extra}
        return encode(message, self.codec)

    def _birth(self, nodes: list[str] | None = None, collections: list[str] | None = None) -> bytes:
        return self._state(
            "online",
            version=__version__,
            protocol=PROTOCOL_VERSION,
            codecs=list(CODECS),
            since=self.started,
            nodes=nodes or [],
            collections=collections or [],
            drivers=self._driver_states(),
            # Live timestamps are on this clock ("lsl" for streams proxied from LSL);
            # the `clock` method reads every clock in `clocks` (docs/remote-api.md).
            clock="unix",
            clocks=list(CLOCKS),
        )

    def _driver_states(self) -> list[dict[str, Any]]:
        return [status.to_dict() for status in self.api.driver_states()]

    def _announce(self, birth: bytes) -> None:
        self.link.publish_nowait(self.topics.agent_state(self.id), birth, qos=1, retain=True)
        v1_state = self.topics.v1_state(self.id)
        if v1_state:  # a v1 client then asks, and learns that it must upgrade
            self.link.publish_nowait(v1_state, birth, qos=1, retain=True)

    def _on_connect(self, session_present: bool) -> None:
        # After every (re)connect: the will may have said "offline" meanwhile. Not before
        # the first subscriptions (see _start): a client that sees the birth may send a
        # request at once, and a request to a topic nobody subscribes to is lost.
        if self._subscribed:
            self._announce(self._birth(*self._summary))
        if len(self.spool):
            self._spool_ready.set()
        # Leases: whoever owns a task must show up again (or still be there).
        for lease in {lease_key(t.owner, t.session) for t in self._tasks.values()}:
            self.leases.renew(lease)

    async def _announce_nodes(self) -> None:
        """Publish the birth message again with node and collection ids, once known."""
        try:
            nodes = [n.id for n in await self.api.list_live_nodes()]
            collections = [c.id for c in await self.api.list_collections()]
        except Exception as exc:  # a broken driver must not keep the agent from serving
            log.warning("listing nodes for the birth message failed: %s", exc)
            return
        self._summary = (nodes, collections)
        self._announce(self._birth(nodes, collections))

    # -- incoming messages ---------------------------------------------------------------

    def _on_message(self, message: Incoming) -> None:
        if message.topic in self._v1_rpc:
            self._answer_v1(message)
            return
        root, agent, kind, client = self.topics.levels(message.topic, 4)
        if root == "agents" and agent == self.id and kind == "rpc":
            self._on_request(client, message)
        elif root == "clients" and kind == "state" and client == "":
            self._on_client_state(agent, message)  # levels: clients/{client}/state
        elif root == "clients" and kind == "discover" and client == "":
            self._on_discover()

    def _on_discover(self) -> None:
        """A client looks for agents: announce again, for brokers that do not deliver
        the retained birth (docs/protocol.md, "Discovery"). Requests within
        DISCOVER_COALESCE_S share one answer, so a flood of them costs one message."""
        if self._discover_answer is not None or self._stopping.is_set():
            return

        def answer() -> None:
            self._discover_answer = None
            self.link.publish_nowait(
                self.topics.agent_state(self.id), self._birth(*self._summary), qos=1
            )

        loop = asyncio.get_running_loop()
        self._discover_answer = loop.call_later(DISCOVER_COALESCE_S, answer)

    def _on_request(self, client: str, message: Incoming) -> None:
        """A request from ``client``: the topic level the broker let that client write."""
        self.counters.requests += 1
        if not is_id(client):
            # No identity we could answer to: log and count, never reply elsewhere.
            self.counters.bad_requests += 1
            self.counters.unidentified_requests += 1
            self._bad_log.warning(
                "ignored a request on %r: no valid client id in the topic", message.topic[:200]
            )
            return
        if len(self._requests) >= MAX_CONCURRENT_REQUESTS or self._stopping.is_set():
            why = "agent is stopping" if self._stopping.is_set() else "too many requests at once"
            self._reply_error(client, message, "unavailable", why)
            return
        job = asyncio.get_running_loop().create_task(self._serve_request(client, message))
        self._requests.add(job)
        job.add_done_callback(self._requests.discard)

    async def _serve_request(self, client: str, message: Incoming) -> None:
        codec = codec_of(message.payload)
        size = len(message.payload)
        if size > self.max_request_bytes:
            self.counters.bad_requests += 1
            text = f"request of {size} bytes exceeds the limit of {self.max_request_bytes}"
            self._bad_log.warning("refused a request of client %s: %s", client, text)
            self._reply_error(client, message, "invalid_request", text)
            return
        try:
            decoded = decode(message.payload)
        except InvalidRequest as exc:
            self.counters.bad_requests += 1
            self._bad_log.warning("refused a malformed request of client %s: %s", client, exc)
            self._reply_error(client, message, exc.code, str(exc), decodable=False)
            return
        request_id = request_id_of(decoded)
        try:
            request = _parse(decoded, client)
            lease = lease_key(client, request.session)
            if self._owns_tasks(lease):
                self.leases.renew(lease)  # a request is a sign of life too
            result = await self._call(request, codec)
            if TABLE[request.method].paged:
                budget = self.pager.budget(self.link.max_packet_size)
                result = self.pager.reply(request.client, request.params, result, codec, budget)
            reply = ok_reply(request.id, result)
        except DatamuxError as exc:
            if isinstance(exc, InvalidRequest):
                self.counters.bad_requests += 1
            log.info("request %r of client %s failed: %s", request_id, client, exc)
            reply = error_reply(request_id, exc.code, str(exc))
        except asyncio.CancelledError:
            # The agent is stopping: the request still gets its one answer.
            reply = error_reply(request_id, "unavailable", "the agent is stopping")
            self._reply(client, message, reply, codec)
            raise
        except Exception as exc:
            code, text = describe_error(exc)
            log.exception("request %r of client %s failed", request_id, client)
            reply = error_reply(request_id, code, text)
        self._reply(client, message, reply, codec)

    def _reply_error(
        self, client: str, message: Incoming, code: str, text: str, *, decodable: bool = True
    ) -> None:
        request_id = None
        if decodable and len(message.payload) <= self.max_request_bytes * OVERSIZE_DECODE_FACTOR:
            with contextlib.suppress(InvalidRequest):
                request_id = request_id_of(decode(message.payload))
        self._reply(client, message, error_reply(request_id, code, text), codec_of(message.payload))

    def _reply(self, client: str, message: Incoming, reply: dict[str, Any], codec: str) -> None:
        """Answer on the client's own reply topic, the only place a reply ever goes.

        Nothing in the request (a payload field, an MQTT 5 Response Topic) can name
        another: the topic comes from the level the broker let this client write.
        """
        try:
            payload = encode(reply, codec)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. NaN metadata in JSON
            log.warning("reply to %r cannot be encoded: %s", reply.get("id"), exc)
            text = f"the reply cannot be encoded in {codec}: {exc}"
            payload = encode(error_reply(reply.get("id"), "internal", text), codec)
        topic = self.topics.reply(self.id, client)
        self.link.publish_nowait(topic, payload, qos=1, correlation=message.correlation)

    def _answer_v1(self, message: Incoming) -> None:
        """A protocol v1 request: a clear error, so that an old client is not left waiting.

        v1 clients listen on ``{p}/clients/{client}/rpc`` only. The error goes there, and
        nowhere else: the payload's client id, in the prefix the request came on. Its
        text is fixed, and v2 peers never read that topic (v2 ACLs do not even let an
        agent write it).
        """
        self.counters.requests += 1
        self.counters.bad_requests += 1
        self.counters.v1_requests += 1
        prefix = message.topic.rsplit("/agents/", 1)[0]
        decoded: Any = None
        if len(message.payload) <= self.max_request_bytes:
            with contextlib.suppress(InvalidRequest):
                decoded = decode(message.payload)
        client = decoded.get("client") if isinstance(decoded, Mapping) else None
        self._bad_log.warning(
            "a protocol v1 request on %s (client %s)", message.topic, _short_id(client)
        )
        if not is_id(client) or decoded.get("reply_to") != f"{prefix}/clients/{client}/rpc":
            return
        text = (
            f"agent {self.id} speaks protocol v{PROTOCOL_VERSION} under {self.topics.prefix}; "
            "this client speaks v1: upgrade streaminghub-datamux (docs/protocol.md, Versioning)"
        )
        reply = error_reply(request_id_of(decoded), "invalid_request", text)
        payload = encode(reply, codec_of(message.payload))
        self.link.publish_nowait(f"{prefix}/clients/{client}/rpc", payload, qos=1)

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
        return await self._start_task(request, codec)

    async def _serve_proxy_live_stream(self, request: Request, codec: str) -> Any:
        return await self._start_task(request, codec)

    async def _serve_stop_task(self, request: Request, codec: str) -> Any:
        return await self._stop_task(request.params["task_id"], request.client)

    async def _serve_list_tasks(self, request: Request, codec: str) -> Any:
        return [self._describe(t) for t in self._tasks.values() if t.owner == request.client]

    async def _serve_control_task(self, request: Request, codec: str) -> Any:
        return await self._control_task(request)

    async def _serve_clock(self, request: Request, codec: str) -> Any:
        return read_clocks(self.clock_shift)

    async def _start_task(self, request: Request, codec: str) -> dict[str, Any]:
        params = dict(request.params)
        task_id = params.pop("task_id")
        qos = params.pop("qos", 1)
        if len(self._tasks) >= self.max_tasks:
            raise Unavailable(f"agent {self.id} runs {len(self._tasks)} tasks, its limit")
        if task_id in self._tasks:
            raise InvalidRequest(f"task id {task_id!r} is in use; choose a new one")
        sink: asyncio.Queue[Any] = asyncio.Queue()
        attrs = params.pop("attrs", {})
        remote = RemoteTask(
            task_id, request.client, request.session, qos, codec, params["stream_id"]
        )
        remote.live = request.method == "proxy_live_stream"
        self._tasks[task_id] = remote
        try:
            stream = await self._stream_of(request.method, params)
            params["framing"] = self._fit_framing(stream, params.get("framing"), attrs)
            start: Callable[..., Awaitable[StreamAck]]
            if request.method == "replay_collection_stream":
                start, source = self.api.replay_collection_stream, params.pop("collection_id")
            else:
                start, source = self.api.proxy_live_stream, params.pop("node_id")
            ack = await start(
                source,
                params.pop("stream_id"),
                attrs,
                sink,
                owner=request.client,
                task_id=task_id,
                **params,
            )
        except BaseException:
            del self._tasks[task_id]
            raise
        remote.publisher = asyncio.get_running_loop().create_task(
            self._publish_task(remote, sink), name=f"publish-{task_id}"
        )
        if remote.stop_requested:
            await self.api.stop_task(task_id)
        self.leases.renew(lease_key(request.client, request.session))
        log.info("task %s for %s: %s", task_id, request.client, request.method)
        return {"randseq": ack.randseq, "status": ack.status}

    async def _stream_of(self, method: str, params: Mapping[str, Any]) -> Stream:
        """The stream a task request names (NotFound if it does not exist)."""
        if method == "replay_collection_stream":
            return await asyncio.to_thread(
                self.api.get_collection_stream, params["collection_id"], params["stream_id"]
            )
        for stream in await self.api.list_live_streams(params["node_id"]):
            if stream.id == params["stream_id"]:
                return stream
        raise NotFound(f"node {params['node_id']!r} has no stream {params['stream_id']!r}")

    def _fit_framing(self, stream: Stream, asked: Any, attrs: Mapping[str, Any]) -> Framing:
        """The requested framing, with frames capped to what one MQTT message may carry.

        A broker drops a client that publishes a packet over its limit, and QoS 1 would
        resend it after every reconnect: such a frame must never be built.
        """
        framing = Framing.coerce(asked) if asked is not None else self.api.framing
        limit = self.max_frame_bytes
        if self.link.max_packet_size:
            limit = min(limit, self.link.max_packet_size)
        dtype = stream.dtype
        if dtype.kind == "U":
            return framing  # strings vary in size; checked when published
        header = FRAME_HEADER_BYTES + len(encode({"c": stream.channels, "a": dict(attrs)}, "cbor"))
        per_sample = 8 + len(stream.channels) * dtype.itemsize
        fitting = max(1, (limit - header) // per_sample)
        if framing.max_samples <= fitting:
            return framing
        return Framing(max_samples=fitting, max_latency_ms=framing.max_latency_ms)

    async def _stop_task(self, task_id: str, client: str) -> dict[str, Any]:
        remote = self._tasks.get(task_id)
        if remote is not None and remote.owner != client:
            raise Forbidden(f"task {task_id!r} belongs to another client")
        if remote is None and not any(t.id == task_id for t in self.api.tasks()):
            await self.api.stop_task(task_id)  # an ended task: a no-op; unknown: NotFound
            return {"randseq": task_id, "status": True}
        if remote is None:
            raise Forbidden(f"task {task_id!r} was started locally, not by a client")
        if remote.publisher is None:
            # Still starting (the client gave up waiting): stopped as soon as it starts.
            remote.stop_requested = True
            return {"randseq": task_id, "status": True}
        await self.api.stop_task(task_id)
        if remote.publisher is not None:
            # The end message is published before the reply, so it reaches the client first.
            await asyncio.wait({remote.publisher}, timeout=PUBLISHER_STOP_S)
        return {"randseq": task_id, "status": True}

    async def _control_task(self, request: Request) -> dict[str, Any]:
        """Steer a replay this client started (docs/replay-control.md)."""
        params = dict(request.params)
        task_id, action = params.pop("task_id"), params.pop("action")
        remote = self._tasks.get(task_id)
        if remote is None:
            raise NotFound(f"no running task {task_id!r} on agent {self.id}")
        if remote.owner != request.client:
            raise Forbidden(f"task {task_id!r} belongs to another client")
        return await self.api.control_task(task_id, action, **params)

    def _describe(self, remote: RemoteTask) -> dict[str, Any]:
        return {
            "task_id": remote.id,
            "owner": remote.owner,
            "qos": remote.qos,
            "frames": remote.frames,
            "samples": remote.samples,
            "started": remote.started,
        }

    # -- publishing ----------------------------------------------------------------------

    async def _publish_task(self, remote: RemoteTask, sink: asyncio.Queue[Any]) -> None:
        # The owner is in the topic: the broker can let only that client read it.
        data = self.topics.task_data(self.id, remote.owner, remote.id)
        ctrl = self.topics.task_ctrl(self.id, remote.owner, remote.id)
        try:
            while True:
                item = await sink.get()
                if isinstance(item, Frame):
                    remote.next_seq = item.seq + 1
                    if self.clock_shift and remote.live:
                        item.timestamps = item.timestamps + self.clock_shift  # test hook
                    payload = encode_frame(item, remote.id, remote.codec)
                    if self._too_big(payload):
                        await self._send(
                            ctrl, encode(self._oversize(remote, item, payload), remote.codec)
                        )
                        continue
                    await self._send(data, payload, remote.qos)
                    remote.frames += 1
                    remote.samples += len(item)
                    self.counters.frames += 1
                    self.counters.samples += len(item)
                elif isinstance(item, StreamStatus):
                    status = ctrl_status(remote.id, item, remote.next_seq)
                    await self._send(ctrl, encode(status, remote.codec))
                elif isinstance(item, StreamError):
                    await self._send(ctrl, encode(ctrl_error(remote.id, item), remote.codec))
                elif item is END_OF_STREAM:
                    if remote.ended_by:
                        why = StreamError(remote.stream_id, "unavailable", remote.ended_by)
                        await self._send(ctrl, encode(ctrl_error(remote.id, why), remote.codec))
                    end = ctrl_end(remote.id, remote.frames, remote.samples)
                    await self._send(ctrl, encode(end, remote.codec))
                    return
        except Exception as exc:
            log.exception("publisher of task %s failed", remote.id)
            await self.api.stop_task(remote.id)
            # The consumer must still hear the end of its task.
            failure = StreamError(remote.stream_id, *describe_error(exc))
            with contextlib.suppress(Exception):
                await self._send(ctrl, encode(ctrl_error(remote.id, failure), "cbor"))
                end = ctrl_end(remote.id, remote.frames, remote.samples)
                await self._send(ctrl, encode(end, "cbor"))
        finally:
            self._tasks.pop(remote.id, None)

    def _too_big(self, payload: bytes) -> bool:
        limit = self.link.max_packet_size
        return limit is not None and len(payload) > limit - FRAME_HEADER_BYTES

    def _oversize(self, remote: RemoteTask, frame: Frame, payload: bytes) -> dict[str, Any]:
        reason = (
            f"{len(frame)} samples dropped: a frame of {len(payload)} bytes exceeds the "
            f"broker's maximum packet size ({self.link.max_packet_size})"
        )
        log.warning("task %s: %s", remote.id, reason)
        return ctrl_status(remote.id, StreamStatus(frame.stream_id, "dropped", reason))

    async def _send(self, topic: str, payload: bytes, qos: int = CTRL_QOS) -> None:
        """Publish; QoS 1 goes to the spool while the broker is away (or the spool drains)."""
        if qos == 1 and (len(self.spool) or not self.link.connected):
            self._to_spool(topic, payload)
            return
        if await self.link.publish(topic, payload, qos):
            return
        if qos == 1:
            self._to_spool(topic, payload)
        else:
            self.counters.frames_dropped += 1

    def _to_spool(self, topic: str, payload: bytes) -> None:
        self.spool.append(topic, payload, 1)
        self._spool_ready.set()

    async def _drain_spool(self) -> None:
        """Send spooled messages, oldest first, at most ``agent.spool_drain_per_s``."""
        while True:
            try:
                await self._drain_spool_until_error()
            except Exception:  # a disk error must not stop the drain for good
                log.exception("sending spooled messages failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _drain_spool_until_error(self) -> None:
        batch = 32
        while True:
            await self._spool_ready.wait()
            if not len(self.spool):
                self._spool_ready.clear()
                continue
            if not self.link.connected:
                await asyncio.sleep(0.1)
                continue
            began = time.monotonic()
            messages = self.spool.peek(batch)
            sent = 0
            for message in messages:
                if not await self.link.publish(message.topic, message.payload, message.qos):
                    break
                sent += 1
            self.spool.commit(sent)
            if sent < len(messages):
                continue
            # Rate limit: a reconnecting fleet must not flood the broker.
            await asyncio.sleep(max(0.0, sent / self.drain_per_s - (time.monotonic() - began)))

    # -- leases (agent/leases.py) ---------------------------------------------------------

    def _on_client_state(self, client: str, message: Incoming) -> None:
        """A presence message, on the topic only ``client`` may write (ACL profiles).

        Its ``session`` (one of the client's connections) picks the lease: one user
        with two notebooks loses only the tasks of the one that went away. An empty
        message (a cleared presence) concerns the connection without a session.
        """
        if not ID_PATTERN.fullmatch(client) or len(message.payload) > self.max_request_bytes:
            return
        state: Mapping[str, Any] = {}
        if message.payload:
            try:
                decoded = decode(message.payload)
            except InvalidRequest:
                log.warning("unreadable state message of client %s", client)
                return
            state = decoded if isinstance(decoded, Mapping) else {}
            session = state.get("session", "")
            if (
                state.get("state") not in ("online", "offline")
                or state.get("client", client) != client
                or not (session == "" or is_id(session))
            ):
                return  # not a presence message of this client
        lease = lease_key(client, state.get("session", ""))
        self.leases.on_presence(lease, state, message.retain)

    def _owns_tasks(self, lease: str) -> bool:
        return any(lease_key(t.owner, t.session) == lease for t in self._tasks.values())

    def _release(self, lease: str, why: str) -> None:
        owned = [t for t in self._tasks.values() if lease_key(t.owner, t.session) == lease]
        client = lease.split("#", 1)[0]
        if owned:
            log.info("stopping %d tasks of client %s: %s", len(owned), client, why)
        for remote in owned:
            # Should the client still be there after all, it learns why its task ended.
            remote.ended_by = f"the agent ended the task: client {client} {why}"
            self._spawn(self.api.stop_task(remote.id), f"release-{remote.id}")

    # -- health --------------------------------------------------------------------------

    def health(self, system: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The health message (published as JSON, retained, on the health topic).

        Args:
            system: the box's readings (:func:`.health.system_readings`); read here
                when omitted. The health loop reads them in a thread (files in /sys).
        """
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._cpu_mark[0]
        cpu_percent = 100.0 * (cpu - self._cpu_mark[1]) / wall if wall > 0 else 0.0
        self._cpu_mark = (now, cpu)
        counters = self.counters
        return {
            "agent": self.id,
            "boot": self.boot,
            "version": __version__,
            "time": time.time(),
            "uptime_s": time.time() - self.started,
            "tasks": len(self._tasks),
            "frames": counters.frames,
            "samples": counters.samples,
            "frames_dropped": counters.frames_dropped,
            "samples_dropped": sum(t.samples_dropped for t in self.api.tasks()),
            "requests": counters.requests,
            "bad_requests": counters.bad_requests,
            "unidentified_requests": counters.unidentified_requests,
            "v1_requests": counters.v1_requests,
            "spool_messages": len(self.spool),
            "spool_bytes": self.spool.depth_bytes,
            "spool_dropped": self.spool.dropped,
            "broker_disconnects": self.link.disconnects,
            "cpu_percent": round(cpu_percent, 1),
            "rss_mb": round(rss_bytes() / (1 << 20), 1),
            "drivers": self._driver_states(),
            "task_list": [self._task_health(t) for t in self._tasks.values()],
            **(system if system is not None else system_readings(self.spool.directory)),
        }

    def _task_health(self, remote: RemoteTask) -> dict[str, Any]:
        elapsed = max(time.time() - remote.started, 1e-3)
        local = next((t for t in self.api.tasks() if t.id == remote.id), None)
        return {
            **self._describe(remote),
            "stream": remote.stream_id,
            "rate_hz": round(remote.samples / elapsed, 1),
            "samples_dropped": local.samples_dropped if local is not None else 0,
        }

    async def _health_loop(self) -> None:
        watchdog = sdnotify.watchdog_interval()
        interval = min(self.health_interval_s, watchdog) if watchdog else self.health_interval_s
        next_health = 0.0
        announced = self._driver_states()
        shown = f"serving as {self.id} on {self.settings.address}"  # what READY=1 said
        while True:
            if watchdog:
                sdnotify.watchdog_ping()
            self._bad_log.flush()
            # The spool syncs on its own calls only; this bounds what a power cut can take.
            self.spool.sync()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + self.health_interval_s
                system = await asyncio.to_thread(system_readings, self.spool.directory)
                health = self.health(system)
                payload = encode(health, HEALTH_CODEC)
                self.link.publish_nowait(
                    self.topics.agent_health(self.id), payload, qos=0, retain=True
                )
                self._announce_if_drivers_changed(announced, health["drivers"])
                announced = health["drivers"]
                shown = self._show_status(shown)
            await asyncio.sleep(interval)

    def _show_status(self, shown: str) -> str:
        """systemd's STATUS= (``systemctl status``): serving, or why the broker is away."""
        text = f"serving as {self.id} on {self.settings.address}"
        if not self.link.connected:
            text = f"broker {self.settings.address} away: {self.link.problem or 'reconnecting'}"
        if text != shown:
            sdnotify.status(text)
        return text

    def _announce_if_drivers_changed(
        self, before: list[dict[str, Any]], now: list[dict[str, Any]]
    ) -> None:
        """A driver that came up (or went down) shows in the retained birth message too."""
        if [(d["name"], d["state"]) for d in before] == [(d["name"], d["state"]) for d in now]:
            return
        self._spawn(self._announce_nodes(), "announce")


def _parse(message: Any, client: str) -> Request:
    """parse_request, with hostile shapes (huge numbers, cycles) as InvalidRequest."""
    try:
        return parse_request(message, client)
    except (RecursionError, OverflowError) as exc:
        raise InvalidRequest(f"malformed request: {type(exc).__name__}") from None


class RateLimitedLog:
    """Warnings, at most ``per_window`` every ``window_s``; then one line says how many
    were left out (they are still counted in health)."""

    def __init__(self, logger: logging.Logger, per_window: int, window_s: float) -> None:
        self.logger = logger
        self.per_window = per_window
        self.window_s = window_s
        self._window_start = 0.0
        self._logged = 0
        self._skipped = 0

    def warning(self, text: str, *args: Any) -> None:
        self.flush()
        if self._logged < self.per_window:
            self._logged += 1
            self.logger.warning(text, *args)
        else:
            self._skipped += 1

    def flush(self) -> None:
        """Start a new window once the last is over, saying how many were left out."""
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self._skipped:
                self.logger.warning("%d more bad requests were not logged", self._skipped)
            self._window_start, self._logged, self._skipped = now, 0, 0


def lease_key(client: str, session: str) -> str:
    """A lease is per client connection: ``client#session`` ("#" is never in an id)."""
    return f"{client}#{session}"


def _short_id(value: Any) -> str:
    return repr(value[:64]) if isinstance(value, str) else type(value).__name__


def _checked_agent_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"agent id {value!r} cannot be used in topics",
            key="agent.id",
            fix="use 1 to 64 letters, digits, '_', '.' or '-'",
        )
    return value


def rss_bytes() -> int:
    """Resident memory now (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
